"""The head never holds the [N, V] logits, and ignored rows never reach the matmul."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import prefuse
from tests.reference import make_inputs


def test_ignored_rows_are_dropped_before_the_matmul(chunk_rows):
    seen = chunk_rows
    hidden, weight, labels, _ = make_inputs(100, 8, 50, ignore_frac=0.4)
    kept = int((labels != -100).sum())
    loss = prefuse.linear_cross_entropy(hidden, weight, labels, mode="recompute", chunk_size=16)
    assert sum(seen) == kept and max(seen) <= 16
    seen.clear()
    loss.backward()
    assert sum(seen) == kept  # backward recomputes only kept rows


def test_chunk_rows_follow_the_budget():
    from prefuse.kernels.plan import make_plan

    plan = make_plan(n_rows=10_000, hidden_size=64, vocab=32000, dtype=torch.float32, device=torch.device("cpu"),
                     needs_grad=True, upstream_known=True, chunk_budget_bytes=32 << 20)
    assert plan.rows_per_chunk * 32000 * 4 <= 32 << 20 and plan.rows_per_chunk >= 200
    small = make_plan(n_rows=10_000, hidden_size=4096, vocab=128256, dtype=torch.bfloat16,
                      device=torch.device("cpu"), needs_grad=True, upstream_known=True, grad_budget_bytes=1 << 30)
    assert small.mode == "recompute"  # grad_weight [V, H] in float32 (2 GiB) does not fit 1 GiB
    big = make_plan(n_rows=10_000, hidden_size=64, vocab=32000, dtype=torch.float32, device=torch.device("cpu"),
                    needs_grad=True, upstream_known=True, grad_budget_bytes=1 << 30)
    assert big.mode == "in_forward"
    assert make_plan(n_rows=10, hidden_size=8, vocab=10, dtype=torch.float32, device=torch.device("cpu"),
                     needs_grad=True, upstream_known=False).mode == "recompute"



def test_default_vocabulary_tiles_are_2_mib_on_the_cpu_and_8_mib_elsewhere():
    """The head's default logits buffer when it tiles the vocabulary: 512 rows x 1024 float32 columns on the CPU
    (what keeps the trainable and frozen heads' extra peak at PyTorch's chunked op's, README), 512 x 4096 on a
    GPU; the plan only, so no GPU is needed."""
    from prefuse.kernels.plan import Plan, make_plan

    common = dict(n_rows=3072, hidden_size=1024, vocab=32000, dtype=torch.float32, needs_grad=True,
                  upstream_known=False)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert make_plan(device=cpu, **common) == Plan(512, "recompute", vocab_tile=1024)
    assert make_plan(device=cpu, weight_frozen=True, **common) == Plan(512, "frozen_weight", vocab_tile=1024)
    assert make_plan(device=gpu, **common) == Plan(512, "recompute", vocab_tile=4096)
    assert make_plan(device=cpu, **dict(common, needs_grad=False)) == Plan(512, "forward_only", vocab_tile=1024)

PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, prefuse
    n, h, v, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / h ** 0.5).requires_grad_()
    labels = torch.randint(0, v, (n,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode.startswith("logprobs"):
        weight.requires_grad_(mode != "logprobs_frozen")  # frozen: the basis [N, H] is held from forward on
        out = prefuse.linear_logprobs(hidden, weight, labels, backend="torch").sum()
    else:
        out = prefuse.linear_cross_entropy(hidden, weight, labels, backend="torch", mode=mode)
    out.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"extra_mib": (peak - base) / 1024}))
""")


@pytest.mark.heavy
@pytest.mark.parametrize("mode", ["logprobs", "logprobs_frozen", "in_forward", "recompute"])
def test_peak_memory_is_bounded_by_the_chunk_not_by_n(mode):
    """N=16384, V=32000: the fp32 logits alone would be 2000 MiB. The head's extra peak (process high-water mark,
    measured in a fresh process) stays within the weight gradient (V x H fp32, 8 MiB), hidden-sized buffers
    (N x H, 4 MiB each) and one chunk budget (96 MiB) with slack for the allocator."""
    n, h, v = 16384, 64, 32000
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(n), str(h), str(v), mode],
                         capture_output=True, text=True, check=True)
    extra = json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]
    logits_mib = n * v * 4 / 2**20
    assert extra < 250, f"extra peak {extra:.0f} MiB (full logits would be {logits_mib:.0f} MiB)"
