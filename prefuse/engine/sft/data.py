"""Supervised fine-tuning data: TRL's three SFT formats, tokenized as TRL 1.16's SFTTrainer tokenizes them, so that
the same token ids are trained.

    records = load_records("sft.jsonl")
    data = tokenize_sft(records, tokenizer, source="sft.jsonl", max_length=1024)
    data.examples[i]   # {"input_ids": [...], "labels": [...] (-100 where no loss), "where": "sft.jsonl:3"}

Formats (the file's columns decide, one format per file):
    language_modeling   `text`: a string. The EOS token's text is appended unless the text ends with it; tokenized
                        with the tokenizer's special tokens (BOS where the tokenizer adds one). Every token trained.
    prompt_completion   `prompt`, `completion`: two strings (the completion's EOS appended as above; the pair
                        tokenized as prompt + completion), or two message lists (the chat template over prompt +
                        completion; the prompt alone with the generation prompt). The completion starts where the
                        tokenized prompt and the whole stop agreeing. completion_only_loss (default True): only
                        the completion's tokens are trained.
    conversational      `messages`: a message list through the chat template. Every token trained, or with
                        assistant_only_loss only the assistant turns' tokens: the template must mark them with
                        `{% generation %}` ... `{% endgeneration %}` (transformers' return_assistant_tokens_mask).

Conversational rows use the chat template as transformers' `apply_chat_template(..., tokenize=True)` does (its
special tokens as the template writes them, none added). Then sequences longer than max_length are cut
(truncation_mode keep_start or keep_end) and a sequence left with no trained token is dropped (counted in
`dropped`). A bad row is one line, `<file>:<row>: field '<name>': <what> (<fix>)`, or skipped and tallied with
skip_bad_rows.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from prefuse.engine.data.collate import IGNORE_INDEX
from prefuse.engine.data.errors import WHERE_COLUMN, BadRow, DataError, RowProblem, SkippedRows
from prefuse.engine.data.formats import RowIssue, check_messages, check_text

SFT_FORMATS = ("language_modeling", "prompt_completion", "conversational")
TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class SFTData:
    """Tokenized SFT examples ({"input_ids", "labels", "where"}), the format, the bad rows skipped and the
    sequences dropped for having no trained token left after truncation."""

    format: str
    examples: list[dict]
    skipped: SkippedRows = field(default_factory=SkippedRows)
    dropped: int = 0
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def trained_tokens(self) -> int:
        """Labels that are trained, in the model's shifted layout (a sequence's first token is never predicted)."""
        return sum(sum(1 for label in e["labels"][1:] if label != IGNORE_INDEX) for e in self.examples)


def sft_format(column_names, source: str) -> str:
    """The SFT format of a file with these columns; DataError naming the columns each format needs."""
    names = set(column_names) - {WHERE_COLUMN}
    if "messages" in names:
        return "conversational"
    if {"prompt", "completion"} <= names:
        return "prompt_completion"
    if "text" in names:
        return "language_modeling"
    if {"prompt", "chosen", "rejected"} <= names:
        hint = "; a preference file: train it with `prefuse train`, or give its chosen side as `completion`"
    else:
        hint = ""
    raise DataError(f"{source}: no SFT columns: expected `text` (language modeling), `prompt` and `completion`, or "
                    f"`messages`; the file has {sorted(names)}{hint}")


GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template) -> bool:
    """The chat template (a string, or a dict of named ones: the default) marks assistant turns for transformers'
    return_assistant_tokens_mask."""
    if isinstance(template, dict):
        template = template.get("default")
    return isinstance(template, str) and bool(GENERATION_MARKER.search(template))


def _is_messages(value) -> bool:
    return isinstance(value, list)


def _template_tokens(tokenizer, messages: list[dict], field_name: str, **options) -> dict:
    """apply_chat_template(..., tokenize=True, return_dict=True) as TRL calls it; RowIssue when the template
    refuses the conversation."""
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **options)
    except Exception as error:  # templates signal bad conversations with any exception (raise_exception)
        raise RowIssue("chat_template", field_name, f"chat template: {error}") from error
    return {k: list(v) for k, v in out.items()}


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


class SFTTokenizer:
    """One row -> (input_ids, labels) as TRL's SFTTrainer builds them (module docstring)."""

    def __init__(self, tokenizer, fmt: str, *, completion_only_loss: bool, assistant_only_loss: bool):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.completion_only_loss, self.assistant_only_loss = completion_only_loss, assistant_only_loss
        self.conversational: bool | None = None  # prompt-completion: decided by the first row, as TRL does

    def needs_template(self) -> None:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError("conversational SFT data needs a tokenizer with a chat template (its tokenizer_config.json "
                            "has none): give text or prompt/completion strings, or a model with a chat template")

    def row(self, row: dict) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of one row; raises RowIssue."""
        eos = self.tokenizer.eos_token
        if self.fmt == "language_modeling":
            text = check_text(row.get("text"), "text", response=True)
            ids = list(self.tokenizer(text=_with_eos(text, eos))["input_ids"])
            return ids, list(ids)
        if self.fmt == "conversational":
            self.needs_template()
            messages = check_messages(row.get("messages"), "messages", response=False)
            if not messages:
                raise RowIssue("empty", "messages", "no messages")
            out = _template_tokens(self.tokenizer, messages, "messages",
                                   **({"return_assistant_tokens_mask": True} if self.assistant_only_loss else {}))
            return out["input_ids"], self._labels(out["input_ids"], out.get("assistant_masks"), None, "messages")
        # prompt-completion
        if self.conversational is None:
            self.conversational = _is_messages(row.get("prompt"))
        if self.conversational:
            self.needs_template()
            if not _is_messages(row.get("prompt")):
                raise RowIssue("wrong_type", "prompt", "expected a list of messages as in the file's first row "
                                                       "(one file holds one kind of prompt)")
            prompt = check_messages(row.get("prompt"), "prompt", response=False)
            completion = check_messages(row.get("completion"), "completion", response=True)
            prompt_ids = _template_tokens(self.tokenizer, prompt, "prompt", add_generation_prompt=True)["input_ids"]
            out = _template_tokens(self.tokenizer, prompt + completion, "completion",
                                   **({"return_assistant_tokens_mask": True} if self.assistant_only_loss else {}))
            ids, assistant = out["input_ids"], out.get("assistant_masks")
        else:
            if _is_messages(row.get("prompt")):
                raise RowIssue("wrong_type", "prompt", "expected a string as in the file's first row (one file holds "
                                                       "one kind of prompt)")
            prompt = check_text(row.get("prompt"), "prompt", response=False)
            completion = check_text(row.get("completion"), "completion", response=True)
            prompt_ids = list(self.tokenizer(text=prompt)["input_ids"])
            ids = list(self.tokenizer(text=prompt + _with_eos(completion, eos))["input_ids"])
            assistant = None
        start = _common_prefix(prompt_ids, ids)
        if start == len(ids):
            raise RowIssue("empty", "completion", "the completion adds no tokens to the prompt")
        completion_mask = [0] * start + [1] * (len(ids) - start)
        return ids, self._labels(ids, assistant, completion_mask if self.completion_only_loss else None, "completion")

    def _labels(self, ids: list[int], assistant: list[int] | None, completion_mask: list[int] | None,
                field_name: str) -> list[int]:
        if self.assistant_only_loss and (assistant is None or 1 not in assistant):
            raise RowIssue("chat_template", field_name,
                           "assistant_only_loss: the chat template marks no assistant tokens (it needs "
                           "{% generation %} ... {% endgeneration %} around the assistant turns); give a template "
                           "with them, or drop --assistant_only_loss")
        masks = [m for m in (assistant, completion_mask) if m is not None]
        return [token if all(m[i] for m in masks) else IGNORE_INDEX for i, token in enumerate(ids)]


def tokenize_sft(records, tokenizer, *, source: str, max_length: int | None = 1024,
                 truncation_mode: str = "keep_start", completion_only_loss: bool | None = None,
                 assistant_only_loss: bool = False, skip_bad_rows: bool = False) -> SFTData:
    """The rows of `records` (engine/data/loading.py: load_records) as SFT examples (module docstring).
    completion_only_loss None: True for prompt-completion data (TRL's default); it is refused for the other
    formats, as TRL refuses it."""
    fmt = sft_format(records.column_names, source)
    if completion_only_loss and fmt != "prompt_completion":
        raise DataError(f"completion_only_loss: {source} is {fmt} data, which has no completion to restrict the loss "
                        f"to; drop --completion_only_loss (or give prompt/completion columns)")
    if tokenizer.eos_token is None and fmt != "conversational":
        raise DataError(f"model_name_or_path: the tokenizer has no EOS token, which SFT appends to each {fmt} text; "
                        f"set eos_token in its tokenizer_config.json")
    if assistant_only_loss and not has_generation_markers(getattr(tokenizer, "chat_template", None)):
        raise DataError("assistant_only_loss: the tokenizer's chat template has no {% generation %} ... "
                        "{% endgeneration %} markers around the assistant turns, so its assistant tokens cannot be "
                        "told apart; give a template with them (--chat_template_path FILE.jinja), or drop "
                        "--assistant_only_loss")
    rows = SFTTokenizer(tokenizer, fmt, completion_only_loss=fmt == "prompt_completion" and completion_only_loss
                        is not False, assistant_only_loss=assistant_only_loss)
    data = SFTData(fmt, [])
    for number, row in enumerate(records):
        where = row.get(WHERE_COLUMN) or f"{source}:{number + 1}"
        try:
            ids, labels = rows.row(row)
        except RowIssue as issue:
            if not skip_bad_rows:
                raise BadRow(where, issue.problem) from None
            data.skipped.add(where, issue.problem)
            continue
        if max_length is not None and len(ids) > max_length:
            cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
            ids, labels = ids[cut], labels[cut]
            data.truncated += 1
        if max_length is not None and all(label == IGNORE_INDEX for label in labels):  # cut to nothing to learn
            data.dropped += 1
            continue
        data.examples.append({"input_ids": ids, "labels": labels, "where": where})
    return data


def check_sft_rows_left(data: SFTData, source: str, max_length: int | None) -> None:
    """DataError when no example is left to train on."""
    if len(data) == 0:
        why = (f"; {data.dropped} had no trained token left within max_length={max_length}: raise --max_length"
               if data.dropped else "")
        raise DataError(f"dataset_name: {source} leaves no training examples{why}")


__all__ = [
    "SFT_FORMATS",
    "TRUNCATION_MODES",
    "RowProblem",
    "SFTData",
    "SFTTokenizer",
    "check_sft_rows_left",
    "sft_format",
    "tokenize_sft",
]
