"""One error hierarchy. Every message names the offending key/file, states the rule and ends with the fix."""


class WeightlabError(Exception):
    """Base of every error weightlab raises on purpose."""


class FileFormatError(WeightlabError):
    """A file is not a valid safetensors/checkpoint file (truncated, bad header, overlapping offsets...)."""


class UnsafeFileError(WeightlabError):
    """A pickle-based file was given without explicit opt-in."""


class UnmatchedKeysError(WeightlabError):
    """Keys in a residual map to no module of the target family/model."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = list(keys)


class AdapterOptionError(FileFormatError):
    """A LoRA's adapter options (PEFT ``adapter_config.json``, diffusers ``lora_adapter_metadata``, ``.alpha`` keys)
    contradict its tensors, or ask for something weightlab does not implement."""


class FamilyMismatchError(WeightlabError):
    """A residual belongs to another architecture family than the base."""


class ShapeMismatchError(WeightlabError):
    """A residual's tensor shape does not fit the target weight."""


class NonFiniteError(WeightlabError):
    """A residual holds NaN or Inf values."""


class RecipeError(WeightlabError):
    """A recipe is malformed or refers to something that cannot be resolved."""


class RegistryError(WeightlabError):
    """Registry failures: conflicts, integrity problems."""


class NotFoundError(RegistryError):
    """A name, version, alias or blob does not exist."""


class ExportError(WeightlabError):
    """ONNX export or verification failed."""


class SamplingError(WeightlabError):
    """A video sampling request the model cannot serve (too many frames, unsupported guidance or size)."""


class ScheduleMismatchError(WeightlabError):
    """A consistency-distilled residual was trained under another noise schedule than the stage or sampler using it."""


def fmt_keys(keys, limit: int = 10) -> str:
    """Render a list of keys for an error message, eliding past ``limit``."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
