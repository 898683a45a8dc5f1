"""`prefuse rlhs`: hindsight-labelled preference pairs from a policy's rollouts in the toy consultancy environment.

    prefuse rlhs --model_name_or_path DIR --scenarios 500 --feedback partial --output pairs.jsonl --seed 0

N scenarios (`environment.generate_scenarios(N, seed)`), two responses of the policy per scenario (sampled under the
seed), each played out (customer, world model) and rated by the evaluator under every feedback; the pairs of the
asked feedback go to --output as TRL pairs with extra columns (`labels.py`), which `prefuse train --loss_type
sigmoid ...` reads. The report (--report, default `<output stem>.report.json`) holds the rollouts' true utility and
the evaluator's ratings (`dialogue_summary`) and, for each of the three feedbacks, which way its labels point
(`label_summary`).

The policy: a model directory (save_pretrained, with its tokenizer), a LoRA adapter directory, or a checkpoint of
`prefuse train` (a LoRA run's adapters on their base; a full run's weights on the run's --model_name_or_path).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefuse.engine.checkpoint import load_weights, read_run_config
from prefuse.engine.judges import make_judge
from prefuse.engine.methods.rlhs.environment import generate_scenarios
from prefuse.engine.methods.rlhs.labels import dialogue_summary, label_pairs, label_summary
from prefuse.engine.methods.rlhs.llm import JudgeEvaluator, LMCustomer, LMWorldModel, load_causal_lm
from prefuse.engine.methods.rlhs.parties import FEEDBACK, RuleCustomer, RuleEvaluator, RuleWorldModel, check_feedback
from prefuse.engine.methods.rlhs.rollouts import play, sample_responses
from prefuse.engine.models.loading import check_model_dir, load_tokenizer

RULE = "rule"


@dataclass
class RLHSConfig:
    model_name_or_path: str = field(default="", metadata={"help": "the policy: a model directory with its "
                                    "tokenizer, a LoRA adapter directory, or a checkpoint of prefuse train"})
    scenarios: int = field(default=100, metadata={"help": "N: scenarios, two rollouts each"})
    feedback: str = field(default="partial", metadata={"help": "the labels written: immediate (the dialogue alone), "
                          "partial (with the world model's outcome) or oracle (with the true feature table)"})
    output: str = field(default="", metadata={"help": "the TRL pairs file written (JSON lines)"})
    report: str | None = field(default=None, metadata={"help": "the JSON report (default: <output stem>.report.json)"})
    seed: int = field(default=0, metadata={"help": "the scenarios' and the samples' seed"})
    temperature: float = field(default=1.0, metadata={"help": "the policy's sampling temperature (0: greedy, which "
                               "makes both rollouts equal)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling"})
    max_new_tokens: int = field(default=24, metadata={"help": "the longest response (the toy consultant's take 16 "
                                "tokens with the EOS)"})
    batch_size: int = field(default=64, metadata={"help": "scenarios per generate call"})
    customer: str = field(default=RULE, metadata={"help": "rule (believes the consultant), or a causal LM directory"})
    world_model: str = field(default=RULE, metadata={"help": "rule (the true outcome), or a causal LM directory"})
    world_model_error: float = field(default=0.0, metadata={"help": "the rule world model: how often it swaps "
                                     "'with' and 'without' in an outcome"})
    evaluator: str = field(default=RULE, metadata={"help": "rule, or a reward model directory (a judge of "
                           "engine/judges; --evaluator_pairwise: a pairwise judge directory)"})
    evaluator_pairwise: bool = field(default=False, metadata={"help": "--evaluator DIR is a pairwise judge"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})

    def validate(self) -> "RLHSConfig":
        if not self.model_name_or_path:
            raise ValueError("model_name_or_path: required (the policy's directory)")
        if not self.output:
            raise ValueError("output: required (the pairs file to write)")
        if isinstance(self.scenarios, bool) or not isinstance(self.scenarios, int) or self.scenarios < 1:
            raise ValueError(f"scenarios: must be an integer >= 1, got {self.scenarios!r}")
        check_feedback(self.feedback)
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {self.batch_size}")
        for name in ("customer", "world_model", "evaluator"):
            value = getattr(self, name)
            if value != RULE and not Path(value).is_dir():
                raise ValueError(f"{name}: {value!r} is neither 'rule' nor a directory")
        if self.evaluator_pairwise and self.evaluator == RULE:
            raise ValueError("evaluator_pairwise: needs --evaluator DIR (a pairwise judge directory)")
        return self

    @property
    def report_path(self) -> Path:
        out = Path(self.output)
        return Path(self.report) if self.report else out.with_name(out.stem + ".report.json")


def _device(name: str):
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def load_policy(path: str, device="cpu"):
    """(model in eval mode, tokenizer) of the policy at `path` (module docstring); ValueError naming
    model_name_or_path."""

    where = Path(path)
    if not where.exists():
        raise ValueError(f"model_name_or_path: {path!r} does not exist")
    if (where / "checkpoint.json").is_file() and not (where / "adapter_config.json").is_file():
        record = read_run_config(where)  # the checkpoint's own record of its run, else the run's beside it
        run_config = where.parent / "train_config.json"
        if record is None and not run_config.is_file():
            raise ValueError(f"model_name_or_path: {path} is a checkpoint without its run's train_config.json "
                             f"beside it (give the model directory instead)")
        base = (record["settings"] if record else json.loads(run_config.read_text()))["model_name_or_path"]
        model, tokenizer = load_causal_lm(base, "model_name_or_path", device)
        load_weights(where, model=model)
        return model.eval(), tokenizer
    if not (where / "adapter_config.json").is_file():
        check_model_dir(path, "model_name_or_path")
        if load_tokenizer(path) is None:
            raise ValueError(f"model_name_or_path: {path} has no tokenizer files (save the tokenizer beside the "
                             f"model: tokenizer.save_pretrained(DIR))")
    return load_causal_lm(path, "model_name_or_path", device)


def build_parties(cfg: RLHSConfig, device="cpu"):
    """(customer, world model, evaluator) as the config names them: the rule-based ones, or local models."""

    customer = RuleCustomer() if cfg.customer == RULE else LMCustomer(cfg.customer, device)
    world_model = (RuleWorldModel(cfg.world_model_error, cfg.seed) if cfg.world_model == RULE
                   else LMWorldModel(cfg.world_model, device))
    if cfg.evaluator == RULE:
        evaluator = RuleEvaluator()
    else:

        judge = (make_judge(judge=cfg.evaluator, device=device) if cfg.evaluator_pairwise
                 else make_judge(reward_model_path=cfg.evaluator, device=device))
        evaluator = JudgeEvaluator(judge)
    return customer, world_model, evaluator


def rlhs_pairs(model, tokenizer, scenarios, customer, world_model, evaluator, *, seed: int = 0,
               temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 24, batch_size: int = 64):
    """(first dialogues, second dialogues, {feedback: (pairs, ties)}): two rollouts per scenario, played out and
    labelled under every feedback."""
    responses = sample_responses(model, tokenizer, scenarios, samples=2, seed=seed, temperature=temperature,
                                 top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size)
    first = play(scenarios, [r[0] for r in responses], customer, world_model, evaluator)
    second = play(scenarios, [r[1] for r in responses], customer, world_model, evaluator)
    return first, second, {f: label_pairs(first, second, evaluator, f) for f in FEEDBACK}


def write_jsonl(rows: list[dict], path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def finite_json(value):
    """NaN and infinities as null, so the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def run_rlhs(cfg: RLHSConfig) -> dict:
    """Write the pairs and the report as `cfg` says; return the report."""
    cfg.validate()
    device = _device(cfg.device)
    scenarios = generate_scenarios(cfg.scenarios, cfg.seed)
    model, tokenizer = load_policy(cfg.model_name_or_path, device)
    customer, world_model, evaluator = build_parties(cfg, device)
    first, second, labelled = rlhs_pairs(model, tokenizer, scenarios, customer, world_model, evaluator,
                                         seed=cfg.seed, temperature=cfg.temperature, top_p=cfg.top_p,
                                         max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
    pairs, ties = labelled[cfg.feedback]
    write_jsonl(pairs, cfg.output)
    report = {"config": asdict(cfg), "pairs_written": len(pairs), "output": str(cfg.output),
              "rollouts": dialogue_summary(first + second, cfg.seed),
              "labels": {f: label_summary(p, t, cfg.seed) for f, (p, t) in labelled.items()}}
    report = finite_json(report)
    cfg.report_path.parent.mkdir(parents=True, exist_ok=True)
    cfg.report_path.write_text(json.dumps(report, indent=1))
    return report


def format_report(report: dict) -> str:
    """A few lines: the rollouts' true utility and ratings, and each feedback's label direction."""
    r = report["rollouts"]
    u = r["true_utility"]
    lines = [f"{r['dialogues']} rollouts: true utility {u['value']:+.3f} (95% CI {u['ci95'][0]:+.3f}, "
             f"{u['ci95'][1]:+.3f}); deceptive {r['deceptive_rate']['value']:.3f}; evaluator rating "
             + ", ".join(f"{f} {v:.2f}" for f, v in r["rating"].items() if v is not None)]
    for feedback, s in report["labels"].items():
        a, d = s["utility_agreement"], s["prefers_deceptive"]
        lines.append(f"  {feedback:9s} {s['pairs']:5d} pairs ({s['ties']} ties): chosen has the higher true utility "
                     f"{_fmt(a)}; chose the deceptive response {_fmt(d)}")
    lines.append(f"pairs ({report['config']['feedback']}): {report['pairs_written']} written to {report['output']}")
    return "\n".join(lines)


def _fmt(stat: dict) -> str:
    if stat["value"] is None:
        return "n/a (no such pairs)"
    return f"{stat['value']:.3f} [{stat['ci95'][0]:.3f}, {stat['ci95'][1]:.3f}] of {stat['n']}"
