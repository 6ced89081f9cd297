"""Single-file checkpoints' other components: the CLIP text encoder (``cond_stage_model.*``: SD1.x's transformers CLIP,
SD2's OpenCLIP) and the VAE (``first_stage_model.*``), converted with diffusers' single-file converters
(``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``, ``convert_ldm_vae_checkpoint``) into a diffusers
pipeline folder, so a personalized checkpoint (DreamBooth/Civitai style) is a whole base without a diffusers folder.

Configs: the family's, shipped in ``weightlab/configs/<family>/`` as a diffusers pipeline config folder (diffusers' own:
tests/formats/test_single_file_configs.py), unless the file's ``__metadata__`` carries ``weightlab.text_encoder_config``
/ ``weightlab.vae_config`` (JSON). Each component must have exactly the parameters its config gives. The tokenizer is
the one component such a file lacks: a folder the user gives, else the family's tokenizer in the Hugging Face cache
(offline), else :class:`MissingComponentError` saying how to get it.
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
# Which of diffusers' converters reads each text-encoder prefix (SD1.x's CLIP, SD2's OpenCLIP).
TEXT_ENCODER_PREFIXES = dict(zip(COMPONENTS["text_encoder"].ldm_prefixes, ("clip", "open_clip")))
VAE_PREFIX = COMPONENTS["vae"].ldm_prefixes[0]
CONVERTED = ("text_encoder", "vae")  # the components besides the UNet that a single-file checkpoint may carry
COMPONENT_CONFIGS = {c: f"{c}/config.json" for c in CONVERTED}
WEIGHT_FILES = {c: f"{c}/{COMPONENTS[c].weights_file}" for c in CONVERTED}
# The family's tokenizer in the Hugging Face cache, (repo, subfolder), where diffusers' from_single_file looks for it.
TOKENIZER_REPOS = {
    "sd15": (("openai/clip-vit-large-patch14", ""), ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
             ("runwayml/stable-diffusion-v1-5", "tokenizer")),
    "sd2": (("stabilityai/stable-diffusion-2-1", "tokenizer"), ("stabilityai/stable-diffusion-2", "tokenizer")),
}
# A CLIP tokenizer is a fast ``tokenizer.json`` or a slow ``vocab.json`` + ``merges.txt`` (repositories hold both).
TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
# Buffers transformers recomputes, and OpenCLIP's projection that a CLIPTextModel has no use for.
_NOT_PARAMETERS = ("position_ids", "text_projection.weight")


def components(keys) -> list[str]:
    """The components besides the UNet that a single-file checkpoint's keys carry (``text_encoder``, ``vae``)."""
    keys = list(keys)
    return [c for c in CONVERTED if any(k.startswith(COMPONENTS[c].ldm_prefixes) for k in keys)]


def config_dir(family: str) -> Path:
    """The shipped diffusers pipeline config folder of ``family``.

    Raises:
        FileFormatError: weightlab ships none for the family (SDXL's two text encoders are not supported yet).
    """
    folder = CONFIG_ROOT / family
    if not (folder / "model_index.json").is_file():
        shipped = ", ".join(sorted(p.name for p in CONFIG_ROOT.iterdir() if (p / "model_index.json").is_file()))
        raise FileFormatError(f"weightlab builds single-file pipelines of families {shipped}, not {family!r}. Fix: "
                              "convert the checkpoint with diffusers (`<Pipeline>.from_single_file(FILE).save_pretrained(DIR)`) "
                              "and use DIR as the base.")
    return folder


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
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    if component == "vae":
        return AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return CLIPTextModel(CLIPTextConfig(**config))


def _text_encoder(checkpoint: dict, model) -> dict:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    prefix = next(p for p in TEXT_ENCODER_PREFIXES if any(k.startswith(p) for k in checkpoint))
    part = {k: v for k, v in checkpoint.items() if k.startswith(prefix)}
    if TEXT_ENCODER_PREFIXES[prefix] == "clip":
        converted = convert_ldm_clip_checkpoint(part)
    else:
        converted = convert_open_clip_checkpoint(model, part, prefix=prefix)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattens CLIPTextModel, as diffusers' loader handles
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    return {k: v for k, v in converted.items() if not k.endswith(_NOT_PARAMETERS)}


def convert_components(checkpoint: dict, family: str, *, metadata: dict | None = None, source: str = "checkpoint",
                       names=None) -> dict[str, dict]:
    """``{component: diffusers state dict}`` for the text encoder and VAE a single-file checkpoint carries (those in
    ``names`` only, when given), each with exactly the parameters (and shapes) of the model its config builds.

    Raises:
        UnmatchedKeysError: a component misses parameters, or has some its config's model lacks.
        ShapeMismatchError: a component is not the family's (e.g. a CLIP of another width), naming the fix.
    """
    import torch
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    out = {}
    for component in components(checkpoint):
        if names is not None and component not in names:
            continue
        config = _config(family, component, metadata or {})
        with torch.device("meta"):
            model = _model(component, config)
        if component == "vae":
            state = convert_ldm_vae_checkpoint({k: v for k, v in checkpoint.items() if k.startswith(VAE_PREFIX)}, config)
        else:
            state = _text_encoder(checkpoint, model)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith(_NOT_PARAMETERS)}
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


def find_tokenizer(family: str, given: str | Path | None = None) -> Path:
    """The tokenizer folder to use: ``given`` (a tokenizer folder, or a pipeline folder with ``tokenizer/``), else the
    family's tokenizer in the Hugging Face cache (no network).

    Raises:
        MissingComponentError: none found; the message says how to get one.
    """
    if given is not None:
        for folder in (Path(given), Path(given) / "tokenizer"):
            if any(all((folder / f).is_file() for f in files) for files in TOKENIZER_SETS):
                return folder
        raise MissingComponentError(f"{given}: no CLIP tokenizer there (tokenizer.json, or vocab.json + merges.txt). "
                                    "Fix: pass the `tokenizer/` folder of the model's diffusers repository (or the "
                                    "repository folder).")
    from huggingface_hub import try_to_load_from_cache

    for repo, sub in TOKENIZER_REPOS.get(family, ()):
        for files in TOKENIZER_SETS:
            found = [try_to_load_from_cache(repo, f"{sub}/{f}".lstrip("/")) for f in files]
            if all(isinstance(f, str) for f in found):
                return Path(found[0]).parent
    repos = [f"{r}{'/' + s if s else ''}" for r, s in TOKENIZER_REPOS.get(family, ())]
    fetch = (f"`huggingface-cli download {TOKENIZER_REPOS[family][0][0]} "
             f"{' '.join(f'{TOKENIZER_REPOS[family][0][1]}/{f}'.lstrip('/') for f in TOKENIZER_FILES)}`"
             if family in TOKENIZER_REPOS else "download the base model's tokenizer/ folder")
    raise MissingComponentError(
        f"a single-file checkpoint carries no tokenizer, and none of family {family!r} is in the Hugging Face cache "
        f"({', '.join(repos) or 'no known repository'}). Fix: {fetch} once (online), or pass a tokenizer folder "
        "(--tokenizer DIR; tokenizer=DIR).")


def _cache_root() -> Path:
    return Path(os.environ.get("WEIGHTLAB_HOME") or "~/.weightlab").expanduser() / "cache" / "single_file"


def pipeline_folder(source: Path, checkpoint: dict, metadata: dict, family: str, *,
                    tokenizer: str | Path | None = None) -> Path:
    """A diffusers pipeline folder (``text_encoder/``, ``tokenizer/``, ``vae/``, ``scheduler/``, configs) built from a
    single-file checkpoint, cached under ``$WEIGHTLAB_HOME/cache/single_file`` by the file (path, size, mtime) and
    the tokenizer; written atomically. The UNet is not copied: merges read it from the file.

    Raises:
        MissingComponentError: the file lacks the text encoder or the VAE, or no tokenizer is found.
        FileFormatError, UnmatchedKeysError, ShapeMismatchError: see :func:`config_dir`, :func:`convert_components`.
    """
    from safetensors.torch import save_file

    missing = [c for c in CONVERTED if c not in components(checkpoint)]
    if missing:
        raise MissingComponentError(f"{source}: a single-file checkpoint without its {' and '.join(missing)} cannot "
                                    "make a pipeline. Fix: use a diffusers pipeline folder as the base, or pass "
                                    "pipeline_dir=DIR for the other components.")
    tok = find_tokenizer(family, tokenizer)
    stat = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{tok.resolve()}".encode()).hexdigest()
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
    (tmp / "tokenizer").mkdir()
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copyfile(tok / name, tmp / "tokenizer" / name)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def text_encoder_to_ldm(state_dict: dict, *, open_clip: bool = False) -> dict:
    """A transformers ``CLIPTextModel`` state dict in single-file names (inverse of the readers above): SD1.x's
    ``cond_stage_model.transformer.text_model.*``, or SD2's OpenCLIP ``cond_stage_model.model.*`` (diffusers'
    ``openclip`` map inverted, q/k/v concatenated into ``in_proj``)."""
    import torch
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    sd = {k.removeprefix("text_model."): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    if not open_clip:
        return {f"cond_stage_model.transformer.text_model.{k}": v for k, v in sd.items()}
    layers = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    out = {}
    for k, v in sd.items():
        if "text_model." + k in layers:
            out[layers["text_model." + k]] = v
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
    return {f"cond_stage_model.model.{k}": v for k, v in out.items()}


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
