"""Records from a local file or a `save_to_disk` directory, through the `datasets` library.

Every dataset returned carries a `__where__` column, `<path>:<row>`, so a bad row found later (after shuffles or
selections) is reported where the user can find it: the line number in a JSON-lines file (blank lines count), the
1-based row elsewhere. When Arrow cannot hold a JSON-lines file as it is (a line that is not JSON, a field whose
type differs from the other rows'), the file is read line by line, the offending values are set to null and the
row carries its problem in a `__problem__` column; tokenization then raises it or skips the row. A file with no
JSON object on any line (CSV, say), or a .json file that does not parse, is not data with a few bad rows: it raises
`<file>:<line>: not valid JSON (<reason>)` at once.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import datasets

from prefuse.engine.data.columns import EXTRA_COLUMNS
from prefuse.engine.data.errors import WHERE_COLUMN, DataError, RowProblem
from prefuse.engine.data.formats import message_list_problem
from prefuse.engine.data.images import IMAGES_COLUMN

PROBLEM_COLUMN = "__problem__"
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label")
# columns whose per-row type problems are reported
CHECKED_COLUMNS = PREFERENCE_COLUMNS + EXTRA_COLUMNS + (IMAGES_COLUMN,)
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
    if _is_empty(path):
        raise DataError(f"{path}: the file is empty (no rows); give a file of rows in one of TRL's formats (one "
                        f"JSON object per line)")
    json_lines = ".jsonl" in path.suffixes
    try:
        dataset = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, cache_dir=cache_dir)
    except Exception as error:  # Arrow's schema errors come as several types; the line scan says which row
        if json_lines or (builder == "json" and _holds_json_lines(path)):
            return _load_json_lines_by_hand(path)
        if builder == "json":
            _raise_if_not_json(path)
        raise DataError(f"{path}: cannot be read: {error}") from error
    if json_lines and any(_holds_mixed_types(dataset.features.get(c)) for c in CHECKED_COLUMNS):
        return _load_json_lines_by_hand(path)  # a type differs between rows: say which row
    if len(dataset) == 0:
        raise DataError(f"{path}: holds no rows; give a file of preference rows")
    rows = range(1, len(dataset) + 1)
    if json_lines:
        rows = _nonblank_line_numbers(path)
        if len(rows) != len(dataset):  # the reader skipped something else than blank lines: number rows instead
            rows = range(1, len(dataset) + 1)
    return dataset.add_column(WHERE_COLUMN, [f"{path}:{i}" for i in rows])


def _is_empty(path: Path) -> bool:
    """A file of zero bytes, or (a text file) of blank lines only."""
    if path.stat().st_size == 0:
        return True
    if path.suffix == ".parquet":
        return False
    with _open_bytes(path) as lines:
        return not any(line.strip() for line in lines)


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


def _holds_json_lines(path: Path) -> bool:
    """Whether a .json file is JSON lines (datasets reads both): its first non-blank line is a JSON object."""
    with _open_bytes(path) as lines:
        first = next((line for line in lines if line.strip()), b"")
    try:
        return isinstance(json.loads(first), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _raise_if_not_json(path: Path) -> None:
    """DataError `<file>:<line>: not valid JSON (...)` where a whole-document .json file stops parsing."""
    with _open_bytes(path) as f:
        content = f.read()
    try:
        json.loads(content.decode("utf-8"))
    except UnicodeDecodeError as error:
        line = content[:error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid JSON (not UTF-8 text)") from None
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: {_json_error_text(error)}") from None


def _json_error_text(error: json.JSONDecodeError) -> str:
    return f"not valid JSON ({error.msg} at column {error.colno})"


def _open_bytes(path: Path):
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


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
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "number"  # JSON writes 9 and 9.5 alike; Arrow holds both as float64
    return type(value).__name__


_EXPECTED = {"str": "a string", "messages": "a list of {'role', 'content'} messages", "bool": "a bool",
             "number": "a number"}


def _parse_json_line(line: bytes) -> tuple[dict, str | None]:
    """(the row, None) or ({}, why the line is not a JSON object)."""
    try:
        row = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return {}, "not valid JSON (not UTF-8 text)"
    except json.JSONDecodeError as error:
        return {}, _json_error_text(error)
    if not isinstance(row, dict):
        return {}, f"not a JSON object but {type(row).__name__}"
    return row, None


def _load_json_lines_by_hand(path: Path) -> datasets.Dataset:
    """Parse line by line; null the values whose type differs from the column's usual one and record why."""
    rows, wheres, problems = [], [], []
    with _open_bytes(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            row, problem = _parse_json_line(line)
            rows.append(row)
            wheres.append(f"{path}:{number}")
            problems.append(None if problem is None else RowProblem("invalid_json", None, problem))
    if rows and all(problems):  # no line is a JSON object: the file is not JSON lines at all
        raise DataError(problems[0].message(wheres[0]))
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
            if key in CHECKED_COLUMNS and problems[i] is None:
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
