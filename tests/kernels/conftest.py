"""Kernel tests run the real Triton kernel on CPU under the interpreter, switched on before it is imported."""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
if "weightlab.kernels.triton_merge" in sys.modules and not sys.modules["weightlab.kernels.triton_merge"].INTERPRET:
    raise RuntimeError("weightlab.kernels.triton_merge was imported before tests/kernels/conftest.py set "
                       "TRITON_INTERPRET=1. Fix: run tests/kernels in a fresh process.")
