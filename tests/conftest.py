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


@pytest.fixture
def chunk_rows(monkeypatch):
    """Records the row count of every logits chunk the fused head computes (a spy on fused_head.chunk_logits)."""
    from prefuse.kernels import fused_head

    seen: list[int] = []
    original = fused_head.chunk_logits

    def spy(hidden_chunk, weight, bias, out=None, columns=False, **kwargs):
        seen.append(hidden_chunk.shape[0])
        return original(hidden_chunk, weight, bias, out=out, columns=columns, **kwargs)

    monkeypatch.setattr(fused_head, "chunk_logits", spy)
    return seen


@pytest.fixture
def one_thread():
    """Tiny shapes: a second thread only adds contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def offline_hf_home(monkeypatch, tmp_path):
    """No hub access, and a private HF_HOME, for tests that build and load models."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
