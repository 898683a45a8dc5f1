"""Prompts for online training (generate -> judge -> update): file -> prompt token ids, plus what a reward function
sees of each prompt.

| format                       | columns | values                                                  |
|------------------------------|---------|---------------------------------------------------------|
| `prompt_only`                | prompt  | strings                                                 |
| `conversational_prompt_only` | prompt  | lists of {"role", "content"} messages                   |
| any format of formats.py     |         | its prompts (an implicit one's shared prefix); its      |
|                              |         | responses are not read                                  |

Every other column is carried per example (`columns`, TRL style: reward functions receive them as keyword
columns), but for chosen/rejected/completion/label. Prompts are tokenized as tokenize.py tokenizes them (plain text
with the tokenizer's special tokens; messages through the chat template with the generation prompt) and cut to
`max_prompt_length` from the left, by its policy. A bad prompt raises `<file>:<row>: field 'prompt': <what>`, or
is skipped and tallied with `skip_bad_rows=True`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from prefuse.engine.data.errors import BadRow, DataError, RowProblem, SkippedRows
from prefuse.engine.data.formats import (
    PAIRED_FORMATS,
    PROMPT_ONLY_FORMATS,
    UNPAIRED_FORMATS,
    RowIssue,
    _column_kind,
    check_messages,
    check_text,
    detect_format,
    split_row,
)
from prefuse.engine.data.images import ImageRows
from prefuse.engine.data.loading import PROBLEM_COLUMN, WHERE_COLUMN, load_records, row_problem
from prefuse.engine.data.tokenize import render_chat_prompt, require_chat_template, tokenize_prompt_texts, truncate

# the columns an example's `columns` leaves out: the prompt itself, the responses and the loader's own
NOT_CARRIED = ("prompt", "chosen", "rejected", "completion", "label", WHERE_COLUMN, PROBLEM_COLUMN)
NO_PROMPT_COLUMN = "no 'prompt' column: online training reads prompts (TRL's prompt-only format: {\"prompt\": ...})"


@dataclass
class PromptData:
    """examples: per prompt `prompt_ids` (list of int), `prompt` (the text, or the messages, a reward function
    sees), `columns` (the row's other columns) and `where` (`<file>:<row>`); skipped: the rows left out;
    max_prompt_length: the limit the prompts were cut to (None: not cut)."""

    format: str
    examples: list[dict[str, Any]]
    skipped: SkippedRows = field(default_factory=SkippedRows)
    max_prompt_length: int | None = None

    def __len__(self) -> int:
        return len(self.examples)


def load_prompts(path: str | Path, tokenizer, *, split: str = "train", max_prompt_length: int | None = None,
                 skip_bad_rows: bool = False, cache_dir: str | None = None, processor=None) -> PromptData:
    """load_records -> tokenize_prompts, in one call; DataError `<file>: no prompts ...` when no prompt is left."""
    records = load_records(path, split=split, cache_dir=cache_dir)
    if len(records) == 0:
        raise DataError(f"{path}: no prompts to train on (no rows)")
    data = tokenize_prompts(records, tokenizer, max_prompt_length=max_prompt_length, skip_bad_rows=skip_bad_rows,
                            source=str(path), processor=processor)
    if not data.examples:
        raise DataError(f"{path}: no prompts to train on (all {data.skipped.count} rows are bad, the first: "
                        f"{data.skipped.messages[0]})")
    return data


def detect_prompt_format(dataset: datasets.Dataset, source: str = "dataset") -> str:
    """`prompt_only` or `conversational_prompt_only` from the `prompt` column's type; a paired or unpaired table
    keeps its own format (detect_format's). Raises DataError `<source>: no 'prompt' column: ...` when there is no
    prompt to read."""
    names = set(dataset.column_names)
    if {"chosen", "rejected"} <= names or {"prompt", "completion", "label"} <= names:
        return detect_format(dataset)
    if "prompt" not in names:
        raise DataError(f"{source}: {NO_PROMPT_COLUMN}")
    feature = dataset.features["prompt"]
    kind = _column_kind(feature)
    if kind == "other":
        raise DataError(f"{source}: column 'prompt' holds {feature}, expected strings or lists of "
                        "{'role', 'content'} messages")
    if kind == "null":
        raise DataError(f"{source}: column 'prompt' holds no values")
    return "conversational_prompt_only" if kind == "messages" else "prompt_only"


def tokenize_prompts(dataset: datasets.Dataset, tokenizer, *, max_prompt_length: int | None = None,
                     skip_bad_rows: bool = False, fmt: str | None = None, source: str = "dataset",
                     processor=None) -> PromptData:
    """The prompt of every row of `dataset` (format detected unless `fmt` is given), tokenized and cut.
    processor: a vision-language model's, for rows with `images` (data/images.py): their prompts are tokenized by
    it with their images, and each example carries `images` (an ExampleImages; `vision_inputs` gives its pixels).

    A bad prompt raises BadRow `<file>:<row>: field 'prompt': <what>` for the first one in the data's order; with
    `skip_bad_rows=True` bad rows are left out and tallied in `.skipped`. `source` names rows of a dataset that
    did not come from `load_records` (`<source>:<1-based row>`)."""
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    fmt = fmt or detect_prompt_format(dataset, source)
    conversational = fmt.startswith("conversational")
    template = processor if processor is not None else tokenizer  # a processor's chat template writes images
    if conversational:
        require_chat_template(template)
    images = ImageRows.of(dataset, processor, source)  # None without an `images` column
    dataset = images.prepare(dataset) if images else dataset
    carried = [c for c in dataset.column_names if c not in NOT_CARRIED]
    skipped = SkippedRows()
    kept, texts, expanded = [], [], []
    for index, row in enumerate(dataset):
        where = row.get(WHERE_COLUMN) or f"{source}:{index + 1}"
        try:
            prompt = read_prompt(row, fmt)
            text = render_chat_prompt(template, prompt) if conversational else prompt
            if images:
                row_images = images.read(row, where)
                expanded.append(images.prompt_ids(text, row_images, special_tokens=not conversational))
                if expanded[-1] is not None:  # the cut below may take text, never an image's tokens
                    images.check_cut(expanded[-1], truncate(expanded[-1], [], [], None, max_prompt_length, True)[0])
        except RowIssue as issue:
            if not skip_bad_rows:
                raise BadRow(where, issue.problem) from None
            skipped.add(where, issue.problem)
            continue
        texts.append(text)
        kept.append({"prompt": prompt, "columns": {c: row[c] for c in carried}, "where": where,
                     **({"images": row_images} if images else {})})
    examples = []
    text_ids = tokenize_prompt_texts(tokenizer, texts, special_tokens=not conversational)
    for number, (ids, example) in enumerate(zip(text_ids, kept)):
        ids = (expanded[number] or ids) if images else ids  # a prompt with images: the processor's ids
        prompt_ids = truncate(ids, [], [], None, max_prompt_length, True)[0]
        examples.append({"prompt_ids": prompt_ids, **example})
    return PromptData(fmt, examples, skipped, max_prompt_length)


def read_prompt(row: dict[str, Any], fmt: str) -> Any:
    """The row's prompt, checked and not empty: the text, or the messages. Only what the prompt comes from is read:
    the `prompt` column, or in the implicit formats `chosen` and `rejected`, whose shared start it is. Raises
    RowIssue."""
    problem = row_problem(row)
    implicit = fmt.endswith("_implicit")
    if problem is not None and problem.field in (None, "prompt", *(("chosen", "rejected") if implicit else ())):
        raise RowIssue(problem.kind, problem.field, problem.detail)
    conversational = fmt.startswith("conversational")
    if implicit:
        prompt = split_row(row, fmt).prompt
        shared = "'chosen' and 'rejected' share no " + ("messages before their last" if conversational else
                                                        "text before their responses")
    elif fmt in PAIRED_FORMATS + UNPAIRED_FORMATS + PROMPT_ONLY_FORMATS:
        check = check_messages if conversational else check_text
        prompt, shared = check(row.get("prompt"), "prompt", response=False), ""
    else:
        raise ValueError(f"unknown format {fmt!r}")
    if not (prompt if conversational else prompt.strip()):
        detail = "no messages" if conversational else "empty prompt"
        raise RowIssue("empty", "prompt", f"{detail} ({shared})" if shared else detail)
    return prompt


def answer_text(value: Any, where: str, column: str, empty_ok: bool = False) -> str:
    """A column's answer: a string (non-empty unless empty_ok), or the content of the last message of a message
    list; else BadRow."""
    if isinstance(value, str) and (empty_ok or value.strip()):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]  # messages: the last one's (an assistant's answer)
    raise BadRow(where, RowProblem("missing" if value is None else "wrong_type" if not isinstance(value, str)
                                   else "empty", column, "expected an answer (a string, or messages ending with one)"))


def read_prompt_table(path: str | Path, answer_column: str | None = None, answer_flag: str = "answer column",
                      empty_answers: bool = False) -> tuple[list, list[str] | None, dict]:
    """(prompts: strings or message lists, the answers of `answer_column` or None, the other columns as lists) of
    a prompt file or a preference file, before any tokenizer: what `prefuse generate` and `prefuse eval` judge
    against (empty_answers: an empty answer counts, as a model's may be empty). A bad row is one line,
    `<file>:<row>: field '<name>': <what>`; answer_flag names the setting that chose the column in the
    missing-column error."""
    records = load_records(path)
    if len(records) == 0:
        raise DataError(f"{path}: no prompts (no rows)")
    fmt = detect_prompt_format(records, str(path))
    if answer_column is not None and answer_column not in records.column_names:
        have = sorted(c for c in records.column_names if c not in (WHERE_COLUMN, PROBLEM_COLUMN))
        raise DataError(f"{path}: column {answer_column!r} ({answer_flag}) is missing; it has {have}")
    carried = [c for c in records.column_names if c not in NOT_CARRIED and c != answer_column]
    prompts, answers, columns = [], [], {c: [] for c in carried}
    for index, row in enumerate(records):
        where = row.get(WHERE_COLUMN) or f"{path}:{index + 1}"
        try:
            prompts.append(read_prompt(row, fmt))
        except RowIssue as issue:
            raise BadRow(where, issue.problem) from None
        if answer_column is not None:
            answers.append(answer_text(row.get(answer_column), where, answer_column, empty_answers))
        for c in carried:
            columns[c].append(row[c])
    return prompts, (answers if answer_column is not None else None), columns
