"""prefuse.engine.data beyond the preference columns, on the shared real files: extra per-example columns (scores,
preference_prob, a reference response, unpaired rewards) checked per row, required columns, pairs turned into
unpaired examples, the pairs a tight max_length leaves with nothing to learn, and files that are not JSON."""
import csv
import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import pytest  # noqa: E402

from prefuse.engine.data import (  # noqa: E402
    IGNORE_INDEX,
    BadRow,
    DataError,
    TokenizedData,
    check_response_tokens_left,
    collate_pairs,
    collate_unpaired,
    load_preference_data,
    load_records,
    pairs_to_completions,
    tokenize_preferences,
)
from prefuse.engine.data.formats import split_row  # noqa: E402
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer  # noqa: E402
from tests.data_helpers import cache_dir, read_rows, tokenizer, write_jsonl  # noqa: E402,F401

UF = DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl"
UF_CHAT = DATA_DIR / "ultrafeedback_binarized_sample_train.conversational.jsonl"
UF_META = DATA_DIR / "ultrafeedback_binarized_sample_train.meta.jsonl"
PANDALM = DATA_DIR / "pandalm_testset_v1_human.jsonl"
PANDALM_META = DATA_DIR / "pandalm_testset_v1_human.meta.jsonl"
HH = DATA_DIR / "hh_rlhf_harmless_base_test.jsonl"
LF_CHAT = DATA_DIR / "llamafactory_dpo_en_demo.conversational.jsonl"
PAIR_KEYS = ["prompt_ids", "chosen_ids", "rejected_ids"]


def with_scores(rows_path, n):
    """The first n rows of an UltraFeedback file with the GPT-4 scores of its meta file."""
    return [{**row, "score_chosen": meta["score_chosen"], "score_rejected": meta["score_rejected"]}
            for row, meta in zip(read_rows(rows_path, n), read_rows(UF_META, n))]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------- number columns

@pytest.mark.parametrize("path", [UF, UF_CHAT])
def test_scores_ride_along_as_floats(path, tmp_path, tokenizer, cache_dir):
    rows = with_scores(path, 20)
    data = load_preference_data(write_jsonl(tmp_path / "scored.jsonl", rows), tokenizer, cache_dir=cache_dir)
    plain = tokenize_preferences(datasets.Dataset.from_list(read_rows(path, 20)), tokenizer)
    assert len(data) == 20
    for row, example, bare in zip(rows, data.examples, plain.examples):
        assert list(example) == PAIR_KEYS + ["score_chosen", "score_rejected", "where"]
        assert example["score_chosen"] == row["score_chosen"] and example["score_rejected"] == row["score_rejected"]
        assert type(example["score_chosen"]) is float and type(example["score_rejected"]) is float
        assert {k: example[k] for k in PAIR_KEYS} == {k: bare[k] for k in PAIR_KEYS}
    assert list(plain.examples[0]) == PAIR_KEYS + ["where"]  # no column, no key


def test_integer_scores_and_preference_prob_from_real_votes(tmp_path, tokenizer, cache_dir):
    # PandaLM: three annotators; the share who picked `chosen` is a preference probability in [0, 1]
    metas = read_rows(PANDALM_META, 12)
    rows = [{**row, "preference_prob": meta["agreement"] / 3, "score_chosen": meta["agreement"],
             "score_rejected": 3 - meta["agreement"]} for row, meta in zip(read_rows(PANDALM, 12), metas)]
    data = load_preference_data(write_jsonl(tmp_path / "votes.jsonl", rows), tokenizer, cache_dir=cache_dir)
    assert [e["preference_prob"] for e in data.examples] == [m["agreement"] / 3 for m in metas]
    assert [e["score_chosen"] for e in data.examples] == [float(m["agreement"]) for m in metas]
    assert all(type(e["score_chosen"]) is float for e in data.examples)


GOOD = {"prompt": "Hi.", "chosen": " Hello!", "rejected": " Go away.", "score_chosen": 8.0, "score_rejected": 2,
        "preference_prob": 0.75, "reference_response": " Hello there."}
GOOD_CHAT = {"prompt": [{"role": "user", "content": "Hi."}], "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}],
             "reference_response": [{"role": "assistant", "content": "Hello there."}]}
GOOD_UNPAIRED = {"prompt": "Hi.", "completion": " Hello!", "label": True, "reward": 1.5, "advantage": -0.25}
BAD_EXTRAS = {  # name: (good row, bad row or raw line, expected message after "<path>:3: ")
    "score_str": (GOOD, {**GOOD, "score_chosen": "high"}, "field 'score_chosen': expected a number, got str"),
    "score_bool": (GOOD, {**GOOD, "score_rejected": True}, "field 'score_rejected': expected a number, got bool"),
    "score_null": (GOOD, {**GOOD, "score_rejected": None}, "field 'score_rejected': missing"),
    "score_absent": (GOOD, {k: v for k, v in GOOD.items() if k != "score_chosen"}, "field 'score_chosen': missing"),
    "score_nan": (GOOD, json.dumps({**GOOD, "score_chosen": 0.0}).replace("0.0", "NaN"),
                  "field 'score_chosen': expected a finite number, got nan"),
    "score_inf": (GOOD, json.dumps({**GOOD, "score_rejected": 0.0}).replace("0.0", "-Infinity"),
                  "field 'score_rejected': expected a finite number, got -inf"),
    "prob_above": (GOOD, {**GOOD, "preference_prob": 1.5},
                   "field 'preference_prob': expected a number in [0, 1], got 1.5"),
    "prob_below": (GOOD, {**GOOD, "preference_prob": -0.1},
                   "field 'preference_prob': expected a number in [0, 1], got -0.1"),
    "reference_int": (GOOD, {**GOOD, "reference_response": 5},
                      "field 'reference_response': expected a string, got int"),
    "reference_empty": (GOOD, {**GOOD, "reference_response": "  "}, "field 'reference_response': empty response"),
    "reference_text_in_chat": (GOOD_CHAT, {**GOOD_CHAT, "reference_response": "Hello there."},
                               "field 'reference_response': expected a list of {'role', 'content'} messages, got str"),
    "reference_user_turn": (GOOD_CHAT, {**GOOD_CHAT, "reference_response": [{"role": "user", "content": "x"}]},
                            "field 'reference_response': the last message must be an assistant turn, got 'user'"),
    "reward_str": (GOOD_UNPAIRED, {**GOOD_UNPAIRED, "reward": "1.5"}, "field 'reward': expected a number, got str"),
    "advantage_null": (GOOD_UNPAIRED, {**GOOD_UNPAIRED, "advantage": None}, "field 'advantage': missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXTRAS))
def test_bad_extra_value_names_file_row_and_field(case, tmp_path, tokenizer, cache_dir):
    good, bad, expected = BAD_EXTRAS[case]
    path = write_jsonl(tmp_path / f"{case}.jsonl", [good, good, bad, good])
    records = load_records(path, cache_dir=cache_dir)
    with pytest.raises(BadRow) as err:
        tokenize_preferences(records, tokenizer)
    assert str(err.value) == f"{path}:3: {expected}"
    kept = tokenize_preferences(records, tokenizer, skip_bad_rows=True)
    assert [e["where"] for e in kept.examples] == [f"{path}:{i}" for i in (1, 2, 4)]
    assert kept.skipped.count == 1 and kept.skipped.messages == [str(err.value)]


def test_a_column_of_bools_is_not_a_score(tmp_path, tokenizer, cache_dir):
    path = write_jsonl(tmp_path / "bools.jsonl", [{**GOOD, "score_chosen": True}] * 2)
    with pytest.raises(BadRow) as err:
        load_preference_data(path, tokenizer, cache_dir=cache_dir)
    assert str(err.value) == f"{path}:1: field 'score_chosen': expected a number, got bool"


def test_unpaired_rewards_and_advantages(tmp_path, tokenizer, cache_dir):
    pairs = with_scores(UF, 4)
    rows = [{"prompt": r["prompt"], "completion": r[side], "label": side == "chosen", "reward": r[f"score_{side}"],
             "advantage": r[f"score_{side}"] - (r["score_chosen"] + r["score_rejected"]) / 2}
            for r in pairs for side in ("chosen", "rejected")]
    data = load_preference_data(write_jsonl(tmp_path / "kto.jsonl", rows), tokenizer, needs="unpaired",
                                cache_dir=cache_dir)
    assert [list(e) for e in data.examples] == [["prompt_ids", "completion_ids", "label", "reward", "advantage",
                                                 "where"]] * 8
    assert [(e["reward"], e["advantage"]) for e in data.examples] == [(r["reward"], r["advantage"]) for r in rows]


# ---------------------------------------------------------------- reference response

def test_reference_response_is_tokenized_and_cut_as_chosen(tokenizer):
    rows = read_rows(UF, 30)
    # the reference of each pair: the next pair's chosen (a real response, of another length than this chosen)
    with_ref = [{**r, "reference_response": rows[(i + 1) % len(rows)]["chosen"]} for i, r in enumerate(rows)]
    records = datasets.Dataset.from_list(with_ref)
    eos = tokenizer.eos_token_id
    full = tokenize_preferences(records, tokenizer).examples
    for r, ex in zip(with_ref, full):
        assert list(ex) == PAIR_KEYS + ["reference_ids", "where"]
        assert ex["reference_ids"] == ids(tokenizer, r["reference_response"]) + [eos]
    cut = tokenize_preferences(records, tokenizer, max_length=48, max_prompt_length=16).examples
    cut_references = 0
    for f, c in zip(full, cut):
        assert c["prompt_ids"] == f["prompt_ids"][-16:]
        assert c["reference_ids"] == f["reference_ids"][:48 - len(c["prompt_ids"])]
        cut_references += len(c["reference_ids"]) < len(f["reference_ids"])
    assert cut_references > 15
    # a reference equal to chosen gets exactly chosen's ids, cut or not
    same = datasets.Dataset.from_list([{**r, "reference_response": r["chosen"]} for r in rows])
    for kwargs in ({}, {"max_length": 40, "max_prompt_length": 8}, {"max_length": 4}):
        assert all(e["reference_ids"] == e["chosen_ids"]
                   for e in tokenize_preferences(same, tokenizer, **kwargs).examples)


def test_reference_response_in_conversational_and_implicit_formats(tokenizer):
    rows = read_rows(LF_CHAT, 30)
    explicit = tokenize_preferences(datasets.Dataset.from_list(
        [{**r, "reference_response": r["rejected"]} for r in rows]), tokenizer)
    eos = tokenizer.eos_token_id
    for r, ex in zip(rows, explicit.examples):
        assert ex["reference_ids"] == ex["rejected_ids"] and ex["reference_ids"].count(eos) == 1
        assert tokenizer.decode(ex["reference_ids"]) == r["rejected"][0]["content"] + tokenizer.eos_token + "\n"
    implicit_rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"],
                      "reference_response": r["prompt"] + r["rejected"]} for r in rows]
    implicit = tokenize_preferences(datasets.Dataset.from_list(implicit_rows), tokenizer)
    assert implicit.format == "conversational_implicit"
    assert [e["reference_ids"] for e in implicit.examples] == [e["reference_ids"] for e in explicit.examples]
    # rows whose shared prefix is their prompt (in others chosen and rejected also share a first word or more)
    text_rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"],
                  "reference_response": r["prompt"] + " An answer of its own."} for r in read_rows(HH, 40)
                 if split_row({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
                              "standard_implicit").prompt == r["prompt"]]
    assert len(text_rows) >= 30
    text = tokenize_preferences(datasets.Dataset.from_list(text_rows), tokenizer)
    assert text.format == "standard_implicit"
    assert all(e["reference_ids"] == ids(tokenizer, " An answer of its own.") + [eos] for e in text.examples)


def test_reference_response_must_share_the_implicit_prompt(tokenizer):
    chat = read_rows(LF_CHAT, 2)
    other_prompt = [{"role": "user", "content": "Something else."}]
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"],
             "reference_response": (other_prompt if i == 1 else r["prompt"]) + r["chosen"]}
            for i, r in enumerate(chat)]
    with pytest.raises(BadRow) as err:
        tokenize_preferences(datasets.Dataset.from_list(rows), tokenizer, source="chat")
    assert str(err.value) == ("chat:2: field 'reference_response': its messages before the last differ from the "
                              "prompt of 'chosen' and 'rejected'")
    text = [{"chosen": "Q: hi? A: yes", "rejected": "Q: hi? A: no", "reference_response": "Q: bye? A: ok"}]
    with pytest.raises(BadRow) as err:
        tokenize_preferences(datasets.Dataset.from_list(text), tokenizer, source="text")
    assert str(err.value) == ("text:1: field 'reference_response': does not begin with the prompt that 'chosen' "
                              "and 'rejected' share")


def test_long_reference_is_a_long_row_when_truncation_is_off(tmp_path, tokenizer, cache_dir):
    rows = [GOOD, {**GOOD, "reference_response": " Hello, " * 40}]
    path = write_jsonl(tmp_path / "long_ref.jsonl", rows)
    n = 1 + len(ids(tokenizer, "Hi.")) + len(ids(tokenizer, " Hello, " * 40)) + 1
    with pytest.raises(BadRow) as err:
        load_preference_data(path, tokenizer, max_length=30, truncation=False, cache_dir=cache_dir)
    assert str(err.value) == f"{path}:2: field 'reference_response': {n} tokens with the prompt, over max_length=30"


# ---------------------------------------------------------------- required columns

def test_required_column_missing_from_the_file(tmp_path, tokenizer, cache_dir):
    path = write_jsonl(tmp_path / "plain.jsonl", read_rows(UF, 5))
    hint = "loss_type 'score_weighted' weights each pair by its scores"
    with pytest.raises(DataError) as err:
        load_preference_data(path, tokenizer, require=("score_chosen",), require_hint=hint, cache_dir=cache_dir)
    assert str(err.value) == f"{path}: column 'score_chosen' is missing; {hint}"
    with pytest.raises(DataError) as err:
        load_preference_data(path, tokenizer, require=("score_chosen", "score_rejected"), cache_dir=cache_dir)
    assert str(err.value) == f"{path}: columns 'score_chosen', 'score_rejected' are missing"
    with pytest.raises(ValueError, match=r"require: \['reward'\] not carried by standard data"):
        load_preference_data(path, tokenizer, require=("reward",), cache_dir=cache_dir)


def test_required_columns_present_and_others_still_carried(tmp_path, tokenizer, cache_dir):
    rows = [{**r, "preference_prob": 0.9} for r in with_scores(UF, 5)]
    path = write_jsonl(tmp_path / "scored.jsonl", rows)
    data = load_preference_data(path, tokenizer, require=("score_chosen",), require_hint="h", cache_dir=cache_dir)
    assert list(data.examples[0]) == PAIR_KEYS + ["score_chosen", "score_rejected", "preference_prob", "where"]
    unpaired = write_jsonl(tmp_path / "unpaired.jsonl", [{"prompt": "Hi.", "completion": " Yo.", "label": True}])
    with pytest.raises(DataError) as err:
        load_preference_data(unpaired, tokenizer, needs="unpaired", require=["reward"], require_hint="needs rewards",
                             cache_dir=cache_dir)
    assert str(err.value) == f"{unpaired}: column 'reward' is missing; needs rewards"


# ---------------------------------------------------------------- pairs -> unpaired examples

def test_pairs_to_completions(tmp_path, tokenizer, cache_dir):
    rows = [{**r, "preference_prob": 1.0, "reference_response": r["chosen"]} for r in with_scores(UF, 6)]
    pairs = load_preference_data(write_jsonl(tmp_path / "scored.jsonl", rows), tokenizer, max_length=64,
                                 cache_dir=cache_dir)
    unpaired = pairs_to_completions(pairs)
    assert unpaired.format == "unpaired" and len(unpaired) == 12
    for k, pair in enumerate(pairs.examples):
        assert unpaired.examples[2 * k] == {"prompt_ids": pair["prompt_ids"], "completion_ids": pair["chosen_ids"],
                                            "label": True, "reward": rows[k]["score_chosen"], "where": pair["where"]}
        assert unpaired.examples[2 * k + 1] == {"prompt_ids": pair["prompt_ids"],
                                                "completion_ids": pair["rejected_ids"], "label": False,
                                                "reward": rows[k]["score_rejected"], "where": pair["where"]}
    assert unpaired.max_length == 64
    batch = collate_unpaired(unpaired.examples, tokenizer.pad_token_id)
    assert batch["desirable"].tolist() == [True, False] * 6
    bare = pairs_to_completions(tokenize_preferences(datasets.Dataset.from_list(read_rows(UF, 2)), tokenizer))
    assert [list(e) for e in bare.examples] == [["prompt_ids", "completion_ids", "label", "where"]] * 4
    with pytest.raises(ValueError, match="needs paired data, got the unpaired format"):
        pairs_to_completions(unpaired)


# ---------------------------------------------------------------- nothing left to learn

def first_tokens_agree(tokenizer, row):
    return ids(tokenizer, row["chosen"])[0] == ids(tokenizer, row["rejected"])[0]


def test_max_length_4_leaves_pairs_token_identical(tokenizer, cache_dir):
    """Why `prefuse train --max_length 4` runs at loss 0.6931, margin 0: every prompt is cut to its last 3 tokens,
    each response to its first token (its EOS lost), and where chosen and rejected begin with the same token the
    pair is identical: the same one labeled token on both rows, a margin of 0 whatever the weights."""
    rows = read_rows(PANDALM)
    data = load_preference_data(PANDALM, tokenizer, max_length=4, cache_dir=cache_dir)
    assert len(data) == 842
    assert all(len(e["prompt_ids"]) == 3 and len(e["chosen_ids"]) == len(e["rejected_ids"]) == 1
               for e in data.examples)
    agree = sum(first_tokens_agree(tokenizer, r) for r in rows)
    assert agree == 363 and data.identical == 363 and data.empty == 0 and data.unlearnable == 363
    assert data.truncation_report() == ("363 of 842 pairs have no response tokens left after truncation "
                                        "(max_length 4): 363 with chosen and rejected token-identical, 0 with an "
                                        "empty response")
    batch = collate_pairs(data.examples, tokenizer.pad_token_id)
    labels, B = batch["labels"], len(data)
    assert (labels != IGNORE_INDEX).sum(1).tolist() == [1] * (2 * B)  # one labeled token per row, not zero
    same_labels = [labels[i].tolist() == labels[B + i].tolist() for i in range(B)]
    assert same_labels == [first_tokens_agree(tokenizer, r) for r in rows]
    normal = load_preference_data(PANDALM, tokenizer, max_length=1024, max_prompt_length=512, cache_dir=cache_dir)
    assert normal.unlearnable == 0
    assert normal.truncation_report() == ("0 of 842 pairs have no response tokens left after truncation "
                                          "(max_length 1024, max_prompt_length 512): 0 with chosen and rejected "
                                          "token-identical, 0 with an empty response")


def test_no_pair_left_to_learn_from_is_an_error(tmp_path, tokenizer, cache_dir):
    rows = [r for r in read_rows(PANDALM) if first_tokens_agree(tokenizer, r)]
    path = write_jsonl(tmp_path / "alike.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_preference_data(path, tokenizer, max_length=4, cache_dir=cache_dir)
    assert str(err.value) == (f"{path}: 363 of 363 pairs have no response tokens left after truncation "
                              "(max_length 4): 363 with chosen and rejected token-identical, 0 with an empty "
                              "response; nothing to learn from: raise --max_length or lower --max_prompt_length")
    # either fix works; and tokenize_preferences alone only counts
    assert load_preference_data(path, tokenizer, max_length=1024, max_prompt_length=512,
                                cache_dir=cache_dir).unlearnable == 0
    assert load_preference_data(path, tokenizer, max_length=4, max_prompt_length=1,
                                cache_dir=cache_dir).unlearnable < 363
    assert tokenize_preferences(load_records(path, cache_dir=cache_dir), tokenizer, max_length=4).identical == 363


def test_empty_response_follows_the_label_layout(tokenizer):
    """After an empty prompt the first completion token has no position predicting it (collate's layout)."""
    examples = [{"prompt_ids": [], "completion_ids": [7], "label": True, "where": "x:1"},
                {"prompt_ids": [1], "completion_ids": [7], "label": False, "where": "x:2"},
                {"prompt_ids": [], "completion_ids": [7, 2], "label": True, "where": "x:3"}]
    labeled = (collate_unpaired(examples, tokenizer.pad_token_id)["labels"] != IGNORE_INDEX).sum(1).tolist()
    assert labeled == [0, 1, 1]
    data = TokenizedData("unpaired", examples, max_length=4)
    assert (data.empty, data.identical) == (1, 0)
    assert data.truncation_report() == "1 of 3 examples have no response tokens left after truncation (max_length 4)"
    check_response_tokens_left(data, "x")
    with pytest.raises(DataError) as err:
        check_response_tokens_left(TokenizedData("unpaired", examples[:1]), "x")
    assert str(err.value) == ("x: 1 of 1 examples have no response tokens left; nothing to learn from: raise "
                              "--max_length or lower --max_prompt_length")
    pair = {"prompt_ids": [], "chosen_ids": [5], "rejected_ids": [6, 2], "where": "y:1"}
    assert (TokenizedData("standard", [pair]).empty, TokenizedData("standard", [pair]).identical) == (1, 0)


# ---------------------------------------------------------------- files that are not JSON

def csv_text(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["prompt", "chosen", "rejected"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_csv_text_in_a_json_file(suffix, tmp_path, tokenizer, cache_dir):
    path = tmp_path / f"pairs{suffix}"
    path.write_text(csv_text(read_rows(UF, 5)), encoding="utf-8")
    for skip in (False, True):  # a file that is not JSON at all is no bad row to skip
        with pytest.raises(DataError) as err:
            load_preference_data(path, tokenizer, skip_bad_rows=skip, cache_dir=cache_dir)
        assert str(err.value) == f"{path}:1: not valid JSON (Expecting value at column 1)"


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_garbage_on_line_3_of_json_lines(suffix, tmp_path, tokenizer, cache_dir):
    rows = read_rows(UF, 4)
    path = write_jsonl(tmp_path / f"pairs{suffix}", rows[:2] + ["<<< merge conflict"] + rows[2:])
    with pytest.raises(BadRow) as err:
        load_preference_data(path, tokenizer, cache_dir=cache_dir)
    assert str(err.value) == f"{path}:3: not valid JSON (Expecting value at column 1)"
    kept = load_preference_data(path, tokenizer, skip_bad_rows=True, cache_dir=cache_dir)
    assert [e["where"] for e in kept.examples] == [f"{path}:{i}" for i in (1, 2, 4, 5)]
    assert dict(kept.skipped.by_kind) == {"invalid_json": 1}


def test_a_json_document_broken_on_line_3(tmp_path, tokenizer, cache_dir):
    rows = read_rows(UF, 3)
    lines = ["[", json.dumps(rows[0]) + ",", json.dumps(rows[1]) + ",", json.dumps(rows[2]), "]"]
    path = tmp_path / "pairs.json"
    path.write_text("\n".join(lines), encoding="utf-8")
    assert len(load_preference_data(path, tokenizer, cache_dir=cache_dir)) == 3
    lines[2] = lines[2].replace('{"prompt"', "{prompt", 1)  # an unquoted key, as hand-edited files have
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_preference_data(path, tokenizer, cache_dir=cache_dir)
    assert str(err.value) == f"{path}:3: not valid JSON (Expecting property name enclosed in double quotes at column 2)"


def test_bytes_that_are_not_text(tmp_path, tokenizer, cache_dir):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xff\xfe\x00\x01 binary\n\x89PNG\n")
    with pytest.raises(DataError) as err:
        load_preference_data(path, tokenizer, cache_dir=cache_dir)
    assert str(err.value) == f"{path}:1: not valid JSON (not UTF-8 text)"
