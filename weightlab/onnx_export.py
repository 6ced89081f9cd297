"""ONNX export of a merged video model, verified against PyTorch, and re-weighting without re-export.

An export folder (DESIGN.md "Video assembly, sampling and export")::

    manifest.json                          written last: dtype, opset, shapes (dynamic and static), verification
                                           errors with input hashes, the recipe, and each graph's initializer table
    unet/model.onnx + model.onnx.data      UNetMotionModel; initializer names are the diffusers state-dict keys
    text_encoder/model.onnx + .data        CLIP text encoder (last hidden state), with the recipe's text-encoder
                                           residuals composed in (a style LoRA's ``lora_te_*`` half), if any
    vae_decoder/model.onnx + .data         VAE decoder (post-quant conv + decoder)
    tokenizer/, scheduler/                 what :class:`weightlab.onnx_runtime.OnnxVideoPipeline` needs besides

Graphs come from ``torch.export.export`` (so a dimension that cannot stay dynamic is an error, never silently
frozen) translated by ``torch.onnx.export(..., dynamo=True)`` without graph optimisation, which keeps every
weight as an initializer named after its parameter and stored in the external-data file. That is what lets
:func:`reweight_onnx` re-merge new α/β/γ and rewrite only ``unet/model.onnx.data`` (and
``text_encoder/model.onnx.data`` when the new recipe's text encoder differs), leaving the graph files byte-identical
(a TensorRT engine embeds the weights, so the runtime keys its engine cache on the weights' hashes).
ONNX Runtime applies its own graph optimisations when a session starts.

Example:
    >>> manifest = export_onnx("recipe.yaml", "export/", dtype="float16")       # doctest: +SKIP
    >>> reweight_onnx("export/", "recipe_more_style.yaml")                       # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, get_args

import torch

from weightlab.errors import ExportError
from weightlab.onnx_manifest import MANIFEST, ExportDtype, Graph, OnnxManifest, Pipeline, Verification
from weightlab.onnx_runtime import create_session
from weightlab.video import animatelcm_scheduler, load_unet, merged_component, vae_dtype

log = logging.getLogger(__name__)
GRAPH, DATA = "model.onnx", "model.onnx.data"
EXPORT_DTYPES = get_args(ExportDtype)
EXPORT_ENTRIES = {MANIFEST, "unet", "text_encoder", "vae_decoder", "tokenizer", "scheduler", "trt_cache"}
# Verification passes when max|onnx - torch| <= atol + rtol * max|torch|. fp32 runs the same arithmetic in another
# order (the tiny family differs by ~1e-7); fp16 rounds every op to 11 bits on both sides, in different places.
TOLERANCE = {"float32": (1e-4, 1e-3), "float16": (1e-2, 2e-2)}
VERIFY_SEED = 0
MAX_BATCH = 16  # CFG doubles the batch
MAX_DECODE = 63  # images per VAE decoder call (the pipelines decode 16 at a time)
MAX_LATENT = 256  # latent height/width bound (2048 px for SD1.5)


def _repeat_interleave_self_int(self, repeats: int, dim: int | None = None, output_size: int | None = None):
    """``aten.repeat_interleave.self_int`` for ONNX, correct for a symbolic ``repeats`` at any ``dim``.

    onnxscript 0.7's translation builds the Expand shape with one leading 1 too few when ``repeats`` is symbolic
    (UNetMotionModel repeats its time embedding by the dynamic frame count), which breaks every batch > 1.
    """
    from onnxscript.onnx_opset import opset18 as op

    if dim is None:
        self, dim, rank = op.Reshape(self, op.Constant(value_ints=[-1])), 0, 1
    else:
        rank = len(self.shape)
    dim %= rank
    tail = rank - dim - 1
    count = op.Constant(value_ints=[repeats]) if isinstance(repeats, int) else op.Reshape(repeats, op.Constant(value_ints=[-1]))
    expand = [op.Constant(value_ints=[1] * (dim + 1)), count] + ([op.Constant(value_ints=[1] * tail)] if tail else [])
    tiled = op.Expand(op.Unsqueeze(self, op.Constant(value_ints=[dim + 1])), op.Concat(*expand, axis=0))
    final = ([op.Shape(self, start=0, end=dim)] if dim else []) + [op.Constant(value_ints=[-1])] + (
        [op.Shape(self, start=dim + 1)] if tail else [])
    return op.Reshape(tiled, op.Concat(*final, axis=0))


class _TextEncoder(torch.nn.Module):
    """CLIP text encoder -> last hidden state (what the pipeline feeds the UNet)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids)[0]


class _VaeDecoder(torch.nn.Module):
    """``vae.decode(latents).sample`` (post-quant conv + decoder)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents).sample


@dataclass
class _Spec:
    """What to export for one model, how its dimensions vary, and the inputs it is verified on."""

    name: str
    module: torch.nn.Module
    example: dict[str, torch.Tensor]
    dynamic: dict[str, dict[int, object]]  # input -> axis -> torch.export.Dim
    output: str
    cases: list[dict[str, torch.Tensor]]
    notes: str
    kwargs: dict = field(default_factory=dict)

    def __call__(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            out = self.module(**inputs, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out


def _randn(shape, like: torch.nn.Module, g: torch.Generator) -> torch.Tensor:
    p = next(like.parameters())
    return torch.randn(shape, generator=g).to(device=p.device, dtype=p.dtype)


def _latent_dims():
    from torch.export import Dim

    # Latent sizes are multiples of 8 (three 2x downsamplings in the UNet), from 16 up.
    return 8 * Dim("height_div8", min=2, max=MAX_LATENT // 8), 8 * Dim("width_div8", min=2, max=MAX_LATENT // 8)


def _unet_spec(unet, text_len: int) -> _Spec:
    from torch.export import Dim

    cfg = unet.config
    g = torch.Generator().manual_seed(VERIFY_SEED)

    def case(b, f, h, w, t):
        return {"sample": _randn((b, cfg.in_channels, f, h, w), unet, g),
                "timestep": torch.tensor(t, dtype=torch.int64, device=unet.device),
                "encoder_hidden_states": _randn((b * f, text_len, cfg.cross_attention_dim), unet, g)}

    # Example sizes are distinct and > 1 so torch.export neither specialises nor unifies any of them.
    example = case(2, 3, 16, 24, 999)
    height, width = _latent_dims()
    frames = cfg.motion_max_seq_length
    return _Spec(
        name="unet", module=unet, example=example, kwargs={"return_dict": False}, output="noise_pred",
        dynamic={"sample": {0: Dim("batch", min=1, max=MAX_BATCH), 2: Dim("frames", min=1, max=frames), 3: height,
                            4: width},
                 "timestep": {}, "encoder_hidden_states": {0: Dim("batch_frames", min=1, max=MAX_BATCH * frames)}},
        cases=[example, case(1, 5, 16, 16, 1)],
        notes=(f"dynamic: batch 1..{MAX_BATCH}, frames 1..{frames}, latent height/width multiples of 8 in 16..{MAX_LATENT}; "
               "encoder_hidden_states batch = batch*frames (prompt embeddings repeated per frame). Static: channels "
               f"(architecture) and the text length {text_len} (prompts are padded to the tokenizer's max length)."))


def _text_encoder_spec(text_encoder, text_len: int) -> _Spec:
    from torch.export import Dim

    module = _TextEncoder(text_encoder).eval()
    g = torch.Generator().manual_seed(VERIFY_SEED)
    vocab = text_encoder.config.vocab_size

    def case(b):
        return {"input_ids": torch.randint(0, vocab, (b, text_len), generator=g).to(text_encoder.device)}

    example = case(2)
    return _Spec(name="text_encoder", module=module, example=example, output="last_hidden_state",
                 dynamic={"input_ids": {0: Dim("batch", min=1, max=MAX_BATCH)}}, cases=[example, case(1)],
                 notes=f"dynamic: batch 1..{MAX_BATCH}. Static: sequence length {text_len} (padded by the tokenizer).")


def _vae_decoder_spec(vae) -> _Spec:
    from torch.export import Dim

    module = _VaeDecoder(vae).eval()
    g = torch.Generator().manual_seed(VERIFY_SEED)
    channels = vae.config.latent_channels

    def case(n, h, w):
        return {"latents": _randn((n, channels, h, w), vae, g)}

    example = case(3, 16, 24)
    height, width = _latent_dims()
    return _Spec(name="vae_decoder", module=module, example=example, output="sample",
                 # diffusers' Upsample2D branches on batch >= 64, so one call decodes at most 63 images.
                 dynamic={"latents": {0: Dim("images", max=MAX_DECODE), 2: height, 3: width}},
                 cases=[example, case(2, 16, 16)],
                 notes=f"dynamic: images (frames decoded at once) 1..{MAX_DECODE}, latent height/width multiples of 8 "
                       f"in 16..{MAX_LATENT}. Static: latent channels.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _raw(t: torch.Tensor):
    """A tensor's bytes, as a numpy uint8 array (on the CPU)."""
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(_raw(t).tobytes()).hexdigest()


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _export_graph(spec: _Spec, folder: Path, opset: int | None) -> float:
    """torch.export -> ONNX (no optimisation: initializers keep parameter names) -> graph + external data."""
    import onnx_ir

    t0 = time.perf_counter()
    dynamic = {**spec.dynamic, **{k: None for k in spec.kwargs}}
    try:
        with torch.no_grad():
            # torch.export directly (not torch.onnx.export(module)): it raises on a dimension that cannot stay
            # dynamic instead of falling back to a draft export that may freeze it.
            program = torch.export.export(spec.module, (), {**spec.example, **spec.kwargs}, dynamic_shapes=dynamic,
                                          strict=False)
            onnx_program = torch.onnx.export(
                program, dynamo=True, input_names=list(spec.example), output_names=[spec.output], opset_version=opset,
                optimize=False, verbose=False,
                custom_translation_table={torch.ops.aten.repeat_interleave.self_int: _repeat_interleave_self_int})
    except Exception as e:  # torch.export and the translator raise many types; all mean the same to the user
        raise ExportError(f"{spec.name}: export to ONNX failed: {type(e).__name__}: {str(e)[:2000]}. Fix: export with "
                          "--dtype float32 and the package versions in the README; report the model config if it persists.") from e
    for node in onnx_program.model.graph.all_nodes():
        node.metadata_props.clear()  # per-node stack traces: megabytes of local paths, no use at run time
    folder.mkdir(parents=True, exist_ok=True)
    for name in (GRAPH, DATA):
        (folder / name).unlink(missing_ok=True)
    onnx_ir.save(onnx_program.model, folder / GRAPH, external_data=DATA, size_threshold_bytes=0)
    return time.perf_counter() - t0


def _describe(spec: _Spec, folder: Path) -> dict:
    """Shapes, opset and initializer table of a saved graph; refuses a requested dynamic dimension that froze."""
    import onnx

    proto = onnx.load(str(folder / GRAPH), load_external_data=False)
    inputs = {v.name: _dims(v) for v in proto.graph.input}
    frozen = [f"{name}[{axis}]={inputs[name][axis]}" for name, axes in spec.dynamic.items() for axis in axes
              if not isinstance(inputs[name][axis], str)]
    if frozen:
        raise ExportError(f"{spec.name}: dimensions exported as static although requested dynamic: {', '.join(frozen)}. "
                          "Fix: sample at exactly these sizes, or report the model config (an op in it specialises the shape).")
    table = {}
    for init in proto.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if "offset" in ext or "length" in ext:
            table[init.name] = {"offset": int(ext.get("offset", 0)), "length": int(ext["length"]),
                                "dtype": onnx.helper.tensor_dtype_to_np_dtype(init.data_type).name, "shape": list(init.dims)}
    state = spec.module.state_dict()
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {
        "graph": f"{spec.name}/{GRAPH}", "data": f"{spec.name}/{DATA}", "graph_sha256": _sha256(folder / GRAPH),
        "bytes": {"graph": (folder / GRAPH).stat().st_size, "data": (folder / DATA).stat().st_size},
        "opset": opset, "inputs": inputs, "outputs": {v.name: _dims(v) for v in proto.graph.output},
        "dynamic": {name: {str(axis): inputs[name][axis] for axis in axes} for name, axes in spec.dynamic.items() if axes},
        "notes": spec.notes,
        "initializers": table,
        "constants": sorted(n for n in table if n not in state),  # exporter constants: not re-weighted
        "unused": sorted(k for k in state if k not in table),  # parameters the forward pass never reads
    }


def _verify(spec: _Spec, folder: Path, dtype: str) -> Verification:
    """Run every verification case through ONNX Runtime and PyTorch; raise if they differ beyond tolerance."""
    device = next(spec.module.parameters()).device
    provider = "cuda" if device.type == "cuda" else "cpu"
    session = create_session(folder / GRAPH, provider, device_id=device.index or 0)
    atol, rtol = TOLERANCE[dtype]
    max_abs = max_rel = 0.0
    cases = []
    for inputs in spec.cases:
        ref = spec(inputs).double().cpu()
        got = torch.from_numpy(session.run(None, {k: v.cpu().numpy() for k, v in inputs.items()})[0]).double()
        if not torch.isfinite(ref).all():
            raise ExportError(f"{spec.name}: PyTorch itself returns NaN/Inf in {dtype} on the verification inputs at "
                              f"{tuple(ref.shape)} (activations overflow). Fix: export in float32.")
        scale = ref.abs().max().item()
        err = (got - ref).abs().max().item()
        if not err <= atol + rtol * scale:  # also catches NaN
            raise ExportError(f"{spec.name}: ONNX Runtime ({provider}) differs from PyTorch by {err:.3g} (max |torch| "
                              f"{scale:.3g}, tolerance {atol} + {rtol} x max) at {tuple(ref.shape)}. Fix: export in float32; "
                              "if float32 fails too, report the model config and this manifest.")
        max_abs, max_rel = max(max_abs, err), max(max_rel, err / scale if scale else 0.0)
        cases.append({k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "sha256": _tensor_sha256(v)}
                      for k, v in inputs.items()})
    return Verification(provider=provider, seed=VERIFY_SEED, cases=cases, max_abs_err=max_abs, max_rel_err=max_rel,
                        rel_err="max|onnx - torch| / max|torch| per case", atol=atol, rtol=rtol)


def _export(spec: _Spec, folder: Path, *, opset: int | None, verify: bool) -> Graph:
    seconds = _export_graph(spec, folder, opset)
    entry = Graph(**_describe(spec, folder), export_seconds=seconds)
    if verify:
        dtype = str(next(spec.module.parameters()).dtype).removeprefix("torch.")
        entry.verification = _verify(spec, folder, dtype)
    log.info("exported %s in %.1f s", spec.name, seconds)
    return entry


def export_unet(unet, folder: str | Path, *, text_len: int = 77, opset: int | None = None, verify: bool = True) -> Graph:
    """Export one ``UNetMotionModel`` (its own dtype and device) to ``folder/model.onnx`` + ``model.onnx.data``.

    The building block of :func:`export_onnx`, for a UNet you already hold (benchmarks, custom assemblies).

    Args:
        unet (UNetMotionModel): the model, in eval mode.
        folder (str | Path): where the graph and its external data go.
        text_len (int, default 77): the (static) prompt length of ``encoder_hidden_states``.
        opset (int | None, default None): ONNX opset; the exporter's default when None.
        verify (bool, default True): compare with PyTorch on seeded random inputs.
    Returns:
        Graph: shapes, dynamic dimensions, opset, sizes, initializer table, export seconds and verification errors
        (the ``models["unet"]`` entry of a manifest; its paths are relative to ``folder``'s parent).
    """
    if str(unet.dtype).removeprefix("torch.") not in EXPORT_DTYPES:
        raise ExportError(f"a {unet.dtype} UNet cannot be exported. Fix: cast it to float32 or float16 first.")
    return _export(_unet_spec(unet, text_len), Path(folder), opset=opset, verify=verify)


def _versions() -> dict:
    import diffusers
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _source_name(source) -> str | None:
    return str(source) if isinstance(source, (str, Path)) else None


def _recipe_fields(recipe, unet, text_encoder, merged: bool) -> dict:
    from weightlab.files import state_dict_hash

    return {"recipe": recipe.model_dump(mode="json") if recipe else None, "recipe_hash": recipe.hash if recipe else None,
            "weights_sha256": state_dict_hash(unet.state_dict()),
            "text_encoder_sha256": state_dict_hash(text_encoder.state_dict()) if text_encoder is not None else None,
            "text_encoder_merged": merged if text_encoder is not None else None}


def _text_encoder(source, pipeline_dir: Path, unet, resolve) -> tuple[torch.nn.Module, bool]:
    """The text encoder that goes with ``unet`` (its dtype and device): the recipe's text-encoder residuals composed
    into the base's (:func:`weightlab.video.merged_component`), else ``pipeline_dir``'s; and whether it is merged."""
    from transformers import CLIPTextModel

    merged = merged_component(source, "text_encoder", dtype=unet.dtype, device=str(unet.device), resolve=resolve,
                              tokenizer=pipeline_dir / "tokenizer")
    if merged is not None:
        return merged, True
    base = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder", torch_dtype=unet.dtype)
    return base.to(unet.device).eval().requires_grad_(False), False


def export_onnx(source, out_dir: str | Path, *, dtype: str = "float32", pipeline_dir: str | Path | None = None,
                device: str | None = None, opset: int | None = None, verify: bool = True,
                progress: bool = True, resolve: Callable[[str], Path] | None = None) -> OnnxManifest:
    """Export the merged UNetMotionModel, the text encoder (with the recipe's text-encoder residuals composed in) and
    the VAE decoder to ONNX, verified against PyTorch.

    Args:
        source (Recipe | str | Path): recipe, recipe file or merged folder (see :func:`weightlab.video.load_unet`).
        out_dir (str | Path): the export folder (created; an earlier export there is replaced).
        dtype (str, default "float32"): ``float32`` or ``float16`` (merged in fp32 and rounded once); a VAE whose config
            says ``force_upcast`` stays float32 (recorded as ``pipeline.vae_dtype``).
        pipeline_dir (str | Path | None, default None): where the text encoder/tokenizer/VAE come from; the recipe base's.
        device (str | None, default None): where to export and verify (``cuda`` verifies on ONNX Runtime's CUDA EP).
        opset (int | None, default None): ONNX opset; the exporter's default when None.
        verify (bool, default True): compare every graph with PyTorch on seeded random inputs (at two shapes).
        progress (bool, default True): a progress bar over the three models.
        resolve (Callable[[str], Path] | None, default None): turns the recipe's sources into paths; None resolves
            paths only (registry references: :class:`weightlab.registry.resolve.LocalResolver`).
    Returns:
        OnnxManifest: the manifest (also written to ``out_dir/manifest.json``).
    Raises:
        ExportError: export failed, a dynamic dimension froze, or ONNX Runtime disagrees with PyTorch.
    """
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm
    from transformers import CLIPTokenizer

    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"dtype {dtype!r} cannot be exported. Fix: use {' or '.join(EXPORT_DTYPES)}.")
    out = Path(out_dir)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_ENTRIES) if out.is_dir() else []
    if foreign:
        raise ExportError(f"{out}: holds files that are not part of a weightlab ONNX export ({', '.join(foreign[:5])}); "
                          "refusing to write into it. Fix: choose a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest is written

    unet, folder, recipe = load_unet(source, pipeline_dir=pipeline_dir, dtype=dtype, device=device, resolve=resolve)
    device = unet.device
    text_encoder, merged = _text_encoder(source, folder, unet, resolve)
    vae_type = vae_dtype(folder / "vae", unet.dtype)  # a checkpoint's baked VAE (a dense term's) composed in, else the base's
    vae = (merged_component(source, "vae", dtype=vae_type, device=str(device), resolve=resolve,
                            tokenizer=folder / "tokenizer")
           or AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_type).to(device).eval())
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_len = tokenizer.model_max_length
    shutil.rmtree(out / "tokenizer", ignore_errors=True)
    shutil.copytree(folder / "tokenizer", out / "tokenizer")
    sched_file = folder / "scheduler" / "scheduler_config.json"
    animatelcm_scheduler(json.loads(sched_file.read_text()) if sched_file.is_file() else None).save_config(out / "scheduler")

    specs = [_unet_spec(unet, text_len), _text_encoder_spec(text_encoder, text_len),
             _vae_decoder_spec(vae)]
    models = {spec.name: _export(spec, out / spec.name, opset=opset, verify=verify)
              for spec in tqdm(specs, desc="export onnx", disable=not progress)}
    manifest = OnnxManifest(
        dtype=dtype, opset=models["unet"].opset, created=_now(), versions=_versions(), source=_source_name(source),
        **_recipe_fields(recipe, unet, text_encoder, merged),
        pipeline=Pipeline(
            latent_channels=unet.config.in_channels, sample_size=unet.config.sample_size,
            max_frames=unet.config.motion_max_seq_length, text_max_length=text_len,
            text_hidden_size=text_encoder.config.hidden_size, vae_scaling_factor=vae.config.scaling_factor,
            vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1), vae_out_channels=vae.config.out_channels,
            vae_dtype=str(vae.dtype).removeprefix("torch.")),
        models=models)
    manifest.write(out)
    return manifest


def _write_initializers(data: Path, table: dict, state: dict[str, torch.Tensor]) -> Path:
    """A copy of ``data`` with every initializer named in ``state`` overwritten in place (same offsets, lengths)."""
    new = data.with_name(data.name + ".new")
    shutil.copyfile(data, new)
    with open(new, "r+b") as f:
        for name, entry in sorted(table.items(), key=lambda kv: kv[1].offset):
            if name not in state:
                continue
            f.seek(entry.offset)
            f.write(memoryview(_raw(state[name])))
        f.flush()
        os.fsync(f.fileno())
    return new


def _differs(data: Path, table: dict, state: dict[str, torch.Tensor]) -> bool:
    """Whether any initializer named in ``state`` holds other bytes in ``data`` than ``state`` has."""
    with open(data, "rb") as f:
        for name, entry in sorted(table.items(), key=lambda kv: kv[1].offset):
            if name in state:
                f.seek(entry.offset)
                if f.read(entry.length) != _raw(state[name]).tobytes():
                    return True
    return False


def _check_fits(entry: Graph, state: dict[str, torch.Tensor], source, name: str) -> None:
    """Refuse new weights whose names, dtypes or shapes differ from the export's initializer table."""
    table = entry.initializers
    bad = [f"{k} ({list(state[k].shape)} {str(state[k].dtype).removeprefix('torch.')} vs {e.shape} {e.dtype})"
           for k, e in table.items() if k in state and (list(state[k].shape) != e.shape
                                                        or str(state[k].dtype).removeprefix("torch.") != e.dtype)]
    missing = [k for k in table if k not in state and k not in entry.constants]
    extra = [k for k in state if k not in table and k not in entry.unused]
    if bad or missing or extra:
        raise ExportError(f"{source}: its merged {name} does not fit this export's initializers ({len(bad)} differ, "
                          f"{len(missing)} missing, {len(extra)} new: {', '.join((bad + missing + extra)[:5])}). "
                          "Fix: re-export (`weightlab export onnx`); re-weighting only changes scales, not the architecture.")


def _check_graph(folder: Path, entry: Graph, when: str) -> None:
    graph = folder / entry.graph
    if _sha256(graph) != entry.graph_sha256:
        raise ExportError(f"{graph} changed {when} (hash differs from the manifest). "
                          "Fix: re-export with `weightlab export onnx`.")


def reweight_onnx(onnx_dir: str | Path, source, *, pipeline_dir: str | Path | None = None, device: str | None = None,
                  verify: bool = True, resolve: Callable[[str], Path] | None = None) -> OnnxManifest:
    """Re-merge ``source`` (new α/β/γ) into an existing export, rewriting only external-data files: the UNet's, and
    the text encoder's when ``source``'s differs from the exported one (a term with a text-encoder residual, its
    scale, or another base), so the export never pairs a UNet of one recipe with a text encoder of another.

    The graph files stay byte-identical (checked before and after). The new weights must match the export's
    initializer tables (names, dtypes, shapes); with ``verify`` each rewritten graph is compared with PyTorch on the
    export's verification inputs, and on failure every previous data file is put back.

    Args:
        onnx_dir (str | Path): a folder written by :func:`export_onnx`.
        source (Recipe | str | Path): the new recipe, recipe file or merged folder (same base architecture).
        pipeline_dir (str | Path | None, default None): where the text encoder comes from; the recipe base's.
        device (str | None, default None): where to merge and verify.
        verify (bool, default True): verify the new weights against PyTorch.
        resolve (Callable[[str], Path] | None, default None): turns the recipe's sources into paths (see
            :func:`export_onnx`).
    Returns:
        OnnxManifest: the updated manifest (also written).
    Example:
        >>> reweight_onnx("export/", recipe.with_scale(0, 0.5))   # doctest: +SKIP
    """
    folder = Path(onnx_dir)
    manifest = OnnxManifest.read(folder)
    entries = {name: manifest.models[name] for name in ("unet", "text_encoder") if name in manifest.models}
    for entry in entries.values():
        _check_graph(folder, entry, "since it was exported")
    unet, pipeline, recipe = load_unet(source, pipeline_dir=pipeline_dir, dtype=manifest.dtype, device=device,
                                       resolve=resolve, tokenizer=folder / "tokenizer")
    if merged_component(source, "vae", dtype=unet.dtype, device=str(unet.device), resolve=resolve,
                        tokenizer=folder / "tokenizer") is not None:
        raise ExportError(f"{source}: a term changes the VAE (a checkpoint's baked VAE); re-weighting rewrites the UNet "
                          "and the text encoder only. Fix: re-export (`weightlab export onnx`).")
    text_len = manifest.pipeline.text_max_length
    specs = [_unet_spec(unet, text_len)]
    text_encoder = merged = None
    if "text_encoder" in entries:
        text_encoder, merged = _text_encoder(source, pipeline, unet, resolve)
        specs.append(_text_encoder_spec(text_encoder, text_len))
    states = {spec.name: spec.module.state_dict() for spec in specs}
    for spec in specs:
        _check_fits(entries[spec.name], states[spec.name], source, spec.name)
    if text_encoder is not None and not _differs(folder / entries["text_encoder"].data,
                                                 entries["text_encoder"].initializers, states["text_encoder"]):
        specs.pop()  # the exported text encoder is already this one: its files stay as they are
    data = {spec.name: folder / entries[spec.name].data for spec in specs}
    old = {name: path.with_name(path.name + ".old") for name, path in data.items()}
    new, swapped = {}, []
    try:
        for name, path in data.items():
            new[name] = _write_initializers(path, entries[name].initializers, states[name])
        for name, path in data.items():
            os.replace(path, old[name])
            swapped.append(name)
            os.replace(new[name], path)
        if verify:
            for spec in specs:
                entries[spec.name].verification = _verify(spec, folder / spec.name, manifest.dtype)
    except BaseException:
        for name in swapped:
            os.replace(old[name], data[name])
        for path in new.values():
            path.unlink(missing_ok=True)
        raise
    for name, path in data.items():
        old[name].unlink()
        _check_graph(folder, entries[name], "while re-weighting; this is a bug")
        entries[name].bytes.data = path.stat().st_size
    manifest = manifest.model_copy(update={**_recipe_fields(recipe, unet, text_encoder, merged),
                                           "source": _source_name(source), "reweighted": _now()})
    manifest.write(folder)
    return manifest
