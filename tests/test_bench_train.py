"""`prefuse bench --task train`: prefuse train's step and TRL's DPOTrainer on the same model and pairs give the same
losses at every step (LoRA and full fine-tuning), and the command refuses bad arguments in one line."""
import json
import math
import subprocess
import sys

import pytest

from prefuse.bench import train
from prefuse.cli import main

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    if not train.DATA.exists():
        pytest.skip("the shared preference data is not next to the repository")
    out = tmp_path_factory.mktemp("bench_train")
    proc = subprocess.run([sys.executable, "-m", "prefuse", "bench", "--task", "train", "--quick", "--json",
                           str(out / "train.json"), "--markdown", str(out / "train.md")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads((out / "train.json").read_text()), (out / "train.md").read_text()


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_quick_losses_of_prefuse_and_trl_agree_at_every_step(quick, mode):
    proc, data, _ = quick
    records = {r["path"]: r for r in data["records"] if r["peft"] == mode}
    ours, theirs = records["prefuse"], records["trl"]
    assert not ours["errors"] and not theirs["errors"], (ours["errors"], theirs["errors"])
    assert len(ours["losses"]) == len(theirs["losses"]) == 3  # one warm-up step and two timed ones
    for got, want in zip(theirs["losses"], ours["losses"]):
        assert abs(got - want) <= 1e-4, (theirs["losses"], ours["losses"])
    assert theirs["loss_max_diff"] == pytest.approx(max(abs(a - b) for a, b in zip(theirs["losses"],
                                                                                     ours["losses"])))
    if mode == "lora":  # the adapters start off zero: the policy already differs from its reference
        assert abs(ours["losses"][0] - math.log(2)) > 1e-3
    else:  # full fine-tuning starts at the reference itself
        assert ours["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert ours["losses"][-1] < ours["losses"][0] - 1e-3  # both trained: the loss moved the same way
    assert ours["batch_digest"] == theirs["batch_digest"]  # the same token ids on both sides
    assert ours["tokens_per_step"] == theirs["tokens_per_step"] > 0
    for rec in (ours, theirs):
        assert rec["rounds"] == 2 and 0 < rec["time_min_s"] <= rec["time_median_s"] <= rec["time_max_s"]
        assert rec["tokens_per_s"] == pytest.approx(rec["tokens_per_step"] / rec["time_median_s"])
        assert rec["peak_mib"] > 100 and rec["step_extra_mib"] >= 0
    # the losses are printed, per path
    assert f"{mode} prefuse" in proc.stdout and " ".join(f"{x:.6f}" for x in ours["losses"]) in proc.stdout


def test_quick_reports_liger_not_available_on_the_cpu_and_writes_the_table(quick):
    _, data, markdown = quick
    liger = [r for r in data["records"] if r["path"] == "trl_liger"]
    assert {r["peft"] for r in liger} == {"lora", "full"}
    for rec in liger:
        assert rec["available"] is False and not rec["errors"] and "CUDA" in rec["why_not"]
    assert data["command"].startswith("prefuse bench --task train")
    assert markdown.startswith("    prefuse bench --task train") and "| 64x2x2048 | lora | trl |" in markdown


def record(path, losses, digest="a", logps=(-90.0, -80.0)):
    metrics = [{"logps/chosen": logps[0], "logps/rejected": logps[1]}] * len(losses)
    return {"path": path, "peft": "lora", "losses": losses, "metrics": metrics, "batch_digest": digest, "errors": []}


def test_loss_check_fails_on_a_difference_or_other_tokens():
    records = [record("prefuse", [0.6, 0.5]), record("trl", [0.6, 0.5 + 5e-5]), record("other", [0.6, 0.5002]),
               record("tokens", [0.6, 0.5], digest="b")]
    train.check_losses(records)
    assert records[0]["errors"] == [] and records[1]["errors"] == []
    assert records[1]["loss_max_diff"] == pytest.approx(5e-5)
    assert records[2]["errors"] == ["losses differ from prefuse's by 2.00e-04 (tolerance 1e-04)"]
    assert records[3]["errors"] == ["the batch's token ids differ from prefuse's"]


def test_sequence_logps_are_checked_relative_to_their_size():
    """The tokenization differences the loss may hide (a newline more per response) show in the log-prob sums."""
    records = [record("prefuse", [0.6]), record("trl", [0.6], logps=(-90.0 * (1 + 5e-5), -80.0)),
               record("other", [0.6], logps=(-90.0, -80.022))]
    train.check_losses(records)
    assert records[1]["errors"] == [] and records[1]["metrics_max_rel_diff"]["logps/chosen"] == pytest.approx(5e-5)
    assert records[2]["errors"] == ["logps/rejected differs from prefuse's by 2.75e-04 of its size (tolerance 1e-04)"]


@pytest.mark.parametrize("argv,message", [
    (["--shapes", "256x4"], "--shapes: expected hidden x layers x vocabulary"),
    (["--shapes", "100x4x32000"], "hidden must be a multiple of 64"),
    (["--peft", "qlora"], "--peft: expected lora, full or both"),
    (["--paths", "prefuse", "deepspeed"], "--paths: ['deepspeed'] are not train paths"),
    (["--rounds", "0"], "--rounds: expected at least 1"),
    (["--grid"], "--grid: not for --task train"),
    (["--device", "tpu"], "--device: 'tpu' is not available here"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "--task", "train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prefuse bench: error: ") and message in err, err
