"""`prefuse train` end to end on real preference pairs with a tiny Llama: learning for several objectives (LoRA and
full fine-tuning), exact resume after SIGKILL, gradient accumulation over uneven batches, metrics.jsonl, errors."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.cli import main  # noqa: E402
from tests.tokenizer_fixture import build_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"
METRICS = ["step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mib"]


pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama with the fixture tokenizer, 16 standard and 16 conversational pairs, and unpaired data made of
    the standard pairs (chosen -> True, rejected -> False)."""
    root = tmp_path_factory.mktemp("train")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")

    def head(name, n):
        with open(DATA_DIR / name, encoding="utf-8") as f:
            return [json.loads(next(f)) for _ in range(n)]

    standard = head("pandalm_testset_v1_human.jsonl", 16)
    paths = {"model": root / "model", "standard": root / "standard.jsonl", "unpaired": root / "unpaired.jsonl",
             "conversational": root / "conversational.jsonl"}
    paths["standard"].write_text("".join(json.dumps(r) + "\n" for r in standard))
    paths["conversational"].write_text("".join(
        json.dumps(r) + "\n" for r in head("ultrafeedback_binarized_sample_train.conversational.jsonl", 16)))
    paths["unpaired"].write_text("".join(
        json.dumps({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}) + "\n"
        for r in standard for side in ("chosen", "rejected")))
    return paths


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def args(files, out, data="standard", **flags) -> list[str]:
    argv = ["train", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files[data]),
            "--output_dir", str(out), "--max_length", "128", "--max_prompt_length", "64", "--report_to", "none"]
    for key, value in flags.items():
        argv += [f"--{key}"] + (value.split() if isinstance(value, str) else [str(value)])
    return argv


@pytest.mark.parametrize("loss_type, peft, data, lr, beta", [
    ("sigmoid", True, "standard", 3e-2, 0.1),
    ("sigmoid", False, "conversational", 5e-3, 0.1),
    ("ipo", False, "standard", 5e-3, 0.1),
    ("simpo", True, "conversational", 3e-2, 2.0),  # TRL's SimPO beta: rewards are beta x mean token log-prob
    ("orpo", False, "standard", 5e-3, 0.1),
    ("kto", True, "unpaired", 3e-2, 0.1),
])
def test_training_lowers_the_loss_and_widens_the_margin(files, tmp_path, loss_type, peft, data, lr, beta):
    # one full batch per step: the same pairs every step, so loss and margin move steadily
    batch = 32 if data == "unpaired" else 16
    argv = args(files, tmp_path, data, loss_type=loss_type, learning_rate=lr, beta=beta, per_device_train_batch_size=batch,
                max_steps=12, logging_steps=1, save_steps=0, lr_scheduler_type="constant", use_peft=str(peft).lower(),
                lora_r=8, lora_dropout=0.0)
    assert main(argv) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 13))
    expected = [m for m in METRICS if m != "rewards/accuracies"] if loss_type == "kto" else METRICS  # as TRL's KTO
    for record in records:
        assert set(expected) <= record.keys(), sorted(set(expected) - record.keys())
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 0.05 * abs(first["loss"]), (first["loss"], last["loss"])
    assert last["rewards/margins"] > first["rewards/margins"] + 0.05, (first["rewards/margins"],
                                                                      last["rewards/margins"])
    assert all(b["rewards/margins"] > a["rewards/margins"] for a, b in zip(records[:-4], records[4:]))
    if loss_type != "kto":
        assert last["rewards/accuracies"] > 0.5
    if loss_type in ("sigmoid", "ipo", "kto"):  # policy == reference at step 1: rewards exactly 0
        assert first["rewards/margins"] == 0.0
    assert (tmp_path / "checkpoint-12" / "checkpoint.json").is_file()  # the final checkpoint


def test_logging_window_eval_and_precomputed_reference(files, tmp_path, capsys):
    argv = args(files, tmp_path, loss_type="sigmoid", learning_rate=5e-3, per_device_train_batch_size=4,
                max_steps=5, logging_steps=2, save_steps=0, eval_fraction=0.25, eval_steps=2,
                precompute_ref_log_probs="true")
    assert main(argv) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4, 5]  # one object per logged step (and the last step)
    assert all(set(METRICS) <= r.keys() and "eval_loss" in r and "eval_rewards/margins" in r for r in records)
    cached = list(tmp_path.glob("ref_logps-*.safetensors"))
    assert len(cached) == 2  # train and eval
    out = capsys.readouterr().out
    assert "cached" in out and "12 training examples" in out and "4 held out" in out
    # a second run finds the cache and reproduces the run
    again = tmp_path / "again"
    for path in cached:
        (again / path.name).parent.mkdir(exist_ok=True)
        (again / path.name).write_bytes(path.read_bytes())
    assert main(args(files, again, loss_type="sigmoid", learning_rate=5e-3, per_device_train_batch_size=4,
                     max_steps=5, logging_steps=2, save_steps=0, eval_fraction=0.25, eval_steps=2,
                     precompute_ref_log_probs="true")) == 0
    assert "cached" not in capsys.readouterr().out
    assert [r["loss"] for r in read_metrics(again)] == [r["loss"] for r in records]


def test_accumulation_over_uneven_micro_batches_equals_one_big_batch(files, tmp_path):
    """6 pairs as micro-batches of 4 + 2 (accumulated) give the step of one batch of 6: each micro-batch's mean is
    weighted by its share of the pairs, not 1/2."""
    common = dict(loss_type="sigmoid", learning_rate=5e-3, max_steps=1, logging_steps=1, save_steps=0)
    six = tmp_path / "six.jsonl"
    six.write_text("".join(files["standard"].read_text().splitlines(keepends=True)[:6]))
    paths = {**files, "six": six}
    assert main(args(paths, tmp_path / "one", "six", per_device_train_batch_size=6, **common)) == 0
    assert main(args(paths, tmp_path / "acc", "six", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     **common)) == 0
    one, acc = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "acc")[0]
    assert acc["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert acc["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    assert acc["logps/chosen"] == pytest.approx(one["logps/chosen"], rel=1e-5)


KILL_AT_STEP_5 = textwrap.dedent("""
    import os, signal, sys
    import prefuse.engine.core.metrics as metrics
    flush = metrics.MetricsLog.flush
    def flush_then_die(self, step, **kw):
        record = flush(self, step, **kw)
        if step == 5:  # after checkpoint-3, with steps 4 and 5 already in metrics.jsonl
            os.kill(os.getpid(), signal.SIGKILL)
        return record
    metrics.MetricsLog.flush = flush_then_die
    from prefuse.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(files, tmp_path):
    """LoRA with dropout (the RNG matters), 14 pairs in batches of 4 (a short last batch), accumulation 2, epochs
    wrapping: killed with SIGKILL at step 5, resumed from checkpoint-3, the per-step losses equal the
    uninterrupted run's exactly."""
    fourteen = tmp_path / "fourteen.jsonl"
    fourteen.write_text("".join(files["standard"].read_text().splitlines(keepends=True)[:14]))
    paths = {**files, "fourteen": fourteen}
    flags = dict(loss_type="sigmoid", use_peft="true", lora_r=4, lora_dropout=0.1, learning_rate=1e-2,
                 per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=8, logging_steps=1,
                 save_steps=3, warmup_steps=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}

    def run(out, *extra, script=None):
        start = [sys.executable, "-c", script] if script else [sys.executable, "-m", "prefuse"]
        command = [*start, *args(paths, out, "fourteen", **flags), *extra]
        return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    killed = run(tmp_path / "killed", script=KILL_AT_STEP_5)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = run(tmp_path / "killed", "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    expected, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "killed")
    assert [r["step"] for r in got] == list(range(1, 9))
    for key in ("loss", "rewards/margins", "learning_rate", "grad_norm", "epoch"):
        assert [r[key] for r in got] == [r[key] for r in expected], key
    assert len({r["loss"] for r in expected}) > 4  # the losses do change from step to step


@pytest.mark.parametrize("change, expected", [
    (dict(dataset_name="/nonexistent/pairs.jsonl"), "dataset_name: no such file"),
    (dict(model_name_or_path="/nonexistent/model"), "model_name_or_path"),
    (dict(loss_type="xpo"), "'xpo' does not run on offline data: its y_r is sampled from the reference"),
    (dict(loss_type="wbc"), "columns 'score_chosen', 'score_rejected' are missing; needed by loss_type wbc"),
    (dict(loss_type="selm"), "column 'reference_response' is missing"),
    (dict(loss_type="no_such_objective"), "loss_type"),
    (dict(loss_type="sigmoid", simpo_gamma="0.5"), "simpo_gamma"),
])
def test_bad_input_exits_nonzero_with_one_line(files, tmp_path, capsys, change, expected):
    argv = args(files, tmp_path, max_steps=1, save_steps=0)
    for key, value in change.items():
        flag = f"--{key}"
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # beside the libraries' progress bars
    assert len(errors) == 1 and errors[0].startswith("prefuse train: error:"), err
    assert expected in errors[0], errors[0]


def test_truncation_that_leaves_nothing_to_learn_is_counted_or_refused(files, tmp_path, capsys):
    # --max_length 4 cuts most pairs to one identical token: they are counted, the rest train
    assert main(args(files, tmp_path / "some", max_steps=1, save_steps=0, max_length=4)) == 0
    out = capsys.readouterr().out
    assert "data: 10 of 16 pairs have no response tokens left after truncation (max_length 4, max_prompt_length 64): " \
           "10 with chosen and rejected token-identical, 0 with an empty response" in out
    # pairs that agree on their first tokens, cut before they differ: nothing to learn, refused in one line
    same_start = tmp_path / "same_start.jsonl"
    same_start.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": " The answer is yes, surely.",
                                              "rejected": " The answer is no, never."}) + "\n" for i in range(4)))
    argv = args(files, tmp_path / "none", max_steps=1, save_steps=0, max_length=6)
    argv[argv.index("--dataset_name") + 1] = str(same_start)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "4 of 4 pairs have no response tokens left after truncation (max_length 6" in err[0]
    assert "raise --max_length" in err[0]


def test_config_yaml_takes_the_flag_names(files, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: {files['model']}\ndataset_name: {files['standard']}\n"
                      f"output_dir: {tmp_path / 'out'}\nloss_type: simpo\nsimpo_gamma: 0.3\nmax_steps: 2\n"
                      "logging_steps: 1\nsave_steps: 0\nmax_length: 64\nreport_to: none\n")
    assert main(["train", "--config", str(config), "--max_steps", "3"]) == 0  # a flag overrides the file
    assert [r["step"] for r in read_metrics(tmp_path / "out")] == [1, 2, 3]
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["objective_args"] == {"simpo_gamma": 0.3} and saved["loss_type"] == ["simpo"]


def test_bf16_gradient_checkpointing_mixed_objectives_and_tensorboard(files, tmp_path):
    """bf16 autocast, gradient checkpointing, an MPO-style weighted objective list, and TensorBoard event files."""
    pytest.importorskip("tensorboard")
    argv = args(files, tmp_path, loss_type="sigmoid sft", loss_weights="1.0 0.5", learning_rate=3e-2,
                per_device_train_batch_size=8, max_steps=3, logging_steps=1, save_steps=0, use_peft="true",
                lora_r=8, lora_dropout=0.0, bf16="true", gradient_checkpointing="true")
    argv[argv.index("--report_to") + 1] = "tensorboard"
    assert main(argv) == 0
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert {"loss/sigmoid", "loss/sft"} <= records[0].keys()
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))
