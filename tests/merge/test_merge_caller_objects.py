"""No hidden mutation: a merger or composition never changes the caller's inputs, residuals or pristine mapping.

Each check compares the caller's objects (identity, scale, device, dict contents) before and after; the merged
values themselves are compared with a fresh merge (bit-exact: same engine, same inputs, same order of operations)."""

import torch

from weightlab import load
from weightlab.files import state_dict_hash
from weightlab.merge import Composition, Input, Merger, _model_for


def _inputs(tiny):
    return [Input(load(tiny.style_lora_kohya), "style", 0.8, "style"),
            Input(load(tiny.accel_lora), "image_accel", 1.0, "accel"),
            Input(load(tiny.motion_dir), "motion", 1.0, "motion"),
            Input(load(tiny.style_dense, kind="style"), "style", 0.5, "dense")]


def test_set_scale_leaves_the_callers_input_unchanged(tiny):
    base = load(tiny.base_dir)
    inputs = _inputs(tiny)
    model = _model_for(base, inputs[2].residual, device="cpu")
    merger = Merger(model, base, inputs).load_all()
    merger.set_scale(1, 0.25)
    merger.set_scale(-1, 0.1)  # indices count in the order given, negative ones too
    assert [t.scale for t in inputs] == [0.8, 1.0, 1.0, 0.5]  # the caller's terms keep their scales
    expected = _inputs(tiny)  # what the re-weighted model must equal: a fresh merge at the new scales
    expected[1].scale, expected[3].scale = 0.25, 0.1
    fresh = _model_for(base, inputs[2].residual, device="cpu")
    Merger(fresh, base, expected).load_all()
    assert state_dict_hash(fresh.state_dict()) == state_dict_hash(model.state_dict())


def test_composition_to_moves_copies_not_the_callers_tensors(tiny):
    base = load(tiny.base_dir)
    inputs = _inputs(tiny)
    lora, dense = inputs[0].residual, inputs[3].residual
    targets, weights, pristine = dict(lora.targets), dict(dense.weights), dict(base.weights)
    factors = {p: (t.down, t.up) for p, t in lora.targets.items()}
    model = _model_for(base, inputs[2].residual)  # meta: shapes only
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    comp = Composition({**base.weights, **inputs[2].residual.weights}, inputs, shapes, family=base.family)
    keys = set(comp.touching)
    comp.to(torch.device("meta"), keys)

    # the composition's own copies moved ...
    assert all(comp.pristine[k].device.type == "meta" for k in keys)
    moved = next(t.residual for t in comp.inputs if t.source == "style")
    assert all(f.down.device.type == "meta" and f.up.device.type == "meta" for f in moved.targets.values())
    assert all(v.device.type == "meta" for v in next(t.residual for t in comp.inputs if t.source == "dense").weights.values())
    # ... the caller's residuals, terms and base did not
    assert inputs[0].residual is lora and inputs[3].residual is dense
    for mine, theirs in ((lora.targets, targets), (dense.weights, weights), (base.weights, pristine)):
        assert mine.keys() == theirs.keys() and all(mine[k] is v for k, v in theirs.items())
    assert all(t.down is factors[p][0] and t.up is factors[p][1] for p, t in lora.targets.items())
    assert all(v.device.type == "cpu" for v in dense.weights.values())
