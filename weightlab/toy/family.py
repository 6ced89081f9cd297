"""The trained toy family shipped in the package: AnimateLCM's pieces at toy scale, made by weightlab's own trainers.

``python -m weightlab.toy.reproduce --out runs/toy --ship`` regenerates it from seeds (the full run, about 70 min on
2 CPU cores) and copies here what a user of the method holds:

    teacher/                    the toy base pipeline with the trained teacher UNet (diffusers folder)
    lcm_lora.safetensors        image acceleration: the LCM-LoRA distilled by ``image-lcm``
    motion_lcm.safetensors      motion: the module distilled by ``motion-lcm`` (AnimateDiff's file layout)
    style_lora.safetensors      style: outlined shapes, a LoRA trained by ``style-lora``
    evaluator.safetensors       the toy classifier that scores clips (:mod:`weightlab.toy.evaluate`)
    family.json                 seed, sizes, measured claims and each file's sha256

Example:
    >>> family = toy_family()                                       # doctest: +SKIP
    >>> VideoPipeline.from_source(family.recipe())("a red circle moving right", steps=4)   # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from weightlab.errors import MissingComponentError, WeightlabError

SHIPPED = Path(__file__).with_name("family")
# name in the family -> (path under a reproduce run's --out, kind of term or None)
PIECES = {"teacher": ("runs/teacher/pipeline", "base"),
          "lcm_lora.safetensors": ("runs/image_lcm/lcm_lora.safetensors", "image_accel"),
          "motion_lcm.safetensors": ("runs/motion_lcm/motion_module_animatediff.safetensors", "motion"),
          "style_lora.safetensors": ("runs/style/style_lora.safetensors", "style"),
          "evaluator.safetensors": ("evaluator.safetensors", None)}
MAX_BYTES = 20 * 2**20


@dataclass(frozen=True)
class ToyFamily:
    """Paths of a trained toy family (see the module docstring for the layout)."""

    root: Path

    @property
    def teacher(self) -> Path:
        return self.root / "teacher"

    @property
    def evaluator(self) -> Path:
        return self.root / "evaluator.safetensors"

    def residuals(self) -> dict[str, Path]:
        """Kind (``style``, ``image_accel``, ``motion``) -> file."""
        return {kind: self.root / name for name, (_, kind) in PIECES.items() if kind not in (None, "base")}

    def recipe(self, *, style: float = 1.0, accel: float = 1.0, motion: float = 1.0):
        """Eq. 2 over the family's files: teacher + style·τ_style + accel·τ_LCM + motion·τ_motion (a zero scale drops
        the term)."""
        from weightlab.recipe import Recipe, Term

        scales = {"style": style, "image_accel": accel, "motion": motion}
        return Recipe(base=str(self.teacher), terms=[Term(source=str(path), kind=kind, scale=scales[kind])
                                                     for kind, path in self.residuals().items() if scales[kind]])

    def info(self) -> dict:
        """``family.json``: how it was made and what it measured."""
        return json.loads((self.root / "family.json").read_text())


def toy_family(root: str | Path | None = None) -> ToyFamily:
    """The family at ``root`` (default: the one shipped in the package), checked complete.

    Raises:
        MissingComponentError: a piece is missing (say which, and how to regenerate it).
    """
    family = ToyFamily(Path(root) if root is not None else SHIPPED)
    missing = [name for name in (*PIECES, "family.json") if not (family.root / name).exists()]
    if missing:
        raise MissingComponentError(f"{family.root}: the toy family lacks {', '.join(missing)}. Fix: regenerate it with "
                                    "`python -m weightlab.toy.reproduce --out runs/toy --ship` (about 70 min on 2 CPU "
                                    "cores), or reinstall weightlab.")
    return family


def ship(run: str | Path, dest: str | Path = SHIPPED, *, info: dict | None = None) -> ToyFamily:
    """Copy a finished reproduce run's pieces to ``dest`` (replaced whole, only once every piece is copied).

    Args:
        run (str | Path): a reproduce run's ``--out``. dest (str | Path, default the package's family folder).
        info (dict | None): what to record in ``family.json`` besides the files' hashes (seed, sizes, claims).
    Raises:
        MissingComponentError: the run lacks a piece (it has not finished).
        WeightlabError: the family would exceed 20 MB.
    """
    from weightlab.files import file_sha256

    run, dest = Path(run), Path(dest)
    missing = [src for src, _ in PIECES.values() if not (run / src).exists()]
    if missing:
        raise MissingComponentError(f"{run}: no {', '.join(missing)}. Fix: let the run finish (every stage) first.")
    tmp = dest.with_name(dest.name + ".new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, (src, _) in PIECES.items():
        (shutil.copytree if (run / src).is_dir() else shutil.copyfile)(run / src, tmp / name)
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    size = sum(p.stat().st_size for p in files)
    if size > MAX_BYTES:
        shutil.rmtree(tmp)
        raise WeightlabError(f"{run}: the family would take {size / 2**20:.1f} MB, over the "
                                    f"{MAX_BYTES / 2**20:.0f} MB a package may ship. Fix: train smaller models.")
    hashes = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in files}
    (tmp / "family.json").write_text(json.dumps({**(info or {}), "bytes": size, "sha256": hashes}, indent=1) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return ToyFamily(dest)
