"""``weightlab.load``: one entry point that recognises the layout of a file or folder and returns a typed residual.

Detection order: diffusers folders by their ``config.json``/``model_index.json``; files by their keys
(LoRA roles, ``model.diffusion_model.*``, ``motion_modules``, diffusers UNet names). Safetensors files are
validated and memory-mapped (nothing is copied until a tensor is used); pickles need ``allow_pickle=True``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from weightlab.errors import FamilyMismatchError, FileFormatError, UnmatchedKeysError, WeightlabError, fmt_keys
from weightlab.families import FAMILIES, SD15, detect_family, infer_motion_config
from weightlab.files import load_tensors, mmap_tensors, sniff
from weightlab.formats import ldm, lora, motion
from weightlab.residuals import KINDS, Base, Dense, LoRA, MotionModule, Residual

log = logging.getLogger(__name__)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_WEIGHT_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
_LCM_MARKERS = ("time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv", "conv_shortcut")


def read_weights(path: Path, *, allow_pickle: bool = False) -> tuple[dict, dict[str, str]]:
    """Validated tensors of one file (memory-mapped for safetensors) and its metadata."""
    header = sniff(path)
    if header is None:
        return load_tensors(path, allow_pickle=allow_pickle)
    return mmap_tensors(path, header), dict(header.metadata)


def _folder_weights(folder: Path, allow_pickle: bool) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    for name in PICKLE_WEIGHT_FILES:
        if (folder / name).is_file():
            if allow_pickle:
                return folder / name
            return load_tensors(folder / name)  # raises UnsafeFileError with the opt-in hint
    if (folder / "diffusion_pytorch_model.safetensors.index.json").is_file():
        raise FileFormatError(f"{folder}: sharded weights are not supported yet. Fix: save the model unsharded (max_shard_size large enough).")
    raise FileFormatError(f"{folder}: no weights file ({', '.join(WEIGHT_FILES)}) found.")


def _check_unmatched(unmatched: list[str], strict: bool, source, what: str) -> list[str]:
    if unmatched and strict:
        raise UnmatchedKeysError(
            f"{source}: {len(unmatched)} {what} key(s) map to no sd15 module: {fmt_keys(unmatched)}. "
            "Fix: use a residual made for an SD1.5 UNet, or pass strict=False (CLI: --lenient) to report and skip them.",
            unmatched)
    if unmatched:
        log.warning("%s: skipping %d unmatched key(s): %s", source, len(unmatched), fmt_keys(unmatched))
    return sorted(unmatched)


def _refuse_other_family(unmatched: list[str], unmatched_in, source) -> None:
    """Raise FamilyMismatchError if another known family explains keys that sd15 cannot (an SDXL file, say).

    ``unmatched_in(family)`` lists the file's keys that do not fit ``family``. Raised even with strict=False:
    skipping would keep the keys whose names sd15 shares, and some of those even have sd15's shapes.
    """
    for fam in FAMILIES.values():
        if fam is not SD15 and (left := set(unmatched_in(fam))) < set(unmatched):
            raise FamilyMismatchError(
                f"{source}: belongs to family {fam.name!r} ({fam.description}); weightlab merges sd15. Keys that do "
                f"not exist in sd15: {fmt_keys(set(unmatched) - left)}. Fix: use a residual made for an sd15 base.")


def _guess_lora_kind(targets: dict, source: Path, metadata: dict) -> str:
    if targets and all(".motion_modules." in p for p in targets):
        return "motion_lora"
    hint = (source.name + " " + json.dumps(metadata)).lower()
    if "lcm" in hint or all(any(m in p for p in targets) for m in _LCM_MARKERS):
        return "image_accel"
    return "style"


def _full_unet(weights: dict, config: dict, *, kind: str | None, source: Path, metadata: dict, skipped: list,
               strict: bool, pipeline_dir: Path | None = None) -> Residual:
    sig = SD15.signature
    unknown = [k for k in weights if k not in sig]
    if unknown:
        _refuse_other_family(unknown, lambda fam: [k for k, v in weights.items() if fam.signature.get(k) != v.dim()], source)
    skipped = skipped + _check_unmatched(unknown, strict, source, "UNet")
    weights = {k: v for k, v in weights.items() if k in sig}
    family = detect_family({k: v.dim() for k, v in weights.items()}, what=str(source)).name
    kind = kind or "base"
    if kind == "base":
        missing = [k for k in SD15.unet_shapes if k not in weights]
        if missing:
            raise UnmatchedKeysError(
                f"{source}: a base must hold the whole UNet; {len(missing)} parameter(s) missing: {fmt_keys(missing)}. "
                "Fix: pass the complete checkpoint, or load it with kind='style' if it is a partial fine-tune.", missing)
        return Base(family=family, kind="base", source=source, metadata=metadata, skipped=skipped, weights=weights,
                    config=config or _unet_config_from_weights(weights), pipeline_dir=pipeline_dir)
    if kind != "style":
        raise WeightlabError(f"{source}: a full UNet checkpoint can be kind 'base' or 'style' (dense fine-tune), not {kind!r}.")
    return Dense(family=family, kind=kind, source=source, metadata=metadata, skipped=skipped, weights=weights)


def _motion(weights: dict, *, config: dict | None, kind: str | None, source: Path, metadata: dict, strict: bool) -> MotionModule:
    pe_lengths = [v.shape[1] for k, v in weights.items() if k.endswith("pos_encoder.pe")]
    origin = {}  # diffusers name -> the file's own name, so errors quote what is in the file
    if motion.is_original_layout(weights):
        origin = motion.to_diffusers_names({k: k for k in weights})
        weights = motion.to_diffusers_names(weights)  # drops the pos_encoder tables (recomputed below)
    if config is None:
        config = infer_motion_config({k: tuple(v.shape) for k, v in weights.items()}, what=str(source))
        if pe_lengths:  # AnimateDiff v1 modules have 24 positions; the dropped tables are the only record of it
            config["motion_max_seq_length"] = pe_lengths[0]
    for k, table in motion.positional_tables(config).items():
        weights.setdefault(k, table)
    unknown = [origin.get(k, k) for k in weights if k not in SD15.motion_shapes]
    skipped = _check_unmatched(unknown, strict, source, "motion-module")
    weights = {k: v for k, v in weights.items() if k in SD15.motion_shapes}
    family = detect_family({k: v.dim() for k, v in weights.items()}, what=str(source)).name
    if kind not in (None, "motion"):
        raise WeightlabError(f"{source}: a motion module is kind 'motion', not {kind!r}.")
    return MotionModule(family=family, source=source, metadata=metadata, skipped=skipped, weights=weights, config=config)


def _lora(weights: dict, *, kind: str | None, source: Path, metadata: dict, strict: bool) -> LoRA:
    targets, unmatched = lora.parse_lora(weights, SD15)
    if unmatched:
        _refuse_other_family(unmatched, lambda fam: lora.parse_lora(weights, fam)[1], source)
    skipped = _check_unmatched(unmatched, strict, source, "LoRA")
    if not targets:
        raise UnmatchedKeysError(f"{source}: no LoRA target maps to an sd15 module. Fix: use an SD1.5 LoRA.", unmatched)
    family = detect_family({f"{p}.weight": SD15.signature[f"{p}.weight"] for p in targets}, what=str(source)).name
    kind = kind or metadata.get("weightlab.kind") or _guess_lora_kind(targets, source, metadata)
    if kind not in ("style", "image_accel", "motion_lora"):
        raise WeightlabError(f"{source}: a LoRA can be kind style, image_accel or motion_lora, not {kind!r}.")
    motion_targets = [p for p in targets if ".motion_modules." in p]
    if kind == "motion_lora" and len(motion_targets) != len(targets):
        raise WeightlabError(f"{source}: a motion LoRA may only target motion-module weights; found spatial targets "
                             f"{fmt_keys([p for p in targets if p not in motion_targets])}.")
    return LoRA(family=family, kind=kind, source=source, metadata=metadata, skipped=skipped, targets=targets)


def load(path: str | Path, *, kind: str | None = None, allow_pickle: bool = False, strict: bool = True) -> Residual:
    """Load a base, LoRA, dense fine-tune or motion module from any supported layout.

    Args:
        path (str | Path): a ``.safetensors`` file, a pickle checkpoint (needs ``allow_pickle``), or a diffusers
            folder (pipeline, ``unet/``, ``MotionAdapter``).
        kind (str | None, default None): declare the role (``base``, ``style``, ``image_accel``, ``motion``,
            ``motion_lora``); detected when None. A full checkpoint declared ``style`` becomes a :class:`Dense`.
        allow_pickle (bool, default False): read ``.ckpt/.pt/.bin`` with ``torch.load(weights_only=True)`` in a child process.
        strict (bool, default True): unmatched keys raise :class:`UnmatchedKeysError`; False reports them in ``.skipped``.
    Returns:
        Residual: a :class:`Base`, :class:`Dense`, :class:`LoRA` or :class:`MotionModule` with normalised keys.
    Example:
        >>> lora = weightlab.load("style.safetensors")   # doctest: +SKIP
        >>> lora.kind, lora.ranks                        # doctest: +SKIP
        ('style', [4])
    """
    path = Path(path)
    if kind is not None and kind not in KINDS:
        raise WeightlabError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}.")
    if path.is_dir():
        return _load_folder(path, kind=kind, allow_pickle=allow_pickle, strict=strict)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file or folder.")
    weights, metadata = read_weights(path, allow_pickle=allow_pickle)
    if not weights:
        raise FileFormatError(f"{path}: holds no tensors.")
    kind = kind or (metadata.get("weightlab.kind") if metadata.get("weightlab.kind") in KINDS else None)
    stored_cfg = metadata.get("weightlab.config")
    stored_cfg = _json_object(stored_cfg, f"{path}: __metadata__ weightlab.config") if stored_cfg else None
    if lora.is_lora(weights):
        return _lora(weights, kind=kind, source=path, metadata=metadata, strict=strict)
    if ldm.is_ldm(weights):
        converted, config, skipped = ldm.convert_ldm_unet(weights, strict=strict, source=str(path))
        return _full_unet(converted, stored_cfg or config, kind=kind, source=path, metadata=metadata,
                          skipped=skipped, strict=strict)
    if "conv_in.weight" in weights:
        return _full_unet(weights, stored_cfg, kind=kind, source=path, metadata=metadata, skipped=[], strict=strict)
    if any(".motion_modules." in k or k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in weights):
        return _motion(weights, config=stored_cfg, kind=kind, source=path, metadata=metadata, strict=strict)
    raise UnmatchedKeysError(
        f"{path}: not a recognised UNet, LoRA or motion-module file (first keys: {fmt_keys(list(weights), 5)}). "
        "Fix: pass an SD1.5 checkpoint, a LoRA (PEFT/diffusers/kohya keys) or an AnimateDiff motion module.", list(weights))


def _json_object(text: str, where: str) -> dict:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise FileFormatError(f"{where}: not valid JSON ({e}). Fix: restore it from the original model.") from None
    if not isinstance(doc, dict):
        raise FileFormatError(f"{where}: expected a JSON object, got {type(doc).__name__}. "
                              "Fix: restore it from the original model.")
    return doc


def _unet_config_from_weights(weights: dict) -> dict:
    ldm_names = ldm.diffusers_to_ldm({k: v for k, v in weights.items() if ".motion_modules." not in k})
    return ldm.infer_unet_config({k[len(ldm.LDM_UNET_PREFIX):]: v for k, v in ldm_names.items()})


def _load_folder(path: Path, *, kind: str | None, allow_pickle: bool, strict: bool) -> Residual:
    pipeline_dir = None
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        pipeline_dir, path = path, path / "unet"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileFormatError(f"{path}: a folder needs a diffusers config.json (or model_index.json with unet/).")
    raw_config = _json_object(cfg_file.read_text(), str(cfg_file))
    config = {k: v for k, v in raw_config.items() if not k.startswith("_")}
    cls = raw_config.get("_class_name", "")
    wfile = _folder_weights(path, allow_pickle)
    weights, metadata = read_weights(wfile, allow_pickle=allow_pickle)
    if cls == "MotionAdapter":
        return _motion(weights, config=config, kind=kind, source=path, metadata=metadata, strict=strict)
    if cls in ("UNet2DConditionModel", "UNetMotionModel"):
        return _full_unet(weights, config, kind=kind, source=path, metadata=metadata, skipped=[], strict=strict,
                          pipeline_dir=pipeline_dir)
    raise FileFormatError(f"{path}: unsupported diffusers class {cls!r} (expected UNet2DConditionModel, UNetMotionModel or MotionAdapter).")
