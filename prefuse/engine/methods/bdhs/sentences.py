"""The ground truth's side of BDHS: y+ split into sentences, the yes/no swap, and the random cut of each sentence
into a prefix the policy is given and a rest it writes (prefuse.engine.methods.bdhs, steps 1 and 2)."""
from __future__ import annotations

import bisect
import re

import torch

SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
YES_NO = re.compile(r"^[\s]*(Yes|yes|No|no)\b")
SWAPS = {"Yes": "No", "yes": "no", "No": "Yes", "no": "yes"}


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans [start, end) of the sentences of `text`, covering it from 0 to its end; whitespace after a
    sentence end belongs to the next sentence, trailing whitespace to the last."""
    spans, start = [], 0
    for match in SENTENCE_END.finditer(text):
        if text[start:match.end()].strip():
            spans.append((start, match.end()))
            start = match.end()
    if text[start:].strip():
        spans.append((start, len(text)))
    elif spans:
        spans[-1] = (spans[-1][0], len(text))
    return spans


def swap_yes_no(text: str, generator: torch.Generator, prob: float = 0.5) -> tuple[str, int]:
    """(text with each sentence's leading Yes/yes/No/no swapped with probability `prob`, how many were)."""
    spans = sentence_spans(text)
    if not spans:
        return text, 0
    pieces, swapped = [], 0
    for start, end in spans:
        sentence = text[start:end]
        match = YES_NO.match(sentence)
        if match and float(torch.rand((), generator=generator)) < prob:
            sentence = sentence[:match.start(1)] + SWAPS[match.group(1)] + sentence[match.end(1):]
            swapped += 1
        pieces.append(sentence)
    return "".join(pieces), swapped


def sentence_tokens(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids of `text` without special tokens, token spans [a, b) of its sentences, none empty)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("BDHS needs a fast tokenizer (its offsets map tokens to sentences); load the model's "
                         "tokenizer.json")
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    starts = [start for start, _ in sentence_spans(text)]
    if not starts:
        return ids, ([(0, len(ids))] if ids else [])
    owner = [max(bisect.bisect_right(starts, a) - 1, 0) for a, _ in offsets]
    spans, begin = [], 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or owner[t] != owner[begin]:
            spans.append((begin, t))
            begin = t
    return ids, spans


def draw_cuts(token_spans: list[tuple[int, int]], generator: torch.Generator) -> list[int]:
    """Per sentence of n tokens, the prefix length c ~ U{1, ..., n - 1}; n for a one-token sentence (kept)."""
    cuts = []
    for a, b in token_spans:
        n = b - a
        cuts.append(n if n < 2 else 1 + int(torch.randint(n - 1, (), generator=generator)))
    return cuts
