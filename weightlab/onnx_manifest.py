"""The ``manifest.json`` of an ONNX export folder, as one typed model (pydantic; no torch, no onnx).

:func:`weightlab.onnx_export.export_onnx` writes it last (so its presence marks a complete export) and
:func:`~weightlab.onnx_export.reweight_onnx` rewrites it; :class:`weightlab.onnx_runtime.OnnxVideoPipeline`, the
registry's checks of ``onnx`` versions, ``weightlab export`` and the export job read it. Every write is atomic (temp
file + rename). A manifest that is not valid JSON, not a ``weightlab.onnx`` version 1 manifest, or has a field of the
wrong type is refused with a :class:`~weightlab.errors.FileFormatError` naming the file and the field.

Example:
    >>> manifest = OnnxManifest.read("export/")                          # doctest: +SKIP
    >>> manifest.models["unet"].verification.max_abs_err                 # doctest: +SKIP
    3.2e-07
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from weightlab.errors import ExportError, FileFormatError
from weightlab.files import SHA256_PATTERN, atomic_write

MANIFEST = "manifest.json"
FORMAT, FORMAT_VERSION = "weightlab.onnx", 1
ExportDtype = Literal["float32", "float16"]
_SHA256 = f"^{SHA256_PATTERN}$"
_FIX = "Fix: re-export with `weightlab export onnx` (or put back the manifest.json it wrote, unchanged)."


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Initializer(_Model):
    """Where one weight lies in the graph's external-data file."""

    offset: int = Field(ge=0)
    length: int = Field(ge=0)
    dtype: str = Field(description="numpy dtype name, e.g. float32")
    shape: list[int]


class TensorCase(_Model):
    """One verification input: shape, dtype and sha256 of its bytes."""

    shape: list[int]
    dtype: str
    sha256: str = Field(pattern=_SHA256)


class Verification(_Model):
    """ONNX Runtime vs PyTorch on seeded random inputs (one entry of ``cases`` per input set)."""

    provider: str
    seed: int
    cases: list[dict[str, TensorCase]]
    max_abs_err: float
    max_rel_err: float
    rel_err: str = Field(description="how max_rel_err is defined")
    atol: float
    rtol: float


class Sizes(_Model):
    graph: int = Field(ge=0)
    data: int = Field(ge=0)


class Graph(_Model):
    """One exported model: its graph and external-data files (relative to the export folder), shapes and weights."""

    graph: str
    data: str
    graph_sha256: str = Field(pattern=_SHA256)
    bytes: Sizes
    opset: int
    inputs: dict[str, list[int | str]] = Field(description="input -> dims (a name for a dynamic one)")
    outputs: dict[str, list[int | str]]
    dynamic: dict[str, dict[str, str]] = Field(description="input -> axis -> the dynamic dimension's name")
    notes: str
    initializers: dict[str, Initializer]
    constants: list[str] = Field(description="initializers the exporter made up (not parameters; never re-weighted)")
    unused: list[str] = Field(description="parameters the forward pass never reads (not in the graph)")
    export_seconds: float
    verification: Verification | None = None


class Pipeline(_Model):
    """What the runtime needs besides the graphs: latent and text sizes, and the VAE's scaling."""

    latent_channels: int
    sample_size: int
    max_frames: int
    text_max_length: int
    text_hidden_size: int
    vae_scaling_factor: float
    vae_scale_factor: int
    vae_out_channels: int
    vae_dtype: ExportDtype


class OnnxManifest(_Model):
    """A ``weightlab.onnx`` version 1 manifest.

    Attributes:
        dtype (str): ``float32`` | ``float16``, the graphs' dtype.
        opset (int): the UNet graph's ONNX opset.
        created (str): ISO time of the export; ``reweighted`` that of the last re-weighting, if any.
        versions (dict[str, str]): torch, diffusers, onnx and onnxruntime versions of the export.
        source (str | None): what was exported (a path or registry reference), when it has a name.
        recipe (dict | None), recipe_hash (str | None): the recipe the weights come from, when known.
        weights_sha256 (str): tensor hash of the UNet's weights.
        text_encoder_sha256 (str | None): tensor hash of the exported text encoder's weights; None in exports made
            before weightlab recorded it (their text encoder is the base pipeline's).
        text_encoder_merged (bool | None): whether that text encoder carries the recipe's text-encoder residuals
            (a style LoRA's ``lora_te_*`` half) rather than being the base pipeline's; None as above.
        pipeline (Pipeline): sizes the runtime needs.
        models (dict[str, Graph]): ``unet``, ``text_encoder``, ``vae_decoder``.
    """

    format: Literal["weightlab.onnx"] = FORMAT
    version: Literal[1] = FORMAT_VERSION
    dtype: ExportDtype
    opset: int
    created: str
    reweighted: str | None = None
    versions: dict[str, str]
    source: str | None = None
    recipe: dict[str, Any] | None = None
    recipe_hash: str | None = None
    weights_sha256: str = Field(pattern=_SHA256)
    text_encoder_sha256: str | None = Field(None, pattern=_SHA256)
    text_encoder_merged: bool | None = None
    pipeline: Pipeline
    models: dict[str, Graph]

    @model_validator(mode="after")
    def _has_unet(self) -> OnnxManifest:
        if "unet" not in self.models:
            raise ValueError("lists no `unet` graph under `models`")
        return self

    @property
    def engine_key(self) -> str:
        """What the TensorRT engine cache is keyed on (an engine embeds the weights): the UNet's and the text
        encoder's weight hashes."""
        if self.text_encoder_sha256 is None:
            return self.weights_sha256[:16]
        return hashlib.sha256(f"{self.weights_sha256} {self.text_encoder_sha256}".encode()).hexdigest()[:16]

    @classmethod
    def parse(cls, text: str | bytes, *, where: str) -> OnnxManifest:
        """Validate a manifest's JSON text; ``where`` names it in errors (e.g. ``export/manifest.json``).

        Raises:
            FileFormatError: not JSON, not a ``weightlab.onnx`` version 1 manifest, or a field is missing or wrong.
        """
        try:
            raw = json.loads(text)
        except (UnicodeDecodeError, ValueError) as e:
            raise FileFormatError(f"{where} is not readable JSON ({e}). {_FIX}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT or raw.get("version") != FORMAT_VERSION:
            found = (raw.get("format"), raw.get("version")) if isinstance(raw, dict) else type(raw).__name__
            raise FileFormatError(f"{where} is not a {FORMAT} version {FORMAT_VERSION} manifest (found {found}). {_FIX}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            field = f"field `{'.'.join(map(str, err['loc']))}`: " if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
            raise FileFormatError(f"{where}: {field}{msg}{more}. {_FIX}") from None

    @classmethod
    def read(cls, folder: str | Path) -> OnnxManifest:
        """The manifest of the export folder ``folder``.

        Raises:
            ExportError: there is none (the export never finished).
            FileFormatError: it is malformed (see :meth:`parse`).
        """
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise ExportError(f"{folder}: no {MANIFEST}; not a complete weightlab ONNX export. "
                              "Fix: run `weightlab export onnx --recipe R.yaml --out DIR` (again, if it was interrupted).")
        return cls.parse(path.read_bytes(), where=str(path))

    def write(self, folder: str | Path) -> Path:
        """Write ``folder/manifest.json`` atomically (a reader sees the old manifest or the new one, never half)."""
        text = self.model_dump_json(indent=1)
        return atomic_write(Path(folder) / MANIFEST, lambda tmp: Path(tmp).write_text(text))
