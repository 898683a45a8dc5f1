"""Self-revision at inference (SRPO): prompt -> answer -> revised answer, N times, each revision prompt built by
the revision template (`engine/revision.py`) from the prompt and the previous stage's answer.

    stages = revise(model, tokenizer, prompts, 2)     # per prompt: [answer, revision 1, revision 2], each a Stage
    result = evaluate_revisions(model, tokenizer, prompts, judge, opponents, revisions=5)
    result["win_rates"]                                 # [6]: the judge's win rate of stage n against the opponents
    generate(GenerateConfig(model="out/checkpoint-100", prompts="prompts.jsonl", output="revised.jsonl"))

y^(0) ~ pi(. | x), then y^(n) ~ pi(. | revision prompt(x, y^(n-1))) for n = 1..N (ALGORITHMS.md section 7).
Sampling is transformers' `generate` through `engine/rollout.py` (batched, left-padded, without gradient, in eval
mode): greedy at temperature 0, else sampled with temperature and top_p under a seed per stage and batch, so the
same seed gives the same stages. An answer is the generated text up to its first EOS, decoded without special
tokens; that text is the next revision prompt's `{previous}`.

The win rate of a stage is the mean over prompts of the judge's P(stage answer > opponent) (`Judge.compare`; for a
scoring judge sigmoid(score - opponent's score), so a tie counts 1/2): evaluated at N = 0..5 revisions, as the
paper's win rate against the number of revisions.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefuse.engine.revision import load_template, revision_prompt_text
from prefuse.engine.rollout import RolloutConfig, sample_policy


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
    from prefuse.engine.data.tokenize import render_chat_prompt, require_chat_template

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
    from prefuse.engine.data.tokenize import tokenize_prompt_texts
    from prefuse.engine.model import Models

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

@dataclass
class GenerateConfig:
    model: str = field(default="", metadata={"help": "a local model directory (save_pretrained), or a LoRA adapter "
                                                     "directory (a prefuse checkpoint of a LoRA run) on its base"})
    prompts: str = field(default="", metadata={"help": "a local file of prompts: a 'prompt' column (text or "
                                                       "messages), or preference pairs (their prompts)"})
    output: str = field(default="", metadata={"help": "the JSON-lines file written: per prompt every stage's prompt "
                                                      "and answer"})
    revisions: int = field(default=0, metadata={"help": "N: the answer, then N revisions of it"})
    revision_template: str | None = field(default=None, metadata={"help": "a file, or a string with {prompt} and "
                                                                          "{previous}; None: prefuse's plain "
                                                                          "template (README, SRPO)"})
    base: str | None = field(default=None, metadata={"help": "the base model of a LoRA adapter directory; None: "
                                                             "its adapter_config.json's"})
    max_new_tokens: int = field(default=64, metadata={"help": "the longest answer of a stage"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; else sampled with this temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    seed: int = field(default=0, metadata={"help": "the sampling seed (the same seed gives the same stages)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    max_prompt_length: int | None = field(default=None, metadata={"help": "cut each stage's prompt to its last N "
                                                                          "tokens"})
    judge: str | None = field(default=None, metadata={"help": "win rates by stage: a pairwise model directory, or a "
                                                              "rule judge ('copy')"})
    reward_model_path: str | None = field(default=None, metadata={"help": "win rates by stage: a Bradley-Terry "
                                                                          "reward model directory"})
    opponent_column: str | None = field(default=None, metadata={"help": "the column of the prompts file whose "
                                                                        "answers each stage is judged against "
                                                                        "(e.g. chosen)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})

    def validate(self) -> "GenerateConfig":
        for name in ("model", "prompts", "output"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        check_revisions(self.revisions)
        load_template(self.revision_template)
        RolloutConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                      num_generations=1).validate()
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length: must be >= 1, got {self.max_prompt_length}")
        judged = bool(self.judge or self.reward_model_path)
        if judged != bool(self.opponent_column):
            raise ValueError("opponent_column: win rates need a judge (--judge or --reward_model_path) and "
                             "--opponent_column together")
        if self.judge and self.reward_model_path:
            raise ValueError("judge: --judge and --reward_model_path given together (pass one judge)")
        if not Path(self.prompts).exists():
            raise ValueError(f"prompts: no such file or directory: {self.prompts}")
        return self


def load_generator(path: str, base: str | None = None, device: str = "cpu"):
    """(model in eval mode, tokenizer) from a model directory, or a LoRA adapter directory on its base model (the
    tokenizer from the adapter directory when it has one, else the base's)."""
    from transformers import AutoModelForCausalLM

    from prefuse.engine.model import check_model_dir, load_tokenizer

    adapter = Path(path) / "adapter_config.json"
    if adapter.is_file():
        base = base or json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"base: {path} is a LoRA adapter without base_model_name_or_path; pass --base DIR")
        check_model_dir(base, "base")
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, local_files_only=True), path)
        tokenizer = load_tokenizer(path) or load_tokenizer(base)
    else:
        check_model_dir(path, "model")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"model: {path} has no tokenizer files (nor has its base)")
    return model.to(device).eval(), tokenizer


def _answer_text(value: Any, where: str, column: str) -> str:
    from prefuse.engine.data import BadRow
    from prefuse.engine.data.errors import RowProblem

    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and isinstance(value[-1].get("content"), str):
        return value[-1]["content"]  # a message list: its last message (an assistant's answer)
    raise BadRow(where, RowProblem("missing" if value is None else "wrong_type", column,
                                   "expected an answer (a string, or messages ending with one)"))


def read_prompts(path: str, opponent_column: str | None = None) -> tuple[list, list[str] | None, dict]:
    """(prompts: strings or message lists, the opponents' answers or None, the other columns as lists) of a prompt
    file or a preference file; a bad row raises BadRow, `<file>:<row>: field 'prompt': <what>`."""
    from prefuse.engine.data import BadRow, DataError, load_records
    from prefuse.engine.data.formats import RowIssue
    from prefuse.engine.data.loading import PROBLEM_COLUMN, WHERE_COLUMN
    from prefuse.engine.data.prompts import NOT_CARRIED, detect_prompt_format, read_prompt

    records = load_records(path)
    if len(records) == 0:
        raise DataError(f"{path}: no prompts (no rows)")
    fmt = detect_prompt_format(records, str(path))
    if opponent_column is not None and opponent_column not in records.column_names:
        raise DataError(f"{path}: column {opponent_column!r} (--opponent_column) is missing; it has "
                        f"{sorted(c for c in records.column_names if c not in (WHERE_COLUMN, PROBLEM_COLUMN))}")
    carried = [c for c in records.column_names if c not in NOT_CARRIED]
    prompts, opponents, columns = [], [], {c: [] for c in carried}
    for index, row in enumerate(records):
        where = row.get(WHERE_COLUMN) or f"{path}:{index + 1}"
        try:
            prompts.append(read_prompt(row, fmt))
        except RowIssue as issue:
            raise BadRow(where, issue.problem) from None
        if opponent_column is not None:
            opponents.append(_answer_text(row.get(opponent_column), where, opponent_column))
        for c in carried:
            columns[c].append(row[c])
    return prompts, (opponents if opponent_column is not None else None), columns


def generate(cfg: GenerateConfig) -> dict:
    """`prefuse generate`: the stages of every prompt of cfg.prompts written to cfg.output (one JSON object per
    prompt: {"prompt", "stages": [{"revision", "prompt", "completion", "contains_eos"}, ...]}, plus "judged": the
    judge's P(stage > opponent) per stage when a judge is given); with a judge, the win rate by stage is printed
    and written to <output>.win_rates.json. Returns {"stages": ..., "win_rates": [...] or None}."""
    cfg.validate()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    prompts, opponents, columns = read_prompts(cfg.prompts, cfg.opponent_column)
    judge = None
    if opponents is not None:
        from prefuse.engine.judges import make_judge

        judge = make_judge(judge=cfg.judge, reward_model_path=cfg.reward_model_path, device=device)
    model, tokenizer = load_generator(cfg.model, cfg.base, device)
    stages = revise(model, tokenizer, prompts, cfg.revisions, template=cfg.revision_template,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                    batch_size=cfg.batch_size, max_prompt_length=cfg.max_prompt_length)
    judged = None if judge is None else stage_preferences(judge, prompts, stages, opponents, **columns)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.tmp")
    with open(temp, "w", encoding="utf-8") as f:
        for i, (prompt, prompt_stages) in enumerate(zip(prompts, stages)):
            record = {"prompt": prompt, "stages": [s.to_dict() for s in prompt_stages]}
            if judged is not None:
                record["opponent"] = opponents[i]
                record["judged"] = [judged[n][i] for n in range(cfg.revisions + 1)]
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    temp.replace(out)
    print(f"{len(prompts)} prompts, {cfg.revisions + 1} stages each, written to {out}")
    rates = None
    if judged is not None:
        rates = [math.fsum(values) / len(values) for values in judged]
        out.with_suffix(".win_rates.json").write_text(json.dumps(
            {"win_rates": rates, "opponent_column": cfg.opponent_column, "judge": cfg.judge or cfg.reward_model_path,
             "revisions": cfg.revisions}, indent=1))
        print(f"win rate against {cfg.opponent_column!r} by revision: "
              + ", ".join(f"{n}: {rate:.3f}" for n, rate in enumerate(rates)))
    return {"stages": stages, "win_rates": rates}
