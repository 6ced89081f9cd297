"""One error hierarchy. Every message names the offending key/file, states the rule and ends with the fix.

Each class carries the web API's HTTP status for it (``http_status``) and the names of its fields besides the
message (``field_names``: constructor arguments after the message, stored as attributes of the same names). The
server answers an error with its status, class name, message and fields; :class:`weightlab.Client` raises the same
class again with the same fields (see :class:`weightlab.registry.schemas.ErrorBody`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from weightlab.registry.schemas import VersionInfo


class WeightlabError(Exception):
    """Base of every error weightlab raises on purpose."""

    http_status: ClassVar[int] = 400
    field_names: ClassVar[tuple[str, ...]] = ()


class FileFormatError(WeightlabError):
    """A file is not a valid safetensors/checkpoint file (truncated, bad header, overlapping offsets...)."""

    http_status = 422


class UnsafeFileError(WeightlabError):
    """A pickle-based file was given without explicit opt-in."""

    http_status = 415


class UnmatchedKeysError(WeightlabError):
    """Keys in a residual map to no module of the target family/model; ``.keys`` lists them."""

    http_status = 422
    field_names = ("keys",)

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = list(keys)


class AdapterOptionError(FileFormatError):
    """A LoRA's adapter options (PEFT ``adapter_config.json``, diffusers ``lora_adapter_metadata``, ``.alpha`` keys)
    contradict its tensors, or ask for something weightlab does not implement."""


class FamilyMismatchError(WeightlabError):
    """A residual belongs to another architecture family than the base."""

    http_status = 422


class ShapeMismatchError(WeightlabError):
    """A residual's tensor shape does not fit the target weight."""

    http_status = 422


class KernelError(WeightlabError):
    """A merge call breaks a rule of the merge contract (dtype, device, memory layout, aliasing, backend)."""

    http_status = 422


class MissingComponentError(WeightlabError):
    """A pipeline component is not where it was looked for (a single-file checkpoint's tokenizer, or its CLIP/VAE)."""

    http_status = 422


class NonFiniteError(WeightlabError):
    """A residual holds NaN or Inf values."""

    http_status = 422


class RecipeError(WeightlabError):
    """A recipe is malformed or refers to something that cannot be resolved."""

    http_status = 422


class UnresolvedSourceError(RecipeError):
    """A recipe source is not an existing path, and no resolver for other names (registry references) was given:
    the merge engine resolves paths only; the registry supplies the resolver (`weightlab.registry.resolve`)."""


class ExportError(WeightlabError):
    """ONNX export or verification failed."""


class SamplingError(WeightlabError):
    """A video sampling request the model cannot serve (too many frames, unsupported guidance or size)."""


class ScheduleMismatchError(WeightlabError):
    """A consistency-distilled residual was trained under another noise schedule than the stage or sampler using it."""


# -- the registry and its web API ------------------------------------------------------------------------------


class RegistryError(WeightlabError):
    """Registry failures: conflicts, integrity problems."""


class NotFoundError(RegistryError):
    """A name, version, alias or blob does not exist."""

    http_status = 404


class DuplicateVersionError(RegistryError):
    """``add(..., exist_ok=False)`` of tensors the name already holds; ``.version`` is the existing version."""

    http_status = 409
    field_names = ("version",)

    def __init__(self, message: str, version: VersionInfo):
        super().__init__(message)
        self.version = version


class HashMismatchError(RegistryError):
    """Bytes do not match the hash they were declared or stored under."""


class MetadataError(RegistryError):
    """Metadata (or another free-form JSON document) breaks the registry's limits."""

    http_status = 422


class JobSpecError(RegistryError):
    """A job's kind or parameters are not valid."""

    http_status = 422


class AuthenticationError(RegistryError):
    """No valid token where one is needed."""

    http_status = 401


class PermissionDeniedError(RegistryError):
    """The token does not grant what the request needs."""

    http_status = 403


class FolderUploadError(RegistryError):
    """A folder upload's tar stream breaks a rule."""


class UploadTooLargeError(RegistryError):
    """The request body is larger than the server accepts."""

    http_status = 413


class UnsupportedMediaTypeError(RegistryError):
    """The request body is not sent in the media type the route reads."""

    http_status = 415


def fmt_validation_errors(problems, root: str = "value") -> str:
    """pydantic's validation errors (``ValidationError.errors()``, or a web API's 422 ``detail``) as one line,
    ``loc: msg; loc: msg``; an empty location reads as ``root``."""
    return "; ".join(f"{'.'.join(map(str, p.get('loc', ()))) or root}: {p.get('msg')}" for p in problems
                     if isinstance(p, dict))


def fmt_keys(keys, limit: int = 10) -> str:
    """Render a list of keys for an error message, eliding past ``limit``."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
