"""Single-file checkpoints' other components: the CLIP text encoder(s) (``cond_stage_model.*``: SD1.x's transformers
CLIP, SD2's OpenCLIP; SDXL's ``conditioner.embedders.0.transformer.*`` CLIP-L and ``conditioner.embedders.1.model.*``
OpenCLIP-bigG with its ``text_projection``, diffusers' ``text_encoder_2``) and the VAE (``first_stage_model.*``),
converted with diffusers' single-file converters (``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``,
``convert_ldm_vae_checkpoint``) into a diffusers pipeline folder, so a personalized checkpoint (DreamBooth/Civitai
style) is a whole base without a diffusers folder.

Configs: the family's, shipped in ``weightlab/configs/<family>/`` as a diffusers pipeline config folder (diffusers' own:
tests/formats/test_single_file_configs.py), unless the file's ``__metadata__`` carries ``weightlab.text_encoder_config``
/ ``weightlab.vae_config`` (JSON; ``weightlab.text_encoder_2_config`` for SDXL's second). Each component must have
exactly the parameters its config gives. The tokenizers (SDXL has two, ``tokenizer`` and ``tokenizer_2``) are the one
component such a file lacks: a folder the user gives, else the family's in the Hugging Face cache (offline), else
:class:`MissingComponentError` saying how to get them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from weightlab.errors import FileFormatError, MissingComponentError, ShapeMismatchError, UnmatchedKeysError, fmt_keys
from weightlab.formats.components import COMPONENTS

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
CONVERTED = ("text_encoder", "text_encoder_2", "vae")  # the components besides the UNet a single file may carry
# Which of diffusers' converters reads each text-encoder prefix: the LDM code keeps a transformers CLIP as
# ``.transformer`` (SD1.x, SDXL's CLIP-L) and an OpenCLIP model as ``.model`` (SD2's ViT-H, SDXL's bigG).
TEXT_ENCODER_PREFIXES = {p: "open_clip" if p.endswith(".model.") else "clip"
                         for c in CONVERTED if c != "vae" for p in COMPONENTS[c].ldm_prefixes}
VAE_PREFIX = COMPONENTS["vae"].ldm_prefixes[0]
COMPONENT_CONFIGS = {c: f"{c}/config.json" for c in CONVERTED}
WEIGHT_FILES = {c: f"{c}/{COMPONENTS[c].weights_file}" for c in CONVERTED}
# Where each of the family's tokenizers may be in the Hugging Face cache, (repo, subfolder), in lookup order: the
# family's diffusers repositories and those diffusers' legacy from_single_file reads.
_SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
TOKENIZER_REPOS = {
    "sd15": {"tokenizer": (("openai/clip-vit-large-patch14", ""),
                           ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
                           ("runwayml/stable-diffusion-v1-5", "tokenizer"))},
    "sd2": {"tokenizer": (("stabilityai/stable-diffusion-2-1", "tokenizer"),
                          ("stabilityai/stable-diffusion-2", "tokenizer"))},
    "sdxl": {"tokenizer": ((_SDXL, "tokenizer"), ("openai/clip-vit-large-patch14", "")),
             "tokenizer_2": ((_SDXL, "tokenizer_2"), ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""))},
}
# A CLIP tokenizer is a fast ``tokenizer.json`` or a slow ``vocab.json`` + ``merges.txt`` (repositories hold both).
TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def components(keys) -> list[str]:
    """The components besides the UNet that a single-file checkpoint's keys carry (``text_encoder``,
    ``text_encoder_2``, ``vae``)."""
    keys = list(keys)
    return [c for c in CONVERTED if any(k.startswith(COMPONENTS[c].ldm_prefixes) for k in keys)]


def config_dir(family: str) -> Path:
    """The shipped diffusers pipeline config folder of ``family``.

    Raises:
        FileFormatError: weightlab ships none for the family.
    """
    folder = CONFIG_ROOT / family
    if not (folder / "model_index.json").is_file():
        shipped = ", ".join(sorted(p.name for p in CONFIG_ROOT.iterdir() if (p / "model_index.json").is_file()))
        raise FileFormatError(f"weightlab builds single-file pipelines of families {shipped}, not {family!r}. Fix: "
                              "convert the checkpoint with diffusers (`<Pipeline>.from_single_file(FILE).save_pretrained(DIR)`) "
                              "and use DIR as the base.")
    return folder


def _pipeline(family: str) -> dict:
    """The family's ``model_index.json``: which components and tokenizers its pipeline has."""
    return json.loads((config_dir(family) / "model_index.json").read_text())


def _config(family: str, component: str, metadata: dict) -> dict:
    stored = metadata.get(f"weightlab.{component}_config")
    if not stored:
        return json.loads((config_dir(family) / COMPONENT_CONFIGS[component]).read_text())
    try:
        return dict(json.loads(stored))
    except (ValueError, TypeError) as e:
        raise FileFormatError(f"__metadata__ weightlab.{component}_config is not a JSON object ({e}). "
                              "Fix: restore it from the original model, or delete it to use the family's config.") from None


def _model(component: str, config: dict):
    cls = COMPONENTS[component].model_type()
    if component == "vae":
        return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return cls(cls.config_class(**config))


def _text_encoder(checkpoint: dict, component: str, model) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    prefix = next(p for p in COMPONENTS[component].ldm_prefixes if any(k.startswith(p) for k in checkpoint))
    part = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
    if TEXT_ENCODER_PREFIXES[prefix] == "clip":
        converted = convert_ldm_clip_checkpoint(part)
    else:
        converted = convert_open_clip_checkpoint(model, part, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattens CLIPTextModel, as diffusers' loader handles
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    # position_ids: a buffer transformers recomputes; OpenCLIP's projection: kept by a CLIPTextModelWithProjection
    # (SDXL's text_encoder_2), of no use to a CLIPTextModel (SD2's).
    unused = ("position_ids",) if hasattr(model, "text_projection") else ("position_ids", "text_projection.weight")
    return {k: v for k, v in converted.items() if not k.endswith(unused)}


def convert_components(checkpoint: dict, family: str, *, metadata: dict | None = None, source: str = "checkpoint",
                       names=None) -> dict[str, dict]:
    """``{component: diffusers state dict}`` for the text encoder(s) and VAE a single-file checkpoint carries (those
    in ``names`` only, when given), each with exactly the parameters (and shapes) of the model its config builds.

    Raises:
        UnmatchedKeysError: a component misses parameters, or has some its config's model lacks, or the family's
            pipeline has no such component (SDXL's ``conditioner.embedders.1`` in an SD1.5 checkpoint).
        ShapeMismatchError: a component is not the family's (e.g. a CLIP of another width), naming the fix.
    """
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    out = {}
    pipeline = _pipeline(family)
    for component in components(checkpoint):
        if names is not None and component not in names:
            continue
        if component not in pipeline:
            keys = [k for k in checkpoint if k.startswith(COMPONENTS[component].ldm_prefixes)]
            raise UnmatchedKeysError(f"{source}: carries a {component} ({fmt_keys(keys, 3)}), which the {family} "
                                     "pipeline has not. Fix: use a checkpoint of one family (its UNet names it).", keys)
        config = _config(family, component, metadata or {})
        with torch.device("meta"):
            model = _model(component, config)
        if component == "vae":
            state = convert_ldm_vae_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}, config)
        else:
            state = _text_encoder(checkpoint, component, model)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
        where = f"the file's weightlab.{component}_config" if f"weightlab.{component}_config" in (metadata or {}) \
            else f"weightlab/configs/{family}/{COMPONENT_CONFIGS[component]}"
        missing, unknown = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        bad = [f"{k}: {tuple(v.shape)} vs {expected[k]}" for k, v in state.items()
               if k in expected and tuple(v.shape) != expected[k]]
        if missing or unknown or bad:
            what = "; ".join(f"{n} {w}: {fmt_keys(ks, 3)}" for n, w, ks in (
                (len(missing), "missing", missing), (len(unknown), "unknown", unknown), (len(bad), "of another shape", bad)) if ks)
            message = (f"{source}: its {component} is not the {family} one that {where} describes ({what}). Fix: "
                       "convert the checkpoint with diffusers' from_single_file(config=<its diffusers folder>) and use "
                       f"that folder as the base, or record the component's config in the file's __metadata__ as "
                       f"weightlab.{component}_config (as a style term, `components: [unet]` leaves it out).")
            if missing or unknown:
                raise UnmatchedKeysError(message, missing + unknown)
            raise ShapeMismatchError(message)
        out[component] = state
    return out


def find_tokenizers(family: str, given: str | Path | None = None) -> dict[str, Path]:
    """The folder of each of the family's tokenizers (``tokenizer``; SDXL also ``tokenizer_2``): in ``given`` (a
    tokenizer folder or a pipeline folder with ``tokenizer/``; for SDXL a folder with ``tokenizer/`` and
    ``tokenizer_2/``, e.g. the SDXL pipeline's), else the family's in the Hugging Face cache (no network).

    Raises:
        MissingComponentError: one is not found; the message says how to get it.
    """
    names = [n for n in _pipeline(family) if n.startswith("tokenizer")]
    one = names == ["tokenizer"]
    if given is not None:
        given = Path(given)
        found = {n: next((f for f in ((given / n, given) if one else (given / n,)) if _is_tokenizer(f)), None)
                 for n in names}
        if missing := [n for n, f in found.items() if f is None]:
            raise MissingComponentError(
                f"{given}: no CLIP tokenizer {'there' if one else 'in ' + ', '.join(f'{n}/' for n in missing)} "
                "(tokenizer.json, or vocab.json + merges.txt). Fix: pass "
                + ("the `tokenizer/` folder of the model's diffusers repository (or the repository folder)." if one else
                   f"a folder holding {' and '.join(f'{n}/' for n in names)} (a diffusers repository folder of the "
                   f"family, e.g. {TOKENIZER_REPOS[family]['tokenizer'][0][0]}'s)."))
        return found
    repos = TOKENIZER_REPOS.get(family, {})
    found = {}
    for name in names:
        if (folder := next(filter(None, (_cached(repo, sub) for repo, sub in repos.get(name, ()))), None)) is not None:
            found[name] = folder
    missing = [n for n in names if n not in found]
    if not missing:
        return found
    patterns = {}  # the first repository of each missing tokenizer -> what to download from it
    for repo, sub in (repos[n][0] for n in missing if repos.get(n)):
        patterns.setdefault(repo, []).extend([f"{sub}/*"] if sub else ["*.json", "*.txt"])
    fetch = "; ".join(f"`hf download {repo} {' '.join(f'--include {p!r}' for p in pats)}`"
                      for repo, pats in patterns.items()) or "download the base model's tokenizer folder"
    looked = ", ".join(f"{r}{'/' + s if s else ''}" for n in missing for r, s in repos.get(n, ())) or "no known repository"
    raise MissingComponentError(
        f"a single-file checkpoint carries no tokenizer, and no {family!r} {' or '.join(missing)} is in the Hugging "
        f"Face cache ({looked}). Fix: {fetch} once (online), or pass a tokenizer folder "
        f"(--tokenizer DIR; tokenizer=DIR{'' if one else ', holding ' + ' and '.join(f'{n}/' for n in names)}).")


def _is_tokenizer(folder: Path) -> bool:
    return any(all((folder / f).is_file() for f in files) for files in TOKENIZER_SETS)


def _cached(repo: str, sub: str) -> Path | None:
    """The tokenizer folder ``sub`` of ``repo`` in the Hugging Face cache (no network), or None."""
    from huggingface_hub import try_to_load_from_cache

    for files in TOKENIZER_SETS:
        paths = [try_to_load_from_cache(repo, f"{sub}/{f}".lstrip("/")) for f in files]
        if all(isinstance(p, str) for p in paths):
            return Path(paths[0]).parent
    return None


def _cache_root() -> Path:
    return Path(os.environ.get("WEIGHTLAB_HOME") or "~/.weightlab").expanduser() / "cache" / "single_file"


def pipeline_folder(source: Path, checkpoint: dict, metadata: dict, family: str, *,
                    tokenizer: str | Path | None = None) -> Path:
    """A diffusers pipeline folder (``text_encoder/``, ``tokenizer/``, SDXL's ``text_encoder_2/`` and
    ``tokenizer_2/``, ``vae/``, ``scheduler/``, configs) built from a single-file checkpoint, cached under
    ``$WEIGHTLAB_HOME/cache/single_file`` by the file (path, size, mtime) and the tokenizers; written atomically. The
    UNet is not copied: merges read it from the file.

    Raises:
        MissingComponentError: the file lacks a text encoder of its family's pipeline or the VAE, or a tokenizer is
            not found (see :func:`find_tokenizers`).
        FileFormatError, UnmatchedKeysError, ShapeMismatchError: see :func:`config_dir`, :func:`convert_components`.
    """
    from safetensors.torch import save_file

    pipeline = _pipeline(family)
    missing = [c for c in CONVERTED if c in pipeline and c not in components(checkpoint)]
    if missing:
        what = " and ".join(f"{c} ({' or '.join(f'{p}*' for p in COMPONENTS[c].ldm_prefixes)})" for c in missing)
        raise MissingComponentError(f"{source}: a {family} single-file checkpoint without its {what} cannot make a "
                                    "pipeline. Fix: use a diffusers pipeline folder as the base, or pass "
                                    "pipeline_dir=DIR for the other components.")
    toks = find_tokenizers(family, tokenizer)
    stat = source.stat()
    tok_key = "|".join(str(t.resolve()) for t in toks.values())
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{tok_key}".encode()).hexdigest()
    folder = _cache_root() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', source.stem)[:40]}-{key[:16]}"
    if (folder / "model_index.json").is_file():
        return folder
    converted = convert_components(checkpoint, family, metadata=metadata, source=str(source))
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(config_dir(family), tmp)
    for component, state in converted.items():
        (tmp / COMPONENT_CONFIGS[component]).write_text(json.dumps(_config(family, component, metadata), indent=2))
        save_file({k: v.contiguous() for k, v in state.items()}, tmp / WEIGHT_FILES[component])
    for sub, tok in toks.items():
        (tmp / sub).mkdir()
        for name in TOKENIZER_FILES:
            if (tok / name).is_file():
                shutil.copyfile(tok / name, tmp / sub / name)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def text_encoder_to_ldm(state_dict: dict, *, prefix: str = "cond_stage_model.transformer.") -> dict:
    """A transformers ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) state dict in single-file names under
    ``prefix`` (a key of :data:`TEXT_ENCODER_PREFIXES`; inverse of the readers above): a transformers CLIP's
    ``<prefix>text_model.*`` (SD1.x; SDXL's ``conditioner.embedders.0.transformer.``), or OpenCLIP's names (SD2's
    ``cond_stage_model.model.``, SDXL's ``conditioner.embedders.1.model.``: diffusers' ``openclip`` map inverted, q/k/v
    concatenated into ``in_proj``, ``text_projection`` transposed)."""
    import torch
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    if TEXT_ENCODER_PREFIXES[prefix] == "clip":
        return {f"{prefix}text_model.{k}": v for k, v in sd.items()}
    layers = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out = {}
    for k, v in sd.items():
        if "text_model." + k in layers:
            out[layers["text_model." + k]] = v
            continue
        if k in layers:  # text_projection.weight: OpenCLIP multiplies by it from the right
            out[layers[k]] = v.T.contiguous()
            continue
        if ".self_attn.k_proj." in k or ".self_attn.v_proj." in k:
            continue  # concatenated with q_proj below
        name = "transformer.resblocks." + k.removeprefix("encoder.layers.")
        for new, old in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), (".mlp.fc1.", ".mlp.c_fc."),
                         (".mlp.fc2.", ".mlp.c_proj."), (".self_attn.out_proj.", ".attn.out_proj.")):
            name = name.replace(new, old)
        if ".self_attn.q_proj." in k:
            head, kind = name.split(".self_attn.q_proj.")
            name, v = f"{head}.attn.in_proj_{kind}", torch.cat([sd[k.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj")])
        out[name] = v
    return {f"{prefix}{k}": v for k, v in out.items()}


def vae_to_ldm(state_dict: dict) -> dict:
    """A diffusers ``AutoencoderKL`` state dict in single-file names (``first_stage_model.*``; inverse of diffusers'
    ``convert_ldm_vae_checkpoint``, attention projections back to 1x1 convs)."""
    ups = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("decoder.up_blocks."))
    out = {}
    for k, v in state_dict.items():
        name = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(r"decoder\.up_blocks\.(\d+)\.", lambda m: f"decoder.up.{ups - 1 - int(m.group(1))}.", name)
        name = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", name)
        name = name.replace(".resnets.", ".block.").replace(".upsamplers.0.", ".upsample.")
        if ".mid_block.attentions.0." in name:
            name = name.replace("mid_block.attentions.0.", "mid.attn_1.")
            for new, old in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
                name = name.replace(f".{new}.", f".{old}.")
            if v.dim() == 2:
                v = v.reshape(*v.shape, 1, 1)
        out[VAE_PREFIX + name] = v
    return out
