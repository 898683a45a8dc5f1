"""`prefuse bench --quick` runs every installed path and writes sane numbers to its JSON."""
import json
import subprocess
import sys

import pytest

from prefuse.bench.report import available_paths


@pytest.mark.parametrize("task", ["head", "logprobs", "preference"])
def test_bench_quick_writes_every_installed_path(task, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "prefuse", "bench", "--quick", "--task", task, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    records = {r["path"]: r for r in data["records"]}
    assert set(records) == set(available_paths("cpu", task))
    losses = []
    for path, rec in records.items():
        assert not rec["errors"], (path, rec["errors"])
        assert 0 < rec["time_min_s"] <= rec["time_median_s"] <= rec["time_max_s"] < 60, path
        assert 0 <= rec["peak_extra_mib"] < 1024, path
        losses.append(rec["loss"])
    # every path computes the same loss on the same inputs
    assert max(losses) - min(losses) <= 1e-3 * max(1.0, abs(losses[0]))
    assert data["command"].startswith("prefuse bench")
    assert "| shape | path |" in proc.stdout
    # matmul products per step over the labeled rows, counted from the profiler: the recompute path runs four
    # (logits; backward: logits again, grad_hidden, grad_weight), the frozen-weight path two (logits, basis)
    # the materializing paths run every row: three products (logits, grad_hidden, grad_weight), the preference
    # one a fourth for the reference's logits
    every_row = records[next(iter(records))]["n"] / records[next(iter(records))]["labeled_rows"]
    expected = {"head": {"prefuse_torch_recompute": 4.0, "materialized": 3.0 * every_row},
                "logprobs": {"prefuse_logprobs": 4.0, "prefuse_logprobs_frozen": 2.0,
                             "prefuse_logprobs_frozen_recompute": 3.0, "materialized_logprobs": 3.0 * every_row},
                "preference": {"materialized_preference": 4.0 * every_row}}[task]
    for path, products in expected.items():
        assert records[path]["matmul_products"] == pytest.approx(products, rel=1e-6), path
        assert records[path]["floor_s"] > 0 and records[path]["product_gflops"] > 0, path


def test_matmul_flops_are_counted_once_per_product():
    """2*m*k*n per product for mm, addmm, in-place addmm_ and bmm; F.linear's inner addmm counted once; an
    elementwise op counts nothing."""
    import torch
    import torch.nn.functional as F

    from prefuse.bench.floor import count_matmul_flops

    a, b, c = torch.randn(6, 5), torch.randn(5, 7), torch.zeros(6, 7)
    x, y = torch.randn(3, 6, 5), torch.randn(3, 5, 4)
    bias = torch.randn(7)

    def step():
        torch.mm(a, b)
        torch.addmm(bias, a, b)
        c.addmm_(a, b)
        torch.bmm(x, y)
        F.linear(a, b.t(), bias)
        torch.exp(a)
    assert count_matmul_flops(step) == 4 * 2 * 6 * 5 * 7 + 2 * 3 * 6 * 5 * 4


def test_plots_cover_vocabulary_and_tokens(tmp_path):
    from prefuse.bench.plots import plot_records

    records = [{"path": p, "n": n, "v": v, "peak_extra_mib": n * v / 1e5 * k, "time_median_s": n * v / 1e7 * k}
               for k, p in ((1, "prefuse_torch"), (4, "materialized")) for n in (1024, 4096) for v in (32000, 128256)]
    written = plot_records(records, str(tmp_path / "bench"))
    assert sorted(written) == sorted([str(tmp_path / "bench_vs_tokens.png"), str(tmp_path / "bench_vs_vocab.png")])
    for path in written:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.compile
def test_static_report_covers_every_kernel_and_the_roofline(tmp_path):
    """`prefuse bench --static`: compiler facts for each kernel config on sm_80/sm_90, and the H100 roofline."""
    import os

    out = tmp_path / "static.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "prefuse", "bench", "--static", "--shapes", "4096x4096x128256",
                           "--dtype", "bfloat16", "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    kernels = {(k["kernel"], k["target"]) for k in data["kernels"]}
    assert kernels == {(k, t) for k in ("forward", "grad", "stats") for t in ("sm_80", "sm_90")}
    assert all(k["registers"] > 0 and k["spill_bytes"] == 0 and k["errors"] == 0 for k in data["kernels"])
    steps = {s["mode"]: s for s in data["steps"]}
    # three matmuls of 2*N*H*V FLOPs each at 989 TFLOPS bound the in-forward step from below
    matmul_ms = 3 * 2 * 4096 * 4096 * 128256 / 989e12 * 1e3
    assert matmul_ms <= steps["in_forward"]["step_roofline_ms"] < steps["recompute"]["step_roofline_ms"]


def test_reference_products_take_the_labeled_rows_of_any_leading_shape():
    """The floor's plain products run m rows of hidden [..., H] (a preference task's is [2B, T, H]), the whole one
    capped at MAX_PRODUCT_ELEMENTS outputs, the tiled one over whole 512 x 1024 tiles only."""
    import torch

    from prefuse.bench import floor

    hidden, weight = torch.randn(2, 640, 16), torch.randn(3000, 16)
    products = floor.reference_products(hidden, weight, 1100)
    assert products["whole"][1] == 2 * 1100 * 16 * 3000
    assert products["tiles"][1] == 2 * (2 * 512) * 16 * (2 * 1024)
    products["whole"][0]()
    products["tiles"][0]()


def test_compiled_peers_are_left_out_where_torch_compile_cannot_build():
    """With no working C++ compiler (CXX pointing nowhere: a machine without a toolchain, or ATen's vector headers
    cut by ATEN_CPU_CAPABILITY=default) the torch.compile peers are not installed paths, and asking for one by name
    is a one-line refusal that lists what is installed, not a failed bench."""
    import os

    env = {**os.environ, "CXX": "/nonexistent/c++", "TORCHINDUCTOR_CACHE_DIR": "/nonexistent/cache"}
    listed = subprocess.run([sys.executable, "-c", "from prefuse.bench.report import available_paths as a; "
                             "print(a('cpu', 'preference'), a('cpu', 'logprobs'), a('cpu', 'head'))"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert listed.returncode == 0, listed.stderr[-2000:]
    for name in ("liger_dpo", "cce_torch_compile_logprobs", "cce_torch_compile"):
        assert f"'{name}'" not in listed.stdout
    assert "'prefuse_preference'" in listed.stdout and "'materialized'" in listed.stdout
    from prefuse.bench.paths import PATHS

    compiled = [p.name for p in PATHS.values() if p.compiled and p.available("cpu")]
    if compiled:  # here the toolchain works: the same paths are listed
        assert f"'{compiled[0]}'" in subprocess.run(
            [sys.executable, "-c", "from prefuse.bench.report import available_paths as a; "
             f"print(a('cpu', {PATHS[compiled[0]].task!r}))"], capture_output=True, text=True, timeout=600).stdout
        refused = subprocess.run([sys.executable, "-m", "prefuse", "bench", "--quick", "--task",
                                  PATHS[compiled[0]].task, "--paths", compiled[0]],
                                 capture_output=True, text=True, env=env, timeout=600)
        assert refused.returncode == 2 and f"['{compiled[0]}'] not available on cpu" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
