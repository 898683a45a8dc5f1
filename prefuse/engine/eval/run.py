"""`prefuse eval`: does a model beat a baseline on held-out prompts, and does a policy rank held-out pairs as its
reference does not?

    result = evaluate(EvalConfig(model_name_or_path="out/checkpoint-100", baseline_model="sft/",
                                 prompts="heldout.jsonl", reward_model_path="rm/"))
    result["win_rate"], result["win_rate_ci95"], result["lc_win_rate"]

1. Answers: the model's (and the baseline model's) answer to every prompt, greedy at temperature 0, else sampled
   under --seed (`self_revision.revise` with no revision: the same prompt rendering and seeded rollouts as `prefuse
   generate`); or the baseline's answers read from a column of the prompts file.
2. Judging, one judge of the engine (`judges.make_judge`: --reward_funcs, --reward_model_path or --judge):
   a judge that scores (reward functions, a Bradley-Terry reward model, a rule judge, a vision-language judge)
   scores both answers, and the prompt's win is 1 when the model's score is higher, 1/2 on a tie, 0 when lower; a
   pairwise preference model's win is its P(model answer > baseline answer), which PairwiseJudge.compare already
   takes in both orders and averages, (P(a > b) + 1 - P(b > a)) / 2, so the position in its template cancels.
   A prompt that reward functions leave unscored (None, TRL's abstention) on either side is left out and counted.
3. Statistics (stats.py): the win rate, its 95% Wilson interval, AlpacaEval 2's length-controlled win rate, the
   mean answer length of each side in tokens (both sides' texts tokenized by the evaluated model's tokenizer,
   without special tokens).
4. With --pairs: the implicit-reward accuracy of the model as a policy against its reference (the model with its
   LoRA adapters disabled, or --reference_model): the share of held-out pairs with
   beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))) > 0 (TRL's
   rewards/accuracies: a tie counts as wrong), the log-probs summed over the response tokens by the fused head.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from prefuse.engine.checkpoint import MANIFEST, load_weights, read_run_config
from prefuse.engine.data import collate_pairs, load_preference_data
from prefuse.engine.data.prompts import read_prompt_table
from prefuse.engine.eval.stats import Z95, length_controlled, score_wins, wilson_interval, win_rate
from prefuse.engine.judges import PairwiseJudge, make_judge
from prefuse.engine.methods.self_revision import revise
from prefuse.engine.models.loading import check_device, load_generator, load_models, sequence_logps
from prefuse.engine.online.rollout import RolloutConfig
from prefuse.engine.train.config import TrainConfig


@dataclass
class EvalConfig:
    model_name_or_path: str = field(default="", metadata={"help": "the model evaluated: a model directory, a LoRA "
                                                                  "adapter directory, a prefuse checkpoint (LoRA or "
                                                                  "full) or a GGUF file"})
    baseline_model: str | None = field(default=None, metadata={"help": "the baseline: another model (directory, "
                                                                       "adapter, checkpoint or GGUF file)"})
    baseline_column: str | None = field(default=None, metadata={"help": "the baseline: the column of the prompts "
                                                                        "file holding its answers (e.g. chosen)"})
    prompts: str | None = field(default=None, metadata={"help": "held-out prompts (JSON lines): a 'prompt' column "
                                                                "(text or messages), or preference pairs"})
    pairs: str | None = field(default=None, metadata={"help": "held-out preference pairs (prompt/chosen/rejected): "
                                                              "the implicit-reward accuracy against the reference"})
    reference_model: str | None = field(default=None, metadata={"help": "--pairs: the reference model (default: "
                                                                        "the model with its LoRA adapters disabled)"})
    base: str | None = field(default=None, metadata={"help": "the base of a LoRA adapter directory whose "
                                                             "adapter_config.json names none"})
    reward_funcs: list[str] | None = field(default=None, metadata={"help": "judge: reward functions file.py:name "
                                                                           "(TRL's signature), scores summed"})
    reward_weights: list[float] | None = field(default=None, metadata={"help": "weights of the reward functions"})
    reward_model_path: str | None = field(default=None, metadata={"help": "judge: a Bradley-Terry reward model "
                                                                          "directory"})
    judge: str | None = field(default=None, metadata={"help": "judge: a pairwise preference model directory, or a "
                                                              "rule judge ('copy')"})
    max_new_tokens: int = field(default=64, metadata={"help": "the longest answer"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; else sampled with this temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    seed: int = field(default=0, metadata={"help": "the sampling seed (the same seed gives the same numbers)"})
    batch_size: int = field(default=8, metadata={"help": "prompts (pairs) per forward"})
    max_prompt_length: int | None = field(default=None, metadata={"help": "cut each prompt to its last N tokens"})
    max_length: int | None = field(default=None, metadata={"help": "--pairs: cut prompt + response to N tokens"})
    beta: float = field(default=0.1, metadata={"help": "--pairs: the implicit reward's beta (reported margins)"})
    output: str | None = field(default=None, metadata={"help": "the JSON file written (top level: win_rate, ...)"})
    markdown: str | None = field(default=None, metadata={"help": "also write the markdown table to this file"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})

    def validate(self) -> EvalConfig:
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path: required (the model to evaluate)")
        if not self.prompts and not self.pairs:
            raise ValueError("prompts: required (held-out prompts to answer), or --pairs (held-out pairs)")
        for name in ("prompts", "pairs"):
            value = getattr(self, name)
            if value and not Path(value).exists():
                raise ValueError(f"{name}: no such file: {value}")
        judges = [f for f in ("reward_funcs", "reward_model_path", "judge") if getattr(self, f) not in (None, [])]
        if self.prompts:
            if bool(self.baseline_model) == bool(self.baseline_column):
                raise ValueError("baseline_model: pass exactly one baseline, --baseline_model DIR or "
                                 "--baseline_column COLUMN" + (" (both given)" if self.baseline_model else ""))
            if not judges:
                raise ValueError("judge: no judge given (pass --reward_funcs file.py:name, --reward_model_path DIR "
                                 "or --judge DIR|copy)")
        else:
            for name in ("baseline_model", "baseline_column", *judges):
                if getattr(self, name) not in (None, []):
                    raise ValueError(f"{name}: a baseline and a judge need --prompts (only --pairs was given)")
        if len(judges) > 1:
            raise ValueError(f"judge: {' and '.join('--' + j for j in judges)} given together (pass one judge)")
        RolloutConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                      num_generations=1).validate()
        for name, low in (("batch_size", 1), ("max_prompt_length", 1), ("max_length", 2)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name}: must be at least {low}, got {value}")
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"beta: must be a positive number, got {self.beta}")
        if self.reference_model and not self.pairs:
            raise ValueError("reference_model: used only with --pairs")
        return self


def load_model(path: str, base: str | None, device, field_name: str):
    """(model in eval mode, tokenizer) from a model directory, a LoRA adapter directory (`load_generator`), or a
    checkpoint of `prefuse train` (its manifest checkpoint.json: the model rebuilt from the settings it records, as
    `prefuse export` does, its weights loaded: a full model, or LoRA adapters on the base)."""
    where = Path(path)
    if not where.exists():
        raise ValueError(f"{field_name}: no such model directory: {path}")
    if (where / MANIFEST).is_file() and not (where / "adapter_config.json").is_file():
        record = read_run_config(where)
        if record is None:
            raise ValueError(f"{field_name}: checkpoint {path} records no settings (an older checkpoint); turn it "
                             f"into a model directory with `prefuse export` first")
        cfg = TrainConfig.from_dict(record["settings"])
        model_cfg = cfg.model_config()
        model_cfg.lora_dropout = 0.0
        models = load_models(model_cfg, device=device, need_reference=False)
        load_weights(where, model=models.policy)
        if models.tokenizer is None:
            raise ValueError(f"{field_name}: {cfg.model_name_or_path} (the base of {path}) has no tokenizer files")
        return models.policy.eval().requires_grad_(False), models.tokenizer
    model, tokenizer = load_generator(path, base, device)
    return model.requires_grad_(False), tokenizer


def answer_prompts(model, tokenizer, prompts: list, cfg: EvalConfig) -> list[str]:
    """The model's answer text to every prompt (greedy, or sampled under cfg.seed)."""
    stages = revise(model, tokenizer, prompts, 0, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                    top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size,
                    max_prompt_length=cfg.max_prompt_length)
    return [s[0].completion for s in stages]


def token_length(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def judge_wins(judge, prompts: list, answers: list[str], baseline: list[str], columns: dict) -> dict:
    """Per prompt the model's win against the baseline (module docstring, 2.): {"wins": [N] with None where a
    judge abstained, "model_scores", "baseline_scores" (None for a pairwise judge)}."""
    if isinstance(judge, PairwiseJudge):
        return {"wins": [float(p) for p in judge.compare(prompts, answers, baseline, **columns).tolist()],
                "model_scores": None, "baseline_scores": None}
    model_scores = judge.score(prompts, answers, **columns).tolist()
    baseline_scores = judge.score(prompts, baseline, **columns).tolist()
    wins = [None if math.isnan(m) or math.isnan(b) else score_wins([m], [b])[0]
            for m, b in zip(model_scores, baseline_scores)]
    return {"wins": wins, "model_scores": model_scores, "baseline_scores": baseline_scores}


def describe_judge(cfg: EvalConfig, judge) -> str:
    if cfg.reward_funcs:
        weights = f" weights {cfg.reward_weights}" if cfg.reward_weights else ""
        return f"reward functions {', '.join(cfg.reward_funcs)}{weights}: win = model score > baseline score"
    if cfg.reward_model_path:
        return f"reward model {cfg.reward_model_path}: win = model score > baseline score"
    if isinstance(judge, PairwiseJudge):
        return f"pairwise model {cfg.judge}: win = P(model > baseline), both orders averaged"
    return f"judge {cfg.judge}: win = model score > baseline score"


@torch.no_grad()
def implicit_reward_accuracy(model, tokenizer, pairs: str, *, beta: float, reference=None, batch_size: int = 8,
                             max_length: int | None = None, max_prompt_length: int | None = None) -> dict:
    """The implicit-reward accuracy of `model` against its reference (`reference`, else `model` with its LoRA
    adapters disabled) on the pairs file: {"accuracy", "margin_mean" (beta-scaled), "n", "margins" [N]}."""
    if reference is None and not hasattr(model, "disable_adapter"):
        raise ValueError("reference_model: the model has no LoRA adapters to disable for its reference; pass "
                         "--reference_model DIR")
    data = load_preference_data(pairs, tokenizer, needs="pairs", max_length=max_length,
                                max_prompt_length=max_prompt_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    margins = []
    for start in range(0, len(data), batch_size):
        examples = data.examples[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate_pairs(examples, pad).items()}
        inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        policy, _ = sequence_logps(model, *inputs)
        if reference is not None:
            ref, _ = sequence_logps(reference, *inputs)
        else:
            with model.disable_adapter():
                ref, _ = sequence_logps(model, *inputs)
        ratio = (policy.double() - ref.double()).cpu()
        b = len(examples)
        margins += (beta * (ratio[:b] - ratio[b:])).tolist()
    correct = sum(m > 0 for m in margins)
    return {"accuracy": correct / len(margins), "margin_mean": math.fsum(margins) / len(margins),
            "n": len(margins), "margins": margins}


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def markdown_table(result: dict) -> str:
    """The result as markdown: a win-rate table (with --prompts) and a pairs table (with --pairs)."""
    lines = []
    if result.get("win_rate") is not None:
        low, high = result["win_rate_ci95"]
        lines += [("| model | baseline | n | win rate | 95% CI (Wilson) | LC win rate | mean length | "
                  "baseline mean length |"),
                  "|---|---|---:|---:|---:|---:|---:|---:|",
                  (f"| {result['model']} | {result['baseline']} | {result['n']} | {_percent(result['win_rate'])} | "
                  f"{_percent(low)} - {_percent(high)} | {_percent(result['lc_win_rate'])} | "
                  f"{result['mean_length']:.1f} | {result['baseline_mean_length']:.1f} |"),
                  "", f"judge: {result['judge']}"]
    if result.get("pairs") is not None:
        pairs = result["pairs"]
        lines += ([""] if lines else []) + [
            "| model | reference | pairs | implicit-reward accuracy | mean margin (beta) |", "|---|---|---:|---:|---:|",
            (f"| {result['model']} | {pairs['reference']} | {pairs['n']} | {_percent(pairs['accuracy'])} | "
            f"{pairs['margin_mean']:.4f} ({pairs['beta']}) |")]
    return "\n".join(lines) + "\n"


def evaluate(cfg: EvalConfig, names: dict[str, str] | None = None) -> dict:
    """`prefuse eval` (module docstring): the result dict, written to cfg.output (JSON) and cfg.markdown. names: how
    the output names the model and the baseline model (`{"model": ..., "baseline_model": ...}`, e.g. the GGUF file a
    user gave rather than its plain copy); default: their paths in cfg."""
    names = names or {}
    cfg.validate()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    check_device(device)
    result: dict[str, Any] = {"model": names.get("model", cfg.model_name_or_path), "win_rate": None}
    judge = None
    if cfg.prompts:
        prompts, baseline_answers, columns = read_prompt_table(cfg.prompts, cfg.baseline_column, "--baseline_column",
                                                                   empty_answers=True)
        judge = make_judge(reward_funcs=cfg.reward_funcs, reward_weights=cfg.reward_weights,
                           reward_model_path=cfg.reward_model_path, judge=cfg.judge, device=device,
                           batch_size=cfg.batch_size)
    model, tokenizer = load_model(cfg.model_name_or_path, cfg.base, device, "model_name_or_path")
    if cfg.prompts:
        answers = answer_prompts(model, tokenizer, prompts, cfg)
        if cfg.baseline_model:
            baseline, baseline_tokenizer = load_model(cfg.baseline_model, None, device, "baseline_model")
            baseline_answers = answer_prompts(baseline, baseline_tokenizer, prompts, cfg)
            del baseline
        judged = judge_wins(judge, prompts, answers, baseline_answers, columns)
        lengths = [token_length(tokenizer, a) for a in answers]
        baseline_lengths = [token_length(tokenizer, a) for a in baseline_answers]
        kept = [i for i, w in enumerate(judged["wins"]) if w is not None]
        if not kept:
            raise ValueError("judge: the reward functions scored no prompt on both sides (every one returned None)")
        wins = [judged["wins"][i] for i in kept]
        rate = win_rate(wins)
        lc = length_controlled(wins, [lengths[i] for i in kept], [baseline_lengths[i] for i in kept])
        result.update({
            "win_rate": rate, "win_rate_ci95": list(wilson_interval(rate, len(wins))),
            "ci95_method": f"Wilson score interval, z = {Z95}", "lc_win_rate": lc.rate,
            "lc_fit": {"theta": lc.theta, "phi": lc.phi, "note": lc.note,
                       "model": "P(win) = sigmoid(theta + phi * tanh(d / sd(d))), d = answer length difference "
                                "(tokens); LC = sigmoid(theta)"},
            "n": len(wins), "n_abstained": len(prompts) - len(wins),
            "mean_length": math.fsum(lengths) / len(lengths),
            "baseline_mean_length": math.fsum(baseline_lengths) / len(baseline_lengths),
            "baseline": (names.get("baseline_model", cfg.baseline_model) if cfg.baseline_model
                         else f"column {cfg.baseline_column!r}"),
            "judge": describe_judge(cfg, judge),
            "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
                         "max_new_tokens": cfg.max_new_tokens},
            "records": [{"prompt": p, "answer": a, "baseline_answer": b, "win": w, "length": n, "baseline_length": m,
                         **({} if judged["model_scores"] is None else
                            {"score": judged["model_scores"][i], "baseline_score": judged["baseline_scores"][i]})}
                        for i, (p, a, b, w, n, m) in enumerate(zip(prompts, answers, baseline_answers,
                                                                   judged["wins"], lengths, baseline_lengths))],
        })
    if cfg.pairs:
        reference = None
        if cfg.reference_model:
            reference, _ = load_model(cfg.reference_model, None, device, "reference_model")
        pairs = implicit_reward_accuracy(model, tokenizer, cfg.pairs, beta=cfg.beta, reference=reference,
                                         batch_size=cfg.batch_size, max_length=cfg.max_length,
                                         max_prompt_length=cfg.max_prompt_length)
        result["pairs"] = {"file": cfg.pairs, "reference": cfg.reference_model or "the model, adapters disabled",
                           "beta": cfg.beta, **pairs}
    table = markdown_table(result)
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    if cfg.markdown:
        Path(cfg.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.markdown).write_text(table)
    result["markdown"] = table
    return result
