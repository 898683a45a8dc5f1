"""prefuse.engine.data on the shared real preference files: formats, prompts, token ids, truncation, batches, bad
rows (one-line file:row:field reports), skipping, the unpaired format and a resumable batch order."""
import json
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from prefuse.engine.data import (  # noqa: E402
    IGNORE_INDEX,
    BadRow,
    DataError,
    PairBatches,
    check_format_for,
    collate_pairs,
    collate_unpaired,
    detect_format,
    load_preference_data,
    load_records,
    tokenize_preferences,
)
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer  # noqa: E402
from tests.data_helpers import cache_dir, read_rows, tokenizer, write_jsonl  # noqa: E402,F401

UF = DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl"
HH_CHAT = DATA_DIR / "hh_rlhf_harmless_base_test.conversational.jsonl"
LF = DATA_DIR / "llamafactory_dpo_en_demo.jsonl"
LF_CHAT = DATA_DIR / "llamafactory_dpo_en_demo.conversational.jsonl"


# ---------------------------------------------------------------- loading and formats

@pytest.mark.parametrize("path, expected", [(UF, "standard"), (LF, "standard"), (LF_CHAT, "conversational"),
                                            (HH_CHAT, "conversational")])
def test_detect_format_of_shared_files(path, expected, cache_dir):
    records = load_records(path, cache_dir=cache_dir)
    assert detect_format(records) == expected
    assert records[0]["__where__"] == f"{path}:1" and records[len(records) - 1]["__where__"] == f"{path}:{len(records)}"


def test_detect_implicit_and_unpaired_formats():
    std = read_rows(LF, 4)
    chat = read_rows(LF_CHAT, 4)
    def implicit(rows):
        return [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]

    cases = {
        "standard_implicit": implicit(std),
        "conversational_implicit": implicit(chat),
        "unpaired": [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in std],
        "conversational_unpaired": [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in chat],
    }
    for expected, rows in cases.items():
        assert detect_format(datasets.Dataset.from_list(rows)) == expected
    with pytest.raises(DataError, match="no preference columns"):
        detect_format(datasets.Dataset.from_list([{"prompt": "a", "response": "b"}]))
    with pytest.raises(DataError, match="mix plain text and message lists"):
        detect_format(datasets.Dataset.from_list([{"prompt": "a", "chosen": chat[0]["chosen"],
                                                   "rejected": chat[0]["rejected"]}]))


def test_load_records_missing_path_and_other_sources(tmp_path, cache_dir):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match=f"{missing}: no such file") as err:
        load_records(missing)
    assert isinstance(err.value, ValueError)
    rows = read_rows(UF, 5)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    saved = datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
    saved.save_to_disk(str(tmp_path / "saved"))
    for records in (load_records(tmp_path / "pairs.parquet", cache_dir=cache_dir),
                    load_records(tmp_path / "saved", split="test")):
        assert [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in records] == rows
    assert load_records(tmp_path / "saved", split="test")[4]["__where__"] == f"{tmp_path / 'saved'}:5"
    with pytest.raises(DataError, match="no split 'train'"):
        load_records(tmp_path / "saved")


def test_row_numbers_are_line_numbers_with_blank_lines(tmp_path, tokenizer, cache_dir):
    rows = read_rows(UF, 3)
    path = write_jsonl(tmp_path / "blank.jsonl", [rows[0], "", rows[1], "   ", {**rows[2], "rejected": None}])
    with pytest.raises(BadRow) as err:
        tokenize_preferences(load_records(path, cache_dir=cache_dir), tokenizer)
    assert str(err.value) == f"{path}:5: field 'rejected': missing"


# ---------------------------------------------------------------- prompts and token ids

def test_implicit_text_prompt_is_the_shared_prefix_cut_at_a_word():
    from prefuse.engine.data.formats import split_row
    rows = read_rows(DATA_DIR / "hh_rlhf_harmless_base_test.jsonl", 200)
    same_as_explicit = 0
    for r in rows:
        chosen, rejected = r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]
        parts = split_row({"chosen": chosen, "rejected": rejected}, "standard_implicit")
        assert parts.prompt + parts.completions["chosen"] == chosen
        assert parts.prompt + parts.completions["rejected"] == rejected
        assert parts.prompt.startswith(r["prompt"])
        assert parts.completions["chosen"][:1].isspace() and parts.completions["rejected"][:1].isspace()
        same_as_explicit += parts.prompt == r["prompt"]
    assert same_as_explicit >= 150  # the rest share a first word or more of the response


def test_standard_token_ids(tokenizer):
    rows = read_rows(UF, 40)
    data = tokenize_preferences(datasets.Dataset.from_list(rows), tokenizer)
    assert data.format == "standard" and len(data) == 40 and data.skipped.count == 0
    eos = tokenizer.eos_token_id
    for r, ex in zip(rows, data.examples):
        assert ex["prompt_ids"] == [tokenizer.bos_token_id] + tokenizer(r["prompt"], add_special_tokens=False).input_ids
        for name in ("chosen", "rejected"):
            assert ex[f"{name}_ids"] == tokenizer(r[name], add_special_tokens=False).input_ids + [eos]
            assert ex[f"{name}_ids"].count(eos) == 1


def test_conversational_token_ids_explicit_and_implicit_agree(tokenizer):
    rows = read_rows(LF_CHAT, 40)  # single- and multi-turn, some with a system prompt
    explicit = tokenize_preferences(datasets.Dataset.from_list(rows), tokenizer)
    implicit_rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    implicit = tokenize_preferences(datasets.Dataset.from_list(implicit_rows), tokenizer)
    assert implicit.format == "conversational_implicit"
    eos = tokenizer.eos_token_id
    for r, ex, im in zip(rows, explicit.examples, implicit.examples):
        assert {k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} == \
            {k: im[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        rendered = tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(ex["prompt_ids"]) == rendered and rendered.endswith("<|assistant|>\n")
        for name in ("chosen", "rejected"):  # as TRL's DPOTrainer: what the template writes after the prompt
            ids = ex[f"{name}_ids"]
            whole = tokenizer.apply_chat_template(r["prompt"] + r[name], tokenize=False)
            assert ids == tokenizer(whole, add_special_tokens=False).input_ids[len(ex["prompt_ids"]):]
            assert ids.count(eos) == 1  # the template's EOS, not a second one appended
            assert tokenizer.decode(ids) == r[name][0]["content"] + tokenizer.eos_token + "\n"  # the turn's end


def test_truncation_policy(tokenizer):
    rows = read_rows(UF, 40)
    records = datasets.Dataset.from_list(rows)
    full = tokenize_preferences(records, tokenizer).examples
    cut = tokenize_preferences(records, tokenizer, max_length=48, max_prompt_length=16).examples
    cut_completions = 0
    for f, c in zip(full, cut):
        assert len(c["prompt_ids"]) == min(16, len(f["prompt_ids"]))
        assert c["prompt_ids"] == f["prompt_ids"][-16:]  # cut from the left
        for name in ("chosen_ids", "rejected_ids"):
            assert len(c["prompt_ids"]) + len(c[name]) <= 48
            assert c[name] == f[name][:48 - len(c["prompt_ids"])]  # cut from the right
            cut_completions += len(c[name]) < len(f[name])
    assert cut_completions > 20
    # a prompt that leaves no room is cut to max_length - 1, leaving one response token
    tiny = tokenize_preferences(records.select(range(3)), tokenizer, max_length=8).examples
    assert all(len(e["prompt_ids"]) == 7 and len(e["chosen_ids"]) == 1 for e in tiny)


def test_truncation_off_reports_the_long_row(tmp_path, tokenizer, cache_dir):
    rows = [{"prompt": "Hi.", "chosen": " Yes.", "rejected": " No."}, {"prompt": "Hi.", "chosen": " Yes.",
                                                                      "rejected": " No, " * 40}]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    n = 1 + len(tokenizer("Hi.", add_special_tokens=False).input_ids) + \
        len(tokenizer(" No, " * 40, add_special_tokens=False).input_ids) + 1
    records = load_records(path, cache_dir=cache_dir)
    with pytest.raises(BadRow) as err:
        tokenize_preferences(records, tokenizer, max_length=30, truncation=False)
    assert str(err.value) == f"{path}:2: field 'rejected': {n} tokens with the prompt, over max_length=30"
    n_prompt = 1 + len(tokenizer("Hi.", add_special_tokens=False).input_ids)
    with pytest.raises(BadRow) as err:
        tokenize_preferences(records, tokenizer, max_prompt_length=2, truncation=False)
    assert str(err.value) == f"{path}:1: field 'prompt': {n_prompt} tokens, over max_prompt_length=2"
    assert len(tokenize_preferences(records, tokenizer, max_length=n, truncation=False)) == 2


# ---------------------------------------------------------------- batches

def test_collate_pairs_layout(tokenizer):
    examples = tokenize_preferences(datasets.Dataset.from_list(read_rows(LF, 5)), tokenizer).examples
    pad = tokenizer.pad_token_id
    batch = collate_pairs(examples, pad)
    B = len(examples)
    sequences = [e["prompt_ids"] + e["chosen_ids"] for e in examples] + \
                [e["prompt_ids"] + e["rejected_ids"] for e in examples]
    T = max(map(len, sequences))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2 * B, T) for k in ("input_ids", "attention_mask",
                                                                                        "labels")}
    for row, seq in enumerate(sequences):
        example = examples[row % B]
        n_prompt = len(example["prompt_ids"])
        assert batch["input_ids"][row, :len(seq)].tolist() == seq
        assert (batch["input_ids"][row, len(seq):] == pad).all()
        assert batch["attention_mask"][row].tolist() == [1] * len(seq) + [0] * (T - len(seq))
        # next-token labels: position t holds the token at t + 1 when it is a response token
        expected = [IGNORE_INDEX] * T
        expected[n_prompt - 1:len(seq) - 1] = seq[n_prompt:]
        assert batch["labels"][row].tolist() == expected
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == \
        [len(e["chosen_ids"]) for e in examples] + [len(e["rejected_ids"]) for e in examples]
    assert collate_pairs(examples, pad, pad_to_multiple_of=64)["input_ids"].shape[1] % 64 == 0


def test_unpaired_format_for_kto(tmp_path, tokenizer, cache_dir):
    pairs = read_rows(UF, 6)
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
            for r in pairs for side in ("chosen", "rejected")]
    path = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    data = load_preference_data(path, tokenizer, needs="unpaired", cache_dir=cache_dir)
    assert data.format == "unpaired" and len(data) == 12
    batch = collate_unpaired(data.examples, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["input_ids"].shape[0] == 12
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].tolist() == [r["label"] for r in rows]
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [len(e["completion_ids"]) for e in data.examples]
    with pytest.raises(DataError, match="needs pairs data, with columns 'chosen' and 'rejected'.*unpaired format"):
        load_preference_data(path, tokenizer, needs="pairs", cache_dir=cache_dir)


def test_format_needs_error_names_columns():
    check_format_for("standard", "pairs")
    check_format_for("conversational_unpaired", "unpaired")
    with pytest.raises(DataError) as err:
        check_format_for("conversational", "unpaired")
    assert str(err.value) == ("the objective needs unpaired data, with columns 'prompt', 'completion' and 'label' "
                              "(a bool): the unpaired format; the data is in the conversational format")
    with pytest.raises(ValueError, match="needs must be"):
        check_format_for("standard", "triples")


# ---------------------------------------------------------------- bad rows

GOOD = {"prompt": "Hi.", "chosen": " Hello!", "rejected": " Go away."}
GOOD_CHAT = {"prompt": [{"role": "user", "content": "Hi."}], "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}
USER = [{"role": "user", "content": "Hi."}]
BAD_ROWS = {  # name: (good row, bad row, expected message after "<path>:3: ")
    "missing": (GOOD, {"prompt": "Hi.", "chosen": " Hello!"}, "field 'rejected': missing"),
    "null": (GOOD, {**GOOD, "rejected": None}, "field 'rejected': missing"),
    "empty": (GOOD, {**GOOD, "chosen": ""}, "field 'chosen': empty response"),
    "blank": (GOOD, {**GOOD, "rejected": " \n "}, "field 'rejected': empty response"),
    "int": (GOOD, {**GOOD, "chosen": 5}, "field 'chosen': expected a string, got int"),
    "list_in_text": (GOOD, {**GOOD, "prompt": ["Hi."]}, "field 'prompt': expected a string, got list"),
    "no_content": (GOOD_CHAT, {**GOOD_CHAT, "chosen": [{"role": "assistant"}]},
                   "field 'chosen': message 1: missing 'content'"),
    "int_content": (GOOD_CHAT, {**GOOD_CHAT, "prompt": [{"role": "user", "content": 7}]},
                    "field 'prompt': message 1: 'content' must be a string, got int"),
    "string_message": (GOOD_CHAT, {**GOOD_CHAT, "rejected": ["Go away."]},
                       "field 'rejected': message 1: expected a {'role', 'content'} object, got str"),
    "text_for_messages": (GOOD_CHAT, {**GOOD_CHAT, "rejected": "Go away."},
                          "field 'rejected': expected a list of {'role', 'content'} messages, got str"),
    "empty_content": (GOOD_CHAT, {**GOOD_CHAT, "chosen": [{"role": "assistant", "content": ""}]},
                      "field 'chosen': empty response"),
    "last_not_assistant": (GOOD_CHAT, {**GOOD_CHAT, "chosen": [{"role": "user", "content": "x"}]},
                           "field 'chosen': the last message must be an assistant turn, got 'user'"),
    "roles_repeat": (GOOD_CHAT, {**GOOD_CHAT, "prompt": USER + USER},
                     "field 'prompt': chat template: conversation roles must alternate"),
    "label": ({"prompt": "Hi.", "completion": " Hello!", "label": True},
              {"prompt": "Hi.", "completion": " Hello!", "label": "yes"}, "field 'label': expected a bool, got str"),
    "not_json": (GOOD, '{"prompt": "Hi.", "chosen": ', None),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_message_names_file_row_and_field(case, tmp_path, tokenizer, cache_dir):
    good, bad, expected = BAD_ROWS[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", [good, good, bad, good])
    records = load_records(path, cache_dir=cache_dir)
    with pytest.raises(BadRow) as err:
        tokenize_preferences(records, tokenizer)
    if expected is None:
        assert str(err.value).startswith(f"{path}:3: not valid JSON (")
    else:
        assert str(err.value) == f"{path}:3: {expected}"
    assert "\n" not in str(err.value)
    kept = tokenize_preferences(records, tokenizer, skip_bad_rows=True)
    assert len(kept) == 3 and [e["where"] for e in kept.examples] == [f"{path}:{i}" for i in (1, 2, 4)]
    assert kept.skipped.count == 1 and kept.skipped.messages == [str(err.value)]


def test_skip_bad_rows_counts_by_kind(tmp_path, tokenizer, cache_dir):
    rows = [GOOD, {**GOOD, "rejected": " no" * 50}, {**GOOD, "chosen": ""}, GOOD, {**GOOD, "chosen": 3},
            {"prompt": "Hi.", "chosen": " Hello!"}, "not json", {**GOOD, "rejected": None}, GOOD]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    data = load_preference_data(path, tokenizer, max_length=20, truncation=False, skip_bad_rows=True,
                                cache_dir=cache_dir)
    assert len(data) == 3 and [e["where"] for e in data.examples] == [f"{path}:{i}" for i in (1, 4, 9)]
    assert data.skipped.count == 6
    assert dict(data.skipped.by_kind) == {"missing": 2, "empty": 1, "wrong_type": 1, "invalid_json": 1,
                                          "too_long": 1}
    # the first bad row in file order, though its problem (length) is found after the others
    with pytest.raises(BadRow, match=f"^{re.escape(str(path))}:2: field 'rejected': \\d+ tokens with the prompt"):
        load_preference_data(path, tokenizer, max_length=20, truncation=False, cache_dir=cache_dir)


def test_skip_real_rows_whose_roles_do_not_alternate(tokenizer, cache_dir):
    """The 4 HH rows with two same-role turns in a row (meta: roles_alternate false) fail the strict template."""
    with open(DATA_DIR / "hh_rlhf_harmless_base_test.meta.jsonl", encoding="utf-8") as f:
        flagged = [i for i, line in enumerate(f) if not json.loads(line)["roles_alternate"]]
    assert len(flagged) == 4
    records = load_records(HH_CHAT, cache_dir=cache_dir)
    subset = records.select(sorted(set(range(30)) | set(flagged)))
    data = tokenize_preferences(subset, tokenizer, skip_bad_rows=True)
    assert len(data) == 30 and data.skipped.count == 4 and dict(data.skipped.by_kind) == {"chat_template": 4}
    assert data.skipped.messages == [f"{HH_CHAT}:{i + 1}: field 'prompt': chat template: conversation roles must "
                                     "alternate" for i in flagged]
    with pytest.raises(BadRow, match=f"{HH_CHAT}:{flagged[0] + 1}: field 'prompt'"):
        tokenize_preferences(subset, tokenizer)


# ---------------------------------------------------------------- order

def run_epochs(batches, epochs):
    return [indices for _ in range(epochs) for indices in batches]


@pytest.mark.parametrize("drop_last", [False, True])
def test_batch_order_is_deterministic_and_covers_each_epoch(drop_last):
    batches = PairBatches(37, batch_size=5, seed=3, drop_last=drop_last)
    assert len(batches) == (7 if drop_last else 8)
    seen = run_epochs(batches, 2)
    assert len(seen) == 2 * len(batches)
    epoch0, epoch1 = seen[:len(batches)], seen[len(batches):]
    flat0 = [i for b in epoch0 for i in b]
    assert len(flat0) == len(set(flat0)) == (35 if drop_last else 37)
    assert epoch0 != epoch1  # a new permutation each epoch
    assert seen == run_epochs(PairBatches(37, batch_size=5, seed=3, drop_last=drop_last), 2)
    assert seen != run_epochs(PairBatches(37, batch_size=5, seed=4, drop_last=drop_last), 2)


@pytest.mark.parametrize("k", [0, 3, 8, 11])  # start, mid-epoch, end of epoch 0, mid-epoch 1
def test_batch_order_resumes_exactly(k):
    reference = run_epochs(PairBatches(37, batch_size=5, seed=3), 3)
    batches = PairBatches(37, batch_size=5, seed=3)
    consumed = []
    while len(consumed) < k:
        for indices in batches:
            consumed.append(indices)
            if len(consumed) == k:
                break
    state = json.loads(json.dumps(batches.state_dict()))  # as a checkpoint stores it
    assert all(isinstance(v, int) for v in state.values())
    resumed = PairBatches(37, batch_size=5, seed=3)
    resumed.load_state_dict(state)
    rest = []
    while len(consumed) + len(rest) < len(reference):
        rest.extend(resumed)
    assert consumed + rest == reference


def test_batch_order_refuses_a_different_run():
    state = PairBatches(37, batch_size=5, seed=3).state_dict()
    with pytest.raises(ValueError, match="batch_size=5"):
        PairBatches(37, batch_size=4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="num_examples=37"):
        PairBatches(36, batch_size=5, seed=3).load_state_dict(state)
