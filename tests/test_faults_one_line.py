"""Faults and bad data, each in one line through the CLI (`prefuse <cmd>: error: ...`, exit status 2, never a
traceback), or counted in one line: model files cut short or not matching their config, a tokenizer larger than the
model's vocabulary, a disk that fills up while a checkpoint is written, a device this torch cannot use, `export` of
a checkpoint with truncated weights, `merge-adapters` of adapters of different bases; conversational roles,
duplicate rows, prompts cut to max_prompt_length, an empty data file, a misspelt column."""
import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.cli import main  # noqa: E402
from prefuse.engine.checkpoint import files as checkpoint_files  # noqa: E402
from tests.tokenizer_fixture import build_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


def _llama(path: Path, tokenizer, vocab_size: int, hidden_size: int = 32, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                      max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _truncate(file: Path, keep: int) -> None:
    with open(file, "r+b") as handle:
        handle.truncate(keep)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama and its variants (weights cut short, a config of other shapes, half the vocabulary, a wider
    model), 8 standard pairs (rows 1 and 3 of the source file are the same pair) and 8 conversational ones."""
    root = tmp_path_factory.mktemp("faults")
    tokenizer = build_tokenizer()
    paths = {"model": _llama(root / "model", tokenizer, len(tokenizer)),
             "small_vocab": _llama(root / "small_vocab", tokenizer, len(tokenizer) // 2),
             "wide": _llama(root / "wide", tokenizer, len(tokenizer), hidden_size=64)}
    paths["truncated"] = root / "truncated"
    shutil.copytree(paths["model"], paths["truncated"])
    weights = paths["truncated"] / "model.safetensors"
    _truncate(weights, weights.stat().st_size // 2)
    paths["reshaped"] = root / "reshaped"
    shutil.copytree(paths["model"], paths["reshaped"])
    config = json.loads((paths["reshaped"] / "config.json").read_text())
    (paths["reshaped"] / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))

    def head(name, n):
        with open(DATA_DIR / name, encoding="utf-8") as f:
            return [json.loads(next(f)) for _ in range(n)]

    paths["rows"] = head("pandalm_testset_v1_human.jsonl", 8)
    paths["pairs"] = _jsonl(root / "pairs.jsonl", paths["rows"])
    paths["chats"] = head("ultrafeedback_binarized_sample_train.conversational.jsonl", 8)
    return paths


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _train(files, out, model="model", data=None, **flags) -> list[str]:
    values = dict(model_name_or_path=files[model], dataset_name=data or files["pairs"], output_dir=out,
                  max_length=96, max_prompt_length=48, report_to="none", learning_rate=1e-3, max_steps=1,
                  logging_steps=1, save_steps=0, per_device_train_batch_size=4, use_peft="true", lora_r=4,
                  lora_dropout=0.0)
    values.update(flags)
    return ["train"] + [item for key, value in values.items() for item in (f"--{key}", str(value))]


def _one_line(capsys, argv) -> str:
    """Run the CLI; it must exit 2 with one error line last on stderr and no traceback; return that line."""
    status = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("prefuse ")]
    assert errors == [err.strip().splitlines()[-1]], err
    return errors[0]


# -- models and checkpoints ---------------------------------------------------------------------------------------

def _train_rm(files, out, model="model", **flags) -> list[str]:
    argv = ["train-rm", "--model_name_or_path", files[model], "--dataset_name", files["pairs"], "--output_dir", out,
            "--max_length", "512", "--max_steps", "1", "--per_device_train_batch_size", "4", "--report_to", "none"]
    return argv + [item for key, value in flags.items() for item in (f"--{key}", str(value))]


@pytest.mark.parametrize("command", ["train", "train-rm"])
def test_truncated_model_weights_are_named_in_one_line(files, tmp_path, capsys, command):
    line = _one_line(capsys, (_train if command == "train" else _train_rm)(files, tmp_path / "out", "truncated"))
    weights = files["truncated"] / "model.safetensors"
    assert line == (f"prefuse {command}: error: model_name_or_path: {weights} is truncated or corrupt (Error while "
                    f"deserializing header: incomplete metadata, file not fully covered); copy or download the "
                    f"model again, or re-save it with save_pretrained")
    assert not (tmp_path / "out").exists()


def test_a_config_whose_shapes_differ_from_the_weights(files, tmp_path, capsys):
    line = _one_line(capsys, _train(files, tmp_path / "out", model="reshaped"))
    assert line.startswith(f"prefuse train: error: model_name_or_path: {files['reshaped']}/config.json does not "
                           f"match its weights (")
    assert "[500, 32] in model.safetensors, [500, 64] by config.json" in line
    assert line.endswith("use the config.json saved with these weights")
    assert not (tmp_path / "out").exists()


def test_train_rm_refuses_a_tokenizer_larger_than_the_vocabulary(files, tmp_path, capsys):
    line = _one_line(capsys, _train_rm(files, tmp_path / "out", "small_vocab"))
    assert line.startswith("prefuse train-rm: error: model_name_or_path: the tokenizer has 500 tokens but the model "
                           f"in {files['small_vocab']} embeds only 250 (vocab_size); resize")
    assert not (tmp_path / "out" / "checkpoint-1").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_before_the_data(files, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")  # the data would be refused too: the model's check comes first
    line = _one_line(capsys, _train(files, tmp_path / "out", model="small_vocab", data=empty))
    assert line == (f"prefuse train: error: model_name_or_path: the tokenizer has 500 tokens but the model in "
                    f"{files['small_vocab']} embeds only 250 (vocab_size); resize the model's embeddings to the "
                    f"tokenizer (model.resize_token_embeddings(500), then save_pretrained) or use the model's own "
                    f"tokenizer")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize("command", ["train", "train-rm"])
def test_device_cuda_without_cuda(files, tmp_path, capsys, command):
    argv = (_train if command == "train" else _train_rm)(files, tmp_path / "out", device="cuda")
    line = _one_line(capsys, argv)
    why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
    assert line == (f"prefuse {command}: error: device: 'cuda' but {why}; pass --device cpu (or auto: CUDA when "
                    f"there is one)")
    assert not (tmp_path / "out").exists()


def test_a_device_name_torch_does_not_know(files, tmp_path, capsys):
    line = _one_line(capsys, _train(files, tmp_path / "out", device="gpu"))
    assert line == "prefuse train: error: device: 'gpu' is not a torch device; pass auto, cpu, cuda or cuda:<index>"


def test_disk_full_while_writing_a_checkpoint_keeps_the_earlier_ones(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    write = checkpoint_files.write_safetensors

    def full_at_step_2(tensors, file, tied=None):
        if file.parent.name.startswith(f"{checkpoint_files.TEMP_PREFIX}2-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return write(tensors, file, tied)

    monkeypatch.setattr(checkpoint_files, "write_safetensors", full_at_step_2)
    line = _one_line(capsys, _train(files, out, max_steps=3, save_steps=1))
    assert line == (f"prefuse train: error: checkpoint {out / 'checkpoint-2'}: no space left on the device while "
                    f"writing it; nothing of it is kept and the earlier checkpoints are intact (latest: "
                    f"checkpoint-1); free space (or give --output_dir on a larger disk) and resume with "
                    f"--resume_from_checkpoint latest")
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]
    monkeypatch.setattr(checkpoint_files, "write_safetensors", write)
    assert main([str(a) for a in _train(files, out, max_steps=3, save_steps=1,
                                        resume_from_checkpoint="latest")]) == 0  # the earlier one resumes
    assert (out / "checkpoint-3" / "checkpoint.json").is_file()


@pytest.fixture(scope="module")
def lora_checkpoints(files, tmp_path_factory):
    """One-step LoRA runs on the model and on the wider model: their checkpoint-1 directories."""
    root = tmp_path_factory.mktemp("lora_runs")
    runs = {}
    for name in ("model", "wide"):
        assert main([str(a) for a in _train(files, root / name, model=name, save_steps=1)]) == 0
        runs[name] = root / name / "checkpoint-1"
    return runs


def test_export_of_a_checkpoint_with_truncated_weights(lora_checkpoints, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(lora_checkpoints["model"].parent, copy)
    adapter = copy / "checkpoint-1" / "adapter_model.safetensors"
    _truncate(adapter, adapter.stat().st_size - 64)
    line = _one_line(capsys, ["export", "--checkpoint", copy / "checkpoint-1", "--output", tmp_path / "exported",
                              "--merge_lora"])
    assert line == (f"prefuse export: error: checkpoint {copy / 'checkpoint-1'}: adapter_model.safetensors is "
                    f"truncated or corrupt (Error while deserializing header: incomplete metadata, file not fully "
                    f"covered); copy the checkpoint again, or use an earlier checkpoint-<step>")
    assert not (tmp_path / "exported").exists()


def test_merge_adapters_of_different_bases(files, lora_checkpoints, tmp_path, capsys):
    a, b = lora_checkpoints["model"], lora_checkpoints["wide"]
    argv = ["merge-adapters", "--adapters", a, b, "--weights", "0.5", "0.5", "--output", tmp_path / "merged"]
    line = _one_line(capsys, argv)
    assert line == (f"prefuse merge-adapters: error: adapters: {a} was trained on {str(files['model'])!r}, {b} on "
                    f"{str(files['wide'])!r}; merge adapters of one base model (pass --base DIR if both name the "
                    f"same model)")
    line = _one_line(capsys, argv + ["--base", files["model"]])  # told the base: the shapes still differ
    assert line.startswith(f"prefuse merge-adapters: error: adapters: {b} was not trained on the base "
                           f"{files['model']} (its shapes differ: base_model.model.model.layers.0.")
    assert line.endswith("); merge adapters of one base model")
    assert not (tmp_path / "merged").exists()


# -- data ---------------------------------------------------------------------------------------------------------

def test_a_conversational_role_that_is_not_a_role(files, tmp_path, capsys):
    rows = [dict(row) for row in files["chats"]]
    rows[2]["prompt"] = [{"role": "usr", "content": "how do I cook rice?"}]
    data = _jsonl(tmp_path / "chats.jsonl", rows)
    line = _one_line(capsys, _train(files, tmp_path / "out", data=data))
    assert line == (f"prefuse train: error: {data}:3: field 'prompt': message 1: role 'usr' is not one of system, "
                    f"user, assistant, tool; did you mean 'user'?")
    assert not (tmp_path / "out").exists()


def test_duplicate_rows_are_counted_and_kept_dropped_or_refused(files, tmp_path, capsys):
    rows = files["rows"] + files["rows"][:2]  # the source's rows 1 and 3 are one pair already
    repeats = len(rows) - len({json.dumps(row, sort_keys=True) for row in rows})
    assert rows[2] == rows[0] and repeats >= 3
    data = _jsonl(tmp_path / "pairs.jsonl", rows)
    assert main([str(a) for a in _train(files, tmp_path / "keep", data=data)]) == 0
    out = capsys.readouterr().out
    assert (f"data: {data}: {repeats} of 10 pairs repeat an earlier row's prompt and responses (first {data}:3 = "
            f"{data}:1): kept, as TRL does (--duplicate_rows drop leaves them out, refuse stops)") in out.splitlines()
    assert "data: 10 training examples (standard)" in out
    assert main([str(a) for a in _train(files, tmp_path / "drop", data=data, duplicate_rows="drop")]) == 0
    out = capsys.readouterr().out
    assert (f"data: {data}: {repeats} of 10 pairs repeat an earlier row's prompt and responses (first {data}:3 = "
            f"{data}:1): dropped (--duplicate_rows drop)") in out.splitlines()
    assert f"data: {10 - repeats} training examples (standard)" in out
    line = _one_line(capsys, _train(files, tmp_path / "refuse", data=data, duplicate_rows="refuse"))
    assert line == (f"prefuse train: error: {data}:3: repeats {data}:1 (the same prompt and responses; {repeats} such "
                    f"rows in {data}); remove them, or pass --duplicate_rows keep (train on them, as TRL does) or drop")
    assert not (tmp_path / "refuse").exists()


def test_prompts_cut_to_max_prompt_length_are_counted(files, tmp_path, capsys):
    lengths = [len(build_tokenizer()(row["prompt"])["input_ids"]) for row in files["rows"]]
    assert main([str(a) for a in _train(files, tmp_path / "out", max_prompt_length=64)]) == 0
    cut = sum(n > 64 for n in lengths)
    assert 0 < cut < len(lengths)
    assert (f"data: {files['pairs']}: {cut} of 8 prompts cut to 64 tokens (--max_prompt_length; their start is "
            f"dropped, raise it to keep more)") in capsys.readouterr().out.splitlines()
    assert main([str(a) for a in _train(files, tmp_path / "whole", max_prompt_length=max(lengths),
                                        max_length=max(lengths) + 64)]) == 0
    assert "prompts cut" not in capsys.readouterr().out


def test_an_empty_data_file_is_named(files, tmp_path, capsys):
    for name, content in [("empty.jsonl", ""), ("blank.jsonl", "\n\n")]:
        data = tmp_path / name
        data.write_text(content)
        line = _one_line(capsys, _train(files, tmp_path / f"out-{name}", data=data))
        assert line == (f"prefuse train: error: {data}: the file is empty (no rows); give a file of rows in one "
                        f"of TRL's formats (one JSON object per line)")
        assert not (tmp_path / f"out-{name}").exists()


def test_a_misspelt_column_says_did_you_mean(files, tmp_path, capsys):
    rows = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejectd": r["rejected"]} for r in files["rows"]]
    data = _jsonl(tmp_path / "misspelt.jsonl", rows)
    line = _one_line(capsys, _train(files, tmp_path / "out", data=data))
    assert "__where__" not in line
    assert line == (f"prefuse train: error: {data}: no preference columns: found ['chosen', 'prompt', 'rejectd'], "
                    f"need 'chosen' and 'rejected' (with an optional 'prompt'): the paired preference format, or "
                    f"'prompt', 'completion' and 'label' (a bool): the unpaired format; did you mean 'rejected' for "
                    f"'rejectd'?")


def test_columns_that_mix_text_and_messages_name_the_file(files, tmp_path, capsys):
    rows = [{"prompt": "Say hi.", "chosen": r["chosen"], "rejected": r["rejected"]} for r in files["chats"]]
    data = _jsonl(tmp_path / "mixed.jsonl", rows)
    line = _one_line(capsys, _train(files, tmp_path / "out", data=data))
    assert line == (f"prefuse train: error: {data}: columns mix plain text and message lists: 'prompt' is text, "
                    f"'chosen' is messages, 'rejected' is messages")


@pytest.mark.parametrize("model, expected", [
    ("truncated", "{weights} is truncated or corrupt (Error while deserializing header: incomplete metadata, file "
                  "not fully covered); copy or download the model again, or re-save it with save_pretrained"),
    ("small_vocab", "the tokenizer has 500 tokens but the model in {path} embeds only 250 (vocab_size); resize the "
                    "model's embeddings to the tokenizer (model.resize_token_embeddings(500), then save_pretrained) "
                    "or use the model's own tokenizer"),
])
def test_generate_refuses_weights_cut_short_and_a_tokenizer_too_large(files, tmp_path, capsys, model, expected):
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Say hi."}])
    line = _one_line(capsys, ["generate", "--model", files[model], "--prompts", prompts, "--output",
                              tmp_path / "out.jsonl", "--max_new_tokens", "2"])
    detail = expected.format(weights=files[model] / "model.safetensors", path=files[model])
    assert line == f"prefuse generate: error: model: {detail}"
    assert not (tmp_path / "out.jsonl").exists()
