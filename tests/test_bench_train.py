"""`prefuse bench --task train`: prefuse train's step and TRL's DPOTrainer on the same model and pairs give the same
losses at every step (LoRA and full fine-tuning), an installed prefuse runs it with nothing beside it (the pairs are
generated), and the command refuses bad arguments in one line."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefuse.bench import train, train_data
from prefuse.cli import main

pytest.importorskip("trl")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """prefuse as a user installs it: a wheel built from a copy of the sources, installed into a folder of its own
    (its dependencies are the environment's)."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "prefuse", source / "prefuse", ignore=shutil.ignore_patterns("__pycache__"))
    def pip(*args):
        proc = subprocess.run([sys.executable, "-m", "pip", "-q", *args], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]

    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "wheel"), str(source))
    pip("install", "--no-deps", "--no-index", "--target", str(root / "site"), *map(str, (root / "wheel").glob("*.whl")))
    return root / "site"


@pytest.fixture(scope="module")
def quick(installed, tmp_path_factory):
    """`prefuse bench --task train --quick` of the installed copy, run in a folder with no ../shared beside it."""
    work = tmp_path_factory.mktemp("bench_train")
    assert not (work.parent / "shared").exists()
    env = dict(os.environ, PYTHONPATH=str(installed))
    where = subprocess.run([sys.executable, "-c", "import prefuse; print(prefuse.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(installed), where.stdout + where.stderr
    proc = subprocess.run([sys.executable, "-m", "prefuse", "bench", "--task", "train", "--quick", "--json",
                           "train.json", "--markdown", "train.md"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads((work / "train.json").read_text()), (work / "train.md").read_text()


def test_an_installed_copy_runs_the_quick_bench_on_generated_pairs(quick):
    _, data, _ = quick
    assert {(r["peft"], r["path"]) for r in data["records"]} == {(m, p) for m in train.MODES
                                                                 for p in train.DEFAULT_TRAIN_PATHS}
    for rec in data["records"]:
        assert rec["dataset"] == "generated" and rec["shape"] == train.QUICK_SHAPE.label, rec
        assert rec["losses"] or not rec["available"], rec


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


def test_generated_pairs_are_seeded_words_of_the_list_in_the_shapes_lengths():
    pairs = train_data.generated_pairs(6, 256)
    assert pairs == train_data.generated_pairs(6, 256) != train_data.generated_pairs(6, 256, seed=1)
    assert train_data.generated_pairs(2, 256) == pairs[:2]
    assert train_data.tokenizer_texts(256)[:3] == [pairs[0]["prompt"], pairs[0]["chosen"], pairs[0]["rejected"]]
    words = set(train_data.WORDS)
    for pair in pairs:
        assert pair["prompt"].endswith("?\n") and len(pair["prompt"]) <= 256 // 2 + 2
        assert pair["chosen"] != pair["rejected"]
        for side in ("chosen", "rejected"):
            assert 2 * 256 <= len(pair[side]) <= 5 * 256 + 200
        text = " ".join(pair.values()).lower()
        assert set(text.replace(",", " ").replace(".", " ").replace("?", " ").split()) <= words


def test_the_built_shape_takes_a_dataset_file(tmp_path):
    rows = [{"prompt": "no answer", "chosen": "same", "rejected": "same"}] + [
        {"prompt": f"Question {k}: " + "why " * 40, "chosen": f" Because {k}.", "rejected": f" No idea {k}."}
        for k in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shape = train.TrainShape(64, 1, 512, pairs=2, max_length=32, dataset=str(path))
    model_dir, pairs_file = train.prepare(shape, tmp_path)
    written = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    assert written == [{"prompt": rows[k]["prompt"][:16].rstrip() + "\n", "chosen": rows[k]["chosen"].lstrip(),
                        "rejected": rows[k]["rejected"].lstrip()} for k in (1, 2)]  # the tie is left out
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
    assert shape.describe()["dataset"] == str(path)


@pytest.mark.parametrize("rows,message", [
    (None, "--dataset: no such file"),
    ([{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}],
     "pairs.jsonl:1: the built shape takes prompt, chosen and rejected strings"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}], "has 1 usable pairs (a prompt and two different responses), "
                                                        "the shape asks for 2"),
])
def test_a_bad_dataset_for_the_built_shape_is_one_line(tmp_path, capsys, rows, message):
    path = tmp_path / "pairs.jsonl"
    if rows is not None:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["bench", "--task", "train", "--quick", "--dataset", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prefuse bench: error: --dataset: ") and message in err, err


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
    (["--model_name_or_path", "model"], "--model_name_or_path: give --dataset too"),
    (["--model_name_or_path", "model", "--dataset", "d.jsonl", "--shapes", "64x2x2048"],
     "--shapes: not with --model_name_or_path"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "--task", "train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prefuse bench: error: ") and message in err, err
