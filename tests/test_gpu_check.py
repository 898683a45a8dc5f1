"""bench/gpu_check.sh up to the point where CUDA is needed: its dry run checks the wheels folder, prints the GPU run's
commands, runs the CUDA subset (which skips here) and the three benches with --quick on the CPU into the output folder;
bench/download_wheels.sh prints the pip commands for the GPU machine's platform (nothing is downloaded here)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
TASKS = ("head", "logprobs", "preference")


def gpu_check(*args, wheels, stages=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GPU_CHECK_WHEELS"] = str(wheels)
    if stages:
        env["GPU_CHECK_STAGES"] = stages
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    wheels = tmp_path_factory.mktemp("wheels")
    for name in ("liger_kernel-0.8.5-py3-none-any.whl", "cut_cross_entropy-25.1.1-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    out = tmp_path_factory.mktemp("gpu_check")
    proc = gpu_check("--dry-run", out, wheels=wheels)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc, out, wheels


def test_dry_run_writes_each_task_json_and_table(dry_run):
    _, out, _ = dry_run
    for task in TASKS:
        data = json.loads((out / f"{task}.json").read_text())
        records = data["records"]
        assert {r["path"].split("_")[0] for r in records} == {"prefuse", "materialized"}, task
        for rec in records:
            assert not rec["errors"] and rec["device"] == "cpu" and rec["time_median_s"] > 0, (task, rec)
        table = (out / f"{task}.md").read_text()
        assert table.startswith(f"    prefuse bench --task {task} --device cpu --quick") and "| shape | path |" in table
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# GPU check (dry run on the CPU, --quick)")
    assert all(f"## {task}" in summary for task in TASKS)
    assert "cuda tests: 12 skipped" in summary  # the CUDA subset collects and skips without a GPU


def test_dry_run_prints_the_gpu_commands_and_the_wheels_install(dry_run):
    proc, out, wheels = dry_run
    assert f"would run: {proc.stdout.split('would run: ')[1].split()[0]} -m pip install --no-index --find-links " \
           f"{wheels} liger-kernel cut-cross-entropy" in proc.stdout
    assert "peer matplotlib: no wheel in" in proc.stdout
    assert "+ env TRITON_INTERPRET=0" in proc.stdout and "-m pytest -m cuda tests/test_cuda.py" in proc.stdout
    for task, shape in (("head", "32768x4096x128256"), ("logprobs", "4096x4096x128256"),
                        ("preference", "8x2048x4096x128256")):
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"would run:") and f"--task {task} " in ln)
        assert "--device cuda --dtype bfloat16" in line and shape in line and f"--plot {out}/{task}" in line
    assert "cce_triton liger_fused_linear_cross_entropy torch_linear_cross_entropy" in proc.stdout


def test_without_wheels_it_says_how_to_get_them(tmp_path):
    proc = gpu_check("--dry-run", tmp_path / "out", wheels=tmp_path / "none", stages="install", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "no peer wheels in" in proc.stdout and "bench/download_wheels.sh" in proc.stdout
    assert "pip install" not in proc.stdout


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, message in (((), "give the output folder"), (("--bogus", tmp_path), "unknown option --bogus"),
                          ((tmp_path / "a", tmp_path / "b"), "one output folder")):
        proc = gpu_check(*args, wheels=tmp_path, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_without_a_gpu_the_real_run_stops_at_once(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real run would start")
    proc = gpu_check(tmp_path / "out", wheels=tmp_path, timeout=60)
    assert proc.returncode == 2 and "no CUDA GPU visible" in proc.stderr and "--dry-run" in proc.stderr


def test_download_wheels_targets_the_gpu_platform():
    proc = subprocess.run(["bash", str(REPO / "bench" / "download_wheels.sh"), "--dry-run", "--python-version", "3.12",
                           "pyyaml"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    peers, rest = [ln for ln in proc.stdout.splitlines() if ln.startswith("+ ")]
    for line in (peers, rest):
        assert "pip download --only-binary=:all: --platform manylinux2014_x86_64" in line
        assert "--python-version 3.12 --implementation cp --abi cp312" in line
        assert f"--dest {REPO / 'bench' / 'wheels'}" in line
    assert peers.endswith("--no-deps liger-kernel==0.8.5 cut-cross-entropy==25.1.1")
    assert rest.endswith(" matplotlib pyyaml") and "--no-deps" not in rest
