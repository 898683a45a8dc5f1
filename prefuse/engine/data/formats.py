"""TRL's preference formats: detection from the columns, and each row split into a prompt and its completions.

| format                    | columns                                  | values                                   |
|---------------------------|------------------------------------------|------------------------------------------|
| `standard`                | prompt, chosen, rejected                 | strings                                  |
| `standard_implicit`       | chosen, rejected                         | strings; the shared prefix is the prompt |
| `conversational`          | prompt, chosen, rejected                 | lists of {"role", "content"} messages    |
| `conversational_implicit` | chosen, rejected                         | whole conversations; the prompt is all   |
|                           |                                          | messages but the last (assistant) turn   |
| `unpaired`                | prompt, completion, label                | strings, label a bool (KTO)              |
| `conversational_unpaired` | prompt, completion, label                | messages, label a bool                   |

Prompt-only data (`prompt_only`, `conversational_prompt_only`: a `prompt` column, a string or messages, without
responses) is for online training (prompts.py); offline, `detect_format` refuses it in one line naming the file.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import datasets

from prefuse.engine.data.errors import DataError, RowProblem, source_of

PAIRED_FORMATS = ("standard", "standard_implicit", "conversational", "conversational_implicit")
UNPAIRED_FORMATS = ("unpaired", "conversational_unpaired")
PROMPT_ONLY_FORMATS = ("prompt_only", "conversational_prompt_only")
PROMPTS_ONLY = "holds prompts only (a 'prompt' column without responses): train on it with --online"
# A file with one of these is preference data with a column missing or misnamed (`response` for `completion`, say),
# not prompts: the "no preference columns" message, which names the columns needed, serves it better.
_RESPONSE_COLUMNS = ("chosen", "rejected", "completion", "label", "response")
ROLES = ("system", "user", "assistant", "tool")  # the roles chat templates know (TRL's conversational formats)
NEEDED_COLUMNS = {
    "pairs": "'chosen' and 'rejected' (with an optional 'prompt'): the paired preference format",
    "unpaired": "'prompt', 'completion' and 'label' (a bool): the unpaired format",
}


def _column_kind(feature: Any) -> str:
    """'text', 'messages', 'null' (no value in any row) or 'other'."""
    if isinstance(feature, datasets.Value):
        if feature.dtype in ("string", "large_string"):
            return "text"
        return "null" if feature.dtype == "null" else "other"
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        inner = feature.feature
        if isinstance(inner, dict) and {"role", "content"} <= set(inner):
            return "messages"
    return "other"


def holds_prompts_only(column_names) -> bool:
    """Whether a table with these columns is prompt-only data: a `prompt` column and no response column."""
    names = set(column_names)
    return "prompt" in names and not names & set(_RESPONSE_COLUMNS)


def detect_format(dataset: datasets.Dataset) -> str:
    """The TRL format of `dataset`, from its column names and types (one of PAIRED_FORMATS or UNPAIRED_FORMATS).

    Extra columns are allowed. Raises DataError when the preference columns are missing or mix plain text with
    message lists, and `<file>: holds prompts only (...): train on it with --online` for prompt-only data."""
    features = dataset.features
    names = set(features)
    if {"chosen", "rejected"} <= names:
        response_columns, paired = ["chosen", "rejected"], True
    elif {"prompt", "completion", "label"} <= names:
        response_columns, paired = ["completion"], False
    elif holds_prompts_only(names):
        source = source_of(dataset)
        raise DataError(f"{source}: {PROMPTS_ONLY}" if source else f"the data {PROMPTS_ONLY}")
    else:
        raise DataError(_no_preference_columns(dataset))
    columns = (["prompt"] if "prompt" in names else []) + response_columns
    kinds = {c: _column_kind(features[c]) for c in columns}
    source = f"{source_of(dataset)}: " if source_of(dataset) else ""  # the file, when the rows came from one
    for column, kind in kinds.items():
        if kind == "other":
            raise DataError(f"{source}column '{column}' holds {features[column]}, expected strings or lists of "
                            "{'role', 'content'} messages")
    found = set(kinds.values()) - {"null"}
    if len(found) > 1:
        raise DataError(f"{source}columns mix plain text and message lists: "
                        + ", ".join(f"'{c}' is {k}" for c, k in kinds.items()))
    if not found:
        raise DataError(f"{source}columns {columns} hold no values")
    conversational = found == {"messages"}
    if not paired:
        return "conversational_unpaired" if conversational else "unpaired"
    implicit = "_implicit" if "prompt" not in names else ""
    return ("conversational" if conversational else "standard") + implicit


def _no_preference_columns(dataset: datasets.Dataset) -> str:
    """`<file>: no preference columns: found [...], need ...; did you mean 'rejected' for 'rejectd'?`: the file's
    own columns only (not the loader's bookkeeping), and the likely misspellings of the needed ones."""
    source = source_of(dataset)
    found = sorted(name for name in dataset.column_names if not (name.startswith("__") and name.endswith("__")))
    guesses = []
    for needed in ("prompt", "chosen", "rejected", "completion", "label"):
        close = difflib.get_close_matches(needed, [n for n in found if n not in _KNOWN_COLUMNS], n=1, cutoff=0.6)
        if needed not in found and close:
            guesses.append(f"{needed!r} for {close[0]!r}")
    message = (f"{source + ': ' if source else ''}no preference columns: found {found}, need "
               f"{NEEDED_COLUMNS['pairs']}, or {NEEDED_COLUMNS['unpaired']}")
    return message + (f"; did you mean {', '.join(guesses)}?" if guesses else "")


_KNOWN_COLUMNS = ("prompt", "chosen", "rejected", "completion", "label")


def check_format_for(fmt: str, needs: str) -> None:
    """Raise DataError when data in format `fmt` cannot feed an objective that `needs` "pairs" (DPO and family)
    or "unpaired" examples (KTO); the message names the columns it needs."""
    if needs not in NEEDED_COLUMNS:
        raise ValueError(f"needs must be 'pairs' or 'unpaired', got {needs!r}")
    allowed = PAIRED_FORMATS if needs == "pairs" else UNPAIRED_FORMATS
    if fmt in PROMPT_ONLY_FORMATS:
        raise DataError(f"the data {PROMPTS_ONLY}")
    if fmt not in PAIRED_FORMATS + UNPAIRED_FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    if fmt not in allowed:
        raise DataError(f"the objective needs {needs} data, with columns {NEEDED_COLUMNS[needs]}; "
                        f"the data is in the {fmt} format")


class RowIssue(Exception):
    """Raised by the row checks below; carries the RowProblem."""

    def __init__(self, kind: str, field: str | None, detail: str):
        super().__init__(detail)
        self.problem = RowProblem(kind, field, detail)


@dataclass
class RowParts:
    """One row split into a prompt (text or messages) and its completions ({"chosen", "rejected"} or
    {"completion"}); label is the unpaired format's bool."""

    prompt: Any
    completions: dict[str, Any]
    label: bool | None = None


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_text(value: Any, field: str, response: bool) -> str:
    """`value` as a prompt or response text; raises RowIssue."""
    if value is None:
        raise RowIssue("missing", field, "missing")
    if not isinstance(value, str):
        raise RowIssue("wrong_type", field, f"expected a string, got {_type_name(value)}")
    if response and not value.strip():
        raise RowIssue("empty", field, "empty response")
    return value


def _content_problem(content: list) -> str | None:
    """Why a message's list content is not content parts ({"type": "text", "text": str}, {"type": "image"}, ...)."""
    for number, part in enumerate(content, start=1):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            return f"content part {number}: expected a {{'type', ...}} object"
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            return f"content part {number}: a text part needs a string 'text'"
    return None


def content_text(content: str | list) -> str:
    """The text of a message's content: the string, or its text parts joined (content parts, TRL's vision form)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if part.get("type") == "text")


def message_list_problem(value: Any) -> str | None:
    """Why `value` is not a list of {"role": str, "content": str or content parts} messages, or None when it is
    one."""
    if not isinstance(value, list):
        return f"expected a list of messages, got {_type_name(value)}"
    for number, message in enumerate(value, start=1):
        if not isinstance(message, dict):
            return f"message {number}: expected a {{'role', 'content'}} object, got {_type_name(message)}"
        for key in ("role", "content"):
            if message.get(key) is None:
                return f"message {number}: missing '{key}'"
            if key == "content" and isinstance(message[key], list):
                problem = _content_problem(message[key])
                if problem:
                    return f"message {number}: {problem}"
            elif not isinstance(message[key], str):
                return f"message {number}: '{key}' must be a string, got {_type_name(message[key])}"
    return None


def _without_nulls(message: dict) -> dict:
    """Arrow gives every message (and content part) the union of keys seen in the column; keep the ones it has."""
    out = {k: v for k, v in message.items() if v is not None}
    if isinstance(out.get("content"), list):
        out["content"] = [{k: v for k, v in part.items() if v is not None} for part in out["content"]]
    return out


def check_messages(value: Any, field: str, response: bool) -> list[dict]:
    """`value` as prompt or response messages (a response ends with a non-empty assistant turn); raises RowIssue."""
    if value is None:
        raise RowIssue("missing", field, "missing")
    problem = message_list_problem(value)
    if problem is not None:
        kind = "wrong_type" if not isinstance(value, list) else "malformed_messages"
        raise RowIssue(kind, field, problem)
    messages = [_without_nulls(m) for m in value]
    for number, message in enumerate(messages, start=1):
        if message["role"] not in ROLES:
            raise RowIssue("malformed_messages", field, f"message {number}: role {message['role']!r} is not one of "
                                                        f"{', '.join(ROLES)}{did_you_mean(message['role'], ROLES)}")
    if response:
        if not messages:
            raise RowIssue("empty", field, "no messages")
        if messages[-1]["role"] != "assistant":
            raise RowIssue("malformed_messages", field,
                           f"the last message must be an assistant turn, got '{messages[-1]['role']}'")
        if not content_text(messages[-1]["content"]).strip():
            raise RowIssue("empty", field, "empty response")
    return messages


def did_you_mean(name: str, known) -> str:
    """"; did you mean 'x'?" when `name` is close to one of `known`, else ""."""
    close = difflib.get_close_matches(name.lower(), list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _shared_text_prompt(chosen: str, rejected: str) -> int:
    """Length of the implicit prompt: the common prefix of chosen and rejected, cut back to a word boundary so
    neither response starts mid-word, and with the separating space left to the responses."""
    limit = min(len(chosen), len(rejected))
    n = 0
    while n < limit and chosen[n] == rejected[n]:
        n += 1

    def word_ends_at(text: str, i: int) -> bool:
        return i == len(text) or text[i].isspace()

    while n > 0 and not chosen[n - 1].isspace() and not (word_ends_at(chosen, n) and word_ends_at(rejected, n)):
        n -= 1
    if n > 0 and chosen[n - 1] == " ":
        n -= 1
    return n


def split_row(row: dict[str, Any], fmt: str) -> RowParts:
    """Check one row of format `fmt` and split it into prompt and completions; raises RowIssue."""
    conversational = fmt.startswith("conversational")
    check = check_messages if conversational else check_text
    if fmt in UNPAIRED_FORMATS:
        prompt = check(row.get("prompt"), "prompt", response=False)
        completion = check(row.get("completion"), "completion", response=True)
        label = row.get("label")
        if label is None:
            raise RowIssue("missing", "label", "missing")
        if not isinstance(label, bool):
            raise RowIssue("wrong_type", "label", f"expected a bool, got {_type_name(label)}")
        return RowParts(prompt, {"completion": completion}, label)
    if not fmt.endswith("_implicit"):
        prompt = check(row.get("prompt"), "prompt", response=False)
        completions = {name: check(row.get(name), name, response=True) for name in ("chosen", "rejected")}
        return RowParts(prompt, completions)
    chosen = check(row.get("chosen"), "chosen", response=conversational)
    rejected = check(row.get("rejected"), "rejected", response=conversational)
    if conversational:
        if chosen[:-1] != rejected[:-1]:
            raise RowIssue("prompt_mismatch", "rejected",
                           "its messages before the last differ from those of 'chosen' (no shared prompt)")
        return RowParts(chosen[:-1], {"chosen": chosen[-1:], "rejected": rejected[-1:]})
    n = _shared_text_prompt(chosen, rejected)
    completions = {"chosen": chosen[n:], "rejected": rejected[n:]}
    for name, text in completions.items():
        if not text.strip():
            raise RowIssue("empty", name, "empty response (nothing after the prompt it shares with the other)")
    return RowParts(chosen[:n], completions)
