"""Every Triton kernel, in every config its launcher can use, compiles for sm_80 and sm_90 (PTX and cubin through
the bundled ptxas) and for AMD gfx942, with no register spills. Runs the compiler in a subprocess: under
TRITON_INTERPRET=1 (set for the other tests) kernels are interpreted functions and cannot be compiled."""
import itertools
import json
import os
import subprocess
import sys

import pytest

from prefuse.kernels.compile_report import AMD_TARGETS, DTYPES, NVIDIA_TARGETS, launch_variants

KERNELS = ("forward", "grad", "stats")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # --cover: each switch off, alone and all on (147 variants; every combination, 280, is bench/REGISTERS.md's
    # `python -m prefuse.kernels.compile_report`, too long for the suite on 2 cores)
    proc = subprocess.run([sys.executable, "-m", "prefuse.kernels.compile_report", "--json", "--cover"], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.compile
def test_every_launch_config_compiles_without_spills(report):
    returncode, results = report
    errors = [r for r in results if r["error"]]
    assert not errors, errors[:5]
    spills = [r for r in results if (r["spill_stores"] or 0) or (r["spill_loads"] or 0)]
    assert not spills, spills[:5]
    assert returncode == 0
    nvidia = [r for r in results if r["target"].startswith("sm_")]
    assert all(r["registers"] and r["registers"] <= 255 for r in nvidia)


@pytest.mark.compile
def test_report_covers_every_kernel_target_dtype_and_variant(report):
    _, results = report
    got = {(r["kernel"], r["target"], r["dtype"], json.dumps(r["constexprs"], sort_keys=True), r["num_warps"])
           for r in results}
    for kernel, arch, dtype in itertools.product(KERNELS, NVIDIA_TARGETS, DTYPES):
        for const, warps in launch_variants(kernel, arch, cover=True):
            assert (kernel, f"sm_{arch}", dtype, json.dumps(const, sort_keys=True), warps) in got
    every_switch = {(r["kernel"], name) for r in results for name, on in r["constexprs"].items() if on is True}
    for kernel in KERNELS:  # each switch of each kernel compiled on
        names = {k for const, _ in launch_variants(kernel, 90) for k, v in const.items() if isinstance(v, bool)}
        assert {(kernel, name) for name in names} <= every_switch
    for kernel, target in itertools.product(KERNELS, AMD_TARGETS):
        assert any(r["kernel"] == kernel and r["target"] == target for r in results)
