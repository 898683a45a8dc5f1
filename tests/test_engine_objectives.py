"""`prefuse train` runs 3 steps of every objective that offline data can feed, on the shared data (UltraFeedback
pairs with their scores joined from the .meta.jsonl file), and refuses the others with one line naming the flag
that will run them. Plus `prefuse objectives`."""
import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import prefuse  # noqa: E402
from prefuse.cli import main  # noqa: E402
from prefuse.engine.core.objectives import NOT_OFFLINE, objective_needs  # noqa: E402
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")
SOURCE = "ultrafeedback_binarized_sample_train"
OFFLINE = [n for n in prefuse.list_objectives() if n not in NOT_OFFLINE]
HPARAMS = {"exo_pair": {"label_smoothing": 1e-3}}


def lines(name: str, n: int) -> list[dict]:
    with open(DATA_DIR / name, encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama; 12 UltraFeedback pairs with score_chosen / score_rejected from the meta file, a
    preference_prob (Bradley-Terry of the two scores) and a reference_response generated greedily by the model
    itself (the reference, before training); the same pairs as unpaired completions with a `reward`."""
    root = tmp_path_factory.mktemp("objectives")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = save_tiny_llama(root / "model", tokenizer)
    pairs, meta = lines(f"{SOURCE}.jsonl", 12), lines(f"{SOURCE}.meta.jsonl", 12)
    rows = []
    for pair, info in zip(pairs, meta):
        prompt = tokenizer(pair["prompt"][-200:], return_tensors="pt")
        with torch.no_grad():
            sample = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        generated = tokenizer.decode(sample[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True) or " ok"
        rows.append({**pair, "prompt": pair["prompt"][-200:], "score_chosen": info["score_chosen"],
                     "score_rejected": info["score_rejected"],
                     "preference_prob": 1 / (1 + math.exp(info["score_rejected"] - info["score_chosen"])),
                     # the model's own response: SELM's y_ref, and Avg-DPO's generated rejected y~-
                     "reference_response": generated, "generated_rejected": generated})
    paths = {"model": root / "model", "pairs": root / "scored_pairs.jsonl", "unpaired": root / "rewards.jsonl"}
    paths["pairs"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["unpaired"].write_text("".join(
        json.dumps({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen",
                    "reward": r[f"score_{side}"] / 10}) + "\n" for r in rows for side in ("chosen", "rejected")))
    return paths


def train_argv(files, out, loss_type, data="pairs", **flags):
    argv = ["train", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files[data]),
            "--output_dir", str(out), "--loss_type", loss_type, "--max_steps", "3", "--logging_steps", "1",
            "--save_steps", "0", "--per_device_train_batch_size", "4", "--max_length", "48",
            "--max_prompt_length", "24", "--learning_rate", "1e-3", "--report_to", "none", "--use_peft",
            "--lora_r", "4"]
    for key, value in {**HPARAMS.get(loss_type, {}), **flags}.items():
        argv += [f"--{key}", str(value)]
    return argv


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type", OFFLINE)
def test_three_steps_of_every_offline_objective(files, tmp_path, loss_type, capsys):
    assert main(train_argv(files, tmp_path, loss_type)) == 0, capsys.readouterr().err
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert math.isfinite(record["loss"]) and record["grad_norm"] > 0, record  # it learns from something
    assert len({r["loss"] for r in records}) > 1  # the updates change the loss
    needs = objective_needs([loss_type])
    if needs.data == "completions":
        assert "24 training examples" in capsys.readouterr().out  # 12 scored pairs -> 24 completions


def test_ld_dpo_and_wpo_run(files, tmp_path):
    """LD-DPO's ld_alpha and WPO's use_weighting (its values against TRL: tests/test_preference_wpo.py) train."""
    assert main(train_argv(files, tmp_path / "ld", "sigmoid", ld_alpha=0.5)) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "ld")] == [1, 2, 3]
    assert main(train_argv(files, tmp_path / "wpo", "sigmoid", use_weighting="true")) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "wpo")] == [1, 2, 3]


def test_rewards_from_an_unpaired_reward_column(files, tmp_path):
    assert main(train_argv(files, tmp_path, "wbc", data="unpaired")) == 0
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_advantage_is_reward_minus_the_mean_reward(files):
    """A-LoL's advantages without an `advantage` column: the reward minus the training set's mean reward."""
    from prefuse.engine.data import load_preference_data, pairs_to_completions
    from prefuse.engine.core.sources import OfflineSource

    tokenizer = transformers.AutoTokenizer.from_pretrained(files["model"])
    data = pairs_to_completions(load_preference_data(files["pairs"], tokenizer, max_length=48))
    rewards = [e["reward"] for e in data.examples]
    source = OfflineSource(data, objective_needs(["alol"]), batch_size=len(data), seed=0, pad_id=0)
    batch = source.next_batch()
    expected = torch.tensor([rewards[i] for i in batch.index.tolist()]) - sum(rewards) / len(rewards)
    assert torch.allclose(batch.inputs["advantages"], expected.float())
    assert batch.inputs["advantages"].abs().sum() > 0


@pytest.mark.parametrize("loss_type", sorted(NOT_OFFLINE))
def test_objectives_offline_data_cannot_feed_are_refused_in_one_line(files, tmp_path, loss_type, capsys):
    assert main(train_argv(files, tmp_path, loss_type)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"prefuse train: error: loss_type: '{loss_type}' does not run on "
                                               f"offline data: "), err
    assert any(flag in err[0] for flag in ("--online", "--ofs", "--srpo", "issue 11"))


def test_prefuse_objectives_lists_every_objective_with_its_data(capsys):
    assert main(["objectives"]) == 0
    out = capsys.readouterr().out
    blocks = {block.split()[0]: " ".join(block.split()) for block in out.split("\n\n")}
    assert sorted(blocks) == prefuse.list_objectives()
    assert "reference_response" in blocks["selm"] and "preference_prob" in blocks["online_ipo"]
    assert "score_chosen, score_rejected" in blocks["wbc"] and "not offline" in blocks["xpo"]
    assert "generated_rejected" in blocks["avg_dpo"] and "--mixed_p" in blocks["mixed_dpo"]
    assert main(["objectives", "--json", "kto"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["roles"] == ["completion", "kl"] and record["separable"] is False
