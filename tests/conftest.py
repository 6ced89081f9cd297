import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one torch thread each, no oversubscription
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny model family, built once per test worker."""
    from weightlab.testing import build_tiny_family

    return build_tiny_family(tmp_path_factory.mktemp("tiny"))
