"""`prefuse sft` on a tiny model: TRL 1.16's SFTTrainer tokenizes every format into the same ids and labels; the
fused loss, entropy and accuracy equal F.cross_entropy on the model's own logits (float64); gradient accumulation
normalises over the optimizer step's trained tokens (one batch = two micro-batches of unequal lengths); --packing
equals the padded run; a resumed run continues exactly; bad rows are one line naming file, row and field."""
import json

import pytest
import torch
import torch.nn.functional as F

from prefuse.engine.data import DataError, load_records
from prefuse.engine.sft.data import tokenize_sft
from prefuse.engine.sft.train import SFTStep, sft_batch
from tests.data_helpers import write_jsonl
from tests.tokenizer_fixture import CHAT_TEMPLATE, build_tokenizer, save_tiny_llama

# CHAT_TEMPLATE with transformers' generation markers around each assistant turn (its EOS included)
MARKED_TEMPLATE = CHAT_TEMPLATE.replace(
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}",
    "{% if message['role'] == 'assistant' %}{{ '<|assistant|>\n' }}{% generation %}{{ message['content'] + "
    "eos_token }}{% endgeneration %}{% else %}{{ '<|' + message['role'] + '|>\n' + message['content'] }}{% endif %}")
assert MARKED_TEMPLATE != CHAT_TEMPLATE

TEXT = [{"text": "The cat sat on the mat."}, {"text": "Two plus two is four, and five is more.</s>"},
        {"text": "Short."}, {"text": "A somewhat longer line of text about nothing in particular at all."}]
PROMPT_COMPLETION = [{"prompt": "Say hi:", "completion": " hi there"}, {"prompt": "Count:", "completion": " 1 2 3"},
                     {"prompt": "Name a colour:", "completion": " blue</s>"}, {"prompt": "Q?", "completion": " A."}]
CONV_PROMPT_COMPLETION = [
    {"prompt": [{"role": "user", "content": r["prompt"]}], "completion": [{"role": "assistant",
                                                                             "content": r["completion"]}]}
    for r in PROMPT_COMPLETION]
MESSAGES = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"},
                          {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "And?"},
                          {"role": "assistant", "content": "That is all."}]},
            {"messages": [{"role": "user", "content": "Why is the sky blue?"},
                          {"role": "assistant", "content": "Light scatters."}]}]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny")
    save_tiny_llama(path, tokenizer)
    return path


def trl_tokenized(rows, tokenizer, tmp_path, **args):
    """TRL 1.16's SFTTrainer's prepared training set (input_ids, labels) of `rows`."""
    import datasets
    import transformers
    from trl import SFTConfig, SFTTrainer

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2))
    config = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, **args)
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    return [(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]


@pytest.mark.parametrize("name, rows, args", [
    ("text", TEXT, {}),
    ("text_cut_keep_end", TEXT, {"max_length": 8, "truncation_mode": "keep_end"}),
    ("prompt_completion", PROMPT_COMPLETION, {}),
    ("prompt_completion_all_tokens", PROMPT_COMPLETION, {"completion_only_loss": False}),
    ("prompt_completion_cut", PROMPT_COMPLETION, {"max_length": 5}),
    ("conversational_prompt_completion", CONV_PROMPT_COMPLETION, {}),
    ("messages", MESSAGES, {}),
    ("messages_assistant_only", MESSAGES, {"assistant_only_loss": True}),
    ("conversational_prompt_completion_assistant_only", CONV_PROMPT_COMPLETION, {"assistant_only_loss": True}),
])
def test_the_tokens_trained_are_trls(tokenizer, tmp_path, name, rows, args):
    """The same input_ids and labels as TRL's SFTTrainer builds from the same rows (EOS appended, chat template,
    completion and assistant masks, truncation and the rows it drops)."""
    tokenizer = build_tokenizer().__class__.from_pretrained(_saved(tokenizer, tmp_path, args))
    want = trl_tokenized(rows, tokenizer, tmp_path, **args)
    data = tokenize_sft(load_records(write_jsonl(tmp_path / "rows.jsonl", rows)), tokenizer, source="rows.jsonl",
                        max_length=args.get("max_length", 1024), truncation_mode=args.get("truncation_mode",
                                                                                          "keep_start"),
                        completion_only_loss=args.get("completion_only_loss"),
                        assistant_only_loss=args.get("assistant_only_loss", False))
    got = [(e["input_ids"], e["labels"]) for e in data.examples]
    assert got == want
    assert any(label == -100 for _, labels in got for label in labels) == (
        name.startswith("prompt_completion") and "all_tokens" not in name or "assistant_only" in name
        or name.startswith("conversational_prompt"))


def _saved(tokenizer, tmp_path, args) -> str:
    """The fixture tokenizer saved, with the marked template when the case trains assistant tokens only."""
    path = tmp_path / "tokenizer"
    tokenizer.save_pretrained(path)
    if args.get("assistant_only_loss"):
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = MARKED_TEMPLATE
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        (path / "chat_template.jinja").write_text(MARKED_TEMPLATE)
    return str(path)


def test_fused_loss_entropy_and_accuracy_equal_the_materialized_logits_in_float64(tokenizer, tmp_path):
    """SFTStep's loss, entropy and mean_token_accuracy against F.cross_entropy, the softmax entropy and the argmax
    of the model's own logits [B, T, V] (its lm_head, float64), over the data's own labels shifted by hand."""
    torch.manual_seed(0)
    model = save_tiny_llama(tmp_path / "m", tokenizer).double()
    data = tokenize_sft(load_records(write_jsonl(tmp_path / "pc.jsonl", PROMPT_COMPLETION)), tokenizer,
                        source="pc.jsonl")
    batch = sft_batch(data.examples, list(range(len(data))), pad_id=0)
    loss, metrics = SFTStep(model)(batch)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    terms, entropies, hits = [], [], []
    for row, example in enumerate(data.examples):
        n = len(example["input_ids"])
        targets = torch.tensor(example["labels"][1:])
        keep = targets != -100
        row_logits = logits[row, :n - 1][keep]
        terms.append(F.cross_entropy(row_logits, targets[keep], reduction="none"))
        logp = row_logits.log_softmax(-1)
        entropies.append(-(logp.exp() * logp).sum(-1))
        hits.append(row_logits.argmax(-1) == targets[keep])
    want = torch.cat(terms).mean()
    # the fused head returns float32 log-probs: each term within float32's unit roundoff (2^-24 relative), so the
    # mean of these positive terms within 2^-24 too (one more for the sum)
    assert float(loss) == pytest.approx(float(want), rel=2 * 2.0 ** -24)
    assert float(metrics["entropy"]) == pytest.approx(float(torch.cat(entropies).mean()), rel=1e-6)  # float32 stats
    assert float(metrics["mean_token_accuracy"]) == float(torch.cat(hits).double().mean())
    grads = torch.autograd.grad(loss, [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight])
    want_grads = torch.autograd.grad(want, [model.lm_head.weight, model.model.layers[0].mlp.up_proj.weight])
    for g, w in zip(grads, want_grads):  # the float32 log-probs' upstream gradient: float32's roundoff of the largest
        assert float((g - w).abs().max()) <= 4 * 2.0 ** -24 * float(w.abs().max())


def run_sft(model_dir, data, out, *flags):
    from prefuse.cli import main

    argv = ["sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
            "--logging_steps", "1", "--save_steps", "0", "--report_to", "none", "--learning_rate", "1e-3",
            "--train_sampling_strategy", "sequential", "--seed", "0", "--device", "cpu", *flags]
    assert main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.usefixtures("one_thread")
def test_gradient_accumulation_normalises_over_the_steps_trained_tokens(model_dir, tmp_path):
    """Two micro-batches of one sequence each (11 and 3 trained tokens) give the step of one batch of both: TRL's
    num_items_in_batch (each micro-batch's sum over the step's count), not the mean of the micro-batches' means."""
    data = write_jsonl(tmp_path / "text.jsonl", TEXT)
    one = run_sft(model_dir, data, tmp_path / "one", "--per_device_train_batch_size", "2", "--max_steps", "2")
    two = run_sft(model_dir, data, tmp_path / "two", "--per_device_train_batch_size", "1",
                  "--gradient_accumulation_steps", "2", "--max_steps", "2")
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key  # float32: a batch's sums in another order
    assert one[0]["loss"] != one[1]["loss"]


@pytest.mark.usefixtures("one_thread")
def test_packing_equals_the_padded_run(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "text.jsonl", TEXT)
    padded = run_sft(model_dir, data, tmp_path / "padded", "--per_device_train_batch_size", "4", "--max_steps", "2")
    packed = run_sft(model_dir, data, tmp_path / "packed", "--per_device_train_batch_size", "4", "--max_steps", "2",
                     "--packing")
    for a, b in zip(padded, packed):
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key


@pytest.mark.usefixtures("one_thread")
def test_a_resumed_run_continues_exactly(model_dir, tmp_path):
    """LoRA, random order: 4 steps in one go against 2 steps, then resumed to 4 from checkpoint-2."""
    data = write_jsonl(tmp_path / "text.jsonl", TEXT)
    flags = ["--per_device_train_batch_size", "2", "--use_peft", "--lora_r", "4", "--lora_dropout", "0",
             "--lr_scheduler_type", "constant", "--train_sampling_strategy", "random"]
    whole = run_sft(model_dir, data, tmp_path / "whole", *flags, "--max_steps", "4")
    run_sft(model_dir, data, tmp_path / "parts", *flags, "--max_steps", "2", "--save_steps", "2")
    parts = run_sft(model_dir, data, tmp_path / "parts", *flags, "--max_steps", "4",
                    "--resume_from_checkpoint", "latest")
    assert len(whole) == len(parts) == 4
    for a, b in zip(whole, parts):
        assert (a["loss"], a["grad_norm"], a["num_tokens"]) == (b["loss"], b["grad_norm"], b["num_tokens"])


@pytest.mark.parametrize("rows, message", [
    ([{"text": "fine"}, {"text": ""}], "rows.jsonl:2: field 'text': empty response"),
    ([{"text": "fine"}, {"text": 3}], "rows.jsonl:2: field 'text': expected a string, got int"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "a"}], "rows.jsonl:2: field 'completion': missing"),
    ([{"messages": [{"role": "user", "content": "x"}]}, {"messages": [{"role": "bot", "content": "x"}]}],
     "rows.jsonl:2: field 'messages': message 1: role 'bot' is not one of"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}],
     "rows.jsonl:1: field 'messages': chat template: conversation roles must alternate"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], "no SFT columns"),
])
def test_a_bad_row_is_one_line_naming_file_row_and_field(tokenizer, tmp_path, rows, message):
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError) as error:
        tokenize_sft(load_records(path), tokenizer, source=str(path))
    text = str(error.value)
    assert message in text and "\n" not in text


def test_bad_rows_skipped_are_counted(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "fine"}, {"text": ""}, {"text": "also fine"}])
    data = tokenize_sft(load_records(path), tokenizer, source=str(path), skip_bad_rows=True)
    assert len(data) == 2 and data.skipped.count == 1


def test_assistant_only_loss_without_generation_markers_is_refused_in_one_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", MESSAGES)
    with pytest.raises(DataError, match=r"assistant_only_loss: .* no \{% generation %\}.*chat_template_path"):
        tokenize_sft(load_records(path), tokenizer, source=str(path), assistant_only_loss=True)


def test_the_command_refuses_bad_settings_in_one_line(model_dir, tmp_path, capsys):
    from prefuse.cli import main

    data = write_jsonl(tmp_path / "text.jsonl", TEXT)
    base = ["sft", "--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "o")]
    assert main([*base, "--truncation_mode", "middle"]) == 2
    assert "truncation_mode: 'middle' is not one of" in capsys.readouterr().err
    assert main([*base, "--completion_only_loss"]) == 2
    assert "completion_only_loss: " in capsys.readouterr().err


@pytest.mark.heavy
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_torchrun_two_ranks_equal_one_process(model_dir, tmp_path, sharding):
    """`torchrun --nproc_per_node 2 -m prefuse sft` (DDP, or FSDP2 with --fsdp), 1 sequence per rank and 2
    micro-batches, against one process with batches of 2 and 2 micro-batches: each rank's micro-batch weighs by its
    own trained tokens over the global step's (sequences of 11, 3, 18, 16 tokens: the ranks' token counts differ)."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    data = write_jsonl(tmp_path / "text.jsonl", TEXT * 2)
    flags = ["--gradient_accumulation_steps", "2", "--max_steps", "2", "--use_peft", "--lora_r", "4",
             "--lora_dropout", "0"]
    single = run_sft(model_dir, data, tmp_path / "single", "--per_device_train_batch_size", "2", *flags)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port), "-m", "prefuse", "sft", "--model_name_or_path", str(model_dir),
            "--dataset_name", str(data), "--output_dir", str(tmp_path / "ranks"), "--logging_steps", "1",
            "--save_steps", "0", "--report_to", "none", "--learning_rate", "1e-3", "--train_sampling_strategy",
            "sequential", "--seed", "0", "--device", "cpu", "--per_device_train_batch_size", "1", *flags, *sharding]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1",
           "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(argv, check=False, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(line) for line in (tmp_path / "ranks" / "metrics.jsonl").read_text().splitlines()]
    assert len(ranks) == len(single) == 2
    for a, b in zip(single, ranks):
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy", "num_tokens"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
