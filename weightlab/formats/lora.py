"""Adapter key layouts -> module path + factors of a registered algebra (`weightlab.formats.algebra`).

Handled: PEFT/diffusers (``lora_A``/``lora_B``, optionally ``.default``), diffusers' older ``.lora.down/up`` and
attention-processor keys (``processor.to_q_lora.down``), kohya/A1111 (``lora_unet_<flattened path>.lora_down/up``
+ ``.alpha``; also LyCORIS's ``lycoris_`` prefix; module names in diffusers' or in the LDM UNet's layout,
``lora_unet_input_blocks_1_1_proj_in``, renamed as diffusers' single-file converter does), conv LoRA, LyCORIS LoCon (Tucker ``lora_mid``), LoHa
(``hada_*``), LoKr (``lokr_*``) and full (``diff``/``diff_b``) in kohya/LyCORIS keys, and motion LoRAs in
AnimateDiff's original naming. OFT/BOFT, GLoRA, IA³ and the other algebras in `algebra.REFUSED` are refused by name.
Text-encoder keys (diffusers/PEFT ``text_encoder.text_model.encoder.layers.0.self_attn.q_proj``, kohya
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``, SDXL's first encoder ``lora_te1_``, its second
``text_encoder_2.``/``lora_te2_``: `weightlab.formats.components`) are parsed the same way into targets of that CLIP
text model (``component="text_encoder"``, ``"text_encoder_2"``). Alphas: ``.alpha`` keys in any layout, else PEFT's options
(`weightlab.formats.adapter_config`), else alpha = rank (docs/formats.md). DoRA magnitudes (PEFT
``lora_magnitude_vector``, kohya/LyCORIS ``dora_scale``) become `AdapterTarget.magnitude`.
"""

from __future__ import annotations

import math
import re

from weightlab.errors import AdapterOptionError, FileFormatError, fmt_keys
from weightlab.families import Family
from weightlab.formats import algebra
from weightlab.formats.adapter_config import AdapterConfig
from weightlab.formats.components import COMPONENTS, of_adapter_key
from weightlab.formats.ldm import ldm_module_names
from weightlab.formats.motion import is_original_layout, rename_path
from weightlab.residuals import AdapterTarget, FactorTarget, LoRATarget

_COMMON_ROLES = {".alpha": "alpha", ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
                 ".dora_scale": "dora_scale"}
# Every factor suffix of every registered algebra, longest first (``.lora.down.weight`` before ``.down.weight``).
_ROLE_SUFFIXES = tuple(sorted({**_COMMON_ROLES, **{s: r for a in algebra.ALGEBRAS.values() for s, r in a.suffixes.items()}}.items(),
                              key=lambda sr: -len(sr[0])))
# Suffixes no UNet parameter has: a key ending in one is an adapter key whatever its prefix.
_DISTINCT = tuple(s for a in algebra.ALGEBRAS.values() if a.name != "lora" for s in a.suffixes) + tuple(algebra.REFUSED)
_KOHYA_PREFIXES = ("lora_unet_", "lycoris_")  # kohya/A1111; LyCORIS's own wrapper
_STRIP_PREFIXES = ("base_model.model.", "unet.", "model.")
# A CLIP text model's adapter targets (``CLIPTextModel`` names; transformers 4 nests them in ``text_model.``, 5 does
# not), dotted and as kohya flattens them. Targets are named without ``text_model.`` (the component's ``strip``).
_TE_MODULE = re.compile(r"(?:text_model\.)?(encoder\.layers\.\d+\.(?:self_attn\.(?:[qkv]|out)_proj|mlp\.fc[12]))")
_TE_KOHYA = re.compile(r"(?:text_model_)?encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


# Metadata that names the base a LoRA was made for: key -> (value prefix, family); weightlab's own, kohya sd-scripts'
# (``sd_v1``, ``sd_v2``, ``sd_v2_768_v``, ``sdxl_base_v1-0``; older files only ``ss_v2``) and the SAI model spec's.
_DECLARED_FAMILY = {
    "weightlab.family": (("sd15", "sd15"), ("sd2", "sd2"), ("sdxl", "sdxl")),
    "ss_base_model_version": (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd15")),
    "modelspec.architecture": (("stable-diffusion-xl-v1-base", "sdxl"), ("stable-diffusion-v2", "sd2"),
                               ("stable-diffusion-v1", "sd15")),
    "ss_v2": (("True", "sd2"),),
}


def declared_family(metadata: dict[str, str]) -> tuple[str, str] | None:
    """The family a file's metadata names, and where (``"ss_base_model_version=sd_v2"``); None if none does."""
    for key, values in _DECLARED_FAMILY.items():
        value = str(metadata.get(key, ""))
        for prefix, family in values:
            if value == prefix or (key != "weightlab.family" and value.startswith(prefix)):
                return family, f"{key}={value}"
    return None


def is_lora(keys) -> bool:
    """Whether ``keys`` are an adapter's (any registered algebra, or one refused by name)."""
    return any(k.endswith(_DISTINCT) or ("lora" in k.lower() and any(k.endswith(s) for s, r in _ROLE_SUFFIXES if r != "alpha"))
               for k in keys)


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


_LDM_KOHYA: dict[str, dict[str, str]] = {}


def _ldm_kohya_names(family: Family) -> dict[str, str]:
    """kohya name of an LDM module (``input_blocks_1_1_proj_in``) -> diffusers module path (`ldm.ldm_module_names`)."""
    if family.name not in _LDM_KOHYA:
        _LDM_KOHYA[family.name] = {ldm.replace(".", "_"): path for ldm, path in ldm_module_names(family).items()}
    return _LDM_KOHYA[family.name]


def _peft_name(raw: str) -> str:
    """The module's name in the model the adapter was made for: what PEFT's rank/alpha patterns match."""
    for p in _STRIP_PREFIXES:
        if raw.startswith(p):
            return raw[len(p):]
    return raw


def _te_module_path(raw: str, component: str) -> str | None:
    """Normalise a module name of text encoder ``component`` to a CLIP text model's module path without
    ``text_model.`` (``encoder.layers.0.self_attn.q_proj``), or None (an unknown module)."""
    dotted, *kohya = COMPONENTS[component].adapter_prefixes
    for prefix in kohya:
        if raw.startswith(prefix) and (m := _TE_KOHYA.fullmatch(raw[len(prefix):])):
            return f"encoder.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = _TE_MODULE.fullmatch(raw.removeprefix(dotted).removeprefix("base_model.model."))
    return m.group(1) if raw.startswith(dotted) and m else None


def _module_path(raw: str, family: Family) -> str | None:
    """Normalise one raw module name to a family module path, or None if it maps to nothing."""
    for prefix in _KOHYA_PREFIXES:
        if raw.startswith(prefix):
            name = raw[len(prefix):]
            return family.kohya_names.get(name) or _ldm_kohya_names(family).get(name)
    raw = _peft_name(raw)
    m = _PROCESSOR.search(raw)
    if m:
        raw = raw[: m.start()] + "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1))
    if is_original_layout([raw + "."]):
        raw = rename_path(raw)
    return raw if raw in family.weight_modules else None


def parse_lora(state_dict: dict, family: Family, *, adapter: AdapterConfig | None = None,
               source: str = "LoRA", component: str = "unet") -> tuple[dict[str, AdapterTarget], list[str]]:
    """Group the keys of one ``component`` (``unet``, or a text encoder: keys with its prefixes,
    `weightlab.formats.components`) of an adapter state dict by target module and algebra; the other components'
    keys are ignored. Returns ``(targets, unmatched_keys)``; text-encoder targets are CLIP text-model module paths,
    checked against the text encoder at merge.

    Each module's factors select one registered algebra (`weightlab.formats.algebra`): LoRA/LoCon (a Tucker
    ``lora_mid`` is folded into down) becomes a :class:`LoRATarget`, LoHa/LoKr/full diff a :class:`FactorTarget`.
    A module's alpha (kohya's convention, scale = alpha / rank) comes from its ``.alpha`` key, else from
    ``adapter`` (PEFT's options: see `weightlab.formats.adapter_config`), else it is None (alpha = rank, the
    diffusers/PEFT convention for files without options). A key is unmatched if its module maps to no weight of
    ``family`` (text encoder: to no CLIP text-model attention or MLP projection), if it has an unknown role, or if
    its module has no factor or lacks a LoRA down or up factor, has a non-scalar alpha or two kinds of DoRA
    magnitude, or is given twice.

    Raises:
        AdapterOptionError: a refused algebra (OFT/BOFT, GLoRA, IA³, ...), a DoRA file without a magnitude for some
            module, or ``adapter`` options that contradict the tensors (a rank, or an alpha that differs from the
            file's ``.alpha`` key, or PEFT options on a non-LoRA module).
        FileFormatError: a module whose factors are incomplete or do not fit together (LoHa, LoKr, full diff, a
            LoCon Tucker core), or that mixes two algebras.
    """
    groups: dict[str, dict[str, object]] = {}
    owners: dict[str, list[str]] = {}
    unmatched: list[str] = []
    refused = [(k, name) for k in state_dict for s, name in algebra.REFUSED.items() if k.endswith(s)]
    if refused:
        raise AdapterOptionError(
            f"{source}: holds {refused[0][1]} factors (`{refused[0][0]}`"
            + (f" and {len(refused) - 1} more" if len(refused) > 1 else "") + "); weightlab merges LoRA, LoCon, "
            "LoHa, LoKr, full diff and DoRA, not this algebra. Fix: merge it into the UNet with the tool that made it "
            "(LyCORIS `create_lycoris_from_weights(...).merge_to()`, PEFT `merge_and_unload()`), save that UNet and "
            "use it as a dense style term.")
    for key, value in state_dict.items():
        if of_adapter_key(key) != component:
            continue
        split = _split(key)
        if split is None:
            unmatched.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = value
        owners.setdefault(split[0], []).append(key)
    targets: dict[str, AdapterTarget] = {}
    contradictions: list[str] = []
    for raw, p in groups.items():
        path = _module_path(raw, family) if component == "unet" else _te_module_path(raw, component)
        factors = {r: v for r, v in p.items() if r not in ("alpha", "magnitude", "dora_scale")}
        found = algebra.of(factors)
        if len(found) > 1:
            raise FileFormatError(f"{source}: module `{raw}` mixes {' and '.join(a.name for a in found)} factors "
                                  f"({fmt_keys(owners[raw])}). Fix: the file is damaged; get it again from its source.")
        if (path is None or path in targets or not found or {"magnitude", "dora_scale"} <= set(p)
                or ("alpha" in p and p["alpha"].numel() != 1)
                or (found[0].name == "lora" and ("down" not in p or "up" not in p))):
            unmatched.extend(owners[raw])
            continue
        alg = found[0]
        why = alg.check(factors, None)
        if why is not None:
            raise FileFormatError(f"{source}: module `{raw}` ({fmt_keys(owners[raw])}): {why}. Fix: the file is "
                                  "incomplete or damaged; save it again with the tool that trained it (LyCORIS "
                                  "`save_weights`).")
        magnitude = p.get("magnitude", p.get("dora_scale"))
        dora = "lycoris" if "dora_scale" in p else "peft"
        rank = alg.rank(factors)
        if alg.name == "lora":
            down, up = algebra.lora.factored(factors)
            name = _peft_name(raw if component == "unet" else raw.removeprefix(COMPONENTS[component].adapter_prefixes[0]))
            alpha = _kohya_alpha(raw, name, rank, p.get("alpha"), adapter, contradictions)
            targets[path] = LoRATarget(down, up, alpha=alpha, magnitude=magnitude, dora=dora)
            continue
        if adapter is not None:
            contradictions.append(f"`{raw}` is a {alg.name} module, which PEFT's LoRA options do not describe")
        alpha = None if "alpha" not in p else float(p["alpha"])
        targets[path] = FactorTarget(alg.name, factors, name=raw, alpha=alpha, magnitude=magnitude, dora=dora)
    _check_dora(targets, adapter, source)
    if contradictions:
        raise AdapterOptionError(
            f"{source}: the adapter options ({adapter.where}) contradict the tensors: {'; '.join(contradictions[:5])}"
            + (f"; ... ({len(contradictions) - 5} more)" if len(contradictions) > 5 else "")
            + ". Fix: use the options saved with these weights (PEFT `save_pretrained` writes both; diffusers "
              "`save_lora_weights(..., unet_lora_adapter_metadata=model.peft_config[name].to_dict())`).")
    return dict(sorted(targets.items())), sorted(unmatched)


def _check_dora(targets: dict[str, AdapterTarget], adapter: AdapterConfig | None, source: str) -> None:
    """A DoRA file (``use_dora``, or any magnitude vector) needs a magnitude for every module it targets."""
    has = [p for p, t in targets.items() if t.magnitude is not None]
    missing = [p for p, t in targets.items() if t.magnitude is None]
    if missing and (has or (adapter is not None and adapter.use_dora)):
        raise AdapterOptionError(
            f"{source}: a DoRA adapter needs a magnitude vector (`lora_magnitude_vector`/`dora_scale`) for every module; "
            f"{len(missing)} have none: {fmt_keys(missing, 5)}. Fix: the file is incomplete; save it again with PEFT "
            "(`save_pretrained`) or diffusers (`get_peft_model_state_dict`).")


def _kohya_alpha(raw: str, name: str, rank: int, alpha_key, adapter: AdapterConfig | None,
                 contradictions: list[str]) -> float | None:
    """The module's alpha in kohya's convention (scale = alpha / rank); ``name``: the module's name in the model the
    adapter was made for (what PEFT's patterns match). Appends to ``contradictions``."""
    alpha = None if alpha_key is None else float(alpha_key)
    if adapter is None:
        return alpha
    expected, option = adapter.rank(name)
    if expected != rank:
        contradictions.append(f"`{raw}` has rank {rank} but `{option}` = {expected}")
        return alpha
    peft_alpha = adapter.scale(name) * rank
    if alpha is not None and not math.isclose(alpha, peft_alpha, rel_tol=1e-6):
        contradictions.append(f"`{raw}.alpha` = {alpha:g} but the options give alpha {peft_alpha:g} (scale {peft_alpha / rank:g})")
    return peft_alpha
