"""Self-revision at inference (SRPO): prompt -> answer -> revised answer, N times, each revision prompt built by
the revision template (`engine/methods/srpo.py`) from the prompt and the previous stage's answer.

    stages = revise(model, tokenizer, prompts, 2)     # per prompt: [answer, revision 1, revision 2], each a Stage
    result = evaluate_revisions(model, tokenizer, prompts, judge, opponents, revisions=5)
    result["win_rates"]                                 # [6]: the judge's win rate of stage n against the opponents

y^(0) ~ pi(. | x), then y^(n) ~ pi(. | revision prompt(x, y^(n-1))) for n = 1..N (docs/methods/srpo.md).
Sampling is transformers' `generate` through `engine/online/rollout.py` (batched, left-padded, without gradient, in eval
mode): greedy at temperature 0, else sampled with temperature and top_p under a seed per stage and batch, so the
same seed gives the same stages. An answer is the generated text up to its first EOS, decoded without special
tokens; that text is the next revision prompt's `{previous}`.

The win rate of a stage is the mean over prompts of the judge's P(stage answer > opponent) (`Judge.compare`; for a
scoring judge sigmoid(score - opponent's score), so a tie counts 1/2): evaluated at N = 0..5 revisions, as the
paper's win rate against the number of revisions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from prefuse.engine.data.tokenize import render_chat_prompt, require_chat_template, tokenize_prompt_texts
from prefuse.engine.methods.srpo import load_template, revision_prompt_text
from prefuse.engine.models.loading import Models
from prefuse.engine.online.rollout import RolloutConfig, sample_policy


@dataclass
class Stage:
    """One stage of a prompt's self-revision: `revision` n (0: the first answer), the prompt text the model
    answered (the chat template's rendering for messages), the answer's text, and whether it ended with EOS."""

    revision: int
    prompt: str
    completion: str
    contains_eos: bool

    def to_dict(self) -> dict:
        return {"revision": self.revision, "prompt": self.prompt, "completion": self.completion,
                "contains_eos": self.contains_eos}


def first_prompt_text(tokenizer, prompt: Any) -> tuple[str, bool]:
    """(text, whether to tokenize it with special tokens) of the prompt itself, as training tokenizes prompts: a
    string as it is (with the tokenizer's BOS), messages through the chat template with the generation prompt."""

    if isinstance(prompt, str):
        return prompt, True
    require_chat_template(tokenizer)
    return render_chat_prompt(tokenizer, prompt), False


def check_revisions(revisions: int) -> int:
    if not isinstance(revisions, int) or isinstance(revisions, bool) or revisions < 0:
        raise ValueError(f"revisions: must be an integer >= 0 (0: the answer alone), got {revisions!r}")
    return revisions


def revise(model, tokenizer, prompts: list, revisions: int, *, template: str | None = None,
           max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
           batch_size: int = 8, max_prompt_length: int | None = None) -> list[list[Stage]]:
    """Per prompt (a string or a message list), its revisions + 1 stages: the answer, then each revision of the
    previous stage's answer through the revision template (None: DEFAULT_TEMPLATE). Prompt token ids are cut to
    their last max_prompt_length tokens. Greedy at temperature 0; else sampled under `seed`."""

    check_revisions(revisions)
    template = load_template(template)
    rollout = RolloutConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            num_generations=1).validate()
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length: must be >= 1, got {max_prompt_length}")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    models = Models(policy=model, reference=None, tokenizer=tokenizer)
    stages: list[list[Stage]] = [[] for _ in prompts]
    for revision in range(revisions + 1):
        texts = [first_prompt_text(tokenizer, p) if revision == 0 else
                 revision_prompt_text(tokenizer, p, stages[i][-1].completion, template)
                 for i, p in enumerate(prompts)]
        for start in range(0, len(prompts), batch_size):
            chunk = texts[start:start + batch_size]
            ids = [tokenize_prompt_texts(tokenizer, [text], special)[0] for text, special in chunk]
            if max_prompt_length is not None:
                ids = [p[-max_prompt_length:] for p in ids]
            samples = sample_policy(models, ids, rollout, seed=seed * 1_000_003 + revision * 10_007 + start,
                                    eos_id=eos_id, pad_id=pad_id)
            for offset, (completion, has_eos) in enumerate(zip(samples.completion_ids, samples.contains_eos)):
                text = tokenizer.decode(completion, skip_special_tokens=True)
                stages[start + offset].append(Stage(revision, chunk[offset][0], text, has_eos))
    return stages


def stage_preferences(judge, prompts: list, stages: list[list[Stage]], opponents: list[str],
                      **columns) -> list[list[float]]:
    """[stage n][prompt i]: the judge's P(stage-n answer of prompt i > opponents[i]) (`Judge.compare`)."""
    if len(opponents) != len(prompts) or len(stages) != len(prompts):
        raise ValueError(f"opponents: {len(opponents)} opponents and {len(stages)} stage lists for {len(prompts)} "
                         f"prompts (give one per prompt)")
    n_stages = {len(s) for s in stages}
    if len(n_stages) != 1:
        raise ValueError("stages: every prompt needs the same number of stages")
    return [judge.compare(prompts, [s[n].completion for s in stages], list(opponents), **columns).tolist()
            for n in range(n_stages.pop())]


def win_rates(judge, prompts: list, stages: list[list[Stage]], opponents: list[str], **columns) -> list[float]:
    """The win rate of each stage n = 0..N against `opponents` (one per prompt): the mean over prompts of the
    judge's P(stage answer > opponent), in [0, 1]."""
    return [math.fsum(p) / len(p) for p in stage_preferences(judge, prompts, stages, opponents, **columns)]


def evaluate_revisions(model, tokenizer, prompts: list, judge, opponents: list[str], revisions: int = 0,
                       columns: dict | None = None, **options) -> dict:
    """The judges' win-rate evaluation with self-revision: `revise` (options: template, max_new_tokens,
    temperature, top_p, seed, batch_size, max_prompt_length), then `win_rates` of every stage against the opponents.
    Returns {"win_rates": [revisions + 1 floats], "stages": per prompt its Stages}."""
    stages = revise(model, tokenizer, prompts, revisions, **options)
    return {"win_rates": win_rates(judge, prompts, stages, opponents, **(columns or {})), "stages": stages}


# -- prefuse generate: files in, JSON lines out ---------------------------------------------------------------------
