"""PEFT adapter options -> each module's rank and scale, exactly as PEFT computes them.

Where the options live: a PEFT folder's ``adapter_config.json`` (also next to an ``adapter_model.safetensors`` given
alone), or diffusers' safetensors metadata key ``lora_adapter_metadata`` (JSON of ``LoraConfig.to_dict()``, keys
prefixed ``unet.``/``text_encoder.`` by ``save_lora_weights``, unprefixed by a model's ``save_lora_adapter``).

PEFT's rules (peft ``tuners/lora/model.py`` ``_create_and_replace``, ``tuners/lora/layer.py`` ``update_layer``):
``r = rank_pattern[get_pattern_key(rank_pattern, name)]`` else ``r``; ``alpha`` likewise from ``alpha_pattern`` /
``lora_alpha``; ``scaling = alpha / r``, or ``alpha / √r`` with ``use_rslora``. ``name`` is the module's name in the
model the adapter was made for (the file's key without ``base_model.model.`` / ``unet.``). The pattern matching is
PEFT's own ``peft.utils.other.get_pattern_key``.

Any option that changes the merged weight and that weightlab does not implement is refused by name: silently
dropping it would merge a wrong weight.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from weightlab.errors import AdapterOptionError, FileFormatError

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
CONFIG_FILE = "adapter_config.json"  # peft.utils.CONFIG_NAME
PEFT_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft.utils.SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
# The prefixes save_lora_weights gives each component's options; weightlab merges the UNet's and the text encoders'.
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")

# LoraConfig fields that cannot change a merged weight: bookkeeping, training-only settings, and the choice of
# target modules (the file's own keys say which modules it holds).
_NO_EFFECT = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "lora_dropout", "megatron_config", "megatron_core", "qalora_group_size", "eva_config", "ensure_weight_tying",
    "runtime_config",
})
_USED = frozenset({"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "init_lora_weights",
                   "bias"})
# init_lora_weights values that neither change the base weights nor select another algebra (PiSSA, CorDA, OLoRA,
# LoftQ and LoRA-GA rewrite the base weight the adapter was trained against; MiCA is a LoRA variant).
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_UNFUSE_FIX = ("Fix: merge it with the library that made it (PEFT `merge_and_unload`, diffusers `fuse_lora`), save "
               "the merged UNet and load that as a dense style term (kind='style').")
_FIXES = {
    "lora_bias": "the adapter trains a bias for lora_B, which weightlab does not merge. " + _UNFUSE_FIX,
    "bias": "the adapter trains the base model's biases, which weightlab does not merge. " + _UNFUSE_FIX,
    "modules_to_save": "the adapter stores whole trained modules next to its LoRA factors. " + _UNFUSE_FIX,
    "layer_replication": "the adapter duplicates base layers, which a merged UNet cannot express. " + _UNFUSE_FIX,
    "fan_in_fan_out": "the factors are stored transposed (Conv1D layout), which no UNet layer uses. Fix: use an "
                      "adapter made for a diffusers UNet.",
    "init_lora_weights": "PEFT trained this adapter against base weights it rewrote at initialisation (or as another "
                         "LoRA variant). Fix: convert it to a plain LoRA with PEFT's `save_pretrained(..., "
                         "path_initial_model_for_weight_conversion=...)`, or " + _UNFUSE_FIX[len("Fix: "):],
    "peft_type": "only PEFT's LORA adapters are read by their options. " + _UNFUSE_FIX,
}


@dataclass(frozen=True)
class AdapterConfig:
    """The options of one component's LoRA adapter that decide its ranks and scales.

    Args:
        r (int): default rank. lora_alpha (float): default alpha.
        rank_pattern / alpha_pattern (dict): per-module overrides, keys matched by PEFT's ``get_pattern_key``.
        use_rslora (bool): scale by alpha / √r instead of alpha / r.
        use_dora (bool): DoRA: every module must carry its magnitude vector.
        where (str): where the options were read, for messages.
    """

    r: int
    lora_alpha: float
    where: str
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False

    def rank(self, name: str) -> tuple[int, str]:
        """PEFT's rank for module ``name`` and the option that set it (``r`` or ``rank_pattern[...]``)."""
        key = _pattern_key(self.rank_pattern, name)
        if key in self.rank_pattern:
            return int(self.rank_pattern[key]), f"rank_pattern[{key!r}]"
        return int(self.r), "r"

    def scale(self, name: str) -> float:
        """PEFT's ``scaling`` of module ``name``: alpha / r, or alpha / √r with rsLoRA."""
        r = self.rank(name)[0]
        alpha = float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, name), self.lora_alpha))
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def describe(self) -> str:
        """One line for ``weightlab inspect``."""
        extra = [f"rank_pattern {len(self.rank_pattern)}" if self.rank_pattern else "",
                 f"alpha_pattern {len(self.alpha_pattern)}" if self.alpha_pattern else "", "rsLoRA" if self.use_rslora else "",
                 "DoRA" if self.use_dora else ""]
        return f"{self.where} (r={self.r}, lora_alpha={self.lora_alpha:g}" + "".join(f", {e}" for e in extra if e) + ")"


def _pattern_key(pattern: dict, name: str) -> str:
    """PEFT's own matching (imported here: importing peft takes seconds, and most files have no patterns)."""
    if not pattern:
        return name
    from peft.utils.other import get_pattern_key

    return get_pattern_key(pattern.keys(), name)


def _refuse(option: str, value, where: str, why: str) -> AdapterOptionError:
    return AdapterOptionError(f"{where}: adapter option `{option}` = {json.dumps(value, default=str)} is not supported: {why}")


def parse_options(options: dict, where: str) -> AdapterConfig:
    """Validate a ``LoraConfig`` dict and keep what decides ranks and scales.

    Raises:
        AdapterOptionError: an option that would change the merged weight and that weightlab does not implement,
            an unknown option that is set, or a missing/invalid ``r``/``lora_alpha``.
    """
    peft_type = options.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise _refuse("peft_type", peft_type, where, _FIXES["peft_type"])
    init = options.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise _refuse("init_lora_weights", init, where, _FIXES["init_lora_weights"])
    if options.get("bias", "none") != "none":
        raise _refuse("bias", options["bias"], where, _FIXES["bias"])
    for key, value in sorted(options.items()):
        if key in _NO_EFFECT or key in _USED or value in (None, False, "", 0) or value == {} or value == []:
            continue
        raise _refuse(key, value, where, _FIXES.get(key, "weightlab does not know what it does to the merged weight. "
                      "Fix: merge it with the library that made it and load the merged UNet as a dense style term, "
                      "or remove the option if you know it does not change the weights."))
    try:
        cfg = AdapterConfig(r=int(options["r"]), lora_alpha=float(options["lora_alpha"]), where=where,
                            rank_pattern={str(k): int(v) for k, v in (options.get("rank_pattern") or {}).items()},
                            alpha_pattern={str(k): float(v) for k, v in (options.get("alpha_pattern") or {}).items()},
                            use_rslora=bool(options.get("use_rslora", False)),
                            use_dora=bool(options.get("use_dora", False)))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise AdapterOptionError(f"{where}: `r` and `lora_alpha` must be numbers and the patterns objects of numbers "
                                 f"({type(e).__name__}: {e}). Fix: restore the options saved with the adapter.") from None
    bad = [f"r={cfg.r}"] if cfg.r <= 0 else []
    bad += [f"rank_pattern[{k!r}]={v}" for k, v in cfg.rank_pattern.items() if v <= 0]
    if bad:
        raise AdapterOptionError(f"{where}: ranks must be positive: {', '.join(bad)}. Fix: restore the options saved with the adapter.")
    return cfg


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except ValueError as e:
        raise FileFormatError(f"{where}: not valid JSON ({e}). Fix: restore it from the original adapter.") from None


def from_metadata(metadata: dict[str, str], where: str, component: str = "unet") -> AdapterConfig | None:
    """One component's options in diffusers' ``lora_adapter_metadata``, or None when the file has none for it.

    Prefixed keys (``unet.r``, ``text_encoder.r``; ``save_lora_weights``) select ``component``'s; unprefixed ones
    (``r``; a model's ``save_lora_adapter``) are the whole adapter's.
    """
    if METADATA_KEY not in metadata:
        return None
    where = f"{where}: safetensors metadata {METADATA_KEY!r}"
    doc = _json(metadata[METADATA_KEY], where)
    if not isinstance(doc, dict):
        raise FileFormatError(f"{where}: expected a JSON object. Fix: restore it from the original adapter.")
    prefixed = {k.split(".", 1)[0] for k in doc if "." in k and k.split(".", 1)[0] in _COMPONENTS}
    if not prefixed:
        return parse_options(doc, where)
    if component not in prefixed:
        return None
    return parse_options({k[len(component) + 1:]: v for k, v in doc.items() if k.startswith(component + ".")},
                         f"{where} ({component}.*)")


def from_file(path: Path) -> AdapterConfig:
    """The options in a PEFT ``adapter_config.json``."""
    doc = _json(path.read_text(), str(path))
    if not isinstance(doc, dict):
        raise FileFormatError(f"{path}: expected a JSON object. Fix: restore it from the original adapter.")
    return parse_options(doc, str(path))


def sibling_config(weights_file: Path) -> Path | None:
    """The ``adapter_config.json`` next to a PEFT weights file (``adapter_model.safetensors``), if there is one."""
    cfg = weights_file.parent / CONFIG_FILE
    return cfg if weights_file.name in PEFT_WEIGHT_FILES and cfg.is_file() else None
