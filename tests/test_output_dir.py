"""An output_dir holds one run (engine/train/output_dir.py): its lock, the refusal of a used directory, nothing
written before the settings and the data are checked; export reads what the checkpoint records; resume refuses
changed settings (or applies them, recorded) and extends the schedule; SIGINT / SIGTERM save and exit 130 / 143."""
import json
import os
import shutil
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

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two tiny Llamas of the same shape (other seeds: other weights), 8 standard pairs, a file without the pairs'
    columns."""
    root = tmp_path_factory.mktemp("outdir")
    tokenizer = build_tokenizer()
    paths = {}
    for seed, name in [(0, "model_a"), (1, "model_b")]:
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                                          max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                                          eos_token_id=2, tie_word_embeddings=False)
        transformers.LlamaForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = root / name
    with open(DATA_DIR / "pandalm_testset_v1_human.jsonl", encoding="utf-8") as f:
        rows = [next(f) for _ in range(8)]
    paths["pairs"] = root / "pairs.jsonl"
    paths["pairs"].write_text("".join(rows))
    paths["bad"] = root / "bad.jsonl"
    paths["bad"].write_text('{"prompt": "hi", "answer": "there"}\n')
    return paths


def argv(files, out, model="model_a", data="pairs", **flags) -> list[str]:
    values = dict(model_name_or_path=files[model], dataset_name=files[data], output_dir=out, max_length=96,
                  max_prompt_length=48, report_to="none", learning_rate=1e-2, max_steps=2, logging_steps=1,
                  save_steps=2, per_device_train_batch_size=4, use_peft="true", lora_r=4, lora_dropout=0.0,
                  loss_type="sigmoid")
    values.update(flags)
    return ["train"] + [item for key, value in values.items() if value is not None
                        for item in (f"--{key}", *([] if value is True else [str(value)]))]


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def error_line(capsys) -> str:
    """The one error line on stderr (loading bars aside), and no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("prefuse ")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_used_output_dir_is_refused_unless_resumed_or_overwritten(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(files, out)) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    config = (out / "train_config.json").read_text()
    capsys.readouterr()

    assert main(argv(files, out, learning_rate=2e-2)) == 2
    line = error_line(capsys)
    assert line.startswith(f"prefuse train: error: output_dir: {out} holds another run (checkpoint-2, metrics.jsonl")
    assert "--resume_from_checkpoint latest" in line and "--overwrite_output_dir" in line
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched, no lock left
    assert (out / "train_config.json").read_text() == config

    # --overwrite_output_dir: the old checkpoints and log go, once the new run's settings and data are checked
    (out / "checkpoint-1").mkdir()  # an old run's checkpoint the new one would not overwrite
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-1", dirs_exist_ok=True)
    assert main(argv(files, out, max_steps=3, save_steps=3, overwrite_output_dir=True)) == 0
    printed = capsys.readouterr().out
    assert "the earlier run's checkpoint-1, checkpoint-2, metrics.jsonl, train_config.json removed" in printed
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "metrics.jsonl", "train_config.json"]
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]


def test_a_failed_run_writes_nothing(files, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    assert main(argv(files, fresh, data="bad")) == 2
    assert error_line(capsys).startswith(f"prefuse train: error: {files['bad']}")
    assert not fresh.exists()  # made for the run, left empty, removed

    used = tmp_path / "used"
    assert main(argv(files, used)) == 0
    config = (used / "train_config.json").read_text()
    capsys.readouterr()
    assert main(argv(files, used, model="model_b", data="bad", overwrite_output_dir=True)) == 2
    assert error_line(capsys).startswith(f"prefuse train: error: {files['bad']}")
    assert (used / "train_config.json").read_text() == config  # the earlier run's, not the failed one's
    assert sorted(p.name for p in used.iterdir()) == ["checkpoint-2", "metrics.jsonl", "train_config.json"]


def test_a_live_run_holds_its_output_dir_and_a_dead_ones_lock_is_taken_over(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".prefuse.lock").write_text(f"{other.pid}\n")
        assert main(argv(files, out)) == 2
        assert error_line(capsys) == (f"prefuse train: error: output_dir: {out} is in use by another run (pid "
                                      f"{other.pid}, {out / '.prefuse.lock'}); wait for it to end or give another "
                                      f"--output_dir")
        assert sorted(p.name for p in out.iterdir()) == [".prefuse.lock"]  # the other run's lock stays
    finally:
        other.kill()
        other.wait()
    assert main(argv(files, out)) == 0  # its process is gone
    assert f"output_dir: {out}: took over the stale lock of pid {other.pid} (that process is gone)" in \
        capsys.readouterr().out
    assert not (out / ".prefuse.lock").exists()  # released at the end
    assert (out / "checkpoint-2").is_dir()


def test_export_merges_into_the_base_the_checkpoint_records(files, tmp_path, capsys):
    """The issue's case: a LoRA run on model_a, then a failed run with model_b into the same output_dir (and, as an
    older prefuse left it, a train_config.json naming model_b): export --merge_lora merges into model_a."""
    out = tmp_path / "out"
    assert main(argv(files, out)) == 0
    assert main(argv(files, out, model="model_b", data="bad", overwrite_output_dir=True)) == 2
    stale = json.loads((out / "train_config.json").read_text())
    stale["model_name_or_path"] = str(files["model_b"])  # what the failed run wrote before this change
    (out / "train_config.json").write_text(json.dumps(stale))
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(out / "checkpoint-2"), "--output", str(tmp_path / "merged"),
                 "--merge_lora"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base_a = transformers.AutoModelForCausalLM.from_pretrained(files["model_a"])
    base_b = transformers.AutoModelForCausalLM.from_pretrained(files["model_b"])
    embed = "model.embed_tokens.weight"  # LoRA leaves the embeddings as the base has them
    assert torch.equal(merged.state_dict()[embed], base_a.state_dict()[embed])
    assert not torch.equal(merged.state_dict()[embed], base_b.state_dict()[embed])

    # a checkpoint without its own record: the train_config.json beside it, said in one line
    (out / "checkpoint-2" / "run_config.json").unlink()
    manifest = json.loads((out / "checkpoint-2" / "checkpoint.json").read_text())
    manifest["files"].remove("run_config.json")
    (out / "checkpoint-2" / "checkpoint.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(out / "checkpoint-2"), "--output", str(tmp_path / "old")]) == 0
    assert (f"checkpoint: {out / 'checkpoint-2'} records no settings (an older checkpoint); rebuilding its model "
            f"from {out / 'train_config.json'}") in capsys.readouterr().out


def test_resume_refuses_changed_settings_or_applies_them_recorded(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(files, out)) == 0
    capsys.readouterr()
    resume = dict(resume_from_checkpoint="latest", max_steps=3, save_steps=3)
    assert main(argv(files, out, learning_rate=2e-2, beta=0.2, **resume)) == 2
    assert error_line(capsys) == (
        f"prefuse train: error: resume_from_checkpoint: this run's settings differ from {out / 'checkpoint-2'}'s: "
        f"beta 0.1 -> 0.2; learning_rate 0.01 -> 0.02; resume with the checkpoint's settings, or give "
        f"--resume_with_changed_settings to apply the new ones")
    assert not (out / "checkpoint-3").exists()
    assert json.loads((out / "train_config.json").read_text())["learning_rate"] == 1e-2

    assert main(argv(files, out, learning_rate=2e-2, resume_with_changed_settings=True, **resume)) == 0
    printed = capsys.readouterr().out
    assert "resume: applying changed settings (--resume_with_changed_settings): learning_rate 0.01 -> 0.02" in printed
    records = metrics(out)
    assert records[2] == {"step": 2, "resumed_with_changed_settings": {
        "learning_rate": {"checkpoint": 0.01, "now": 0.02}}}
    # linear over 3 steps from 2e-2, at step 3 (the learning rate a step uses is logged): 2e-2 x 1/3
    assert records[3]["step"] == 3 and records[3]["learning_rate"] == pytest.approx(2e-2 / 3)
    assert json.loads((out / "train_config.json").read_text())["learning_rate"] == 2e-2


def test_resume_refuses_another_base_even_of_the_same_shape(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(argv(files, out)) == 0
    capsys.readouterr()
    assert main(argv(files, out, model="model_b", resume_from_checkpoint="latest", max_steps=3)) == 2
    line = error_line(capsys)
    assert f"model_name_or_path '{files['model_a']}' -> '{files['model_b']}'" in line

    # the same path, another model in it: its config's digest differs
    base = tmp_path / "base"
    shutil.copytree(files["model_a"], base)
    assert main(argv({**files, "base": base}, tmp_path / "two", model="base")) == 0
    config = json.loads((base / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (base / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(argv({**files, "base": base}, tmp_path / "two", model="base", resume_from_checkpoint="latest",
                     max_steps=3)) == 2
    line = error_line(capsys)
    assert "this run's settings differ from" in line and "base model {" in line and "config_sha256" in line


def test_a_larger_max_steps_continues_on_the_new_schedule(files, tmp_path, capsys):
    """max_steps 2 -> 4 (linear, 1e-2): steps 3 and 4 run at the new schedule's rates, 1e-2 x 2/4 and 1e-2 x
    1/4 (the old one's end is 0)."""
    out = tmp_path / "out"
    assert main(argv(files, out)) == 0
    assert main(argv(files, out, max_steps=4, save_steps=4, resume_from_checkpoint="latest")) == 0
    assert "resume: the schedule is this run's (linear, learning_rate 0.01, 4 steps), continued from step 2 at " \
           "learning rate 0.005" in capsys.readouterr().out
    rates = {r["step"]: r["learning_rate"] for r in metrics(out)}
    assert rates == pytest.approx({1: 1e-2, 2: 5e-3, 3: 5e-3, 4: 2.5e-3})


SIGNAL_AT_STEP_3 = textwrap.dedent("""
    import os, signal, sys
    import prefuse.engine.core.metrics as metrics
    add = metrics.MetricsLog.add
    def add_then_signal(self, values, **kw):
        add(self, values, **kw)
        self.steps_seen = getattr(self, "steps_seen", 0) + 1
        if self.steps_seen == 3 and os.environ.get("SEND_SIGNAL") and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), getattr(signal, os.environ["SEND_SIGNAL"]))
    metrics.MetricsLog.add = add_then_signal
    from prefuse.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_and_sigint_save_a_checkpoint_and_the_run_resumes(files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}

    def run(out, sent=None, **flags):
        command = [sys.executable, "-c", SIGNAL_AT_STEP_3, *argv(files, out, max_steps=5, save_steps=0, **flags)]
        return subprocess.run(command, env={**env, **({"SEND_SIGNAL": sent} if sent else {})}, cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    full = run(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-2000:]
    stopped = run(tmp_path / "stopped", "SIGTERM")
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert (f"SIGTERM at step 3: checkpoint saved to {tmp_path / 'stopped' / 'checkpoint-3'}; "
            f"--resume_from_checkpoint latest continues the run") in stopped.stdout
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir()) == ["checkpoint-3", "metrics.jsonl",
                                                                         "train_config.json"]  # no lock left
    resumed = run(tmp_path / "stopped", resume_from_checkpoint="latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = [(r["step"], r["loss"], r["learning_rate"]) for r in metrics(tmp_path / "full")]
    assert [(r["step"], r["loss"], r["learning_rate"]) for r in metrics(tmp_path / "stopped")] == expected

    interrupted = run(tmp_path / "interrupted", "SIGINT")
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert "SIGINT at step 3: checkpoint saved to" in interrupted.stdout
    assert (tmp_path / "interrupted" / "checkpoint-3" / "checkpoint.json").is_file()


def test_resume_compares_the_global_batch_and_skips_what_does_not_change_the_run():
    """A checkpoint of 2 ranks x 4 resumes in one process with 8 (the same global batch); logging, saving and
    max_steps are not compared; a setting an older checkpoint did not record is not compared."""
    from prefuse.engine.train.output_dir import changed_settings

    recorded = {"settings": {"per_device_train_batch_size": 4, "logging_steps": 1, "max_steps": 6, "seed": 1},
                "world_size": 2}
    same = {"per_device_train_batch_size": 8, "logging_steps": 5, "max_steps": 9, "seed": 1, "new_setting": 3}
    assert changed_settings(recorded, same, world_size=1) == []
    assert changed_settings(recorded, {**same, "per_device_train_batch_size": 4}, world_size=1) == [
        ("per_device_train_batch_size x ranks", 8, 4)]
    assert changed_settings(recorded, {**same, "seed": 2}, world_size=1) == [("seed", 1, 2)]


def test_train_rm_takes_the_same_lock_and_refuses_a_used_output_dir(files, tmp_path, capsys):
    rm = ["train-rm", "--model_name_or_path", str(files["model_a"]), "--dataset_name", str(files["pairs"]),
          "--report_to", "none", "--max_steps", "1", "--per_device_train_batch_size", "4"]
    busy = tmp_path / "busy"
    busy.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (busy / ".prefuse.lock").write_text(f"{other.pid}\n")
        assert main(rm + ["--output_dir", str(busy)]) == 2
        assert error_line(capsys).startswith(f"prefuse train-rm: error: output_dir: {busy} is in use by another run "
                                             f"(pid {other.pid}")
    finally:
        other.kill()
        other.wait()
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    assert main(rm + ["--output_dir", str(used)]) == 2
    assert error_line(capsys).startswith(f"prefuse train-rm: error: output_dir: {used} holds another run "
                                         f"(metrics.jsonl)")
    assert sorted(p.name for p in used.iterdir()) == ["metrics.jsonl"]


def test_prefuse_demo_takes_the_output_dir_lock(tmp_path, capsys):
    out = tmp_path / "demo"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".prefuse.lock").write_text(f"{other.pid}\n")
        assert main(["demo", "--output_dir", str(out)]) == 2
        assert error_line(capsys).startswith(f"prefuse demo: error: output_dir: {out} is in use by another run (pid "
                                             f"{other.pid}")
        assert sorted(p.name for p in out.iterdir()) == [".prefuse.lock"]
    finally:
        other.kill()
        other.wait()


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(files, tmp_path):
    """torchrun, 2 ranks on the CPU: SIGTERM to rank 0 alone during step 3; both ranks stop after it (the ranks
    agree through one all-reduce per step), checkpoint-3 is written once, and the run resumes on 2 ranks."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "signal_at_step_3.py"
    script.write_text(SIGNAL_AT_STEP_3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "GLOO_SOCKET_IFNAME": "lo"}

    def torchrun(*extra, sent=None):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                   "127.0.0.1", "--master_port", str(port), str(script),
                   *argv(files, tmp_path / "out", max_steps=5, save_steps=0, per_device_train_batch_size=2), *extra]
        return subprocess.run(command, env={**env, **({"SEND_SIGNAL": sent} if sent else {})}, cwd=REPO,
                              capture_output=True, text=True, timeout=300)

    stopped = torchrun(sent="SIGTERM")
    assert stopped.returncode != 0, stopped.stderr[-2000:]
    assert stopped.stdout.count("SIGTERM at step 3: checkpoint saved to") == 1, stopped.stdout[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-3"]
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2, 3]
    resumed = torchrun("--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in metrics(tmp_path / "out")] == [1, 2, 3, 4, 5]
