"""The workers of the GRPO train bench (prefuse/bench/train_grpo.py), with the DPO workers' protocol
(prefuse/bench/train_workers.py): each runs one (mode, beta, path) in its own process and takes one GRPO step on
the same fixed groups each time its parent writes "step".

The groups (groups.json, written once by the parent): P prompts' token ids and num_generations completions' token
ids each, and the pad id. Nothing is generated during the steps; both sides read the same ids.

- prefuse: `prefuse train --online --loss_type grpo`'s run (engine/train/build.build_run) whose batch source is
  `FixedGroups` (the batch the online source builds from sampled groups, `engine/online/source.py:_groups`, here
  from the file's), then the body of the loop for one micro-batch (`train_workers.prefuse_steps`): decoder (and the
  reference's when beta > 0) -> fused head -> GRPO objective -> backward -> clip -> AdamW -> schedule.
- trl: TRL 1.16's `GRPOTrainer(...).train()` with `rollout_func` (TRL's hook for custom generation) returning the
  same ids; everything after generation is TRL's own code: padding, the reward function (the same one),
  advantages, the reference's log-probs, `compute_loss`, backward, clipping, AdamW, schedule.
- trl_prefuse: the same with prefuse's drop-in `PrefuseGRPOTrainer` (prefuse/compat/trl_grpo.py): TRL's trainer,
  its per-token log-probs and entropies from prefuse's fused head.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter

from prefuse.bench.train_workers import LORA, SEED, _Protocol, init_adapters, prefuse_steps, trl_step_args

# logged by both sides under TRL's names, compared step by step (train_grpo.check_losses)
GRPO_METRICS = ("kl", "reward", "reward_std", "frac_reward_zero_std")


def distinct_token_reward(completion_ids, **kwargs) -> list[float]:
    """The bench's reward function (TRL's signature): the share of distinct token ids in each completion.
    Deterministic and different between most completions of a group, so the advantages are fixed and not zero."""
    return [len(set(ids)) / max(len(ids), 1) for ids in completion_ids]


def groups_digest(input_ids, attention_mask) -> str:
    """A hash of the batch's sequences (the tokens under the mask, whatever the padding side), in sorted order."""
    rows = sorted(ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu()))
    return hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:16]


def read_groups(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class FixedGroups:
    """A batch source serving the file's groups at every step, as the online source lays out sampled ones: rows
    prompt-major (sample j of prompt i is row i * k + j), the role `online` [P, k], rewards [P, k] from
    `distinct_token_reward` (scored at each step, as a judge scores each step's samples)."""

    batches_per_epoch = 1
    epoch = 0.0

    def __init__(self, groups: dict):
        self.groups = groups

    def next_batch(self):
        import torch

        from prefuse.engine.core.sources import Batch
        from prefuse.engine.data import collate_sequences

        prompts, completions = self.groups["prompt_ids"], self.groups["completion_ids"]
        k = len(completions[0])
        rows = [(p, c) for p, group in zip(prompts, completions) for c in group]
        padded = collate_sequences([p for p, _ in rows], [c for _, c in rows], self.groups["pad_id"])
        rewards = torch.tensor(distinct_token_reward([c for _, c in rows]), dtype=torch.float32)
        return Batch(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], labels=padded["labels"],
                     roles={"online": torch.arange(len(rows)).view(len(prompts), k)},
                     inputs={"rewards": rewards.view(len(prompts), k)}, index=torch.arange(len(prompts)))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def prefuse_grpo_run(spec: dict):
    """prefuse's side, built: `prefuse train --online --loss_type grpo`'s run with the bench's settings and
    FixedGroups as its batch source; LoRA adapters from `init_adapters`. Returns (run, cfg)."""
    from prefuse.engine.train.build import build_run
    from prefuse.engine.train.config import TrainConfig

    groups = read_groups(spec["groups_file"])
    lora = spec["mode"] == "lora"
    cfg = TrainConfig(model_name_or_path=spec["model_dir"], dataset_name=spec["prompts_file"],
                      output_dir=spec["output_dir"], online=True, loss_type=["grpo"], beta=spec["beta"],
                      objective_args={"grpo_loss_type": "dapo", "scale_rewards": "group", "epsilon": 0.2},
                      reward_funcs=[f"{__file__}:distinct_token_reward"],
                      num_generations=len(groups["completion_ids"][0]),
                      max_new_tokens=spec["max_completion_length"], temperature=1.0,
                      learning_rate=spec["learning_rate"], per_device_train_batch_size=len(groups["prompt_ids"]),
                      max_steps=spec["steps"], use_peft=lora, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                      lora_dropout=0.0, lora_target_modules=LORA["target_modules"], max_grad_norm=1.0,
                      weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0, logging_steps=10**6,
                      save_steps=0, report_to="none", device=spec["device"], seed=SEED,
                      overwrite_output_dir=True)  # a measurement's scratch directory, built anew each time
    run = build_run(cfg, source=FixedGroups(groups))
    if lora:
        init_adapters(run.policy)
    run.policy.train()
    return run, cfg


def prefuse_final_logp(run, batch) -> float:
    """The mean log-prob of the batch's completion tokens under the trained policy, through prefuse's fused head."""
    import torch

    from prefuse.engine.models.loading import decoder_hidden_states
    from prefuse.heads import head_of
    from prefuse.kernels import linear_logprobs

    head = head_of(run.policy)
    with torch.no_grad():
        hidden = decoder_hidden_states(run.policy, batch.input_ids, batch.attention_mask)
        logps = linear_logprobs(hidden, head.weight, batch.labels, bias=head.bias)
    return float(logps.sum() / (batch.labels != -100).sum())


def prefuse_worker(spec: dict, proto: _Protocol) -> None:
    run, cfg = prefuse_grpo_run(spec)
    proto.send(ready=True)
    clock = {}
    for loss, metrics, batch in prefuse_steps(run, cfg, spec["steps"],
                                              wait=lambda: clock.__setitem__("started", proto.wait())):
        proto.stepped(clock["started"], loss, batch.n_tokens, groups_digest(batch.input_ids, batch.attention_mask),
                      metrics)
    proto.finish(lambda: prefuse_final_logp(run, batch))


def trl_grpo_trainer(spec: dict, wait=lambda: None, stepped=lambda loss, metrics, inputs: None):
    """TRL's side, built: a `GRPOTrainer` (path trl_prefuse: prefuse's `PrefuseGRPOTrainer`) with the same settings
    whose rollout_func returns the groups' ids (each
    prompt's k occurrences in a batch get its k completions, in order); `.train()` calls `wait()` at each step's
    start and `stepped(loss, metrics, inputs)` at its end (metrics: GRPO_METRICS as TRL logged them)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    groups = read_groups(spec["groups_file"])
    lora = spec["mode"] == "lora"
    k = len(groups["completion_ids"][0])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    keys = [tokenizer.decode(ids) for ids in groups["prompt_ids"]]  # the dataset's prompts: the groups' own text
    if len(set(keys)) != len(keys):
        raise ValueError("groups: two prompts have the same text; the rollout could not tell their groups apart")
    group_of = {key: i for i, key in enumerate(keys)}

    def rollout(prompts, trainer):
        taken = Counter()
        prompt_ids, completion_ids = [], []
        for prompt in prompts:
            i = group_of[prompt]
            prompt_ids.append(groups["prompt_ids"][i])
            completion_ids.append(groups["completion_ids"][i][taken[i]])
            taken[i] += 1
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    seen = {}

    base = GRPOTrainer
    if spec["path"] == "trl_prefuse":
        from prefuse.compat.trl_grpo import PrefuseGRPOTrainer as base

    class BenchGRPOTrainer(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            logged = {key: v[-1] for key, v in self._metrics["train"].items() if key in GRPO_METRICS and v}
            seen.update(loss=loss.detach(), inputs=inputs, metrics=logged)
            self.bench_inputs = inputs
            return loss

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            wait()

        def on_step_end(self, args, state, control, **kwargs):
            stepped(float(seen["loss"]), seen["metrics"], seen["inputs"])

    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, local_files_only=True)
    args = GRPOConfig(per_device_train_batch_size=len(keys) * k, num_generations=k,
                      max_completion_length=spec["max_completion_length"], beta=spec["beta"], loss_type="dapo",
                      epsilon=0.2, scale_rewards="group", temperature=1.0, **trl_step_args(spec))
    trainer = BenchGRPOTrainer(model=model, reward_funcs=[distinct_token_reward], args=args,
                               train_dataset=Dataset.from_list([{"prompt": key} for key in keys]),
                               processing_class=tokenizer, rollout_func=rollout,
                               peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA) if lora else None)
    if lora:
        init_adapters(trainer.model)
    trainer.add_callback(Clock())
    return trainer


def trl_worker(spec: dict, proto: _Protocol) -> None:
    import torch

    clock = {}

    def stepped(loss, metrics, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        proto.stepped(clock["started"], loss, int(mask.sum()), groups_digest(ids, mask), metrics)

    trainer = trl_grpo_trainer(spec, wait=lambda: clock.__setitem__("started", proto.wait()), stepped=stepped)
    proto.send(ready=True)
    trainer.train()
    proto.finish(lambda: trl_final_logp(trainer))


def trl_final_logp(trainer) -> float:
    """The mean log-prob of the last batch's completion tokens under the trained policy, through TRL's own
    `_get_per_token_logps_and_entropies` (its fused LM head)."""
    import torch

    inputs = trainer.bench_inputs
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask,
                                                                 inputs["completion_ids"].size(1))
    completion = inputs["completion_mask"]
    return float((logps * completion).sum() / completion.sum())


class _GRPOProtocol(_Protocol):
    metric_names = GRPO_METRICS

    def finish(self, final_logp) -> None:
        """The peak as the DPO workers report it, read before `final_logp()` (the trained policy's mean log-prob
        of the completions) runs, and that number."""
        from prefuse.bench.train_workers import _peak

        peak = _peak(self.device)
        self.send(finished=True, peak_mib=peak, base_mib=self.base, extras={"final_logp": final_logp()})


WORKERS = {"prefuse": prefuse_worker, "trl": trl_worker, "trl_prefuse": trl_worker}


def main(spec_json: str) -> None:
    import os

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func's notice
    spec = json.loads(spec_json)
    proto = _GRPOProtocol(spec["device"], spec["warmup"])
    WORKERS[spec["path"]](spec, proto)
