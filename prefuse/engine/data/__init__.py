"""The training engine's data layer: file -> records -> format -> token ids -> ordered, padded batches.

    records = load_records("pairs.jsonl")                  # datasets.Dataset (+ a `__where__` column)
    fmt = detect_format(records)                           # "standard", "conversational_implicit", "unpaired", ...
    check_format_for(fmt, needs="pairs")                   # DataError naming the columns an objective needs
    data = tokenize_preferences(records, tokenizer, max_length=1024, max_prompt_length=512)
    batches = PairBatches(len(data), batch_size=8, seed=0) # resumable: state_dict() / load_state_dict()
    for indices in batches:
        batch = collate_pairs([data.examples[i] for i in indices], tokenizer.pad_token_id)  # [2B, T] tensors

`load_preference_data` does the first four steps. Bad rows raise `BadRow`, `<file>:<row>: field '<name>': <what>`,
or are skipped and tallied with `skip_bad_rows=True`.
"""
from __future__ import annotations

from pathlib import Path

from prefuse.engine.data.collate import IGNORE_INDEX, collate_pairs, collate_unpaired
from prefuse.engine.data.errors import BadRow, DataError, RowProblem, SkippedRows
from prefuse.engine.data.formats import PAIRED_FORMATS, UNPAIRED_FORMATS, check_format_for, detect_format
from prefuse.engine.data.loading import load_records
from prefuse.engine.data.order import PairBatches
from prefuse.engine.data.tokenize import TokenizedData, tokenize_preferences, truncate


def load_preference_data(path: str | Path, tokenizer, *, needs: str = "pairs", split: str = "train",
                         max_length: int | None = None, max_prompt_length: int | None = None,
                         truncation: bool = True, skip_bad_rows: bool = False,
                         cache_dir: str | None = None) -> TokenizedData:
    """load_records -> detect_format -> check_format_for(needs) -> tokenize_preferences, in one call."""
    records = load_records(path, split=split, cache_dir=cache_dir)
    fmt = detect_format(records)
    check_format_for(fmt, needs)
    return tokenize_preferences(records, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                truncation=truncation, skip_bad_rows=skip_bad_rows, fmt=fmt, source=str(path))


__all__ = [
    "IGNORE_INDEX", "PAIRED_FORMATS", "UNPAIRED_FORMATS", "BadRow", "DataError", "PairBatches", "RowProblem",
    "SkippedRows", "TokenizedData", "check_format_for", "collate_pairs", "collate_unpaired", "detect_format",
    "load_preference_data", "load_records", "tokenize_preferences", "truncate",
]
