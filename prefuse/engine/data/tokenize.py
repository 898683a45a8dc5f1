"""Rows -> token ids: prompt ids and completion ids per example, truncated by a fixed policy.

Text of the standard formats: the prompt is tokenized with the tokenizer's own special tokens (e.g. its BOS), each
completion without them, and the tokenizer's EOS ends every completion (appended unless it is already there).
Conversational formats go through the chat template, as TRL's DPOTrainer does: the prompt messages are rendered with
`add_generation_prompt=True`, prompt + completion without it, both tokenized without special tokens (the template
writes them); the completion is the tokens after the longest prefix the two share, and ends as the template ends an
assistant turn (ChatML: `<|im_end|>` and a newline), nothing appended.

Truncation policy, in this order:
1. `max_prompt_length`: the prompt keeps its last `max_prompt_length` tokens (cut from the left: the text nearest
   the response survives; a leading BOS is cut with the rest).
2. `max_length` (prompt + completion): a prompt that leaves no room for one completion token is cut from the left
   to `max_length - 1` tokens; then each completion keeps its first `max_length - len(prompt)` tokens (cut from the
   right; a response cut short loses its EOS, since it did not end there). Chosen and rejected share the prompt,
   and so does a `reference_response`, tokenized and cut as they are.
With `truncation=False` nothing is cut: a row over either limit is a bad row (kind `too_long`).

A tight `max_length` leaves each response its first few tokens, and chosen and rejected often begin alike: such a
pair is token-identical and teaches nothing (margin 0 whatever the weights). `TokenizedData` counts these and the
responses left without a labeled token (`empty`, `identical`, `truncation_report()`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import json

import datasets

from prefuse.engine.data.collate import labeled_tokens
from prefuse.engine.data.columns import (REFERENCE_COLUMN, RESPONSE_COLUMNS, carried_columns, check_required,
                                         read_numbers, read_reference)
from prefuse.engine.data.errors import BadRow, DataError, RowProblem, SkippedRows
from prefuse.engine.data.formats import UNPAIRED_FORMATS, RowIssue, RowParts, detect_format, split_row
from prefuse.engine.data.images import ImageRows
from prefuse.engine.data.errors import WHERE_COLUMN
from prefuse.engine.data.loading import row_problem


@dataclass
class TokenizedData:
    """examples: per example `prompt_ids` and `chosen_ids` / `rejected_ids` (paired formats) or `completion_ids`
    and `label` (unpaired), lists of ints, the carried extra columns (`columns.py`: `reference_ids`,
    `score_chosen`, `reward`, ...), and `where` (`<file>:<row>`); skipped: the rows left out; max_length /
    max_prompt_length: the limits the examples were cut to (None: not cut), for `truncation_report`."""

    format: str
    examples: list[dict[str, Any]]
    skipped: SkippedRows = field(default_factory=SkippedRows)
    max_length: int | None = None
    max_prompt_length: int | None = None
    notes: list[str] = field(default_factory=list)  # one-line reports of the file: prompts cut, duplicate rows

    def __len__(self) -> int:
        return len(self.examples)

    # Counted from the examples, not stored, so a subset built from `examples` counts right.
    @property
    def empty(self) -> int:
        """Examples with a response (chosen, rejected or completion) left without a labeled token."""
        keys = _response_keys(self.format)
        return sum(_has_empty_response(e, keys) for e in self.examples)

    @property
    def identical(self) -> int:
        """Pairs (not counted in `empty`) whose chosen and rejected ids are the same: their margin is 0 whatever
        the weights, so they give no gradient. Truncation makes them: responses cut to their first tokens often
        agree there."""
        if self.format in UNPAIRED_FORMATS:
            return 0
        keys = _response_keys(self.format)
        return sum(e["chosen_ids"] == e["rejected_ids"] and not _has_empty_response(e, keys) for e in self.examples)

    @property
    def unlearnable(self) -> int:
        """Examples with no response token left to learn from: `empty + identical`."""
        return self.empty + self.identical

    def truncation_report(self) -> str:
        """One line, e.g. `249 of 994 pairs have no response tokens left after truncation (max_length 4): 249 with
        chosen and rejected token-identical, 0 with an empty response`."""
        paired = self.format not in UNPAIRED_FORMATS
        line = f"{self.unlearnable} of {len(self)} {'pairs' if paired else 'examples'} have no response tokens left"
        limits = [f"{name} {value}" for name, value in (("max_length", self.max_length),
                                                        ("max_prompt_length", self.max_prompt_length))
                  if value is not None]
        if limits:
            line += f" after truncation ({', '.join(limits)})"
        if paired:
            line += f": {self.identical} with chosen and rejected token-identical, {self.empty} with an empty response"
        return line


def _response_keys(fmt: str) -> tuple[str, ...]:
    return ("completion_ids",) if fmt in UNPAIRED_FORMATS else ("chosen_ids", "rejected_ids")


def _has_empty_response(example: dict[str, Any], keys: tuple[str, ...]) -> bool:
    return any(labeled_tokens(len(example["prompt_ids"]), len(example[k])) == 0 for k in keys)


def check_response_tokens_left(data: TokenizedData, source: str) -> None:
    """Raise DataError when examples remain but none has a response token to learn from: training on them would
    run at a constant loss (log 2 for DPO) with a margin of 0, silently."""
    if data.examples and data.unlearnable == len(data):
        raise DataError(f"{source}: {data.truncation_report()}; nothing to learn from: raise --max_length or lower "
                        "--max_prompt_length")


def _ids_key(name: str) -> str:
    return "reference_ids" if name == REFERENCE_COLUMN else f"{name}_ids"


def _read_row(row: dict[str, Any], fmt: str, carried: list[str]) -> tuple[RowParts, dict[str, float]]:
    """split_row, plus the carried number columns; a reference response joins the completions, to be tokenized and
    truncated as they are (a generated rejected response too). Raises RowIssue."""
    parts = split_row(row, fmt)
    numbers = read_numbers(row, carried)
    for column in RESPONSE_COLUMNS:
        if column in carried:
            parts.completions[column] = read_reference(row, fmt, parts.prompt, column)
    return parts, numbers


def tokenize_preferences(dataset: datasets.Dataset, tokenizer, *, max_length: int | None = None,
                         max_prompt_length: int | None = None, truncation: bool = True, skip_bad_rows: bool = False,
                         fmt: str | None = None, source: str = "dataset", require: Iterable[str] = (),
                         require_hint: str = "", processor=None, duplicate_rows: str = "keep") -> TokenizedData:
    """Tokenize every row of `dataset` (format detected unless `fmt` is given) with a `transformers` tokenizer.
    processor: a vision-language model's; rows with an `images` column need it (data/images.py: their prompts are
    tokenized by it with their images, chat templates are its, examples carry `images`).

    A bad row raises BadRow (a DataError) with `<file>:<row>: field '<name>': <what>` for the first bad row in
    the data's order; with `skip_bad_rows=True` bad rows are left out and tallied in `.skipped`. `source` names
    rows of a dataset that did not come from `load_records` (`<source>:<1-based row>`). The extra columns of
    `columns.py` the dataset has are carried into every example; those in `require` must be there, else DataError
    `<source>: column 'x' is missing; <require_hint>`.

    Rows that repeat an earlier row's prompt and responses (and label) are kept (as TRL keeps them), dropped, or
    refused (DataError naming both rows) by `duplicate_rows` ("keep", "drop", "refuse"); `.notes` says how many,
    and how many prompts max_prompt_length cut, in one line each."""
    if duplicate_rows not in DUPLICATE_ROWS:
        raise ValueError(f"duplicate_rows: {duplicate_rows!r} is not one of {DUPLICATE_ROWS}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 (a prompt token and a response token), got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    fmt = fmt or detect_format(dataset)
    check_required(dataset.column_names, fmt, require, require_hint, source)
    carried = carried_columns(dataset.column_names, fmt)
    names = ["completion"] if fmt in UNPAIRED_FORMATS else ["chosen", "rejected"]
    names += [column for column in RESPONSE_COLUMNS if column in carried]
    images = ImageRows.of(dataset, processor, source)  # None without an `images` column
    dataset = images.prepare(dataset) if images else dataset
    bad: dict[int, tuple[str, RowProblem]] = {}
    wheres, parts, numbers, row_images = {}, {}, {}, {}
    for index, row in enumerate(dataset):
        wheres[index] = row.get(WHERE_COLUMN) or f"{source}:{index + 1}"
        problem = row_problem(row)
        if problem is None:
            try:
                read = _read_row(row, fmt, carried)
                if images:
                    row_images[index] = images.read(row, wheres[index])
                parts[index], numbers[index] = read
            except RowIssue as issue:
                problem = issue.problem
        if problem is not None:
            bad[index] = (wheres[index], problem)

    if fmt.startswith("conversational"):
        texts = _render_chat(tokenizer, parts, names, bad, wheres, template=processor)
        ids = _tokenize_chat(tokenizer, texts)
    else:
        texts = {i: (p.prompt, [p.completions[n] for n in names]) for i, p in parts.items()}
        ids = _tokenize_texts(tokenizer, texts, prompt_special_tokens=True)
    if images:  # the prompts again, by the processor with their images: placeholders become image tokens
        ids = images.tokenize(ids, texts, row_images, names, bad, wheres, not fmt.startswith("conversational"))

    examples, prompts_cut = [], 0
    for index, (prompt_ids, completion_ids) in ids.items():
        prompts_cut += truncation and max_prompt_length is not None and len(prompt_ids) > max_prompt_length
        try:
            kept_prompt, completion_ids = truncate(prompt_ids, completion_ids, names, max_length, max_prompt_length,
                                                   truncation)
            if images:
                images.check_cut(prompt_ids, kept_prompt)
            prompt_ids = kept_prompt
        except RowIssue as issue:
            bad[index] = (wheres[index], issue.problem)
            continue
        example = {"prompt_ids": prompt_ids, **{_ids_key(n): c for n, c in zip(names, completion_ids)}}
        if fmt in UNPAIRED_FORMATS:
            example["label"] = parts[index].label
        example.update(numbers[index])
        if images:
            example["images"] = row_images[index]
        example["where"] = wheres[index]
        examples.append((index, example))

    skipped = SkippedRows()
    for index in sorted(bad):
        if not skip_bad_rows:
            raise BadRow(*bad[index])
        skipped.add(*bad[index])
    examples.sort(key=lambda pair: pair[0])
    notes = []
    if prompts_cut:
        notes.append(f"{prompts_cut} of {len(examples)} prompts cut to {max_prompt_length} tokens "
                     f"(--max_prompt_length; their start is dropped, raise it to keep more)")
    if not images:  # rows with images: their images are not compared
        examples, note = _duplicates(examples, parts, fmt, duplicate_rows, source)
        notes += [note] if note else []
    limits = (max_length, max_prompt_length) if truncation else (None, None)
    return TokenizedData(fmt, [example for _, example in examples], skipped, *limits, notes=notes)


DUPLICATE_ROWS = ("keep", "drop", "refuse")


def _duplicates(examples: list[tuple[int, dict]], parts: dict[int, RowParts], fmt: str, policy: str,
                source: str) -> tuple[list[tuple[int, dict]], str | None]:
    """(the examples, less the duplicates under policy "drop"; the one-line count of rows that repeat an earlier
    row's prompt, responses and label, or None). Policy "refuse": DataError naming the first repeat and its twin."""
    first: dict[str, str] = {}
    repeats = []
    for index, example in examples:
        row = parts[index]
        key = json.dumps([row.prompt, row.completions, row.label], sort_keys=True, default=str)
        if key in first:
            repeats.append((index, example["where"], first[key]))
        else:
            first[key] = example["where"]
    if not repeats:
        return examples, None
    _, where, twin = repeats[0]
    rows = "pairs" if fmt not in UNPAIRED_FORMATS else "examples"
    count = (f"{len(repeats)} of {len(examples)} {rows} repeat an earlier row's prompt and responses (first "
             f"{where} = {twin})")
    if policy == "refuse":
        raise DataError(f"{where}: repeats {twin} (the same prompt and responses; {len(repeats)} such rows in "
                        f"{source}); remove them, or pass --duplicate_rows keep (train on them, as TRL does) or drop")
    if policy == "drop":
        dropped = {index for index, _, _ in repeats}
        return [pair for pair in examples if pair[0] not in dropped], f"{count}: dropped (--duplicate_rows drop)"
    return examples, f"{count}: kept, as TRL does (--duplicate_rows drop leaves them out, refuse stops)"


def _render_chat(tokenizer, parts: dict[int, RowParts], names: list[str], bad: dict, wheres: dict,
                 template=None) -> dict:
    """{index: (prompt text, [completion texts])} through the chat template (`template`'s: a processor's, else the
    tokenizer's); rows it rejects go to `bad`."""
    template = template if template is not None else tokenizer
    require_chat_template(template)
    texts = {}
    for index, row in parts.items():
        try:
            prompt_text = render_chat_prompt(template, row.prompt)
        except RowIssue as issue:
            bad[index] = (wheres[index], issue.problem)
            continue
        completions = []
        for name in names:
            try:
                full_text = _apply(template, row.prompt + row.completions[name], add_generation_prompt=False)
            except Exception as error:
                bad[index] = (wheres[index], RowProblem("chat_template", name, f"chat template: {error}"))
                break
            if not full_text.startswith(prompt_text):
                bad[index] = (wheres[index], RowProblem(
                    "chat_template", name, "the chat template does not render the prompt as a prefix of the "
                    "prompt followed by this response"))
                break
            completions.append(full_text[len(prompt_text):])
        else:
            texts[index] = (prompt_text, completions)
    return texts


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def require_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("conversational data needs a tokenizer with a chat template")


def render_chat_prompt(tokenizer, messages: list[dict]) -> str:
    """Prompt messages as the chat template writes them before a response (`add_generation_prompt=True`); raises
    RowIssue (chat_template, field 'prompt') when the template rejects them."""
    try:
        return _apply(tokenizer, messages, add_generation_prompt=True)
    except Exception as error:  # templates signal bad conversations with any exception (raise_exception)
        raise RowIssue("chat_template", "prompt", f"chat template: {error}") from error


def tokenize_prompt_texts(tokenizer, texts: list[str], special_tokens: bool) -> list[list[int]]:
    """Prompt texts -> ids, with the tokenizer's special tokens (its BOS) for plain text and without them for text
    the chat template rendered (the template writes them)."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=special_tokens)["input_ids"]]


def _tokenize_chat(tokenizer, texts: dict) -> dict:
    """{index: (prompt ids, [completion ids])} of rendered chats: prompt and prompt + completion tokenized whole
    (no special tokens: the template wrote them); the completions start after the longest prefix that the prompt's
    ids share with every prompt + completion (tokens may merge across the boundary; TRL's rule)."""
    indices = list(texts)
    if not indices:
        return {}
    prompts = tokenize_prompt_texts(tokenizer, [texts[i][0] for i in indices], special_tokens=False)
    width = len(texts[indices[0]][1])
    fulls = tokenizer([texts[i][0] + c for i in indices for c in texts[i][1]], add_special_tokens=False)["input_ids"]
    out = {}
    for k, index in enumerate(indices):
        prompt, full = prompts[k], [list(ids) for ids in fulls[k * width:(k + 1) * width]]
        shared = min(_common_prefix(prompt, ids) for ids in full)
        out[index] = (prompt[:shared], [ids[shared:] for ids in full])
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_texts(tokenizer, texts: dict, prompt_special_tokens: bool) -> dict:
    """{index: (prompt ids, [completion ids, each ending with EOS])}, tokenized in batches."""
    indices = list(texts)
    if not indices:
        return {}
    prompts = tokenize_prompt_texts(tokenizer, [texts[i][0] for i in indices], prompt_special_tokens)
    width = len(texts[indices[0]][1])
    flat = [text for i in indices for text in texts[i][1]]
    completions = tokenizer(flat, add_special_tokens=False)["input_ids"]
    eos_id = tokenizer.eos_token_id
    out = {}
    for k, index in enumerate(indices):
        pieces = []
        for ids in completions[k * width:(k + 1) * width]:
            ids = list(ids)
            if eos_id is not None and (not ids or ids[-1] != eos_id):
                ids.append(eos_id)
            pieces.append(ids)
        out[index] = (prompts[k], pieces)
    return out


def truncate(prompt_ids: list[int], completion_ids: list[list[int]], names: list[str], max_length: int | None,
             max_prompt_length: int | None, truncation: bool) -> tuple[list[int], list[list[int]]]:
    """Apply the module's truncation policy to one example; raises RowIssue (too_long) when truncation is off."""
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        if not truncation:
            raise RowIssue("too_long", "prompt", f"{len(prompt_ids)} tokens, over max_prompt_length="
                                                 f"{max_prompt_length}")
        prompt_ids = prompt_ids[-max_prompt_length:]
    if max_length is None:
        return prompt_ids, completion_ids
    if not truncation:
        for name, ids in zip(names, completion_ids):
            if len(prompt_ids) + len(ids) > max_length:
                raise RowIssue("too_long", name, f"{len(prompt_ids) + len(ids)} tokens with the prompt, over "
                                                 f"max_length={max_length}")
        return prompt_ids, completion_ids
    if len(prompt_ids) > max_length - 1:
        prompt_ids = prompt_ids[-(max_length - 1):]
    room = max_length - len(prompt_ids)
    return prompt_ids, [ids[:room] for ids in completion_ids]
