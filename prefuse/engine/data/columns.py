"""Extra per-example columns, carried next to the preference columns into each tokenized example.

| formats  | column               | value                                          | example key                   |
|----------|----------------------|------------------------------------------------|-------------------------------|
| paired   | `score_chosen`       | a finite number (a bool is not a number)       | `score_chosen` (float)        |
| paired   | `score_rejected`     | a finite number                                | `score_rejected` (float)      |
| paired   | `preference_prob`    | a finite number in [0, 1]                      | `preference_prob` (float)     |
| paired   | `reference_response` | a response shaped as `chosen` is in the format | `reference_ids` (list of int) |
| paired   | `generated_rejected` | a response shaped as `rejected` (Avg-DPO's y~-) | `generated_rejected_ids`      |
| unpaired | `reward`, `advantage`| finite numbers                                 | `reward`, `advantage` (float) |

Every extra column is optional, but one the data has is carried in every row: a null or a value of the wrong kind
is a bad row (`<file>:<row>: field '<name>': <what>`), so every example of a dataset has the same keys and a batch
can stack them. `require` turns absent columns into one file-level error naming them.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from prefuse.engine.data.errors import DataError
from prefuse.engine.data.formats import UNPAIRED_FORMATS, RowIssue, check_messages, check_text

REFERENCE_COLUMN = "reference_response"
GENERATED_REJECTED_COLUMN = "generated_rejected"  # Avg-DPO's policy-generated y~- beside the external `rejected`
# response columns beside chosen and rejected, tokenized and truncated as they are
RESPONSE_COLUMNS = (REFERENCE_COLUMN, GENERATED_REJECTED_COLUMN)
# number columns -> the closed range their values must lie in (None: any finite number)
PAIRED_NUMBERS: dict[str, tuple[float, float] | None] = {"score_chosen": None, "score_rejected": None,
                                                          "preference_prob": (0.0, 1.0)}
UNPAIRED_NUMBERS: dict[str, tuple[float, float] | None] = {"reward": None, "advantage": None}
EXTRA_COLUMNS = (*PAIRED_NUMBERS, *RESPONSE_COLUMNS, *UNPAIRED_NUMBERS)


def extra_columns_of(fmt: str) -> tuple[str, ...]:
    """The extra columns data in format `fmt` may carry."""
    if fmt in UNPAIRED_FORMATS:
        return tuple(UNPAIRED_NUMBERS)
    return (*PAIRED_NUMBERS, *RESPONSE_COLUMNS)


def carried_columns(column_names: Iterable[str], fmt: str) -> list[str]:
    """The extra columns of `fmt` that the data has, in the table's order."""
    present = set(column_names)
    return [c for c in extra_columns_of(fmt) if c in present]


def check_required(column_names: Iterable[str], fmt: str, require: Iterable[str], hint: str, source: str) -> None:
    """Raise DataError `<source>: column 'x' is missing; <hint>` when a required extra column is absent.

    A name that `fmt` never carries is the caller's mistake (ValueError): such a column would not reach the
    examples even when the file has it."""
    require = list(require)
    known = extra_columns_of(fmt)
    unknown = [c for c in require if c not in known]
    if unknown:
        raise ValueError(f"require: {unknown} not carried by {fmt} data; it carries {list(known)}")
    present = set(column_names)
    missing = [c for c in require if c not in present]
    if not missing:
        return
    if len(missing) == 1:
        message = f"{source}: column '{missing[0]}' is missing"
    else:
        message = f"{source}: columns " + ", ".join(f"'{c}'" for c in missing) + " are missing"
    raise DataError(message + (f"; {hint}" if hint else ""))


def check_number(value: Any, field: str, bounds: tuple[float, float] | None = None) -> float:
    """`value` as a float; raises RowIssue when it is null, not a number (bools are not), not finite or out of
    `bounds`."""
    if value is None:
        raise RowIssue("missing", field, "missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowIssue("wrong_type", field, f"expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise RowIssue("out_of_range", field, f"expected a finite number, got {number}")
    if bounds is not None and not bounds[0] <= number <= bounds[1]:
        raise RowIssue("out_of_range", field, f"expected a number in [{bounds[0]:g}, {bounds[1]:g}], got {number:g}")
    return number


def read_numbers(row: dict[str, Any], columns: Iterable[str]) -> dict[str, float]:
    """{column: float} for the number columns among `columns`; raises RowIssue."""
    ranges = {**PAIRED_NUMBERS, **UNPAIRED_NUMBERS}
    return {c: check_number(row.get(c), c, ranges[c]) for c in columns if c in ranges}


def read_reference(row: dict[str, Any], fmt: str, prompt: Any, column: str = REFERENCE_COLUMN) -> Any:
    """The row's `column` (a response column: `reference_response`, `generated_rejected`) as a completion after
    `prompt`, as split_row gives `chosen`: the text or the messages in the explicit formats; in the implicit ones
    the whole text or conversation, which must begin with the prompt that chosen and rejected share. Raises
    RowIssue."""
    value = row.get(column)
    if fmt == "standard":
        return check_text(value, column, response=True)
    if fmt == "conversational":
        return check_messages(value, column, response=True)
    if fmt == "conversational_implicit":
        messages = check_messages(value, column, response=True)
        if messages[:-1] != prompt:
            raise RowIssue("prompt_mismatch", column,
                           "its messages before the last differ from the prompt of 'chosen' and 'rejected'")
        return messages[-1:]
    text = check_text(value, column, response=True)
    if not text.startswith(prompt):
        raise RowIssue("prompt_mismatch", column,
                       "does not begin with the prompt that 'chosen' and 'rejected' share")
    if not text[len(prompt):].strip():
        raise RowIssue("empty", column, "empty response (nothing after the prompt)")
    return text[len(prompt):]
