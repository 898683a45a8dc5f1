"""`prefuse generate`: SRPO's self-revision at inference over a prompts file, each stage written as a JSON line and,
with a judge, each stage's win rate against an opponent column (the revisions themselves:
`engine/methods/self_revision.py`).

    generate(GenerateConfig(model="out/checkpoint-100", prompts="prompts.jsonl", output="revised.jsonl"))
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefuse.engine.data.prompts import read_prompt_table
from prefuse.engine.methods.self_revision import check_revisions, revise, stage_preferences
from prefuse.engine.methods.srpo import load_template
from prefuse.engine.models.loading import load_generator
from prefuse.engine.online.rollout import RolloutConfig


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
                                                                          "template (docs/methods/srpo.md)"})
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


def generate(cfg: GenerateConfig) -> dict:
    """`prefuse generate`: the stages of every prompt of cfg.prompts written to cfg.output (one JSON object per
    prompt: {"prompt", "stages": [{"revision", "prompt", "completion", "contains_eos"}, ...]}, plus "judged": the
    judge's P(stage > opponent) per stage when a judge is given); with a judge, the win rate by stage is printed
    and written to <output>.win_rates.json. Returns {"stages": ..., "win_rates": [...] or None}."""
    cfg.validate()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    prompts, opponents, columns = read_prompt_table(cfg.prompts, cfg.opponent_column, "--opponent_column")
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


NAME = "generate"
HELP = "answers of a local model, then N self-revisions of them (SRPO)"
DESCRIPTION = ("prompt -> answer -> revised answer, --revisions times, each revision prompt made by the revision "
               "template from the prompt and the previous answer. Writes every stage's prompt and answer per prompt "
               "to --output (JSON lines); with --judge (or --reward_model_path) and --opponent_column, the win rate "
               "of each stage.")


def add_arguments(parser) -> None:
    from prefuse.commands.flags import add_config_file, config_flags
    from prefuse.commands.models import add_gguf_file

    add_config_file(parser)
    config_flags(parser, GenerateConfig)
    add_gguf_file(parser)


def run(args) -> int:
    """`prefuse generate`: the command's flags -> GenerateConfig -> generate()."""
    from prefuse.commands.flags import config_values
    from prefuse.commands.models import plain_models, settings

    plain_models(args)
    generate(GenerateConfig(**config_values(GenerateConfig, settings(args))))
    return 0
