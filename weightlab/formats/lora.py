"""LoRA key layouts -> module path + factors.

Handled: PEFT/diffusers (``lora_A``/``lora_B``, optionally ``.default``), diffusers' older ``.lora.down/up`` and
attention-processor keys (``processor.to_q_lora.down``), kohya/A1111 (``lora_unet_<flattened path>.lora_down/up``
+ ``.alpha``), conv LoRA, and motion LoRAs in AnimateDiff's original naming. Text-encoder keys are recognised
but not merged (weightlab composes UNets): they count as unmatched, like unknown keys.
"""

from __future__ import annotations

import re

from weightlab.families import Family
from weightlab.formats.motion import is_original_layout, rename_path
from weightlab.residuals import LoRATarget

_ROLE_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),
    (".lora_mid.weight", "mid"), (".alpha", "alpha"),
)
_STRIP_PREFIXES = ("base_model.model.", "unet.", "model.")
TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "lora_te_", "lora_te1_", "lora_te2_", "te.")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora$")


def is_lora(keys) -> bool:
    return any(k.endswith(s) for k in keys for s, _ in _ROLE_SUFFIXES if s != ".alpha" and "lora" in k.lower())


def _split(key: str) -> tuple[str, str] | None:
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _module_path(raw: str, family: Family) -> str | None:
    """Normalise one raw module name to a family module path, or None if it maps to nothing."""
    if raw.startswith("lora_unet_"):
        return family.kohya_names.get(raw[len("lora_unet_"):])
    for p in _STRIP_PREFIXES:
        if raw.startswith(p):
            raw = raw[len(p):]
            break
    m = _PROCESSOR.search(raw)
    if m:
        raw = raw[: m.start()] + "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1))
    if is_original_layout([raw + "."]):
        raw = rename_path(raw)
    return raw if raw in family.weight_modules else None


def parse_lora(state_dict: dict, family: Family) -> tuple[dict[str, LoRATarget], list[str]]:
    """Group a LoRA state dict by target module. Returns ``(targets, unmatched_keys)``.

    A key is unmatched if its module maps to no weight of ``family``, if it belongs to a text encoder, if it has
    an unknown role, or if its module lacks a down or up factor or has a non-scalar alpha. LoCon/Tucker
    ``lora_mid`` tensors are unmatched too (not supported yet), so such files fail loudly instead of merging wrongly.
    """
    parts: dict[str, dict[str, object]] = {}
    owners: dict[str, list[str]] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        split = _split(key)
        if split is None or key.startswith(TEXT_ENCODER_PREFIXES) or split[1] == "mid":
            unmatched.append(key)
            continue
        raw, role = split
        path = _module_path(raw, family)
        if path is None:
            unmatched.append(key)
            continue
        parts.setdefault(path, {})[role] = value
        owners.setdefault(path, []).append(key)
    targets = {}
    for path, p in parts.items():
        if "down" not in p or "up" not in p or ("alpha" in p and p["alpha"].numel() != 1):
            unmatched.extend(owners[path])
            continue
        alpha = p.get("alpha")
        targets[path] = LoRATarget(down=p["down"], up=p["up"], alpha=None if alpha is None else float(alpha))
    return dict(sorted(targets.items())), sorted(unmatched)
