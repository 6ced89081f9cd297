"""The merge engine: ``w' = w0 + α·τ_style + β·τ_image_accel + γ·τ_motion`` (AnimateLCM Eq. 2), exactly.

Rules (DESIGN.md "Merge engine semantics"):
- every merged value is computed from the pristine ``w0`` (a memory-mapped file or a kept copy), accumulated
  in fp32 and rounded once; unmerge is a copy, re-weighting is a re-merge, term order cannot change a bit;
- everything is validated (family, keys, shapes, finite values) before the first weight is written;
- γ is applied in weight space as the exact scaling of each motion module's ``proj_out`` (weight and bias),
  which scales the zero-initialised residual motion branch by exactly γ;
- a LoRA stays factored (``up @ down`` in the kernel); a DoRA term's residual is its merged weight minus the
  pristine ``w0`` (docs/formats.md "DoRA"); another adapter algebra (LoHa, LoKr, full diff) enters as its dense
  ΔW, computed once per merged tensor (`weightlab.formats.algebra`);
- the per-tensor arithmetic is :func:`weightlab.kernels.merge` (fused Triton kernel on CUDA, PyTorch otherwise).

Entry points: :class:`Merger` (in place into a live diffusers UNet), :func:`build_unet`, :func:`merge_to_file`
and :func:`merge_to_folder` (streamed, one tensor at a time). The other pipeline components a term changes (a
LoRA's text-encoder targets, SDXL's second text encoder; a dense checkpoint's CLIP and baked VAE:
`weightlab.formats.components`) are composed by the same :class:`Composition`, one per component, into the base
pipeline's (:func:`build_component`, :func:`build_text_encoder`, and ``<component>/`` of :func:`merge_to_folder`);
:func:`merge_to_file` writes the UNet only. Sources are paths; a registry reference needs the registry's resolver
(``resolve=``, see :func:`resolve_path`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from weightlab.errors import (MissingComponentError, RecipeError, ShapeMismatchError, UnmatchedKeysError,
                              UnresolvedSourceError, WeightlabError, fmt_keys)
from weightlab.families import best_family, check_fits, is_motion_key
from weightlab.files import release_pages, torch_dtype
from weightlab.formats.components import COMPONENTS
from weightlab.kinds import KIND_ORDER
from weightlab.loading import load
from weightlab.methods import get_method
from weightlab.recipe import Recipe, Term
from weightlab.residuals import Base, Dense, LoRA, LoRATarget, MotionModule, Residual

log = logging.getLogger(__name__)
PROJ_OUT = re.compile(r"\.motion_modules\.\d+\.proj_out\.(weight|bias)$")
TERM_TYPES = {"style": (LoRA, Dense), "image_accel": (LoRA,), "motion": (MotionModule,), "motion_lora": (LoRA,)}
Resolver = Callable[[str], Path]  # a recipe source -> the local file or folder it names


@dataclass(eq=False)
class Input:
    """One resolved term: the residual, its role and its scale. Compared by identity (a residual holds tensors)."""

    residual: Residual
    kind: str
    scale: float
    source: str = ""


def _structure(res: Residual) -> dict[str, int | None]:
    """Parameter name -> rank of what a residual changes (a LoRA factor's rank is its weight's: 2 linear, 4 conv)."""
    if isinstance(res, LoRA):
        return {f"{p}.weight": f.down.dim() if getattr(f, "down", None) is not None else None
                for p, f in res.targets.items()}
    return {k: v.dim() for k, v in res.tensors().items()}


@dataclass
class Composition:
    """Pristine values plus terms, validated; produces one :class:`~weightlab.kernels.MergeItem` per tensor.

    It keeps its own copies of the ``pristine`` mapping and of each :class:`Input` (canonically ordered;
    ``order[i]`` is the position in the given list of ``inputs[i]``), so nothing it does changes the caller's.
    """

    pristine: dict[str, torch.Tensor]  # w0 per key: base weights, then motion-module weights
    inputs: list[Input]
    shapes: dict[str, tuple[int, ...]]  # output key -> shape
    method: str = "linear"
    method_args: dict = field(default_factory=dict)
    family: str | None = "sd15"  # the base's; None: the model fits no known family, shapes alone decide
    component: str = "unet"  # the pipeline component composed: each term enters as its part of it (Residual.component)
    touching: dict[str, list[int]] = field(default_factory=dict)
    order: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Canonical order: identical (kind, source, scale) terms contribute identical values, so ties are harmless.
        self.order = sorted(range(len(self.inputs)),
                            key=lambda i: (KIND_ORDER[self.inputs[i].kind], self.inputs[i].source, self.inputs[i].scale, i))
        self.inputs = [replace(self.inputs[i], residual=self.inputs[i].residual.component(self.component))
                       for i in self.order]
        self.pristine = dict(self.pristine)
        self._combine = get_method(self.method)
        self._validate()

    @property
    def motion(self) -> Input | None:
        return next((t for t in self.inputs if t.kind == "motion"), None)

    def _validate(self) -> None:
        """Family, roles, keys, shapes and finiteness; raises before anything is written."""
        motions = [t for t in self.inputs if t.kind == "motion"]
        if len(motions) > 1:
            raise RecipeError("a recipe can hold one motion module; got " + ", ".join(t.source for t in motions))
        for i, t in enumerate(self.inputs):
            res = t.residual
            if not isinstance(res, TERM_TYPES[t.kind]):
                raise RecipeError(f"{t.source}: a {type(res).__name__} cannot be a {t.kind!r} term. Fix: check the term's kind.")
            if self.family is not None:
                check_fits(_structure(res), res.family, self.family, what=t.source or "a term")
            keys = res.target_keys
            missing = [k for k in keys if k not in self.shapes]
            if missing:
                hint = " (motion keys need a motion term or a video base)" if any(is_motion_key(k) for k in missing) else ""
                raise UnmatchedKeysError(f"{t.source}: {len(missing)} key(s) not in the model{hint}: {fmt_keys(missing)}.", missing)
            self._check_shapes(t)
            res.check_finite()
            if t.kind == "motion":
                continue
            for k in keys:
                self.touching.setdefault(k, []).append(i)
        for k, v in self.pristine.items():
            if k in self.shapes and tuple(v.shape) != self.shapes[k]:
                raise ShapeMismatchError(f"`{k}`: pristine value {tuple(v.shape)} vs model {self.shapes[k]}.")
        absent = [k for k in self.shapes if k not in self.pristine]
        if absent:
            raise UnmatchedKeysError(f"no base value for {len(absent)} model key(s): {fmt_keys(absent)}. "
                                     "Fix: add the motion module as a `motion` term.", absent)
        if self.method != "linear" and sum(t.kind == "style" for t in self.inputs) < 1:
            raise RecipeError(f"method {self.method!r} combines style terms; the recipe has none.")

    def _check_shapes(self, t: Input) -> None:
        res = t.residual
        bad = []
        if isinstance(res, LoRA):
            for path, f in res.targets.items():
                shape = self.shapes[f"{path}.weight"]
                if (why := f.misfit(shape)) is not None:
                    bad.append(f"{path}: {why}")
                elif f.magnitude is not None and not f.magnitude_fits(shape):
                    bad.append(f"{path}: DoRA magnitude {tuple(f.magnitude.shape)} vs weight {shape}")
                elif "bias" in f.params and (f.bias_delta().shape[0],) != self.shapes[f"{path}.bias"]:
                    bad.append(f"{path}: bias change {tuple(f.bias_delta().shape)} vs bias {self.shapes[f'{path}.bias']}")
        else:
            bad = [f"{k}: {tuple(v.shape)} vs {self.shapes[k]}" for k, v in res.tensors().items() if tuple(v.shape) != self.shapes[k]]
        if bad:
            raise ShapeMismatchError(f"{t.source}: {len(bad)} tensor(s) do not fit the base: {'; '.join(bad[:5])}. "
                                     "Fix: the residual was made for a base of other dimensions.")

    def to(self, device: torch.device, keys: Iterable[str]) -> None:
        """Keep the pristine values of ``keys`` and every term tensor on ``device`` (CUDA: the fused kernel
        then reads only device memory; the pristine copy is the "kept copy" of DESIGN.md). The caller's
        residuals stay where they are: the terms get copies."""
        for k in keys:
            self.pristine[k] = self.pristine[k].to(device)
        for t in self.inputs:
            res = t.residual
            if isinstance(res, LoRA):
                t.residual = replace(res, targets={p: f.to(device) for p, f in res.targets.items()})
            elif t.kind != "motion":
                t.residual = replace(res, weights={k: v.to(device) for k, v in res.weights.items()})

    def term_keys(self, index: int) -> set[str]:
        """Keys whose merged value depends on term ``index`` (an index into the canonical ``inputs``)."""
        t = self.inputs[index]
        if t.kind == "motion":  # γ only changes the proj_out scaling; the other motion weights are copies
            return {k for k in self.shapes if PROJ_OUT.search(k)}
        return set(t.residual.target_keys)

    def item(self, key: str, dst: torch.Tensor):
        """The merge of one tensor, written into ``dst``."""
        from weightlab.kernels import MergeItem

        w0 = self.pristine[key]
        motion = self.motion
        gamma = motion.scale if (motion is not None and PROJ_OUT.search(key)) else 1.0
        base_scale = gamma  # γ scales the motion branch's output projection (and motion-LoRA terms on it)
        loras, denses, styles = [], [], []
        module, param = key.rsplit(".", 1)
        for i in self.touching.get(key, ()):
            t = self.inputs[i]
            res = t.residual
            if isinstance(res, LoRA):
                f = res.targets[module]
                strength = t.scale * (gamma if t.kind == "motion_lora" else 1.0)
                if isinstance(f, LoRATarget) and f.magnitude is None:  # kept factored for the kernels
                    scale = t.scale * f.scale * (gamma if t.kind == "motion_lora" else 1.0)
                    if self._combine is not None and t.kind == "style":
                        styles.append(scale * (f.up.float().reshape(f.up.shape[0], -1) @ f.down.float().reshape(f.rank, -1)).reshape(w0.shape))
                    else:
                        loras.append((f.down, f.up, scale))
                    continue
                # DoRA: its residual is dora_weight(w0) − w0, from the pristine w0; another algebra: its dense ΔW
                if f.magnitude is not None:
                    w = f.dora_weight(w0)
                else:
                    w = w0.float() + (f.bias_delta() if param == "bias" else f.delta(w0.shape))
                if self._combine is not None and t.kind == "style":
                    styles.append(strength * (w - w0.float()))
                else:
                    denses.append((w, strength))
            elif isinstance(res, Dense):
                if self._combine is not None:
                    styles.append(t.scale * (res.weights[key].float() - w0.float()))
                else:
                    denses.append((res.weights[key], t.scale))
        if styles:
            delta = self._combine(styles, key=key, **self.method_args)
            w0 = w0.float() * base_scale + delta
            base_scale = 1.0
        return MergeItem(dst=dst, w0=w0, loras=loras, denses=denses, base_scale=base_scale, name=key)


def _release(item) -> None:
    """Once ``item`` is written: drop the memory-mapped pages it read (see `files.release_pages`)."""
    release_pages(item.w0, *(t for down, up, _ in item.loras for t in (down, up)), *(w for w, _ in item.denses))


def resolve_path(source: str) -> Path:
    """The default resolver: a recipe source that is a path, as a path. The merge engine resolves nothing else;
    registry references are resolved by the registry (:class:`weightlab.registry.resolve.LocalResolver`), which
    the CLI, the job runners and the demo pass as ``resolve=``.

    Raises:
        UnresolvedSourceError: no such file or folder.
    """
    p = Path(source).expanduser()
    if p.exists():
        return p
    raise UnresolvedSourceError(
        f"{source!r}: no such file or folder (the merge engine resolves paths only). Fix: check the path; for a "
        "registry reference (ns/name@version, ns/name:alias), pass the registry's resolver, e.g. "
        "`with LocalResolver() as resolve: merge_to_file(recipe, out, resolve=resolve)` "
        "(weightlab.registry.resolve), or use the `weightlab` CLI, which resolves references.")


def load_inputs(recipe: Recipe, *, resolve: Resolver = resolve_path) -> tuple[Base, list[Input]]:
    """Load the base and every term of a recipe (memory-mapped; nothing merged yet); ``resolve`` turns each source
    into a path."""
    base = load(resolve(recipe.base), kind="base")
    inputs = []
    for t in recipe.terms:
        res = load(resolve(t.source), kind=t.kind if t.kind != "motion_lora" else "motion_lora", components=t.components)
        inputs.append(Input(_components(t, res), t.kind, t.scale, t.source))
    return base, inputs


def _components(term: Term, res: Residual) -> Residual:
    """``res`` reduced to the components the term names (all it carries when it names none).

    Raises:
        RecipeError: the term names a component the residual does not carry.
    """
    if term.components is None:
        return res
    carries = res.components
    if missing := [c for c in term.components if c not in carries]:
        raise RecipeError(f"{term.source}: the term names component(s) {', '.join(missing)}, but the residual carries "
                          f"only {', '.join(carries)}. Fix: list only {', '.join(carries)} in the term's `components`, "
                          "or omit it.")
    return res.select(term.components)


@dataclass
class _Part:
    """The composition of one pipeline component besides the UNet, the base pipeline's folder of it, and each key's
    name in its weights file (keys are used without the component's ``strip``: `weightlab.formats.components`)."""

    comp: Composition
    folder: Path
    names: dict[str, str]


def _parts(recipe: Recipe, base: Base, inputs: list[Input], *, tokenizer: str | Path | None = None,
           only: Iterable[str] | None = None) -> dict[str, _Part]:
    """For every component besides the UNet that a term changes (of ``only``, when given), the validated composition
    of the terms' parts over that component of the base's pipeline folder (memory-mapped, pristine).

    Raises:
        MissingComponentError: a term changes a component the base does not have (a UNet-only base), or a single-file
            base's tokenizer is not found.
    """
    from weightlab.loading import component_weights, pipeline_dir, read_weights

    changed = {c: [t for t in inputs if c in t.residual.components] for c in COMPONENTS
               if c != "unet" and (only is None or c in only)}
    changed = {c: terms for c, terms in changed.items() if terms}
    has = base.components if changed else []
    for c, terms in changed.items():
        if c not in has:
            keep = sorted({x for t in terms for x in t.residual.components if x in has}, key=list(COMPONENTS).index)
            raise MissingComponentError(
                f"{', '.join(t.source for t in terms)}: change(s) the {c}, but the base {recipe.base} has none. Fix: use "
                f"a diffusers pipeline folder with {c}/ (or a single-file checkpoint that carries it) as the base, or "
                + (f"add `components: [{', '.join(keep)}]` to the term(s)." if keep else "remove the term(s)."))
    pipeline = pipeline_dir(base, tokenizer=tokenizer) if changed else None
    parts = {}
    for c, terms in changed.items():
        stored, _ = read_weights(component_weights(pipeline, c))
        names = COMPONENTS[c].names(stored)
        pristine = {k: stored[name] for k, name in names.items()}
        method = recipe.method if any(t.kind == "style" for t in terms) else "linear"
        comp = Composition(pristine, terms, {k: tuple(v.shape) for k, v in pristine.items()}, method,
                           dict(recipe.method_args), family=None, component=c)
        parts[c] = _Part(comp, pipeline / c, names)
    return parts


def _compose_into(comp: Composition, dst: dict[str, torch.Tensor], backend: str) -> None:
    """Write the merged value of every key ``comp`` touches into ``dst[key]`` (fp32 from the pristine value,
    rounded once to ``dst``'s dtype)."""
    from weightlab.kernels import merge

    merge([comp.item(k, dst[k]) for k in sorted(comp.touching)], backend=backend, after=_release)


def build_component(recipe: Recipe, name: str, *, dtype: torch.dtype | None = None, device: str | None = None,
                    backend: str = "auto", resolve: Resolver = resolve_path, tokenizer: str | Path | None = None):
    """The base pipeline's component ``name`` (``text_encoder``, ``text_encoder_2``, ``vae``: its model class in
    `weightlab.formats.components`) with the recipe's residuals of it composed in (eval mode, in ``dtype``, default
    the recipe's), or None when no term changes it. ``tokenizer``: for a single-file base (`loading.pipeline_dir`)."""
    base, inputs = load_inputs(recipe, resolve=resolve)
    part = _parts(recipe, base, inputs, tokenizer=tokenizer, only=(name,)).get(name)
    if part is None:
        return None
    model = COMPONENTS[name].model_type().from_pretrained(part.folder, dtype=dtype or torch_dtype(recipe.dtype))
    params = model.state_dict(keep_vars=True)
    names = COMPONENTS[name].names(params)
    _compose_into(part.comp, {k: params[names[k]].data for k in part.comp.touching}, backend)
    return model.to(device or recipe.device).eval().requires_grad_(False)


def build_text_encoder(recipe: Recipe, *, dtype: torch.dtype | None = None, device: str | None = None,
                       backend: str = "auto", resolve: Resolver = resolve_path, tokenizer: str | Path | None = None):
    """:func:`build_component` of the ``text_encoder`` (the base pipeline's ``CLIPTextModel``), or None."""
    return build_component(recipe, "text_encoder", dtype=dtype, device=device, backend=backend, resolve=resolve,
                           tokenizer=tokenizer)


def _composition(base: Base, inputs: list[Input], shapes: dict[str, tuple[int, ...]], method="linear", method_args=None) -> Composition:
    pristine = dict(base.weights)
    motion = next((t for t in inputs if t.kind == "motion"), None)
    if motion is not None:
        if base.has_motion:
            raise RecipeError(f"the base already holds motion modules; remove the motion term {motion.source!r} "
                              "or use a spatial base.")
        pristine.update(motion.residual.weights)
    return Composition(pristine, inputs, shapes, method, dict(method_args or {}), family=base.family)


def _join_motion(unet, base: Base, motion: MotionModule):
    """``UNetMotionModel.from_unet2d`` on the meta device, after refusing a motion module of another family
    (diffusers' own refusal is a bare ValueError)."""
    from diffusers import MotionAdapter, UNetMotionModel

    check_fits({k: v.dim() for k, v in motion.weights.items()}, motion.family, base.family, what=str(motion.source))
    try:
        return UNetMotionModel.from_unet2d(unet, MotionAdapter.from_config(motion.config), load_weights=False)
    except ValueError as e:
        raise ShapeMismatchError(f"{motion.source}: diffusers cannot join this motion module to the base's UNet ({e}). "
                                 "Fix: use a motion module made for the base's block layout.") from None


def _model_for(base: Base, motion: MotionModule | None, *, device: str | torch.device = "meta",
               dtype: torch.dtype = torch.float32):
    """An uninitialised diffusers UNet for the base (+ motion) config on ``device`` (``meta``: shapes only)."""
    from diffusers import UNet2DConditionModel, UNetMotionModel

    with torch.device("meta"):
        if base.has_motion:
            model = UNetMotionModel.from_config(base.config)
        else:
            unet = UNet2DConditionModel.from_config(base.config)
            model = unet if motion is None else _join_motion(unet, base, motion)
    model = torch.nn.Module.to(model, dtype)  # not diffusers.ModelMixin.to: it warns about fp32-kept modules
    if str(device) != "meta":
        model = model.to_empty(device=device)
    return model.eval().requires_grad_(False)


class Merger:
    """Exact, transactional, in-place composition into a live diffusers ``UNet2DConditionModel``/``UNetMotionModel``.

    Args:
        model: the live UNet whose weights are overwritten.
        base (Base | None): pristine ``w0`` (memory-mapped). None keeps a copy of every tensor a term touches.
        inputs (list[Input]): the terms; order is irrelevant (canonicalised).
        method (str, default "linear"): ``linear`` (Eq. 2), ``ties``, ``dare`` or ``svd`` for several style terms.
        backend (str, default "auto"): ``auto`` | ``triton`` | ``torch`` (see :func:`weightlab.kernels.merge`).
    Example:
        >>> m = Merger(unet, base, [Input(lora, "style", 0.8)]); m.apply()   # doctest: +SKIP
        >>> m.set_scale(0, 0.5); m.restore()                                  # doctest: +SKIP
    """

    def __init__(self, model, base: Base | None, inputs: Sequence[Input], *, method: str = "linear",
                 method_args: dict | None = None, backend: str = "auto"):
        self.model = model
        self.backend = backend
        self._params = dict(model.state_dict(keep_vars=True))
        shapes = {k: tuple(v.shape) for k, v in self._params.items()}
        if base is None:
            touched = set().union(*(i.residual.target_keys for i in inputs)) if inputs else set()
            base = Base(weights={k: self._params[k].detach().clone() for k in touched if k in self._params}, config={})
            shapes_for = {k: shapes[k] for k in base.weights}
            fam, misfits = best_family({k: len(s) for k, s in shapes.items()})
            self.composition = Composition(base.weights, list(inputs), shapes_for, method, dict(method_args or {}),
                                           family=None if misfits else fam.name)
        else:
            self.composition = _composition(base, list(inputs), shapes, method, method_args)
        self._position = sorted(range(len(inputs)), key=self.composition.order.__getitem__)  # given -> canonical
        device = next(iter(self._params.values())).device
        if device.type == "cuda":
            self.composition.to(device, self.touched)

    @property
    def touched(self) -> set[str]:
        keys = set(self.composition.touching)
        if self.composition.motion is not None:
            keys |= self.composition.term_keys(self.composition.inputs.index(self.composition.motion))  # by identity
        return keys

    def _write(self, keys: Iterable[str]) -> None:
        from weightlab.kernels import merge

        keys = sorted(keys)
        items = [self.composition.item(k, self._params[k].data) for k in keys]
        try:
            merge(items, backend=self.backend, after=_release)
        except BaseException:
            self._copy_pristine(keys)
            raise

    def _copy_pristine(self, keys: Iterable[str]) -> None:
        with torch.no_grad():
            for k in keys:
                self._params[k].data.copy_(self.composition.pristine[k])
                release_pages(self.composition.pristine[k])

    def apply(self) -> "Merger":
        """Write the merged value of every touched tensor."""
        self._write(self.touched)
        return self

    def load_all(self) -> "Merger":
        """Write every tensor of the model: untouched ones are plain copies of ``w0``, touched ones merged."""
        self._copy_pristine(k for k in self._params if k not in self.touched)
        return self.apply()

    def set_scale(self, index: int, scale: float) -> "Merger":
        """Change term ``index`` (in the order given) and re-merge only the tensors it touches. The caller's
        :class:`Input` keeps its scale: the merger changes its own copy."""
        if not isinstance(scale, (int, float)) or scale != scale or abs(scale) == float("inf"):
            raise WeightlabError(f"scale must be a finite number, got {scale!r}.")
        try:
            canonical = self._position[index]
        except (IndexError, TypeError):
            raise WeightlabError(f"no term {index!r}: the merger has {len(self._position)} term(s), numbered from 0 "
                                 "in the order given. Fix: pass the index of one of them.") from None
        self.composition.inputs[canonical].scale = float(scale)
        self._write(self.composition.term_keys(canonical) & set(self._params))
        return self

    def restore(self) -> "Merger":
        """Copy the pristine value back into every touched tensor (bit-exact unmerge)."""
        self._copy_pristine(sorted(self.touched))
        return self


def build_unet(recipe: Recipe, *, backend: str = "auto", resolve: Resolver = resolve_path):
    """Load a recipe's inputs and return a merged diffusers UNet (``UNetMotionModel`` if there is motion).

    The model is created empty (no random init) and every tensor is written once from the pristine base;
    ``resolve`` turns each source into a path (:func:`resolve_path`: paths only).
    """
    base, inputs = load_inputs(recipe, resolve=resolve)
    motion = next((t.residual for t in inputs if t.kind == "motion"), None)
    model = _model_for(base, motion, device=recipe.device, dtype=torch_dtype(recipe.dtype))
    merger = Merger(model, base, inputs, method=recipe.method, method_args=recipe.method_args, backend=backend)
    merger.load_all()
    return model


def _provenance(recipe: Recipe, base: Base, inputs: list[Input]) -> dict[str, str]:
    from weightlab.files import tensor_hash
    from weightlab.inspect import weights_file

    def ident(res: Residual) -> str:
        wf = weights_file(Path(res.source)) if res.source else None
        return tensor_hash(wf) if wf and wf.suffix == ".safetensors" else ""

    return {
        "format": "pt",
        "weightlab.recipe": recipe.model_dump_json(),
        "weightlab.recipe_hash": recipe.hash,
        "weightlab.inputs": json.dumps({recipe.base: ident(base), **{t.source: ident(t.residual) for t in inputs}}),
        "weightlab.kind": "base",
        "weightlab.family": base.family,
    }


def _unet_composition(recipe: Recipe, base: Base, inputs: list[Input]):
    """The validated UNet composition of a recipe's loaded inputs, and the (meta-device) model it fills."""
    motion = next((t.residual for t in inputs if t.kind == "motion"), None)
    meta_model = _model_for(base, motion)
    shapes = {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}
    return _composition(base, inputs, shapes, recipe.method, recipe.method_args), meta_model


def _stream(comp: Composition, out: Path, provenance: dict[str, str], *, dtype: torch.dtype, device: str,
            backend: str, progress: bool) -> dict:
    from weightlab.kernels import merge
    from weightlab.streaming import StreamWriter

    t0 = time.perf_counter()
    shapes = comp.shapes
    with StreamWriter(out, {k: (dtype, shapes[k]) for k in shapes}) as writer:
        writer.begin(provenance)
        for key in writer.progress(enabled=progress, desc="merge"):
            dst = torch.empty(shapes[key], dtype=dtype, device=device)
            merge([comp.item(key, dst)], backend=backend, after=_release)
            writer.write(key, dst)
        output_hash = writer.finish()
    return {"path": str(out), "output_hash": output_hash, "seconds": time.perf_counter() - t0,
            "tensors": len(shapes), "bytes": writer.nbytes}


def merge_to_file(recipe: Recipe, out: str | Path, *, backend: str = "auto", progress: bool = True,
                  resolve: Resolver = resolve_path) -> dict:
    """Stream the merged UNet into one ``.safetensors`` file, tensor by tensor (bounded memory), atomically.

    Returns ``{"path", "output_hash", "seconds", "tensors", "bytes"}``. The file's ``__metadata__`` carries the
    recipe, every input's tensor hash and the output hash (equal to :func:`weightlab.files.tensor_hash` of it).
    Residuals of the other components (text encoders, VAE) are not in a UNet file (a warning names them):
    :func:`merge_to_folder` composes them.
    """
    base, inputs = load_inputs(recipe, resolve=resolve)
    for c in (c for c in COMPONENTS if c != "unet"):
        if sources := [t.source for t in inputs if c in t.residual.components]:
            log.warning("%s: a UNet file leaves out the %s residual of %s; write a folder (merge_to_folder, "
                        "`weightlab merge --out DIR`) to compose it.", out, c, ", ".join(sources))
    comp, _ = _unet_composition(recipe, base, inputs)
    return _stream(comp, Path(out), _provenance(recipe, base, inputs), dtype=torch_dtype(recipe.dtype),
                   device=recipe.device, backend=backend, progress=progress)


def merge_to_folder(recipe: Recipe, out: str | Path, *, backend: str = "auto", progress: bool = True,
                    resolve: Resolver = resolve_path, tokenizer: str | Path | None = None) -> dict:
    """A diffusers model folder (``UNetMotionModel`` with a motion term, else ``UNet2DConditionModel``):
    ``config.json`` + streamed ``diffusion_pytorch_model.safetensors`` + ``recipe.json``; and, for each other
    component a term changes (``text_encoder/``, ``text_encoder_2/``, ``vae/``), the base pipeline's, its weights
    merged in their own dtype and the others copied bit for bit. Everything is validated before anything is written.
    ``tokenizer``: for a single-file base whose other components a term changes (`loading.pipeline_dir`)."""
    from weightlab.files import save_tensors

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise WeightlabError(f"{out}: exists and is not a diffusers model folder; refusing to write into it. "
                             "Fix: choose an empty or new folder.")
    base, inputs = load_inputs(recipe, resolve=resolve)
    parts = _parts(recipe, base, inputs, tokenizer=tokenizer)
    comp, meta_model = _unet_composition(recipe, base, inputs)
    out.mkdir(parents=True, exist_ok=True)
    summary = _stream(comp, out / "diffusion_pytorch_model.safetensors", _provenance(recipe, base, inputs),
                      dtype=torch_dtype(recipe.dtype), device=recipe.device, backend=backend, progress=progress)
    meta_model.save_config(out)
    for c in (c for c in COMPONENTS if c != "unet" and c not in parts):
        shutil.rmtree(out / c, ignore_errors=True)  # a previous merge's into this folder
    for c, part in parts.items():
        merged = {k: torch.empty_like(part.comp.pristine[k], device="cpu") for k in part.comp.touching}
        _compose_into(part.comp, merged, backend)
        (out / c).mkdir(exist_ok=True)
        save_tensors({part.names[k]: v for k, v in {**part.comp.pristine, **merged}.items()},
                     out / c / COMPONENTS[c].weights_file, {"format": "pt"})
        (out / c / "config.json").write_bytes((part.folder / "config.json").read_bytes())
    (out / "recipe.json").write_text(recipe.to_json())
    summary["path"] = str(out)
    return summary
