"""A real wheel, built from this tree the way pip builds it: its contents, and the installed package working from a
throw-away environment (``weightlab --help`` and a migration on a fresh SQLite database). Offline, about 15 s."""

import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md")


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result


def _package_dirs() -> dict[str, str]:
    """Source folder -> its path inside the wheel, from pyproject's package-dir mapping."""
    return {folder: package.replace(".", "/")
            for package, folder in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
            ["package-dir"].items()}


def _expected_files() -> set[str]:
    """Every file of the source folders (modules and data: alembic.ini, script.py.mako, templates, py.typed), at
    the path the package-dir mapping gives it in the wheel."""
    return {f"{dest}/{path.relative_to(ROOT / folder).as_posix()}"
            for folder, dest in _package_dirs().items() for path in (ROOT / folder).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """``pip wheel --no-deps`` of a copy of the tree (building in place would write build/ into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        shutil.copy(ROOT / name, src / name)
    for folder in _package_dirs():
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp / "dist"), str(src))
    (built,) = (tmp / "dist").glob("weightlab-*.whl")
    return built


def test_the_wheel_holds_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    meta = {n for n in names if n.split("/")[0].endswith(".dist-info")}
    shipped = names - meta
    assert shipped == _expected_files(), (f"missing: {sorted(_expected_files() - shipped)}; "
                                         f"unexpected: {sorted(shipped - _expected_files())}")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p for p in packages if f"{p.replace('.', '/')}/__init__.py" not in shipped} == set()
    assert {"weightlab/registry/migrations/alembic.ini", "weightlab/registry/migrations/script.py.mako",
            "weightlab/registry/migrations/env.py"} <= shipped
    assert any(n.startswith("weightlab/registry/migrations/versions/0001_") for n in shipped)
    assert {n.split("/")[0] for n in shipped} == {"weightlab"}  # never a top-level registry/, kernels/ or alembic/
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in meta if n.endswith("entry_points.txt"))).decode()
    assert "weightlab = weightlab.cli:app" in entry_points


def test_the_installed_wheel_runs_the_cli_and_a_migration(wheel, tmp_path):
    from weightlab.registry.db import head_revision

    # A venv without pip whose site also sees this environment's dependencies (a .pth line adds that folder to
    # sys.path without running its .pth files, so this checkout's editable install stays invisible); pip installs
    # the wheel into it, offline.
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    site = Path(_run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    (site / "weightlab-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))

    env = {**os.environ, "WEIGHTLAB_HOME": str(tmp_path / "home"), "WEIGHTLAB_DB_URL": f"sqlite:///{tmp_path / 'r.db'}",
           "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    where = _run(str(python), "-P", "-c", "import weightlab.registry.migrations as m; print(m.__file__)",
                 cwd=tmp_path, env=env).stdout.strip()
    assert Path(where).is_relative_to(site), where  # the wheel's copy, not this checkout
    assert "Usage: weightlab" in _run(str(venv / "bin" / "weightlab"), "--help", cwd=tmp_path, env=env).stdout
    out = _run(str(venv / "bin" / "weightlab"), "db", "upgrade", cwd=tmp_path, env=env).stdout
    assert f"schema empty -> {head_revision()}" in out
    with sqlite3.connect(tmp_path / "r.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head_revision(),)]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"artifacts", "versions"} <= tables, tables
