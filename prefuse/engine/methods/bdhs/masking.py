"""The prompt's side of BDHS: which positions the mask may hide (image tokens; the text analogue's prompt text),
the mask drawn per attempt, and generation with those key positions masked out of attention (prefuse.engine.methods.bdhs,
steps 3 and 4)."""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Sequence

import torch

from prefuse.engine.data.tokenize import render_chat_prompt, require_chat_template
from prefuse.engine.models.loading import eval_mode
from prefuse.engine.online.rollout import _seeded, left_padded

STOP_CHARACTERS = ".!?"


def draw_hidden(maskable: Sequence[int], rho_th: float, generator: torch.Generator) -> list[int]:
    """The positions of `maskable` hidden this attempt: rho_i ~ U(0, 1), kept iff rho_i >= rho_th."""
    if not maskable:
        return []
    rho = torch.rand(len(maskable), generator=generator)
    return [p for p, keep in zip(maskable, (rho >= rho_th).tolist()) if not keep]


def image_token_positions(prompt_ids: Sequence[int], image_token_id: int) -> list[int]:
    """The positions of a VLM prompt's image tokens (the processor expanded each `<image>` into them)."""
    return [i for i, t in enumerate(prompt_ids) if t == image_token_id]


def maskable_ids(tokenizer, prompt_ids: Sequence[int], image_token_id: int | None = None) -> list[int]:
    """The positions a prompt known only by its ids may hide: its image tokens when it has `image_token_id`'s;
    else (the text analogue, where the template cannot be told from the text) every non-special token."""
    if image_token_id is not None and image_token_id in prompt_ids:
        return image_token_positions(prompt_ids, image_token_id)
    special = set(tokenizer.all_special_ids)
    return [i for i, t in enumerate(prompt_ids) if t not in special]


def text_prompt(tokenizer, prompt: Any, span: str | None = None,
                max_prompt_length: int | None = None) -> tuple[list[int], list[int]]:
    """The text analogue's prompt: (prompt ids as training tokenizes them, maskable positions).

    Maskable: the tokens of the prompt's own text, not the template's: a plain prompt's text (its BOS is not), a
    conversation's message contents (the chat template's markup is not); with `span`, only the tokens overlapping
    the first occurrence of `span` in the rendered prompt (a context, a document: the part standing in for the
    image). Raises ValueError when `span` is not in the prompt. Ids cut to the last max_prompt_length tokens."""

    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("BDHS's text analogue needs a fast tokenizer (its offsets map tokens to the prompt's "
                         "text); load the model's tokenizer.json")
    if isinstance(prompt, str):
        text, special, ranges = prompt, True, [(0, len(prompt))]
    else:
        require_chat_template(tokenizer)
        text, special, ranges, cursor = render_chat_prompt(tokenizer, prompt), False, [], 0
        for message in prompt:
            content = message["content"]
            pieces = [content] if isinstance(content, str) else [part.get("text") or "" for part in content
                                                                 if part.get("type") == "text"]
            for piece in pieces:  # in the order the template writes them
                at = text.find(piece, cursor) if piece else -1
                if at >= 0:
                    ranges.append((at, at + len(piece)))
                    cursor = at + len(piece)
    if span is not None:
        at = text.find(span) if span else -1
        if at < 0:
            raise ValueError("the span to mask is not part of the prompt" if span else "the span to mask is empty")
        ranges = [(at, at + len(span))]
    encoded = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    positions = [t for t, (a, b) in enumerate(encoded["offset_mapping"])
                 if b > a and any(a < end and b > start for start, end in ranges)]
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        drop = len(ids) - max_prompt_length
        ids, positions = ids[drop:], [p - drop for p in positions if p >= drop]
    return ids, positions


def masked_generate(model, contexts: list[list[int]], hidden: list[list[int]], *, pad_id: int,
                    stop_ids: Sequence[int], max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0,
                    seed: int = 0, model_inputs: list[dict[str, torch.Tensor]] | None = None
                    ) -> list[tuple[list[int], bool]]:
    """Continuations of `contexts` (R token lists, left-padded into one batch) with the key positions hidden[r]
    of row r masked out of attention (a 0 in the attention mask: every layer and head), position ids from the
    padding only. model_inputs: per row its extra inputs (pixel_values, ...), concatenated along dim 0. Stops a
    row at the first of `stop_ids`; returns per row (its new tokens up to and including that stop, whether a stop
    ended it). Sampled under `seed` (forked RNG), greedy at temperature 0."""
    device = next(model.parameters()).device
    input_ids, padding = left_padded(contexts, pad_id, device)
    width = input_ids.shape[1]
    position_ids = (padding.cumsum(-1) - 1).masked_fill(padding == 0, 0)  # as generate() makes them, unmasked
    attention_mask = padding.clone()
    for row, (context, positions) in enumerate(zip(contexts, hidden)):
        if positions:
            attention_mask[row, torch.tensor(positions, device=device) + (width - len(context))] = 0
    extra = {}
    rows_inputs = [r for r in (model_inputs or []) if r]
    if rows_inputs:
        extra = {name: torch.cat([r[name] for r in rows_inputs]).to(device) for name in rows_inputs[0]}
    options = dict(max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=list(stop_ids) or None,
                   use_cache=True, do_sample=temperature > 0)
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p, top_k=0)
    with torch.no_grad(), eval_mode(model), _seeded(seed, device), _quiet_padding_check():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **extra, **options)
    stops, results = set(stop_ids), []
    for row in out[:, width:].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        results.append((row, False) if end is None else (row[:end + 1], True))
    return results


@contextlib.contextmanager
def _quiet_padding_check():
    """generate() takes a 0 in the attention mask's last column for right padding and warns; a hidden last prompt
    token is no padding."""
    logger = logging.getLogger("transformers.generation.utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_STOP_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def sentence_stop_ids(tokenizer) -> list[int]:
    """The ids of the (non-special) tokens whose text holds a sentence end (., ! or ?), cached per tokenizer."""
    try:
        return _STOP_IDS[tokenizer]
    except (KeyError, TypeError):
        pass
    special = set(tokenizer.all_special_ids)
    pieces = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    stops = [i for i, piece in enumerate(pieces) if i not in special and any(c in piece for c in STOP_CHARACTERS)]
    try:
        _STOP_IDS[tokenizer] = stops
    except TypeError:
        pass
    return stops
