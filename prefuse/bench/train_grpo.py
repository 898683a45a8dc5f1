"""`prefuse bench --task train --objective grpo`: the same GRPO training step through prefuse and through TRL 1.16's
`GRPOTrainer`, side by side, on the same completions.

    records = run(train.QUICK_SHAPE, modes=["lora"], betas=[0.0, 0.04], settings=GRPOSettings(num_generations=4))

The model and the text are the DPO train bench's (prefuse/bench/train.py: the built shape with its generated pairs,
or a pretrained model and the first rows of a preference file). The groups are fixed once, in the parent, and
written as token ids that both sides read (groups.json): each pair's prompt, tokenized as `prefuse train --online`
tokenizes prompts (the chat template with its generation prompt for conversational rows), and num_generations
completions, the responses of the pairs taken in turn (chosen_i, rejected_i, chosen_i+1, ...), each cut to a
length drawn (seeded) between half and all of max_completion_length tokens, so that the group's lengths differ.
Nothing is generated during the steps: the step timed is the training step GRPO takes after its rollout. The
reward is a fixed function of the completion's ids (`distinct_token_reward`), so the advantages are the same on
both sides and at every step.

Paths (prefuse/bench/train_grpo_workers.py):
- prefuse: `prefuse train --online --loss_type grpo`'s run with the groups as its batch source, then the loop's body
  for one micro-batch: the reference's decoder when beta > 0 (the adapters disabled with LoRA, a second copy in
  full fine-tuning) -> the policy's decoder -> fused head -> GRPO objective -> backward -> clip -> AdamW -> schedule;
- trl: `GRPOTrainer.train()` whose `rollout_func` returns the groups' ids; TRL pads them, scores them with the same
  reward function, computes the advantages and (beta > 0) the reference's log-probs, then its `compute_loss`
  (its chunked fused LM head), backward, clipping, AdamW, schedule;
- trl_prefuse: the same with `PrefuseGRPOTrainer` (prefuse/compat/trl_grpo.py), TRL's trainer whose per-token
  log-probs come from prefuse's fused head.

Both sides: float32, loss_type dapo (TRL's default), epsilon 0.2, group-scaled advantages, temperature 1, one
update per generation (the ratio is 1 in value), the k3 KL with TRL's bias correction when beta > 0, AdamW at the
DPO bench's learning rates with linear decay, clipping at 1.0; LoRA as the DPO bench (r 8, alpha 16, q_proj and
v_proj, the adapters from the same non-zero values). Each (mode, beta, path) is its own process; the paths of
a (mode, beta) build together, then step in turn, the order rotating (train._drive): peak memory and the medians as
the DPO bench measures them.

What is checked (`check_losses`): the losses at every step (at beta 0 the loss's value is -sum_i A_i |y_i| / sum_i
|y_i| with the ratio 1 in value, the same for any weights; the updates show in the rest), TRL's logged kl (beta > 0)
at every step, the reward statistics, the batch's token ids (a hash), and `final_logp`: after the last step each
side scores the batch's completion tokens under its trained policy with its own head, so a different update at any
step shows there.
"""
from __future__ import annotations

import json
import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefuse.bench import train
from prefuse.bench.train_workers import SEED

GRPO_PATHS = ("prefuse", "trl", "trl_prefuse")
BETAS = (0.0, 0.04)  # TRL's default, and the DeepSeekMath paper's
# a float32 per-token log-prob through two different heads (chunked logsumexps over the vocabulary, in different
# orders): a few ulp (2e-6 at |log p| ~ 20) of each reduction, taken generously
LOGP_ERROR = 2e-5
# the trained policy's mean completion log-prob, scored by each side's head: a mean of per-token errors
FINAL_LOGP_TOLERANCE = LOGP_ERROR
# reward statistics: the same float32 rewards on both sides, mean and Bessel std of at most a few hundred values
REWARD_TOLERANCE = 1e-5


def kl_bound(kl: float) -> float:
    """How far the two sides' logged kl may be apart: kl = mean over the tokens of e^d - d - 1 ~ d^2 / 2 with
    d = log pi_ref - log pi, whose error is at most 2 LOGP_ERROR (both log-probs), so |delta kl| <= mean |d| *
    2 LOGP_ERROR <= sqrt(2 kl) * 2 LOGP_ERROR; 1e-9 for the float32 rounding of kl itself near 0."""
    return math.sqrt(2 * abs(kl)) * 2 * LOGP_ERROR + 1e-9


@dataclass(frozen=True)
class GRPOSettings:
    num_generations: int = 4
    max_completion_length: int = 64

    def check(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"--num_generations: GRPO compares the completions of a prompt; need >= 2, got "
                             f"{self.num_generations}")
        if self.max_completion_length < 2:
            raise ValueError(f"--max_completion_length: expected >= 2, got {self.max_completion_length}")


def response_text(value) -> str:
    """A response of a preference row: a string, or (conversational) the content of its last message."""
    return value if isinstance(value, str) else value[-1]["content"]


def write_groups(model_dir, pairs_file: Path, work: Path, settings: GRPOSettings) -> tuple[Path, Path]:
    """(groups.json: prompt_ids [P], completion_ids [P][k], pad_id; prompts.jsonl: the prompts as rows, which
    prefuse's online run loads) from the pairs file, as the module docstring says."""
    import datasets

    from prefuse.engine.data import tokenize_prompts
    from prefuse.engine.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    rows = [json.loads(line) for line in pairs_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = tokenize_prompts(datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows]), tokenizer,
                               source=str(pairs_file))
    responses = [response_text(r[side]) for r in rows for side in ("chosen", "rejected")]
    rng = random.Random(SEED)
    top = settings.max_completion_length
    completion_ids = []
    for i in range(len(rows)):
        group = []
        for j in range(settings.num_generations):
            ids = tokenizer(responses[(2 * i + j) % len(responses)], add_special_tokens=False)["input_ids"]
            group.append(ids[:rng.randint(math.ceil(top / 2), top)])
        completion_ids.append(group)
    if any(not ids for group in completion_ids for ids in group):
        raise ValueError(f"--dataset: {pairs_file} has an empty response; every completion needs a token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    groups_file, prompts_file = work / "groups.json", work / "prompts.jsonl"
    groups_file.write_text(json.dumps({"prompt_ids": [e["prompt_ids"] for e in prompts.examples],
                                       "completion_ids": completion_ids, "pad_id": pad_id}), encoding="utf-8")
    prompts_file.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows), encoding="utf-8")
    return groups_file, prompts_file


def run(shape, modes=train.MODES, betas=BETAS, paths=GRPO_PATHS, *, settings: GRPOSettings = GRPOSettings(),
        rounds: int = 5, warmup: int = 1, device: str = "cpu", work_dir: str | None = None, timeout: float = 1800,
        log=print) -> list[dict]:
    """One record per (mode, beta, path): losses and GRPO_METRICS of every step, final_logp, step time (median,
    min, max over the `rounds` timed steps), tokens per second, peak memory. One (mode, beta)'s workers at a
    time. Checked with `check_losses` against prefuse's, which `paths` must hold."""
    settings.check()
    if "prefuse" not in paths or set(paths) - set(GRPO_PATHS):
        raise ValueError(f"--paths: the GRPO bench's paths are {list(GRPO_PATHS)}, prefuse among them (the others "
                         f"are checked against it), got {list(paths)}")
    with tempfile.TemporaryDirectory(prefix="prefuse-bench-grpo-") as tmp:
        work = Path(work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, pairs_file = shape.prepare(work)
        groups_file, prompts_file = write_groups(model_dir, pairs_file, work, settings)
        groups = json.loads(groups_file.read_text(encoding="utf-8"))
        described = shape.describe()
        described["prompts"] = described.pop("pairs")
        records = []
        for mode in modes:
            for beta in betas:
                workers = {}
                for name in paths:
                    records.append({"task": "train", "objective": "grpo", "peft": mode, "beta": beta, "path": name,
                                    **described, "num_generations": settings.num_generations,
                                    "max_completion_length": settings.max_completion_length,
                                    "completion_tokens": sum(len(c) for g in groups["completion_ids"] for c in g),
                                    "device": device, "dtype": "float32",
                                    "learning_rate": train.LEARNING_RATE[mode], "available": True, "losses": [],
                                    "metrics": [], "times_s": [], "errors": []})
                    spec = {"path": name, "mode": mode, "beta": beta, "device": device, "model_dir": str(model_dir),
                            "groups_file": str(groups_file), "prompts_file": str(prompts_file),
                            "output_dir": str(work / f"out_{mode}_{beta}_{name}"),
                            "max_completion_length": settings.max_completion_length, "steps": warmup + rounds,
                            "warmup": warmup, "learning_rate": train.LEARNING_RATE[mode]}
                    workers[len(records) - 1] = train._Worker(spec, timeout, entry="prefuse.bench.train_grpo_workers")
                log(f"  {mode} beta {beta}:")
                try:
                    train._drive(records, workers, warmup + rounds, warmup, log)
                finally:
                    for worker in workers.values():
                        worker.close()
    check_losses(records)
    return records


def check_losses(records: list[dict]) -> None:
    """Each other path's record against prefuse's of the same (mode, beta): losses (train.LOSS_TOLERANCE), kl (kl_bound),
    the reward statistics, final_logp and the batch's tokens; `loss_max_diff` and `final_logp_diff` on the record, and an error
    for each difference past its tolerance."""
    for rec in records:
        ref = next((r for r in records if r["path"] == "prefuse" and r["peft"] == rec["peft"]
                    and r["beta"] == rec["beta"] and r["losses"]), None)
        if rec["path"] == "prefuse" or ref is None or not rec["losses"]:
            continue
        if len(rec["losses"]) != len(ref["losses"]):
            rec["errors"].append(f"{len(rec['losses'])} steps against prefuse's {len(ref['losses'])}")
            continue
        diff = max(abs(a - b) for a, b in zip(rec["losses"], ref["losses"]))
        rec["loss_max_diff"] = diff
        if diff > train.LOSS_TOLERANCE:
            rec["errors"].append(f"losses differ from prefuse's by {diff:.2e} (tolerance {train.LOSS_TOLERANCE:.0e})")
        for key in ("kl", "reward", "reward_std", "frac_reward_zero_std"):
            pairs = [(m[key], r[key]) for m, r in zip(rec["metrics"], ref["metrics"]) if key in m and key in r]
            if key == "kl" and rec["beta"] != 0 and len(pairs) != len(rec["losses"]):
                rec["errors"].append("kl: not logged at every step by both paths")
            for got, want in pairs:
                bound = kl_bound(want) if key == "kl" else REWARD_TOLERANCE
                if abs(got - want) > bound:
                    rec["errors"].append(f"{key} differs from prefuse's: {got:.6g} against {want:.6g}")
                    break
        if "final_logp" in rec and "final_logp" in ref:
            rec["final_logp_diff"] = abs(rec["final_logp"] - ref["final_logp"])
            if rec["final_logp_diff"] > FINAL_LOGP_TOLERANCE:
                rec["errors"].append(f"final_logp differs from prefuse's by {rec['final_logp_diff']:.2e} (tolerance "
                                     f"{FINAL_LOGP_TOLERANCE:.0e}): the updates differ")
        else:
            rec["errors"].append("final_logp: not reported by both paths")
        if rec.get("batch_digest") != ref.get("batch_digest"):
            rec["errors"].append("the batch's token ids differ from prefuse's")


def format_table(records: list[dict]) -> str:
    """Markdown: time and peak memory of each (mode, beta, path), against prefuse's of the same (mode, beta)."""
    lines = [("| model | peft | beta | path | step s (median) | spread s | peak MiB | step extra MiB | "
              "x prefuse time | x prefuse peak | x prefuse step extra | losses (every step) | final logp |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        head = f"| {rec['shape']} | {rec['peft']} | {rec['beta']:g} | {rec['path']} |"
        if "time_median_s" not in rec:
            lines.append(f"{head} error: {'; '.join(rec['errors'])[:120]} | | | | | | | | |")
            continue
        ref = next((r for r in records if r["path"] == "prefuse" and r["peft"] == rec["peft"]
                    and r["beta"] == rec["beta"] and "time_median_s" in r), None)
        ratio_t = f"{rec['time_median_s'] / ref['time_median_s']:.2f}" if ref else ""
        ratio_m = f"{rec['peak_mib'] / ref['peak_mib']:.2f}" if ref else ""
        extra = "" if rec["step_extra_mib"] is None else f"{rec['step_extra_mib']:.0f}"
        ratio_e = (f"{rec['step_extra_mib'] / ref['step_extra_mib']:.2f}" if ref and rec["step_extra_mib"] is not None
                   and ref["step_extra_mib"] else "")
        losses = " ".join(f"{x:.5f}" for x in rec["losses"])
        if rec["errors"]:
            losses += " (" + "; ".join(rec["errors"]) + ")"
        final = f"{rec['final_logp']:.6f}" if "final_logp" in rec else ""
        lines.append(f"{head} {rec['time_median_s']:.3f} | {rec['time_min_s']:.3f}-{rec['time_max_s']:.3f} | "
                     f"{rec['peak_mib']:.0f} | {extra} | {ratio_t} | {ratio_m} | {ratio_e} | {losses} | {final} |")
    return "\n".join(lines)


__all__ = ["BETAS", "GRPO_PATHS", "GRPOSettings", "check_losses", "format_table", "run", "write_groups"]
