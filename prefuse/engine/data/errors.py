"""Errors of the data layer and the tally of skipped rows.

A bad row is reported in one line, `<file>:<row>: field '<name>': <what>`, where `<row>` is the line number in a
JSON-lines file (blank lines count) and the 1-based row elsewhere.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class DataError(ValueError):
    """Data that prefuse cannot train on: a missing file, a format an objective cannot use, a bad row."""


@dataclass(frozen=True)
class RowProblem:
    """What is wrong with one row. kind groups problems for the skip tally: missing, empty, wrong_type,
    malformed_messages, prompt_mismatch, chat_template, too_long, invalid_json, out_of_range."""

    kind: str
    field: str | None
    detail: str

    def message(self, where: str) -> str:
        """The one-line report, e.g. `data.jsonl:17: field 'rejected': missing`."""
        if self.field is None:
            return f"{where}: {self.detail}"
        return f"{where}: field '{self.field}': {self.detail}"


class BadRow(DataError):
    """One bad row; `where` is `<file>:<row>` and `problem` says what is wrong with it."""

    def __init__(self, where: str, problem: RowProblem):
        super().__init__(problem.message(where))
        self.where = where
        self.problem = problem


@dataclass
class SkippedRows:
    """Rows left out under `skip_bad_rows=True`: how many, how many of each kind, and the first few messages."""

    count: int = 0
    by_kind: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)
    keep_messages: int = 20

    def add(self, where: str, problem: RowProblem) -> None:
        self.count += 1
        self.by_kind[problem.kind] += 1
        if len(self.messages) < self.keep_messages:
            self.messages.append(problem.message(where))


WHERE_COLUMN = "__where__"  # each loaded row's "<file>:<row>", carried to every message about the row


def source_of(dataset) -> str | None:
    """The file the rows of `load_records` came from (their `__where__` is `<file>:<row>`), else None."""
    if WHERE_COLUMN not in dataset.column_names or len(dataset) == 0:
        return None
    return dataset[0][WHERE_COLUMN].rsplit(":", 1)[0]
