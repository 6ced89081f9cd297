"""Trainer tests: tiny family, one CPU thread (the test machine is 2 shared cores), tiny runs."""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Oversubscribed threads make a tiny UNet step 10-100x slower on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def subprocess_env():
    """Environment for child processes: offline, one thread each."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
