"""BDHS's loop (prefuse.engine.methods.bdhs, step 5): per attempt a guided (or, the last, unguided) y~- for the examples
still pending, the similarity filter, and what is kept."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from prefuse.engine.methods.bdhs.masking import draw_hidden, masked_generate, sentence_stop_ids
from prefuse.engine.methods.bdhs.sentences import draw_cuts, sentence_tokens, swap_yes_no
from prefuse.engine.models.embedders import Embedder


@dataclass(frozen=True)
class BDHSConfig:
    """The paper's values (App. A): rho_th 0.99, epsilon_s 0.97, n_bdhs 5; max_new_tokens bounds each sentence's
    continuation and the unguided response; temperature 0 is greedy; generation_batch_size: the most sequences
    (sentences of an attempt, over all examples) one generate call takes."""

    rho_th: float = 0.99
    epsilon_s: float = 0.97
    n_bdhs: int = 5
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    swap_prob: float = 0.5
    generation_batch_size: int = 64

    def validate(self) -> "BDHSConfig":
        for name, ok, rule in (("rho_th", 0 <= self.rho_th <= 1, "in [0, 1]"),
                               ("epsilon_s", -1 <= self.epsilon_s, ">= -1 (a cosine similarity; -1 accepts none)"),
                               ("n_bdhs", isinstance(self.n_bdhs, int) and self.n_bdhs >= 1, "an integer >= 1"),
                               ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                               ("temperature", self.temperature >= 0, ">= 0"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                               ("swap_prob", 0 <= self.swap_prob <= 1, "in [0, 1]"),
                               ("generation_batch_size", self.generation_batch_size >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"{name}: must be {rule}, got {getattr(self, name)!r}")
        return self


@dataclass
class BDHSExample:
    """prompt_ids: the prompt as the model reads it (image tokens expanded, for a VLM); chosen: y+ as text;
    maskable: the prompt positions the mask may hide; model_inputs: this example's extra model inputs, each a
    tensor whose first dimension counts its images (pixel_values [n_images, C, H, W], image_sizes, ...); key: what
    seeds the example's draws (its row in the data)."""

    prompt_ids: list[int]
    chosen: str
    maskable: list[int]
    model_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    key: int = 0


@dataclass(kw_only=True)
class BDHSResult:
    """rejected_ids: y~- as token ids (EOS-terminated when it ended); rejected: its text; attempts: how many were
    made; kept_attempt: the one kept; similarity: phi(y~-, y+); guided: False for the unguided last attempt;
    swapped: yes/no words swapped; hidden: prompt positions masked; cuts: per sentence its prefix length in tokens
    (a one-token sentence: 1, kept whole)."""

    rejected_ids: list[int]
    rejected: str
    attempts: int
    kept_attempt: int
    similarity: float
    guided: bool
    swapped: int
    hidden: int
    cuts: list[int]

    def meta(self) -> dict:
        """The `bdhs` column of a pairs file."""
        return {"attempts": self.attempts, "kept_attempt": self.kept_attempt,
                "similarity": round(self.similarity, 6), "guided": self.guided, "swapped": self.swapped,
                "hidden_tokens": self.hidden}


def mix_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def attempt_generator(seed: int, key: int, attempt: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed("bdhs-draws", seed, key, attempt))


@dataclass
class _Candidate:
    ids: list[int]
    contains_eos: bool
    swapped: int = 0
    hidden: int = 0
    cuts: list[int] = field(default_factory=list)


def _guided(model, tokenizer, examples, draws, cfg: BDHSConfig, *, eos_id, pad_id, seed) -> list[_Candidate]:
    """One guided attempt for every example: swap, cut, mask, then all sentences' continuations in one batch."""
    plans, contexts, hidden, inputs = [], [], [], []
    for example, generator in zip(examples, draws):
        text, swapped = swap_yes_no(example.chosen, generator, cfg.swap_prob)
        ids, spans = sentence_tokens(tokenizer, text)
        cuts = draw_cuts(spans, generator)
        masked = draw_hidden(example.maskable, cfg.rho_th, generator)
        rows = []
        for (a, b), cut in zip(spans, cuts):
            if cut < b - a:
                rows.append(len(contexts))
                contexts.append(list(example.prompt_ids) + ids[:a + cut])
                hidden.append(masked)
                inputs.append(example.model_inputs)
        plans.append((ids, spans, cuts, rows, swapped, len(masked)))
    stops = [eos_id, *sentence_stop_ids(tokenizer)] if eos_id is not None else sentence_stop_ids(tokenizer)
    continuations, size = [], cfg.generation_batch_size
    for chunk, start in enumerate(range(0, len(contexts), size)):  # every sentence of every example, in chunks
        continuations += masked_generate(model, contexts[start:start + size], hidden[start:start + size],
                                         pad_id=pad_id, stop_ids=stops, max_new_tokens=cfg.max_new_tokens,
                                         temperature=cfg.temperature, top_p=cfg.top_p,
                                         seed=mix_seed(seed, chunk) if chunk else seed,
                                         model_inputs=inputs[start:start + size])
    candidates = []
    for ids, spans, cuts, rows, swapped, n_hidden in plans:
        out, pending = [], iter(rows)
        for (a, b), cut in zip(spans, cuts):
            out += ids[a:a + cut]
            if cut < b - a:
                tokens, _ = continuations[next(pending)]
                out += [t for t in tokens if t != eos_id]
        candidates.append(_Candidate(out, True, swapped, n_hidden, cuts))
    return candidates


def _unguided(model, examples, draws, cfg: BDHSConfig, *, eos_id, pad_id, seed) -> list[_Candidate]:
    """The last attempt: the full response from the masked prompt, no guidance."""
    hidden = [draw_hidden(e.maskable, cfg.rho_th, g) for e, g in zip(examples, draws)]
    stops = [eos_id] if eos_id is not None else []
    outputs, size = [], cfg.generation_batch_size
    for chunk, start in enumerate(range(0, len(examples), size)):
        part = examples[start:start + size]
        outputs += masked_generate(model, [list(e.prompt_ids) for e in part], hidden[start:start + size],
                                   pad_id=pad_id, stop_ids=stops, max_new_tokens=cfg.max_new_tokens,
                                   temperature=cfg.temperature, top_p=cfg.top_p,
                                   seed=mix_seed(seed, chunk) if chunk else seed,
                                   model_inputs=[e.model_inputs for e in part])
    return [_Candidate([t for t in tokens if t != eos_id], ended, 0, len(h)) for (tokens, ended), h in
            zip(outputs, hidden)]


def text_tokenizer(tokenizer):
    """The tokenizer itself, or a processor's (a VLM's AutoProcessor holds its tokenizer)."""
    from transformers import ProcessorMixin

    return tokenizer.tokenizer if isinstance(tokenizer, ProcessorMixin) else tokenizer


def bdhs_generate(model, tokenizer, examples: Sequence[BDHSExample], cfg: BDHSConfig, embedder: Embedder, *,
                  seed: int, eos_id: int | None = None, pad_id: int | None = None) -> list[BDHSResult]:
    """Algorithm 1 for every example (module docstring): attempts until the filter accepts, the examples still
    pending at an attempt generated together. `tokenizer`: the model's (a processor's `.tokenizer`)."""
    cfg.validate()
    tokenizer = text_tokenizer(tokenizer)
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id) if pad_id is None else pad_id
    if not examples:
        return []
    chosen = embedder.embed([e.chosen for e in examples])
    results: list[BDHSResult | None] = [None] * len(examples)
    best: dict[int, tuple[float, int, _Candidate, str]] = {}
    pending = list(range(len(examples)))
    for attempt in range(1, cfg.n_bdhs + 1):
        last, unguided = attempt == cfg.n_bdhs, attempt == cfg.n_bdhs and cfg.n_bdhs > 1
        batch = [examples[i] for i in pending]
        draws = [attempt_generator(seed, e.key, attempt) for e in batch]
        sample_seed = mix_seed("bdhs-sampling", seed, attempt, batch[0].key, len(batch))
        if unguided:
            candidates = _unguided(model, batch, draws, cfg, eos_id=eos_id, pad_id=pad_id, seed=sample_seed)
        else:
            candidates = _guided(model, tokenizer, batch, draws, cfg, eos_id=eos_id, pad_id=pad_id, seed=sample_seed)
        texts = [tokenizer.decode(c.ids, skip_special_tokens=True) for c in candidates]
        phis = (embedder.embed(texts) * chosen[pending]).sum(-1).tolist()
        still = []
        for i, candidate, text, phi in zip(pending, candidates, texts, phis):
            if text.strip() and (i not in best or phi < best[i][0]):
                best[i] = (phi, attempt, candidate, text)
            if not (last or phi < cfg.epsilon_s):  # rejected by the filter: a new mask, new swaps and cuts
                still.append(i)
                continue
            kept_phi, kept, candidate, text = (phi, attempt, candidate, text) if text.strip() or i not in best \
                else best[i]
            ids = candidate.ids + ([eos_id] if candidate.contains_eos and eos_id is not None else [])
            results[i] = BDHSResult(rejected_ids=ids, rejected=text, attempts=attempt, kept_attempt=kept,
                                    similarity=float(kept_phi), guided=not (unguided and kept == attempt),
                                    swapped=candidate.swapped, hidden=candidate.hidden, cuts=candidate.cuts)
        pending = still
        if not pending:
            break
    return results  # type: ignore[return-value]


def summary(results: Sequence[BDHSResult], cfg: BDHSConfig) -> dict[str, float]:
    if not results:
        return {}
    n = len(results)
    filtered = sum(r.similarity < cfg.epsilon_s and r.guided for r in results)
    return {"bdhs/attempts": math.fsum(r.attempts for r in results) / n,
            "bdhs/similarity": math.fsum(r.similarity for r in results) / n, "bdhs/filtered": filtered / n}
