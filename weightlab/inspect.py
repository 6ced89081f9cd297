"""``inspect_path``: what a weight file or folder is, without merging anything; ``inspect_table`` shows it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from weightlab.files import file_sha256 as sha256_of, sniff, tensor_hash
from weightlab.loading import PICKLE_WEIGHT_FILES, WEIGHT_FILES, load, lora_folder_file
from weightlab.residuals import LoRA

if TYPE_CHECKING:
    from rich.table import Table


class Inspection(BaseModel):
    """Facts about one residual file or folder."""

    path: str
    format: str  # "safetensors" | "diffusers" | "pickle"
    family: str
    kind_guess: str
    representation: str
    ranks: list[int] = []
    alphas: list[float] = []  # kohya's convention: scale = alpha / rank
    alpha_source: str | None = None  # LoRA: `.alpha` keys, the PEFT options read, or "alpha = rank" (none found)
    algebras: list[str] = []  # adapter algebras of its modules: lora, loha, lokr, full (+dora)
    components: list[str] = ["unet"]  # the pipeline components it changes (a base: has): unet, text_encoder(_2), vae
    n_targets: int
    dtypes: list[str]
    n_params: int
    size_bytes: int
    file_sha256: str
    tensor_hash: str | None  # header-independent; None for pickles
    weights_file: str
    config: dict | None = None
    skipped: list[str] = []
    finite: bool  # every floating-point value is finite (no NaN or Inf)


def weights_file(path: Path) -> Path:
    """The single file holding the tensors of ``path`` (itself, or the weights file inside a diffusers folder)."""
    if not path.is_dir():
        return path
    if (lora_file := lora_folder_file(path, allow_pickle=True)) is not None:
        return lora_file
    folder = path / "unet" if (path / "unet").is_dir() else path
    for name in WEIGHT_FILES + PICKLE_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    return folder


def inspect_path(path: str | Path, *, allow_pickle: bool = False, file_sha256: str | None = None) -> Inspection:
    """Inspect a file or diffusers folder (lenient: unmatched keys are listed in ``skipped``, not raised).

    Args:
        path (str | Path): a weight file or a diffusers folder.
        allow_pickle (bool, default False): read pickle checkpoints (in a child process).
        file_sha256 (str | None, default None): the weights file's sha256 when the caller already knows it
            (the registry, for a stored blob); default hashed here.

    Example:
        >>> inspect_path("style.safetensors").ranks   # doctest: +SKIP
        [4]
    """
    path = Path(path)
    res = load(path, allow_pickle=allow_pickle, strict=False)
    wfile = weights_file(path)
    tensors = res.tensors()
    header = sniff(wfile)  # None for a pickle
    is_st = header is not None
    return Inspection(
        path=str(path), format="diffusers" if path.is_dir() else ("safetensors" if is_st else "pickle"),
        family=res.family, kind_guess=res.kind, representation=res.representation,
        ranks=res.ranks if isinstance(res, LoRA) else [], alphas=res.alphas if isinstance(res, LoRA) else [],
        alpha_source=res.alpha_source if isinstance(res, LoRA) else None,
        algebras=res.algebras if isinstance(res, LoRA) else [],
        components=res.components,
        n_targets=len(res.targets) + sum(map(len, res.others.values())) if isinstance(res, LoRA) else len(tensors),
        dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        n_params=sum(t.numel() for t in tensors.values()), size_bytes=wfile.stat().st_size,
        file_sha256=file_sha256 or sha256_of(wfile), tensor_hash=tensor_hash(wfile, header) if is_st else None,
        weights_file=str(wfile), config=getattr(res, "config", None) or None, skipped=res.skipped,
        finite=not res.non_finite(),
    )


def inspect_table(infos: list[Inspection]) -> Table:
    """A readable rich table of :class:`Inspection` rows (``weightlab inspect``, the demo)."""
    from rich.table import Table

    table = Table(title="weightlab inspect")
    for col in ("file", "family", "kind", "repr", "components", "ranks (alpha)", "targets", "dtypes", "params",
                "sha256", "tensor hash", "skipped", "finite"):
        table.add_column(col, overflow="fold")
    for i in infos:
        ranks = ", ".join(f"{r}" for r in i.ranks) + (f" ({', '.join(f'{a:g}' for a in i.alphas)})" if i.alphas else "")
        algebras = f" ({', '.join(i.algebras)})" if i.algebras and i.algebras != ["lora"] else ""
        table.add_row(Path(i.path).name, i.family, i.kind_guess, i.representation + algebras, ", ".join(i.components),
                      ranks or "-", str(i.n_targets),
                      ",".join(i.dtypes), f"{i.n_params:,}", i.file_sha256[:12], (i.tensor_hash or "-")[:12],
                      str(len(i.skipped)), "yes" if i.finite else "NO (NaN/Inf)")
    return table
