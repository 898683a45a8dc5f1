"""Test setup. TRITON_INTERPRET must be set before prefuse.kernels.triton_ops is imported, so the Triton kernels
run on the CPU through the interpreter; the compile test runs its compiler in a subprocess without it."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
