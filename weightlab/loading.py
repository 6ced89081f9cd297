"""``weightlab.load``: one entry point that recognises the layout of a file or folder and returns a typed residual.

Detection order: diffusers folders by their ``config.json``/``model_index.json``; files by their keys
(LoRA roles, ``model.diffusion_model.*``, ``motion_modules``, diffusers UNet names). Safetensors files are
validated and memory-mapped (nothing is copied until a tensor is used); pickles need ``allow_pickle=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from weightlab.errors import (AdapterOptionError, FamilyMismatchError, FileFormatError, MissingComponentError,
                              ShapeMismatchError, UnmatchedKeysError, WeightlabError, fmt_keys)
from weightlab.families import (FAMILIES, Family, best_family, detect_family, infer_motion_config,
                                infer_unet_config, is_motion_key, is_motion_unet_config, unet_shapes_for)
from weightlab.files import load_tensors, mmap_tensors, sniff
from weightlab.formats import adapter_config, ldm, lora, motion, single_file
from weightlab.formats.adapter_config import AdapterConfig
from weightlab.formats.components import COMPONENTS
from weightlab.kinds import KINDS
from weightlab.residuals import Base, Dense, LoRA, MotionModule, Residual

log = logging.getLogger(__name__)
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
PICKLE_WEIGHT_FILES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes into a folder
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


def _check_unmatched(unmatched: list[str], strict: bool, source, what: str, target: str) -> list[str]:
    if unmatched and strict:
        raise UnmatchedKeysError(
            f"{source}: {len(unmatched)} {what} key(s) map to no {target}: {fmt_keys(unmatched)}. "
            "Fix: use a file made for this architecture, or pass strict=False (CLI: --lenient) to report and skip them.",
            unmatched)
    if unmatched:
        log.warning("%s: skipping %d unmatched key(s): %s", source, len(unmatched), fmt_keys(unmatched))
    return sorted(unmatched)


def _guess_lora_kind(targets: dict, source: Path, metadata: dict) -> str:
    if targets and all(is_motion_key(p) for p in targets):
        return "motion_lora"
    hint = (source.name + " " + json.dumps(metadata)).lower()
    if "lcm" in hint or all(any(m in p for p in targets) for m in _LCM_MARKERS):
        return "image_accel"
    return "style"


def _full_unet(weights: dict, config: dict, *, kind: str | None, source: Path, metadata: dict, skipped: list,
               strict: bool, pipeline_dir: Path | None = None, ldm_checkpoint: dict | None = None,
               components=None) -> Residual:
    """A base, or a dense term (kind ``style``) whose other components (those in ``components``, default all) are
    a single-file ``ldm_checkpoint``'s CLIP and VAE (converted by diffusers: `single_file.convert_components`), the
    components of its ``pipeline_dir``, or the ``<component>.``-prefixed keys `Dense.save` writes."""
    kind = kind or "base"
    if kind == "base":
        return _base(weights, config, source=source, metadata=metadata, skipped=skipped, strict=strict,
                     pipeline_dir=pipeline_dir)
    if kind != "style":
        raise WeightlabError(f"{source}: a full UNet checkpoint can be kind 'base' or 'style' (dense fine-tune), not {kind!r}.")
    saved = {c: {k[len(c) + 1:]: v for k, v in weights.items() if k.startswith(c + ".")} for c in COMPONENTS if c != "unet"}
    weights = {k: v for k, v in weights.items() if not k.startswith(tuple(f"{c}." for c in saved))}
    fam, unknown = best_family({k: v.dim() for k, v in weights.items()})  # a dense term is checked against the base at merge
    skipped = skipped + _check_unmatched(unknown, strict, source, "UNet", f"{fam.name} module")
    weights = {k: v for k, v in weights.items() if k not in unknown}
    carried = (single_file.components(ldm_checkpoint) if ldm_checkpoint is not None else
               [c for c in COMPONENTS if c != "unet" and (pipeline_dir / c).is_dir()] if pipeline_dir is not None else [])
    # Read only the selected components; a selection naming one it lacks reads all, for the merge to name what it has.
    if components is not None and {"unet", *carried} >= set(components):
        carried = [c for c in carried if c in components]
    if ldm_checkpoint is not None:
        saved = single_file.convert_components(ldm_checkpoint, fam.name, metadata=metadata, source=str(source),
                                               names=carried)
    elif pipeline_dir is not None:
        saved = {c: read_weights(component_weights(pipeline_dir, c))[0] for c in carried}
    others = {c: {k.removeprefix(COMPONENTS[c].strip): v for k, v in part.items()} for c, part in saved.items() if part}
    return Dense(family=fam.name, kind=kind, source=source, metadata=metadata, skipped=skipped, weights=weights,
                 others=others)


def component_weights(folder: Path, component: str) -> Path:
    """The safetensors weights file of pipeline ``folder``'s ``component``.

    Raises:
        FileFormatError: there are none (pickled or sharded weights), with the fix.
    """
    path = folder / component / COMPONENTS[component].weights_file
    if not path.is_file():
        raise FileFormatError(f"{folder / component}: no {path.name}. Fix: save the pipeline with safe_serialization "
                              f"and unsharded, or leave the component out (a recipe term's `components`).")
    return path


def _base(weights: dict, config: dict | None, *, source: Path, metadata: dict, skipped: list, strict: bool,
          pipeline_dir: Path | None) -> Base:
    """A base: its parameters are exactly those of the UNet its config describes (given, or inferred from the
    weights), whatever the layout; the family only names it (and refuses residuals of another at merge)."""
    spatial = {k: tuple(v.shape) for k, v in weights.items() if not is_motion_key(k)}
    config = config or infer_unet_config(spatial, what=str(source))
    motion_shapes = {k: tuple(v.shape) for k, v in weights.items() if is_motion_key(k)}
    motion_cfg = (infer_motion_config(motion_shapes, what=str(source))
                  if motion_shapes and not is_motion_unet_config(config) else None)
    expected = unet_shapes_for(config, motion_config=motion_cfg)
    unknown = [k for k in weights if k not in expected]
    skipped = skipped + _check_unmatched(unknown, strict, source, "UNet", "parameter of the UNet its config describes")
    weights = {k: v for k, v in weights.items() if k in expected}
    missing = [k for k in expected if k not in weights]
    if missing:
        raise UnmatchedKeysError(
            f"{source}: a base must hold the whole UNet its config describes; {len(missing)} parameter(s) missing: "
            f"{fmt_keys(missing)}. Fix: pass the complete checkpoint (with the config.json saved with it), or load it "
            "with kind='style' if it is a partial fine-tune.", missing)
    if bad := [f"{k}: {tuple(v.shape)} vs {expected[k]}" for k, v in weights.items() if tuple(v.shape) != expected[k]]:
        raise ShapeMismatchError(f"{source}: {len(bad)} weight(s) do not have the shape the UNet config gives: "
                                 f"{'; '.join(bad[:5])}. Fix: pass the config.json saved with these weights.")
    family = detect_family({k: v.dim() for k, v in weights.items()}, what=str(source)).name
    return Base(family=family, kind="base", source=source, metadata=metadata, skipped=skipped, weights=weights,
                config=config, pipeline_dir=pipeline_dir)


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
    expected = motion.adapter_shapes(config, what=str(source))
    unknown = [origin.get(k, k) for k in weights if k not in expected]
    skipped = _check_unmatched(unknown, strict, source, "motion-module", "parameter of the motion module its config describes")
    weights = {k: v for k, v in weights.items() if k in expected}
    if missing := [k for k in expected if k not in weights]:
        raise UnmatchedKeysError(
            f"{source}: a motion module must hold every parameter its config describes; {len(missing)} missing: "
            f"{fmt_keys(missing)}. Fix: pass the complete module (with the config.json saved with it).", missing)
    if bad := [f"{k}: {tuple(v.shape)} vs {expected[k]}" for k, v in weights.items() if tuple(v.shape) != expected[k]]:
        raise ShapeMismatchError(f"{source}: {len(bad)} weight(s) do not have the shape the motion config gives: "
                                 f"{'; '.join(bad[:5])}. Fix: pass the config.json saved with these weights.")
    family = motion.family_of({k: v.dim() for k, v in weights.items()}, what=str(source)).name
    if kind not in (None, "motion"):
        raise WeightlabError(f"{source}: a motion module is kind 'motion', not {kind!r}.")
    return MotionModule(family=family, source=source, metadata=metadata, skipped=skipped, weights=weights, config=config)


def _adapter_options(source: Path, metadata: dict, config_file: Path | None) -> AdapterConfig | None:
    """PEFT options from the file's ``lora_adapter_metadata`` and/or an ``adapter_config.json``; both must agree."""
    in_file = adapter_config.from_metadata(metadata, str(source))
    beside = adapter_config.from_file(config_file) if config_file else None
    if in_file and beside and dataclasses.replace(in_file, where="") != dataclasses.replace(beside, where=""):
        raise AdapterOptionError(f"{source}: the adapter options in {in_file.where} and {beside.where} disagree "
                                 f"({in_file.describe()} vs {beside.describe()}). Fix: keep the ones saved with "
                                 "these weights and delete the other.")
    return in_file or beside


def _alpha_source(targets: dict, adapter: AdapterConfig | None) -> str:
    """Where the alphas came from, for ``weightlab inspect``."""
    if adapter is not None:
        return adapter.describe()
    targets = {p: t for p, t in targets.items() if t.rank is not None}  # a full diff or whole LoKr has no alpha
    with_key = sum(t.alpha is not None for t in targets.values())
    if with_key == len(targets):
        return "`.alpha` keys" if targets else "no alphas (scale 1: full diffs or whole LoKr factors)"
    none = "alpha = rank (scale 1; diffusers/PEFT convention for a file without alphas or adapter options)"
    return none if with_key == 0 else f"`.alpha` keys for {with_key} of {len(targets)} modules; the others {none}"


def _lora_family(weights: dict, metadata: dict, source: Path) -> Family:
    """The family (sd15, sd2, sdxl) whose modules explain the most keys, and then the most factor ranks (sd2 makes
    ``proj_in``/``proj_out`` linear where sd15 has 1x1 convs). Among several that fit equally (an attention-only
    LoRA fits sd15 and sd2), the one the file's metadata names (`lora.declared_family`), else the first; the merge
    accepts it into any base whose family has all its modules.

    Raises:
        FamilyMismatchError: the metadata names a family that fits the modules worse than another.
    """
    declared = lora.declared_family(metadata)
    scores: dict[str, tuple[int, int]] = {}
    for fam in FAMILIES.values():
        targets, unmatched = lora.parse_lora(weights, fam)
        misfit = sum(getattr(t, "down", None) is not None and t.down.dim() != fam.weight_modules[p]
                     for p, t in targets.items())
        scores[fam.name] = (len(unmatched), misfit)
        if declared is None and scores[fam.name] == (0, 0):
            break
    best = min(scores.values())
    fits = [name for name, score in scores.items() if score == best]
    if declared is None or declared[0] in fits:
        return FAMILIES[declared[0] if declared else fits[0]]
    name, where = declared
    unmatched, misfit = scores[name]
    why = ", ".join(w for n, w in ((unmatched, f"{unmatched} key(s) map to no {name} module"),
                                   (misfit, f"{misfit} factor(s) have the wrong rank for {name} (linear vs conv)")) if n)
    raise FamilyMismatchError(
        f"{source}: its metadata ({where}) says it was made for family {name!r}, but its modules fit "
        f"{' and '.join(repr(f) for f in fits)} better ({why}). Fix: use the LoRA made for your base, or correct "
        "the metadata if it is wrong.")


def _lora(weights: dict, *, kind: str | None, source: Path, metadata: dict, strict: bool,
          config_file: Path | None = None) -> LoRA:
    adapter = _adapter_options(source, metadata, config_file)
    fam = _lora_family(weights, metadata, source)
    targets, unmatched = lora.parse_lora(weights, fam, adapter=adapter, source=str(source))
    others, alpha_sources = {}, [_alpha_source(targets, adapter)] if targets else []
    for c in (c for c in COMPONENTS.values() if c.adapter_prefixes):
        options = adapter_config.from_metadata(metadata, str(source), component=c.name)
        found, more = lora.parse_lora(weights, fam, adapter=options, source=str(source), component=c.name)
        unmatched += more
        if found:
            others[c.name] = found
            alpha_sources.append(f"{c.name}: {_alpha_source(found, options)}")
    skipped = _check_unmatched(sorted(unmatched), strict, source, "LoRA", f"{fam.name} UNet or text-encoder module")
    if not targets and not others:
        raise UnmatchedKeysError(f"{source}: no LoRA target maps to a UNet module of any known family "
                                 f"({', '.join(FAMILIES)}) or to a CLIP text-encoder module. Fix: use a LoRA made "
                                 "for Stable Diffusion.", sorted(unmatched))
    family = fam.name
    kind = kind or metadata.get("weightlab.kind") or _guess_lora_kind(targets, source, metadata)
    if kind not in ("style", "image_accel", "motion_lora"):
        raise WeightlabError(f"{source}: a LoRA can be kind style, image_accel or motion_lora, not {kind!r}.")
    motion_targets = [p for p in targets if is_motion_key(p)]
    if kind == "motion_lora" and (len(motion_targets) != len(targets) or others):
        spatial = [p for p in targets if p not in motion_targets] + [f"{c}.{p}" for c, part in others.items() for p in part]
        raise WeightlabError(f"{source}: a motion LoRA may only target motion-module weights; found spatial targets "
                             f"{fmt_keys(spatial)}.")
    return LoRA(family=family, kind=kind, source=source, metadata=metadata, skipped=skipped, targets=targets,
                others=others, alpha_source="; ".join(alpha_sources))


def load(path: str | Path, *, kind: str | None = None, allow_pickle: bool = False, strict: bool = True,
         components=None) -> Residual:
    """Load a base, LoRA, dense fine-tune or motion module from any supported layout.

    Args:
        path (str | Path): a ``.safetensors`` file, a pickle checkpoint (needs ``allow_pickle``), a diffusers
            folder (pipeline, ``unet/``, ``MotionAdapter``, ``save_lora_weights`` output) or a PEFT adapter folder
            (``adapter_config.json`` + ``adapter_model.safetensors``; a PEFT weights file given alone reads the
            ``adapter_config.json`` beside it). LoRA alphas: `weightlab.formats.adapter_config`.
        kind (str | None, default None): declare the role (``base``, ``style``, ``image_accel``, ``motion``,
            ``motion_lora``); detected when None. A full checkpoint declared ``style`` becomes a :class:`Dense`.
        allow_pickle (bool, default False): read ``.ckpt/.pt/.bin`` with ``torch.load(weights_only=True)`` in a child process.
        strict (bool, default True): unmatched keys raise :class:`UnmatchedKeysError`; False reports them in ``.skipped``.
        components (Iterable[str] | None, default None): the pipeline components a dense fine-tune's file is read
            for (`weightlab.formats.components`; a recipe term's ``components``); None: every one it carries. A
            single-file checkpoint's CLIP and VAE left out here are not converted, so not checked.
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
        return _load_folder(path, kind=kind, allow_pickle=allow_pickle, strict=strict, components=components)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file or folder.")
    weights, metadata = read_weights(path, allow_pickle=allow_pickle)
    if not weights:
        raise FileFormatError(f"{path}: holds no tensors.")
    kind = kind or (metadata.get("weightlab.kind") if metadata.get("weightlab.kind") in KINDS else None)
    stored_cfg = metadata.get("weightlab.config")
    stored_cfg = _json_object(stored_cfg, f"{path}: __metadata__ weightlab.config") if stored_cfg else None
    if lora.is_lora(weights):
        return _lora(weights, kind=kind, source=path, metadata=metadata, strict=strict,
                     config_file=adapter_config.sibling_config(path))
    if ldm.is_ldm(weights):
        converted, config, skipped = ldm.convert_ldm_unet(weights, strict=strict, source=str(path))
        return _full_unet(converted, stored_cfg or config, kind=kind, source=path, metadata=metadata,
                          skipped=skipped, strict=strict, ldm_checkpoint=weights, components=components)
    if "conv_in.weight" in weights:
        return _full_unet(weights, stored_cfg, kind=kind, source=path, metadata=metadata, skipped=[], strict=strict,
                          components=components)
    if any(is_motion_key(k) or k.startswith(("down_blocks.", "mid_block.", "up_blocks.")) for k in weights):
        return _motion(weights, config=stored_cfg, kind=kind, source=path, metadata=metadata, strict=strict)
    raise UnmatchedKeysError(
        f"{path}: not a recognised UNet, LoRA or motion-module file (first keys: {fmt_keys(list(weights), 5)}). "
        "Fix: pass a Stable Diffusion UNet checkpoint, a LoRA (PEFT/diffusers/kohya keys) or an AnimateDiff motion module.", list(weights))


def pipeline_dir(base: Base, *, tokenizer: str | Path | None = None) -> Path:
    """The diffusers pipeline folder that gives a base its text encoder, tokenizer, VAE and scheduler: the folder it
    was loaded from, or, for a single-file checkpoint that carries its CLIP and VAE, one built from the file with
    diffusers' converters (`weightlab.formats.single_file.pipeline_folder`, cached; ``tokenizer``: a tokenizer folder,
    or for SDXL a folder holding ``tokenizer/`` and ``tokenizer_2/``, else the family's in the Hugging Face cache).

    Raises:
        MissingComponentError: the base holds only a UNet, or no tokenizer is found (the message says how to get one).
    """
    if base.pipeline_dir is not None:
        return base.pipeline_dir
    source = Path(base.source)
    if source.is_file() and sniff(source) is not None:
        weights, metadata = read_weights(source)
        if single_file.components(weights):
            return single_file.pipeline_folder(source, weights, metadata, base.family, tokenizer=tokenizer)
    raise MissingComponentError(
        f"{source}: holds a UNet only; sampling also needs a text encoder, tokenizer and VAE. Fix: use a diffusers "
        "pipeline folder or a single-file checkpoint with its CLIP and VAE as the base, or pass pipeline_dir=DIR.")


def _json_object(text: str, where: str) -> dict:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise FileFormatError(f"{where}: not valid JSON ({e}). Fix: restore it from the original model.") from None
    if not isinstance(doc, dict):
        raise FileFormatError(f"{where}: expected a JSON object, got {type(doc).__name__}. "
                              "Fix: restore it from the original model.")
    return doc


def lora_folder_file(folder: Path, allow_pickle: bool) -> Path | None:
    """The weights file of a PEFT adapter folder or of a folder diffusers' ``save_lora_weights`` wrote, or None."""
    names = adapter_config.PEFT_WEIGHT_FILES if (folder / adapter_config.CONFIG_FILE).is_file() else ()
    if not names and (folder / DIFFUSERS_LORA_FILE).is_file() and not (folder / "config.json").is_file():
        names = (DIFFUSERS_LORA_FILE,)
    for name in names:
        if (folder / name).is_file():
            if name.endswith(".bin") and not allow_pickle:
                load_tensors(folder / name)  # raises UnsafeFileError with the opt-in hint
            return folder / name
    if names:
        raise FileFormatError(f"{folder}: has {adapter_config.CONFIG_FILE} but no {' or '.join(names)}. "
                              "Fix: pass the folder PEFT's save_pretrained wrote, complete.")
    return None


def _load_folder(path: Path, *, kind: str | None, allow_pickle: bool, strict: bool, components=None) -> Residual:
    lora_file = lora_folder_file(path, allow_pickle)
    if lora_file is not None:
        weights, metadata = read_weights(lora_file, allow_pickle=allow_pickle)
        config_file = path / adapter_config.CONFIG_FILE
        return _lora(weights, kind=kind, source=path, metadata=metadata, strict=strict,
                     config_file=config_file if config_file.is_file() else None)
    pipeline_dir = None
    if (path / "model_index.json").is_file() or (path / "unet" / "config.json").is_file():
        pipeline_dir, path = path, path / "unet"
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileFormatError(f"{path}: a folder needs a diffusers config.json (or model_index.json with unet/), or "
                              f"PEFT's {adapter_config.CONFIG_FILE} + adapter_model.safetensors.")
    raw_config = _json_object(cfg_file.read_text(), str(cfg_file))
    config = {k: v for k, v in raw_config.items() if not k.startswith("_")}
    cls = raw_config.get("_class_name", "")
    wfile = _folder_weights(path, allow_pickle)
    weights, metadata = read_weights(wfile, allow_pickle=allow_pickle)
    if cls == "MotionAdapter":
        return _motion(weights, config=config, kind=kind, source=path, metadata=metadata, strict=strict)
    if cls in ("UNet2DConditionModel", "UNetMotionModel"):
        return _full_unet(weights, config, kind=kind, source=path, metadata=metadata, skipped=[], strict=strict,
                          pipeline_dir=pipeline_dir, components=components)
    raise FileFormatError(f"{path}: unsupported diffusers class {cls!r} (expected UNet2DConditionModel, UNetMotionModel or MotionAdapter).")
