"""The training engine's data layer: file -> records -> format -> token ids -> ordered, padded batches.

    records = load_records("pairs.jsonl")                  # datasets.Dataset (+ a `__where__` column)
    fmt = detect_format(records)                           # "standard", "conversational_implicit", "unpaired", ...
    check_format_for(fmt, needs="pairs")                   # DataError naming the columns an objective needs
    data = tokenize_preferences(records, tokenizer, max_length=1024, max_prompt_length=512)
    batches = PairBatches(len(data), batch_size=8, seed=0) # resumable: state_dict() / load_state_dict()
    for indices in batches:
        batch = collate_pairs([data.examples[i] for i in indices], tokenizer.pad_token_id)  # [2B, T] tensors

`load_preference_data` does the first four steps. Bad rows raise `BadRow`, `<file>:<row>: field '<name>': <what>`,
or are skipped and tallied with `skip_bad_rows=True`. Extra columns (scores, a reference response, rewards: see
columns.py) ride along in each example; `pairs_to_completions(data)` turns pairs into unpaired examples. Data with
an `images` column (a vision-language model's, tokenized with its processor: images.py) gives examples `images`,
and `vision_inputs` the pixel values of a batch's rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from prefuse.engine.data.collate import IGNORE_INDEX, collate_pairs, collate_sequences, collate_unpaired
from prefuse.engine.data.columns import EXTRA_COLUMNS
from prefuse.engine.data.convert import pairs_to_completions
from prefuse.engine.data.errors import BadRow, DataError, RowProblem, SkippedRows
from prefuse.engine.data.formats import (
    PAIRED_FORMATS,
    PROMPT_ONLY_FORMATS,
    UNPAIRED_FORMATS,
    check_format_for,
    detect_format,
)
from prefuse.engine.data.images import IMAGES_COLUMN, ExampleImages, vision_inputs
from prefuse.engine.data.loading import load_records
from prefuse.engine.data.order import PairBatches, held_out_split
from prefuse.engine.data.prompts import PromptData, load_prompts, tokenize_prompts
from prefuse.engine.data.tokenize import TokenizedData, check_response_tokens_left, tokenize_preferences, truncate


def load_preference_data(path: str | Path, tokenizer, *, needs: str = "pairs", split: str = "train",
                         max_length: int | None = None, max_prompt_length: int | None = None,
                         truncation: bool = True, skip_bad_rows: bool = False,
                         cache_dir: str | None = None, require: Iterable[str] = (),
                         require_hint: str = "", processor=None) -> TokenizedData:
    """load_records -> detect_format -> check_format_for(needs) -> tokenize_preferences, in one call.

    `require`: extra columns the caller cannot do without (e.g. ("score_chosen", "score_rejected")); one absent
    from the file raises DataError `<file>: column 'score_chosen' is missing; <require_hint>`, where the hint says
    who needs it and why. Raises DataError, too, when truncation leaves no example a response token to learn from
    (see `TokenizedData.truncation_report`). processor: a vision-language model's, for data with an `images`
    column (images.py)."""
    records = load_records(path, split=split, cache_dir=cache_dir)
    fmt = detect_format(records)
    check_format_for(fmt, needs)
    data = tokenize_preferences(records, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                truncation=truncation, skip_bad_rows=skip_bad_rows, fmt=fmt, source=str(path),
                                require=require, require_hint=require_hint, processor=processor)
    check_response_tokens_left(data, str(path))
    return data


__all__ = [
    "EXTRA_COLUMNS", "IMAGES_COLUMN", "ExampleImages", "IGNORE_INDEX", "PAIRED_FORMATS", "PROMPT_ONLY_FORMATS", "UNPAIRED_FORMATS", "BadRow",
    "DataError", "PairBatches", "PromptData", "RowProblem", "SkippedRows", "TokenizedData", "check_format_for",
    "check_response_tokens_left", "collate_pairs", "collate_sequences", "collate_unpaired", "detect_format",
    "load_preference_data", "load_prompts", "load_records", "pairs_to_completions", "tokenize_preferences",
    "tokenize_prompts", "truncate", "vision_inputs",
]
