"""SRPO's revision prompt, and the six sequences of each training pair.

    template = load_template(None)                                  # DEFAULT_TEMPLATE (or a file, or a string)
    ids = revision_prompt_ids(tokenizer, prompt, previous, template)  # (x, c) -> the revision prompt's token ids
    data = add_revision_rows(data, records, tokenizer, template=None, max_length=1024, max_prompt_length=512)

The template: text with the two fields {prompt} and {previous} (literal braces doubled, `{{` and `}}`):

    DEFAULT_TEMPLATE = "{prompt}\\n\\nPrevious answer:\\n{previous}\\n\\nImproved answer:\\n"

- Plain-text prompts (the standard formats; prompt strings): the filled template is the revision prompt, tokenized
  as tokenize.py tokenizes prompts (with the tokenizer's special tokens: its BOS).
- Conversational prompts (message lists), through the tokenizer's chat template: the earlier turns are kept, the
  last message's content is replaced by the template filled with that content and c, and the chat template renders
  the messages with the generation prompt (tokenized without special tokens: the template writes them).
c is the previous answer's text: a completion string, or the content of a completion's messages.

Training rows (`add_revision_rows`): beside chosen and rejected (prompt + answer), each pair gets four rows
`<answer>_given_<context>`: the revision prompt with `context` (the pair's chosen or rejected) as the previous
answer, then `answer`'s tokens. The answer tokens are the ones of the row without context, so every row of an answer
holds the same tokens, cut shorter when the revision prompt leaves less room. The truncation policy is tokenize.py's,
applied to (revision prompt, answers): the revision prompt keeps its last max_prompt_length tokens (cut from the
left: the previous answer and the instruction nearest the response survive, the question goes first), then the
answers are cut to max_length; with truncation off, a revision row over a limit is a bad row. Answers cut to the
same tokens under one revision prompt leave that improvement term nothing to compare: `revision_report` counts them
as `TokenizedData.truncation_report` counts pairs.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from prefuse.algorithms.srpo import CONTEXT_PAIRS
from prefuse.engine.data import BadRow, DataError, TokenizedData, truncate
from prefuse.engine.data.collate import labeled_tokens
from prefuse.engine.data.errors import WHERE_COLUMN, SkippedRows
from prefuse.engine.data.formats import RowIssue, split_row
from prefuse.engine.core.sources import ROLE_PROMPT, ROLE_RESPONSE
from prefuse.engine.data.tokenize import render_chat_prompt, require_chat_template, tokenize_prompt_texts

DEFAULT_TEMPLATE = "{prompt}\n\nPrevious answer:\n{previous}\n\nImproved answer:\n"
FIELDS = ("prompt", "previous")
# role -> (answer, context): the row is the revision prompt holding `context` as the previous answer, then `answer`
CONTEXT_ROLES = {role: tuple(role.split("_given_")) for role in CONTEXT_PAIRS}
CONTEXTS = ("chosen", "rejected")

__all__ = ["DEFAULT_TEMPLATE", "CONTEXT_ROLES", "ROLE_PROMPT", "ROLE_RESPONSE", "load_template", "fill_template",
           "revision_prompt_text", "revision_prompt_ids", "previous_text", "add_revision_rows",
           "revision_unlearnable", "revision_report"]


def load_template(spec: str | None) -> str:
    """The revision template: None -> DEFAULT_TEMPLATE; the path of an existing file -> its text; else `spec` itself.
    ValueError `revision_template: ...` (one line) when a field is missing or unknown, or a brace is unmatched."""
    if spec is None:
        return DEFAULT_TEMPLATE
    where = "revision_template"
    if len(spec) < 4096 and "{" not in spec and Path(spec).expanduser().is_file():
        path = Path(spec).expanduser()
        text, where = path.read_text(encoding="utf-8"), f"revision_template: {path}"
    else:
        text = spec
        if "{" not in text:
            raise ValueError(f"revision_template: {spec!r} is neither a file nor a template with {{prompt}} and "
                             f"{{previous}} fields")
        where = "revision_template"
    try:
        fields = [(name, conversion, spec_) for _, name, spec_, conversion in string.Formatter().parse(text)
                  if name is not None]
    except ValueError as error:  # "Single '}' encountered", "unmatched '{'"
        raise ValueError(f"{where}: {error} (write a literal brace as {{{{ or }}}})") from None
    names = [name for name, _, _ in fields]
    unknown = sorted({n for n in names if n not in FIELDS})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {{{', '.join(unknown)}}}; a revision template has the fields "
                         f"{{prompt}} and {{previous}} (write a literal brace as {{{{ or }}}})")
    for name in FIELDS:
        if name not in names:
            raise ValueError(f"{where}: no {{{name}}} field; a revision template holds both {{prompt}} (the prompt) "
                             f"and {{previous}} (the previous answer)")
    if any(conversion or spec_ for _, conversion, spec_ in fields):
        raise ValueError(f"{where}: write the fields as plain {{prompt}} and {{previous}} (no conversion or format "
                         f"spec)")
    return text


def fill_template(template: str, prompt: str, previous: str) -> str:
    return template.format(prompt=prompt, previous=previous)


def previous_text(completion: Any) -> str:
    """A previous answer as the template holds it: a string as it is; a completion's messages as their contents
    joined by newlines (one assistant message: its content)."""
    if isinstance(completion, str):
        return completion
    return "\n".join(message["content"] for message in completion)


def revision_prompt_text(tokenizer, prompt: Any, previous: str, template: str = DEFAULT_TEMPLATE) -> tuple[str, bool]:
    """(the revision prompt's text, whether to tokenize it with the tokenizer's special tokens): plain text for a
    prompt string, the chat template's rendering for a message list (module docstring). Raises RowIssue
    (chat_template, field 'prompt') when the chat template rejects the messages."""
    if isinstance(prompt, str):
        return fill_template(template, prompt, previous), True
    require_chat_template(tokenizer)
    if not prompt:
        raise RowIssue("empty", "prompt", "no messages")
    last = prompt[-1]
    messages = list(prompt[:-1]) + [{**last, "content": fill_template(template, last["content"], previous)}]
    return render_chat_prompt(tokenizer, messages), False


def revision_prompt_ids(tokenizer, prompt: Any, previous: str, template: str = DEFAULT_TEMPLATE) -> list[int]:
    """The revision prompt's token ids for (prompt x, previous answer c)."""
    text, special = revision_prompt_text(tokenizer, prompt, previous, template)
    return tokenize_prompt_texts(tokenizer, [text], special)[0]


def add_revision_rows(data: TokenizedData, records, tokenizer, *, template: str | None = None,
                      max_length: int | None = None, max_prompt_length: int | None = None, truncation: bool = True,
                      skip_bad_rows: bool = False, source: str = "dataset") -> TokenizedData:
    """`data` (tokenized pairs of `records`, by tokenize_preferences) with each example's revision rows added:
    `chosen_context_ids` / `rejected_context_ids` (the revision prompts holding that answer as the previous one) and
    `<answer>_given_<context>_ids` (the answer's tokens after that prompt), cut by the module's policy. A row the
    chat template rejects, or over a limit with truncation off, is a bad row: BadRow, or skipped and tallied with
    skip_bad_rows."""
    template = load_template(template)
    if not data.examples:
        return data
    rows = {(row.get(WHERE_COLUMN) or f"{source}:{index + 1}"): row for index, row in enumerate(records)}
    conversational = data.format.startswith("conversational")
    skipped = SkippedRows(data.skipped.count, data.skipped.by_kind.copy(), list(data.skipped.messages))
    texts, kept = [], []
    for example in data.examples:
        try:
            parts = split_row(rows[example["where"]], data.format)
            texts += [revision_prompt_text(tokenizer, parts.prompt, previous_text(parts.completions[c]), template)[0]
                      for c in CONTEXTS]
            kept.append(example)
        except RowIssue as issue:
            if not skip_bad_rows:
                raise BadRow(example["where"], issue.problem) from None
            skipped.add(example["where"], issue.problem)
    ids = tokenize_prompt_texts(tokenizer, texts, special_tokens=not conversational)
    examples = []
    for number, example in enumerate(kept):
        rows_of = dict(example)
        try:
            for k, context in enumerate(CONTEXTS):
                prompt_ids, (chosen, rejected) = truncate(ids[2 * number + k], [example["chosen_ids"],
                                                          example["rejected_ids"]], [f"chosen_given_{context}",
                                                          f"rejected_given_{context}"], max_length,
                                                          max_prompt_length, truncation)
                rows_of[f"{context}_context_ids"] = prompt_ids
                rows_of[f"chosen_given_{context}_ids"], rows_of[f"rejected_given_{context}_ids"] = chosen, rejected
        except RowIssue as issue:
            if not skip_bad_rows:
                raise BadRow(example["where"], issue.problem) from None
            skipped.add(example["where"], issue.problem)
            continue
        examples.append(rows_of)
    if not examples:
        raise DataError(f"{source}: no pair is left with its revision rows (all {len(data)} are bad, the first: "
                        f"{skipped.messages[-1] if skipped.messages else '?'})")
    return TokenizedData(data.format, examples, skipped, data.max_length, data.max_prompt_length)


def _context_state(example: dict, context: str) -> str | None:
    """'empty' when a revision row of `context` has no labeled token, 'identical' when its two answers are the same
    tokens, else None."""
    prompt = len(example[f"{context}_context_ids"])
    answers = [example[f"{answer}_given_{context}_ids"] for answer in CONTEXTS]
    if any(labeled_tokens(prompt, len(a)) == 0 for a in answers):
        return "empty"
    return "identical" if answers[0] == answers[1] else None


def revision_unlearnable(data: TokenizedData) -> tuple[int, int]:
    """(identical, empty): pairs whose answers under some revision prompt are the same tokens (and none is empty),
    and pairs with a revision row left without a labeled token. Counted from the examples, so subsets count right."""
    identical = empty = 0
    for example in data.examples:
        states = {_context_state(example, c) for c in CONTEXTS}
        empty += "empty" in states
        identical += "identical" in states and "empty" not in states
    return identical, empty


def revision_report(data: TokenizedData) -> str:
    """One line, e.g. `revision rows: 3 of 16 pairs have no response tokens to compare under a revision prompt after
    truncation (max_length 48, max_prompt_length 24): 3 with chosen and rejected token-identical, 0 with an empty
    response`."""
    identical, empty = revision_unlearnable(data)
    line = (f"revision rows: {identical + empty} of {len(data)} pairs have no response tokens to compare under a "
            f"revision prompt")
    limits = [f"{name} {value}" for name, value in (("max_length", data.max_length),
                                                    ("max_prompt_length", data.max_prompt_length))
              if value is not None]
    if limits:
        line += f" after truncation ({', '.join(limits)})"
    return line + f": {identical} with chosen and rejected token-identical, {empty} with an empty response"
