"""The paper's direction on the toy, end to end: immediate labels train the consultant to deceive, hindsight labels
to serve the customer.

    python -m prefuse.commands.rlhs_direction --output_dir rlhs_direction      # about a minute on a laptop CPU

1. The toy consultant: a tiny Llama warmed up on templated truthful and deceptive responses (`toy_policy.py`), or
   --policy DIR.
2. Two rollouts per training scenario, played out by the rule-based customer and world model and labelled by the
   rule-based evaluator under each feedback (`command.rlhs_pairs`), with each label set's direction
   (`labels.label_summary`: how often the chosen response has the higher true utility, how often it is the
   deceptive one, with Wilson intervals).
3. One training run per label set through `prefuse.engine.train.loop.train` (full fine-tuning; --loss_type, default DPO
   with an NLL term on the chosen responses, `sigmoid sft`; see docs/methods/rlhs.md for plain `sigmoid`), from the
   same warmed-up model.
4. Each trained policy (and the warmed-up one) answers the same held-out scenarios under the same seed: its true
   utility, the evaluator's immediate rating, its deception rate; and per pair of runs the difference of true
   utility with a paired bootstrap interval over the held-out scenarios.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from prefuse.engine.methods.rlhs.command import finite_json, load_policy, rlhs_pairs, write_jsonl
from prefuse.engine.methods.rlhs.environment import generate_scenarios
from prefuse.engine.methods.rlhs.labels import bootstrap_interval, dialogue_summary, label_summary
from prefuse.engine.methods.rlhs.parties import FEEDBACK, RuleCustomer, RuleEvaluator, RuleWorldModel, check_feedback
from prefuse.engine.methods.rlhs.rollouts import play, sample_responses

HELD_OUT_SEED = 10_000  # the held-out scenarios' seed is seed + this: never the training scenarios


def evaluate_policy(model, tokenizer, scenarios, *, seed: int, parties=None) -> tuple[dict, list[float]]:
    """(dialogue_summary of one sampled response per scenario, the per-scenario true utilities)."""
    customer, world_model, evaluator = parties or (RuleCustomer(), RuleWorldModel(), RuleEvaluator())
    responses = sample_responses(model, tokenizer, scenarios, samples=1, seed=seed)
    dialogues = play(scenarios, [r[0] for r in responses], customer, world_model, evaluator)
    return dialogue_summary(dialogues, seed), [d.utility for d in dialogues]


def train_on_pairs(policy_dir: str, pairs_file: Path, output_dir: Path, *, loss_type: list[str], steps: int,
                   learning_rate: float, beta: float, batch_size: int, seed: int, use_peft: bool = False) -> Path:
    """One `prefuse train` run on a pairs file; returns its last checkpoint."""
    from prefuse.engine.train.config import TrainConfig
    from prefuse.engine.train.loop import train

    cfg = TrainConfig(model_name_or_path=policy_dir, dataset_name=str(pairs_file), output_dir=str(output_dir),
                      loss_type=list(loss_type), beta=beta, learning_rate=learning_rate, max_steps=steps,
                      per_device_train_batch_size=batch_size, lr_scheduler_type="constant", report_to="none",
                      logging_steps=steps, save_steps=0, seed=seed, device="cpu", use_peft=use_peft,
                      lora_r=8, lora_alpha=16, lora_dropout=0.0,
                      overwrite_output_dir=True)  # this command's own run of an earlier call is replaced
    train(cfg)
    return output_dir / f"checkpoint-{steps}"


def run_direction(output_dir, *, policy: str | None = None, scenarios: int = 400, eval_scenarios: int = 400,
                  feedbacks=("immediate", "partial"), loss_type=("sigmoid", "sft"), steps: int = 60,
                  learning_rate: float = 1e-3, beta: float = 0.1, batch_size: int = 16, sft_steps: int = 300,
                  honest_steps: int = 200, architecture: str = "gpt2", seed: int = 0) -> dict:
    """Steps 1-4 of the module docstring; writes the pairs, the runs and direction.json under output_dir and
    returns what direction.json holds."""
    from prefuse.engine.methods.rlhs.toy_policy import build_toy_policy

    for f in feedbacks:
        check_feedback(f)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if policy is None:
        policy = str(build_toy_policy(out / "toy_policy", steps=sft_steps, honest_steps=honest_steps,
                                       architecture=architecture, seed=seed))
    model, tokenizer = load_policy(policy)
    parties = RuleCustomer(), RuleWorldModel(), RuleEvaluator()
    first, second, labelled = rlhs_pairs(model, tokenizer, generate_scenarios(scenarios, seed), *parties, seed=seed)
    result = {"policy": policy, "loss_type": list(loss_type), "steps": steps, "learning_rate": learning_rate,
              "rollouts": dialogue_summary(first + second, seed),
              "labels": {f: label_summary(p, t, seed) for f, (p, t) in labelled.items()}, "policies": {}}
    held_out = generate_scenarios(eval_scenarios, seed + HELD_OUT_SEED)
    utilities = {}
    result["policies"]["warmed_up"], utilities["warmed_up"] = evaluate_policy(model, tokenizer, held_out,
                                                                              seed=seed + 1, parties=parties)
    for feedback in feedbacks:
        pairs_file = out / f"pairs_{feedback}.jsonl"
        write_jsonl(labelled[feedback][0], pairs_file)
        checkpoint = train_on_pairs(policy, pairs_file, out / f"run_{feedback}", loss_type=list(loss_type),
                                    steps=steps, learning_rate=learning_rate, beta=beta, batch_size=batch_size,
                                    seed=seed)
        trained, _ = load_policy(str(checkpoint))
        result["policies"][feedback], utilities[feedback] = evaluate_policy(trained, tokenizer, held_out,
                                                                            seed=seed + 1, parties=parties)
    names = list(utilities)
    result["utility_differences"] = {}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diffs = [x - y for x, y in zip(utilities[b], utilities[a])]
            low, high = bootstrap_interval(diffs, seed=seed)
            result["utility_differences"][f"{b} - {a}"] = {"value": sum(diffs) / len(diffs), "ci95": [low, high]}
    result = finite_json(result)
    (out / "direction.json").write_text(json.dumps(result, indent=1))
    return result


def format_direction(result: dict) -> str:
    lines = ["labels (the warmed-up policy's rollouts)   chosen has higher true utility   chose the deceptive one"]
    for f, s in result["labels"].items():
        a, d = s["utility_agreement"], s["prefers_deceptive"]
        lines.append(f"  {f:9s} {s['pairs']:4d} pairs   {a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
                     f"            {d['value']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]")
    lines.append(f"policies ({' + '.join(result['loss_type'])}, {result['steps']} steps)   true utility [95% CI]"
                 f"      immediate rating   deceptive")
    for name, s in result["policies"].items():
        u = s["true_utility"]
        lines.append(f"  {name:9s}   {u['value']:+.3f} [{u['ci95'][0]:+.3f}, {u['ci95'][1]:+.3f}]       "
                     f"{s['rating']['immediate']:.2f}        {s['deceptive_rate']['value']:.3f}")
    for name, d in result["utility_differences"].items():
        lines.append(f"  true utility {name}: {d['value']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prefuse.commands.rlhs_direction", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="rlhs_direction")
    p.add_argument("--policy", default=None, help="a policy directory (default: build the toy consultant)")
    p.add_argument("--scenarios", type=int, default=400, help="training scenarios (two rollouts each)")
    p.add_argument("--eval_scenarios", type=int, default=400, help="held-out scenarios")
    p.add_argument("--feedbacks", nargs="+", default=["immediate", "partial"], choices=FEEDBACK)
    p.add_argument("--loss_type", nargs="+", default=["sigmoid", "sft"])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--sft_steps", type=int, default=300)
    p.add_argument("--honest_steps", type=int, default=200)
    p.add_argument("--architecture", default="gpt2", choices=["gpt2", "llama"], help="the toy consultant's")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)  # tiny shapes: one thread is faster than contention
    result = run_direction(args.output_dir, policy=args.policy, scenarios=args.scenarios,
                           eval_scenarios=args.eval_scenarios, feedbacks=tuple(args.feedbacks),
                           loss_type=tuple(args.loss_type), steps=args.steps, learning_rate=args.learning_rate,
                           beta=args.beta, sft_steps=args.sft_steps, honest_steps=args.honest_steps,
                           architecture=args.architecture, seed=args.seed)
    print(format_direction(result))
    print(f"written: {Path(args.output_dir) / 'direction.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
