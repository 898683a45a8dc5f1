"""Records from a local file or a `save_to_disk` directory, through the `datasets` library.

Every dataset returned carries a `__where__` column, `<path>:<row>`, so a bad row found later (after shuffles or
selections) is reported where the user can find it: the line number in a JSON-lines file (blank lines count), the
1-based row elsewhere. When Arrow cannot hold a JSON-lines file as it is (a line that is not JSON, a field whose
type differs from the other rows'), the file is read line by line, the offending values are set to null and the
row carries its problem in a `__problem__` column; tokenization then raises it or skips the row.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import datasets

from prefuse.engine.data.errors import DataError, RowProblem
from prefuse.engine.data.formats import message_list_problem

WHERE_COLUMN = "__where__"
PROBLEM_COLUMN = "__problem__"
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label")
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _builder_for(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    builder = _BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise DataError(f"{path}: unsupported file type; expected .jsonl, .json, .parquet or a save_to_disk folder")
    return builder


def load_records(path: str | Path, split: str = "train", cache_dir: str | None = None) -> datasets.Dataset:
    """The rows of a local .jsonl / .json / .parquet file or `save_to_disk` folder as a `datasets.Dataset`, with
    the `__where__` column. `split` picks the split of a saved DatasetDict (a single file is its own split).

    Raises DataError naming the path when it does not exist, is of an unknown type or holds no such split."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        dataset = _load_saved(path, split)
        return dataset.add_column(WHERE_COLUMN, [f"{path}:{i}" for i in range(1, len(dataset) + 1)])
    builder = _builder_for(path)
    json_lines = ".jsonl" in path.suffixes
    try:
        dataset = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir)
    except Exception as error:  # Arrow's schema errors come as several types; the line scan says which row
        if not json_lines:
            raise DataError(f"{path}: cannot be read: {error}") from error
        return _load_json_lines_by_hand(path)
    if json_lines and any(_holds_mixed_types(dataset.features.get(c)) for c in PREFERENCE_COLUMNS):
        return _load_json_lines_by_hand(path)  # a type differs between rows: say which row
    rows = range(1, len(dataset) + 1)
    if json_lines:
        rows = _nonblank_line_numbers(path)
        if len(rows) != len(dataset):  # the reader skipped something else than blank lines: number rows instead
            rows = range(1, len(dataset) + 1)
    return dataset.add_column(WHERE_COLUMN, [f"{path}:{i}" for i in rows])


def _holds_mixed_types(feature: Any) -> bool:
    """datasets keeps JSON values whose types differ between rows as a `Json` feature (raw Python values), at the
    top of a column or inside its lists and structs."""
    if type(feature).__name__ == "Json":
        return True
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        return _holds_mixed_types(feature.feature)
    if isinstance(feature, dict):
        return any(_holds_mixed_types(inner) for inner in feature.values())
    return False


def _load_saved(path: Path, split: str) -> datasets.Dataset:
    try:
        saved = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"{path}: a folder that is not a datasets save_to_disk folder") from error
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"{path}: no split '{split}' (has {sorted(saved)})")
        return saved[split]
    return saved


def _open_text(path: Path):
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _nonblank_line_numbers(path: Path) -> list[int]:
    with _open_text(path) as lines:
        return [number for number, line in enumerate(lines, start=1) if line.strip()]


def _value_kind(value: Any) -> str:
    if isinstance(value, list) and value and message_list_problem(value) is None:
        return "messages"
    return type(value).__name__


_EXPECTED = {"str": "a string", "messages": "a list of {'role', 'content'} messages", "bool": "a bool"}


def _load_json_lines_by_hand(path: Path) -> datasets.Dataset:
    """Parse line by line; null the values whose type differs from the column's usual one and record why."""
    rows, wheres, problems = [], [], []
    with _open_text(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problem = None if isinstance(row, dict) else f"not a JSON object but {type(row).__name__}"
            except json.JSONDecodeError as error:
                row, problem = {}, f"not valid JSON ({error.msg} at column {error.colno})"
            rows.append(row if problem is None else {})
            wheres.append(f"{path}:{number}")
            problems.append(None if problem is None else RowProblem("invalid_json", None, problem))
    kinds: dict[str, Counter] = {}
    for row in rows:
        for key, value in row.items():
            if value is not None:
                kinds.setdefault(key, Counter())[_value_kind(value)] += 1
    usual = {key: counts.most_common(1)[0][0] for key, counts in kinds.items()}
    for i, row in enumerate(rows):
        for key, value in list(row.items()):
            if value is None or _value_kind(value) == usual[key]:
                continue
            row[key] = None  # so Arrow can hold the column; the problem goes with the row
            if key in PREFERENCE_COLUMNS and problems[i] is None:
                problems[i] = _type_problem(key, value, usual[key])
    for row, where, problem in zip(rows, wheres, problems):
        row[WHERE_COLUMN] = where
        row[PROBLEM_COLUMN] = None if problem is None else json.dumps([problem.kind, problem.field, problem.detail])
    columns = list(dict.fromkeys(key for row in rows for key in row))
    try:
        return datasets.Dataset.from_list([{c: row.get(c) for c in columns} for row in rows])
    except Exception as error:
        raise DataError(f"{path}: cannot be read: {error}") from error


def _type_problem(key: str, value: Any, usual: str) -> RowProblem:
    if usual == "messages" and isinstance(value, list):
        return RowProblem("malformed_messages", key, message_list_problem(value) or "empty message list")
    expected = _EXPECTED.get(usual, f"a {usual}")
    return RowProblem("wrong_type", key, f"expected {expected}, got {type(value).__name__}")


def row_problem(row: dict[str, Any]) -> RowProblem | None:
    """The problem the loader recorded for this row, if any."""
    recorded = row.get(PROBLEM_COLUMN)
    return None if recorded is None else RowProblem(*json.loads(recorded))
