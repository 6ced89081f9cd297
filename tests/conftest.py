import os
import uuid
import warnings

import pytest

PG_ENV = "WEIGHTLAB_TEST_PG_URL"  # a PostgreSQL server's SQLAlchemy URL; .ci/postgres.sh exports it
REQUIRE_PG_ENV = "WEIGHTLAB_REQUIRE_PG"  # "1" (set by .ci/run): a PostgreSQL test that cannot run fails, never skips

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton decides at its own import whether it interprets: peft (and so any test module importing it) imports
# triton, so the switch that tests/kernels needs must be set before any test module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one torch thread each, no oversubscription
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny model family, built once per run and shared by the xdist workers: its paths are part of every
    recipe hash, so exports shared between workers (tests/video) only match when the paths are the same too."""
    from filelock import FileLock

    from weightlab.testing import build_tiny_family

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, never across runs
    with FileLock(str(root / "tiny.lock")):
        return build_tiny_family(root / "tiny")


@pytest.fixture(scope="session")
def style_lora_te(tiny, tmp_path_factory):
    """The tiny family's kohya style LoRA plus a text-encoder half (rank 4, alpha 2) under kohya's ``lora_te_`` names."""
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    from weightlab.testing import lora_to_kohya, make_lora

    text_encoder = CLIPTextModel.from_pretrained(tiny.base_dir / "text_encoder")
    factors = make_lora(text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], rank=4, seed=7)
    out = tmp_path_factory.mktemp("style_te") / "style_lora_te_kohya.safetensors"
    save_file({**load_file(tiny.style_lora_kohya), **lora_to_kohya(factors, 2.0, prefix="lora_te_text_model_")}, out)
    return out


def _skip_pg(reason: str):
    """Skip a PostgreSQL test that cannot run, with a warning; fail it instead under ``$WEIGHTLAB_REQUIRE_PG=1``."""
    fix = f"Fix: run `source .ci/postgres.sh && start_postgres` (exports {PG_ENV}), or set {PG_ENV} to a server's " \
          "SQLAlchemy URL."
    if os.environ.get(REQUIRE_PG_ENV) == "1":
        pytest.fail(f"PostgreSQL tests cannot run ({REQUIRE_PG_ENV}=1 forbids skipping them): {reason}. {fix}",
                    pytrace=False)
    message = f"PostgreSQL tests SKIPPED: {reason}. {fix}"
    warnings.warn(message, pytest.PytestWarning, stacklevel=2)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_database():
    """A database created for this test session (each xdist worker) on ``$WEIGHTLAB_TEST_PG_URL``'s server."""
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.exc import OperationalError

    server = os.environ.get(PG_ENV)
    if not server:
        _skip_pg(f"{PG_ENV} is not set")
    admin = create_engine(server, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    name = f"weightlab_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as e:
        admin.dispose()
        _skip_pg(f"no PostgreSQL server answers at {make_url(server).render_as_string(hide_password=True)} "
                 f"({str(e).splitlines()[0]})")
    yield make_url(server).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_url(pg_database):
    """A URL whose connections use a fresh, empty schema of the session's database."""
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_database, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{pg_database}?options=-csearch_path%3D{schema}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path):
    """The registry database URL, once per backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("pg_url")
