"""CI cannot pass with the PostgreSQL tests skipped: ``.ci/run`` sets ``WEIGHTLAB_REQUIRE_PG=1``, under which
tests/conftest.py fails a PostgreSQL test that cannot run; without it (``make test`` on a laptop) they skip."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_TEST = "import pytest\n\n\n@pytest.mark.postgres\ndef test_needs_postgres(pg_database):\n    pass\n"


@pytest.fixture
def run_pg_test(tmp_path):
    """Run a one-test suite that needs ``pg_database``, with the real tests/conftest.py, under ``env``."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_pg.py").write_text(PG_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    postgres: needs a PostgreSQL server\n")

    def run(**env: str) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k not in ("WEIGHTLAB_TEST_PG_URL", "WEIGHTLAB_REQUIRE_PG",
                                                                 "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
        return subprocess.run([sys.executable, "-P", "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
                               "-rsE", str(tmp_path)], cwd=tmp_path, env={**base, **env}, capture_output=True,
                              text=True, timeout=120)

    return run


def test_without_a_server_postgres_tests_skip_with_the_fix(run_pg_test):
    result = run_pg_test()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and "start_postgres" in result.stdout
    assert "PostgreSQL tests SKIPPED: WEIGHTLAB_TEST_PG_URL is not set" in result.stdout


@pytest.mark.parametrize("url", [None, "postgresql+psycopg://nobody@127.0.0.1:1/none"])  # unset; nobody answers
def test_required_postgres_fails_instead_of_skipping(run_pg_test, url):
    result = run_pg_test(WEIGHTLAB_REQUIRE_PG="1", **({"WEIGHTLAB_TEST_PG_URL": url} if url else {}))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout and "1 skipped" not in result.stdout
    assert "PostgreSQL tests cannot run (WEIGHTLAB_REQUIRE_PG=1 forbids skipping them)" in result.stdout
    assert ("is not set" if url is None else "no PostgreSQL server answers at") in result.stdout


def test_ci_requires_postgres():
    script = (ROOT / ".ci" / "run").read_text()
    assert script.index("\nexport WEIGHTLAB_REQUIRE_PG=1") < script.index("\nmake test")
