"""`prefuse train-rm` on real UltraFeedback pairs with a tiny Llama: a Bradley-Terry model that ranks held-out pairs
above chance and loads in RewardModelJudge at the accuracy the trainer logged, a pairwise model that PairwiseJudge
loads, the loss against a plain computation, exact resume, one-line errors.

The data files are UltraFeedback rows with the prompt cut to its last 64 characters and each response to its first
320 (~190 tokens with the fixture tokenizer): the trainer drops pairs over max_length rather than cut them (TRL's
rule, so that a judge scores the very texts the model learned from), and whole UltraFeedback responses run to
~850 tokens, too long for a test on two CPU cores.
"""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.cli import main  # noqa: E402
from prefuse.engine.core import metrics as metrics_module  # noqa: E402
from prefuse.engine.judges import PairwiseJudge, RewardModelJudge, reward_model_ids  # noqa: E402
from prefuse.engine.reward.train import (  # noqa: E402
    RewardModelConfig,
    bradley_terry_loss,
    load_reward_model,
    pair_logits,
    pair_loss,
    pairwise_loss,
    train_reward_model,
)
from prefuse.engine.reward.pairs import load_reward_pairs  # noqa: E402
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")

TRAIN = DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl"
EVAL = DATA_DIR / "ultrafeedback_binarized_sample_eval.jsonl"
TRAIN_METRICS = {"step", "epoch", "loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward",
                 "num_tokens", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_mib"}
EVAL_METRICS = {"eval_loss", "eval_accuracy", "eval_margin", "eval_min_reward", "eval_mean_reward",
                "eval_max_reward"}


def shortened_rows(path: Path, n: int | None = None) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:n]
    return [{"prompt": r["prompt"][-64:], "chosen": r["chosen"][:320], "rejected": r["rejected"][:320]} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_model")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    save_tiny_llama(root / "model", tokenizer, max_position_embeddings=512)
    train, held_out = shortened_rows(TRAIN), shortened_rows(EVAL)
    return {"root": root, "model": root / "model", "tokenizer": tokenizer, "train_rows": train, "eval_rows": held_out,
            "train": write_jsonl(root / "train.jsonl", train), "eval": write_jsonl(root / "eval.jsonl", held_out),
            "small": write_jsonl(root / "small.jsonl", train[:16]),
            "unpaired": write_jsonl(root / "unpaired.jsonl", [
                {"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in train[:4]])}


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def argv(files, out, data="train", **flags) -> list[str]:
    args = ["train-rm", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files[data]),
            "--output_dir", str(out), "--report_to", "none"]
    for key, value in flags.items():
        args += [f"--{key}", str(value)]
    return args


def test_bradley_terry_learns_and_the_judge_ranks_held_out_pairs_as_the_trainer_logged(files, tmp_path):
    out = tmp_path / "rm"
    assert main(argv(files, out, eval_split=files["eval"], max_length=256, learning_rate=1e-3,
                     per_device_train_batch_size=16, per_device_eval_batch_size=32, max_steps=60, logging_steps=10,
                     eval_steps=20, save_steps=0)) == 0
    records = read_metrics(out)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert TRAIN_METRICS <= set(records[0]) and not EVAL_METRICS & set(records[0])
    final = records[-1]
    assert TRAIN_METRICS | EVAL_METRICS <= set(final)
    assert [r["num_tokens"] for r in records] == sorted({r["num_tokens"] for r in records})  # grows every step
    # chance is 0.5 (UltraFeedback's held-out chosen are not even longer: 44% of the pairs); 0.592 with seed 42
    assert final["eval_accuracy"] >= 0.56, [r.get("eval_accuracy") for r in records]

    # the saved model is a plain classifier directory: the judge reads the held-out texts exactly as trained
    tokenizer = files["tokenizer"]
    kept = [r for r in files["eval_rows"]
            if max(len(reward_model_ids(tokenizer, r["prompt"], r[k])) for k in ("chosen", "rejected")) <= 256]
    assert 150 < len(kept) < len(files["eval_rows"])  # some pairs over max_length were dropped, as by the trainer
    judge = RewardModelJudge(out, batch_size=32)
    prompts = [r["prompt"] for r in kept]
    chosen = judge.score(prompts, [r["chosen"] for r in kept])
    rejected = judge.score(prompts, [r["rejected"] for r in kept])
    wins = int((chosen > rejected).sum())
    assert wins == round(final["eval_accuracy"] * len(kept))
    assert float((chosen - rejected).mean()) == pytest.approx(final["eval_margin"], abs=1e-5)
    assert not list(out.glob("checkpoint-*/adapter_model.safetensors"))  # full fine-tuning: whole weights


def test_pairwise_kind_trains_with_lora_and_pairwise_judge_loads_it(files, tmp_path):
    out = tmp_path / "pairwise"
    assert main(argv(files, out, data="small", kind="pairwise", use_peft="true", lora_r=8, learning_rate=3e-2,
                     eval_split=files["small"], max_length=512, per_device_train_batch_size=8, max_steps=16,
                     logging_steps=1, eval_steps=16, save_steps=0)) == 0
    records = read_metrics(out)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=0.02)  # a fresh score head: logits near 0
    # it learns its 16 pairs (slowly: the two texts of a pair differ only in the order of the responses)
    assert records[-1]["eval_loss"] < math.log(2) - 0.04 and records[-1]["eval_accuracy"] >= 0.75
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()  # LoRA merged in

    judge = PairwiseJudge(out)
    rows = files["train_rows"][:16]
    prompts, chosen, rejected = ([r[k] for r in rows] for k in ("prompt", "chosen", "rejected"))
    forward = judge.compare(prompts, chosen, rejected)
    assert torch.allclose(forward, 1 - judge.compare(prompts, rejected, chosen))
    assert float((forward > 0.5).float().mean()) == pytest.approx(records[-1]["eval_accuracy"], abs=1e-6)


def test_loss_is_the_plain_computation_on_the_models_own_scores(files, tmp_path):
    cfg = RewardModelConfig(model_name_or_path=str(files["model"]), dataset_name=str(files["small"]),
                            output_dir=str(tmp_path), center_rewards_coefficient=0.3)
    model, tokenizer, pad_id = load_reward_model(cfg)
    model.eval()
    pairs = load_reward_pairs(files["small"], tokenizer, kind="bradley_terry", max_length=256)
    indices = [0, 3, 5, 6]
    assert len({len(pairs.first[i]) for i in indices} | {len(pairs.second[i]) for i in indices}) > 1  # padding
    first, second, _ = pair_logits(model, pairs, indices, pad_id, "cpu")

    def one(ids):  # each sequence alone, unpadded
        return model(input_ids=torch.tensor([ids])).logits[0, 0]

    with torch.no_grad():
        r_chosen = torch.stack([one(pairs.first[i]) for i in indices])
        r_rejected = torch.stack([one(pairs.second[i]) for i in indices])
        plain = -torch.log(torch.sigmoid(r_chosen - r_rejected)).mean()
        assert torch.allclose(first, r_chosen, atol=1e-5) and torch.allclose(second, r_rejected, atol=1e-5)
        assert float(pair_loss(cfg, first, second)) == pytest.approx(
            float(plain + 0.3 * ((r_chosen + r_rejected) ** 2).mean()), abs=1e-6)
        assert float(bradley_terry_loss(first, second)) == pytest.approx(float(plain), abs=1e-6)
        # pairwise: (chosen, rejected) has target 1 and (rejected, chosen) target 0, averaged over both texts
        a, b = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
        expected = -(torch.log(torch.sigmoid(a)) + torch.log(1 - torch.sigmoid(b))).mean() / 2
        assert float(pairwise_loss(a, b)) == pytest.approx(float(expected), abs=1e-6)


def test_resume_after_an_interruption_continues_with_identical_losses(files, tmp_path, monkeypatch):
    """LoRA with dropout on (the RNG matters), 10 pairs in batches of 3 (a short last batch), accumulation 2, epochs
    wrapping: stopped at step 5, resumed from checkpoint-3, every logged number equals the uninterrupted run's."""
    data = write_jsonl(tmp_path / "ten.jsonl", files["train_rows"][20:30])
    paths = {**files, "ten": data}
    flags = dict(use_peft="true", lora_r=4, lora_dropout=0.1, disable_dropout="false", learning_rate=1e-2,
                 max_length=256, per_device_train_batch_size=3, gradient_accumulation_steps=2, max_steps=8,
                 logging_steps=1, save_steps=3, warmup_steps=2, center_rewards_coefficient=0.01)
    assert main(argv(paths, tmp_path / "full", "ten", **flags)) == 0

    flush = metrics_module.MetricsLog.flush

    def flush_then_stop(self, step, **kwargs):
        if step == 5:
            raise KeyboardInterrupt  # the run stops between checkpoints 3 and 6
        return flush(self, step, **kwargs)

    monkeypatch.setattr(metrics_module.MetricsLog, "flush", flush_then_stop)
    with pytest.raises(KeyboardInterrupt):
        main(argv(paths, tmp_path / "stopped", "ten", **flags))
    monkeypatch.setattr(metrics_module.MetricsLog, "flush", flush)
    assert [r["step"] for r in read_metrics(tmp_path / "stopped")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "stopped").glob("checkpoint-*")) == ["checkpoint-3"]
    assert main(argv(paths, tmp_path / "stopped", "ten", resume_from_checkpoint="latest", **flags)) == 0

    expected, got = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "stopped")
    assert [r["step"] for r in got] == list(range(1, 9))
    for key in ("loss", "accuracy", "margin", "mean_reward", "learning_rate", "grad_norm", "epoch", "num_tokens"):
        assert [r[key] for r in got] == [r[key] for r in expected], key
    assert len({r["loss"] for r in expected}) > 5  # the losses do change from step to step
    shutil.rmtree(tmp_path / "full")


@pytest.mark.parametrize("change, expected", [
    (dict(model_name_or_path="/nonexistent/model"), "model_name_or_path: no such model directory"),
    (dict(dataset_name="unpaired"), "a reward model learns from pairs"),
    (dict(max_length="8"), "all 16 pairs have a sequence over max_length=8 tokens"),
    (dict(kind="pairs"), "kind: 'pairs' is not one of"),
    (dict(kind="pairwise", center_rewards_coefficient="0.1"), "center_rewards_coefficient:"),
])
def test_bad_input_exits_nonzero_with_one_line(files, tmp_path, capsys, change, expected):
    change = {k: str(files[v]) if v in ("unpaired",) else v for k, v in change.items()}
    args = argv(files, tmp_path / "out", "small", max_steps=1)
    for key, value in change.items():
        flag = f"--{key}"
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # beside the libraries' reports
    assert len(errors) == 1 and errors[0].startswith("prefuse train-rm: error:"), err
    assert expected in errors[0], errors[0]
