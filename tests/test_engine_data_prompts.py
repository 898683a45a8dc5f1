"""prefuse.engine.data.prompts on the shared real files: prompt-only files (text and messages) as online training
reads them, their other columns carried per example, paired / implicit / unpaired files as prompt sources, the
prompt ids equal to the offline tokenization's, max_prompt_length, bad rows (one-line reports, skipping), and the
offline loader refusing a prompt-only file."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402

from prefuse.engine.data import (  # noqa: E402
    BadRow,
    DataError,
    PromptData,
    check_format_for,
    detect_format,
    load_preference_data,
    load_prompts,
    load_records,
    tokenize_preferences,
    tokenize_prompts,
)
from prefuse.engine.data.formats import split_row  # noqa: E402
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer  # noqa: E402
from tests.data_helpers import cache_dir, read_rows, tokenizer, write_jsonl  # noqa: E402,F401

UF = DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl"
UF_CHAT = DATA_DIR / "ultrafeedback_binarized_sample_train.conversational.jsonl"
UF_META = DATA_DIR / "ultrafeedback_binarized_sample_train.meta.jsonl"
HH = DATA_DIR / "hh_rlhf_harmless_base_test.jsonl"
LF_CHAT = DATA_DIR / "llamafactory_dpo_en_demo.conversational.jsonl"
PROMPTS_ONLY = "holds prompts only (a 'prompt' column without responses): train on it with --online"
NO_PROMPT = "no 'prompt' column: online training reads prompts (TRL's prompt-only format: {\"prompt\": ...})"


def offline_prompt_ids(rows, tokenizer):
    return [e["prompt_ids"] for e in tokenize_preferences(datasets.Dataset.from_list(rows), tokenizer).examples]


# ---------------------------------------------------------------- prompt-only files

def test_prompt_only_text_file(tmp_path, tokenizer, cache_dir):
    pairs, meta = read_rows(UF, 24), read_rows(UF_META, 24)
    rows = [{"prompt": r["prompt"], "answer": r["chosen"], "source_row": m["source_row"]} for r, m in zip(pairs, meta)]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    data = load_prompts(path, tokenizer, cache_dir=cache_dir)
    assert isinstance(data, PromptData) and data.format == "prompt_only" and len(data) == 24
    assert data.skipped.count == 0 and data.max_prompt_length is None
    expected_ids = offline_prompt_ids(pairs, tokenizer)
    for i, (row, example) in enumerate(zip(rows, data.examples)):
        assert list(example) == ["prompt_ids", "prompt", "columns", "where"]
        assert example["prompt_ids"] == expected_ids[i]
        assert example["prompt_ids"] == [tokenizer.bos_token_id] + tokenizer(row["prompt"],
                                                                             add_special_tokens=False).input_ids
        assert example["prompt"] == row["prompt"]
        assert example["columns"] == {"answer": row["answer"], "source_row": row["source_row"]}
        assert example["where"] == f"{path}:{i + 1}"
    assert [e["columns"]["source_row"] for e in data.examples] == list(range(24))


@pytest.mark.parametrize("source", [UF_CHAT, LF_CHAT])  # LF: multi-turn, some with a system prompt
def test_prompt_only_conversational_file(source, tmp_path, tokenizer, cache_dir):
    pairs = read_rows(source, 24)
    rows = [{"prompt": r["prompt"], "answer": r["chosen"][-1]["content"]} for r in pairs]
    path = write_jsonl(tmp_path / "chat_prompts.jsonl", rows)
    data = load_prompts(path, tokenizer, cache_dir=cache_dir)
    assert data.format == "conversational_prompt_only" and len(data) == 24
    expected_ids = offline_prompt_ids(pairs, tokenizer)
    for i, (row, example) in enumerate(zip(rows, data.examples)):
        assert example["prompt_ids"] == expected_ids[i]
        rendered = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        assert tokenizer.decode(example["prompt_ids"]) == rendered and rendered.endswith("<|assistant|>\n")
        assert example["prompt"] == row["prompt"]  # the messages, as a reward function receives them
        assert example["columns"] == {"answer": row["answer"]}
        assert example["where"] == f"{path}:{i + 1}"
    assert any(len(r["prompt"]) > 1 for r in rows) or source == UF_CHAT


def test_tokenize_prompts_of_an_in_memory_dataset(tokenizer):
    rows = [{"prompt": "Hi.", "n": 1}, {"prompt": "Bye.", "n": 2}]
    data = tokenize_prompts(datasets.Dataset.from_list(rows), tokenizer, source="mine")
    assert [e["where"] for e in data.examples] == ["mine:1", "mine:2"]
    assert [e["columns"] for e in data.examples] == [{"n": 1}, {"n": 2}]
    assert data.examples[1]["prompt_ids"] == [tokenizer.bos_token_id] + tokenizer("Bye.",
                                                                                 add_special_tokens=False).input_ids


# ---------------------------------------------------------------- other formats as prompt sources

@pytest.mark.parametrize("source, fmt", [(UF, "standard"), (UF_CHAT, "conversational")])
def test_paired_file_as_prompt_source(source, fmt, tokenizer, cache_dir):
    data = load_prompts(source, tokenizer, cache_dir=cache_dir)
    offline = load_preference_data(source, tokenizer, cache_dir=cache_dir)
    assert data.format == offline.format == fmt and len(data) == len(offline) == 994
    assert [e["prompt_ids"] for e in data.examples] == [e["prompt_ids"] for e in offline.examples]
    assert [e["where"] for e in data.examples] == [e["where"] for e in offline.examples]
    assert all(e["columns"] == {} for e in data.examples)  # chosen and rejected are not carried
    assert [e["prompt"] for e in data.examples[:5]] == [r["prompt"] for r in read_rows(source, 5)]


def test_explicit_pairs_responses_are_not_read(tmp_path, tokenizer, cache_dir):
    rows = read_rows(UF, 4)
    rows[2] = {**rows[2], "chosen": None, "rejected": ""}  # a bad pair, but a good prompt
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = load_prompts(path, tokenizer, cache_dir=cache_dir)
    assert data.format == "standard" and len(data) == 4 and data.skipped.count == 0
    assert data.examples[2]["prompt"] == rows[2]["prompt"]
    with pytest.raises(BadRow, match="field 'chosen': missing"):
        load_preference_data(path, tokenizer, cache_dir=cache_dir)


@pytest.mark.parametrize("source, fmt", [(HH, "standard_implicit"), (LF_CHAT, "conversational_implicit")])
def test_implicit_pairs_give_their_shared_prompt(source, fmt, tmp_path, tokenizer, cache_dir):
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"], "id": i}
            for i, r in enumerate(read_rows(source, 30))]
    path = write_jsonl(tmp_path / "implicit.jsonl", rows)
    data = load_prompts(path, tokenizer, cache_dir=cache_dir)
    offline = load_preference_data(path, tokenizer, cache_dir=cache_dir)
    assert data.format == offline.format == fmt and len(data) == 30
    assert [e["prompt_ids"] for e in data.examples] == [e["prompt_ids"] for e in offline.examples]
    assert [e["prompt"] for e in data.examples] == [split_row(r, fmt).prompt for r in rows]
    assert [e["columns"] for e in data.examples] == [{"id": i} for i in range(30)]


def test_unpaired_file_as_prompt_source(tmp_path, tokenizer, cache_dir):
    pairs = read_rows(UF, 6)
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen", "reward": float(i)}
            for i, r in enumerate(pairs) for side in ("chosen", "rejected")]
    path = write_jsonl(tmp_path / "unpaired.jsonl", rows)
    data = load_prompts(path, tokenizer, cache_dir=cache_dir)
    assert data.format == "unpaired" and len(data) == 12
    assert [e["prompt"] for e in data.examples] == [r["prompt"] for r in rows]
    assert [e["columns"] for e in data.examples] == [{"reward": r["reward"]} for r in rows]
    expected_ids = offline_prompt_ids(pairs, tokenizer)
    assert [e["prompt_ids"] for e in data.examples] == [ids for ids in expected_ids for _ in range(2)]


# ---------------------------------------------------------------- truncation

def test_max_prompt_length_keeps_the_last_tokens(tmp_path, tokenizer, cache_dir):
    pairs = read_rows(UF, 40)
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pairs])
    full = load_prompts(path, tokenizer, cache_dir=cache_dir).examples
    cut = load_prompts(path, tokenizer, max_prompt_length=16, cache_dir=cache_dir)
    assert cut.max_prompt_length == 16
    offline = tokenize_preferences(datasets.Dataset.from_list(pairs), tokenizer, max_prompt_length=16).examples
    shortened = 0
    for f, c, o in zip(full, cut.examples, offline):
        assert c["prompt_ids"] == f["prompt_ids"][-16:] == o["prompt_ids"]  # cut from the left
        assert len(c["prompt_ids"]) == min(16, len(f["prompt_ids"]))
        assert c["prompt"] == f["prompt"]  # a reward function still sees the whole prompt
        shortened += len(c["prompt_ids"]) < len(f["prompt_ids"])
    assert shortened > 20
    with pytest.raises(ValueError, match="max_prompt_length must be positive, got 0"):
        load_prompts(path, tokenizer, max_prompt_length=0, cache_dir=cache_dir)


# ---------------------------------------------------------------- bad rows and files

GOOD = {"prompt": "Hi.", "answer": "4"}
GOOD_CHAT = {"prompt": [{"role": "user", "content": "Hi."}], "answer": "4"}
USER = [{"role": "user", "content": "Hi."}]
BAD_PROMPTS = {  # name: (good row, bad row, expected message after "<path>:3: ")
    "missing": (GOOD, {"answer": "4"}, "field 'prompt': missing"),
    "null": (GOOD, {**GOOD, "prompt": None}, "field 'prompt': missing"),
    "empty": (GOOD, {**GOOD, "prompt": ""}, "field 'prompt': empty prompt"),
    "blank": (GOOD, {**GOOD, "prompt": " \n "}, "field 'prompt': empty prompt"),
    "int": (GOOD, {**GOOD, "prompt": 5}, "field 'prompt': expected a string, got int"),
    "list_in_text": (GOOD, {**GOOD, "prompt": ["Hi."]}, "field 'prompt': expected a string, got list"),
    "no_content": (GOOD_CHAT, {**GOOD_CHAT, "prompt": [{"role": "user"}]},
                   "field 'prompt': message 1: missing 'content'"),
    "int_content": (GOOD_CHAT, {**GOOD_CHAT, "prompt": [{"role": "user", "content": 7}]},
                    "field 'prompt': message 1: 'content' must be a string, got int"),
    "string_message": (GOOD_CHAT, {**GOOD_CHAT, "prompt": ["Hi."]},
                       "field 'prompt': message 1: expected a {'role', 'content'} object, got str"),
    "text_for_messages": (GOOD_CHAT, {**GOOD_CHAT, "prompt": "Hi."},
                          "field 'prompt': expected a list of {'role', 'content'} messages, got str"),
    "no_messages": (GOOD_CHAT, {**GOOD_CHAT, "prompt": []}, "field 'prompt': no messages"),
    "roles_repeat": (GOOD_CHAT, {**GOOD_CHAT, "prompt": USER + USER},
                     "field 'prompt': chat template: conversation roles must alternate"),
    "not_json": (GOOD, '{"prompt": "Hi.", "answer": ', None),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompt_names_file_row_and_field(case, tmp_path, tokenizer, cache_dir):
    good, bad, expected = BAD_PROMPTS[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", [good, good, bad, good])
    with pytest.raises(BadRow) as err:
        load_prompts(path, tokenizer, cache_dir=cache_dir)
    if expected is None:
        assert str(err.value).startswith(f"{path}:3: not valid JSON (")
    else:
        assert str(err.value) == f"{path}:3: {expected}"
    assert "\n" not in str(err.value)
    kept = load_prompts(path, tokenizer, skip_bad_rows=True, cache_dir=cache_dir)
    assert len(kept) == 3 and [e["where"] for e in kept.examples] == [f"{path}:{i}" for i in (1, 2, 4)]
    assert kept.skipped.count == 1 and kept.skipped.messages == [str(err.value)]
    assert all(e["prompt"] == good["prompt"] and e["columns"] == {"answer": "4"} for e in kept.examples)


def test_empty_implicit_prompt_is_a_bad_row(tmp_path, tokenizer, cache_dir):
    good = {"chosen": "Q: hi? A: yes", "rejected": "Q: hi? A: no"}
    path = write_jsonl(tmp_path / "implicit.jsonl", [good, {"chosen": "Yes.", "rejected": "No."}, good])
    with pytest.raises(BadRow) as err:
        load_prompts(path, tokenizer, cache_dir=cache_dir)
    assert str(err.value) == (f"{path}:2: field 'prompt': empty prompt ('chosen' and 'rejected' share no text "
                              "before their responses)")
    kept = load_prompts(path, tokenizer, skip_bad_rows=True, cache_dir=cache_dir)
    assert [e["prompt"] for e in kept.examples] == ["Q: hi? A:"] * 2 and dict(kept.skipped.by_kind) == {"empty": 1}


def test_a_file_of_bad_rows_leaves_no_prompts(tmp_path, tokenizer, cache_dir):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": ""}, {"prompt": " "}])
    with pytest.raises(DataError) as err:
        load_prompts(path, tokenizer, skip_bad_rows=True, cache_dir=cache_dir)
    assert str(err.value) == (f"{path}: no prompts to train on (all 2 rows are bad, the first: {path}:1: field "
                              "'prompt': empty prompt)")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_prompts(empty, tokenizer, cache_dir=cache_dir)
    assert str(err.value) == (f"{empty}: the file is empty (no rows); give a file of rows in one of TRL's formats "
                              "(one JSON object per line)")


@pytest.mark.parametrize("rows", [[{"question": "Hi.", "answer": "4"}], [{"chosen": "Hi. Yes.", "answer": "4"}]])
def test_a_file_without_prompts(rows, tmp_path, tokenizer, cache_dir):
    path = write_jsonl(tmp_path / "questions.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_prompts(path, tokenizer, cache_dir=cache_dir)
    assert str(err.value) == f"{path}: {NO_PROMPT}"


# ---------------------------------------------------------------- the offline path refuses prompts

@pytest.mark.parametrize("source", [UF, UF_CHAT])
def test_offline_loader_refuses_a_prompt_only_file(source, tmp_path, tokenizer, cache_dir):
    rows = [{"prompt": r["prompt"], "answer": "x"} for r in read_rows(source, 5)]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    for needs in ("pairs", "unpaired"):
        with pytest.raises(DataError) as err:
            load_preference_data(path, tokenizer, needs=needs, cache_dir=cache_dir)
        assert str(err.value) == f"{path}: {PROMPTS_ONLY}"
    with pytest.raises(DataError) as err:
        detect_format(load_records(path, cache_dir=cache_dir))
    assert str(err.value) == f"{path}: {PROMPTS_ONLY}"
    with pytest.raises(DataError) as err:
        detect_format(datasets.Dataset.from_list(rows))  # rows not from a file: no file to name
    assert str(err.value) == f"the data {PROMPTS_ONLY}"
    with pytest.raises(DataError) as err:
        check_format_for(load_prompts(path, tokenizer, cache_dir=cache_dir).format, "pairs")
    assert str(err.value) == f"the data {PROMPTS_ONLY}"


def test_preference_data_with_a_missing_column_keeps_its_message():
    for row in ({"prompt": "a", "chosen": "b"}, {"prompt": "a", "label": True}, {"prompt": "a", "response": "b"}):
        with pytest.raises(DataError, match="^no preference columns: found "):
            detect_format(datasets.Dataset.from_list([row]))
