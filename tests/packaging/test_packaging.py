"""The wheel must contain every package: pyproject lists them explicitly (package-dir mapping)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAPPED = {"weightlab": "weightlab", "registry": "weightlab.registry", "kernels": "weightlab.kernels",
          "alembic": "weightlab.registry.migrations"}


def test_every_package_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    for folder, name in cfg["package-dir"].items():
        assert (ROOT / name).is_dir() and MAPPED[name.split("/")[0]] == folder
    found = set()
    for top, import_name in MAPPED.items():
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((import_name, *rel)))
    assert found == listed, f"add to pyproject packages: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_every_public_name_resolves():
    import weightlab

    for name in weightlab.__all__:
        assert getattr(weightlab, name) is not None, name
