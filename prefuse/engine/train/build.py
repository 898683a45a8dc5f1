"""Everything a training run is made of, built from its TrainConfig: `build_run(cfg) -> Run`.

    start -> models and step -> batches (offline / online, sharded over the ranks) -> (reference caches) ->
    optimizer and schedule -> resume -> log

Each arrow is a function below; `prefuse train-rm` (engine/reward/train.py) builds its Run from the same start,
optimizer, resume and log. The loop (`engine/train/loop.py`) then only drives a Run; nothing here trains.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from prefuse.engine.checkpoint import load_checkpoint, load_weights, read_run_config, resolve_checkpoint
from prefuse.engine.core.method_defaults import LOSS_TEMPERATURE, loss_temperature
from prefuse.engine.core.metrics import MetricsLog
from prefuse.engine.core.objectives import ObjectiveNeeds
from prefuse.engine.core.reference_cache import ReferenceCache, cache_path
from prefuse.engine.core.shards import ShardedSource, check_last_batch, shard_batch, shard_online
from prefuse.engine.core.sources import Batch, BatchSource, OfflineSource, batches
from prefuse.engine.core.step import Step
from prefuse.engine.data import (
    DataError,
    TokenizedData,
    check_response_tokens_left,
    detect_format,
    held_out_split,
    load_preference_data,
    load_prompts,
    load_records,
    pairs_to_completions,
    tokenize_preferences,
    tokenize_prompts,
)
from prefuse.engine.data.formats import UNPAIRED_FORMATS, holds_prompts_only
from prefuse.engine.data.images import IMAGES_COLUMN
from prefuse.engine.judges import make_judge
from prefuse.engine.methods.alol_advantages import prepare_advantages, priority_order, priority_steps, required_columns
from prefuse.engine.methods.bdhs import bdhs_rejected
from prefuse.engine.methods.monitor import Monitor, build_monitor
from prefuse.engine.methods.ofs_adapters import FastSlowStep, add_slow_adapter, param_groups
from prefuse.engine.methods.srpo import add_revision_rows, revision_report, revision_unlearnable
from prefuse.engine.models.embedders import load_embedder
from prefuse.engine.models.loading import Models, load_models
from prefuse.engine.online.iterations import Iterations
from prefuse.engine.online.methods import JUDGELESS, PAIRED, online_method
from prefuse.engine.online.rollout import RolloutConfig
from prefuse.engine.online.source import OnlineSource
from prefuse.engine.train import distributed
from prefuse.engine.train.allocator import return_freed_memory
from prefuse.engine.train.config import TrainConfig
from prefuse.engine.train.output_dir import (
    SCHEDULE,
    changed_settings,
    claim,
    clear_old_run,
    describe,
    release,
    settings_of,
)
from prefuse.engine.train.report import Report
from prefuse.heads import head_of
from prefuse.preference import PreferenceLoss


@dataclass(kw_only=True)
class Run:
    """What the loop drives: a model, its optimizer and schedule, a step, a batch source, a log. `cfg` is any
    config with the loop's settings (TrainConfig; `prefuse train-rm`'s RewardModelConfig): gradient_accumulation_steps,
    per_device_train_batch_size, max_grad_norm, logging_steps, eval_steps, save_steps, save_total_limit."""
    cfg: TrainConfig
    out: Path
    device: torch.device
    policy: torch.nn.Module  # the trained model
    step: Step               # (batch, reference cache) -> (loss, metrics); held_out_metrics, after_update, state_dict
    source: BatchSource
    params: list
    optimizer: torch.optim.Optimizer
    scheduler: object
    log: MetricsLog
    total_steps: int
    start_step: int = 0
    num_tokens: int = 0      # training tokens of the steps before start_step (a resumed run's)
    nonfinite_steps_skipped: int = 0  # steps --skip_nonfinite_steps skipped so far (a resumed run's too)
    held_out: Callable[[], Iterator[Batch]] | None = None  # the held-out set's batches, walked anew on each call
    references: dict = field(default_factory=dict)  # split -> ReferenceCache (precomputed reference log-probs)
    report: Report = field(default_factory=Report)  # what the run prints (engine/train/report.py)
    monitor: Monitor | None = None  # the over-optimisation monitor (--monitor_steps)
    world: distributed.World = field(default_factory=distributed.World)  # the ranks (torchrun), one by default
    needs: ObjectiveNeeds | None = None  # what the objective reads (a preference run's)
    eval_data: TokenizedData | None = None  # the held-out examples (a preference run's)

    def eval_batches(self) -> Iterator[Batch]:
        """The held-out set's batches (this rank's share of each); none without a held-out set."""
        return iter(()) if self.held_out is None else self.held_out()


def held_out_batches(data: TokenizedData, needs: ObjectiveNeeds, *, batch_size: int, pad_id: int,
                     max_length: int | None, baseline: float, world: distributed.World) -> Iterator[Batch]:
    """The held-out set in global batches (ranks x batch_size), this rank's share of each."""
    walk = batches(data, needs, batch_size=batch_size * world.size, pad_id=pad_id, max_length=max_length,
                   baseline=baseline)
    return (shard_batch(b, world.rank, world.size) for b in walk) if world.distributed else walk


def build_run(cfg: TrainConfig, source: BatchSource | None = None) -> Run:
    """The run `cfg` describes; `source` replaces the offline batches of dataset_name (an online source, a test's),
    which then still gives the held-out set and the tokenizer's data checks."""
    filled = cfg.apply_defaults()
    cfg.validate()
    if filled:
        print(f"defaults of {' '.join(cfg.loss_type)}: {', '.join(filled)}", flush=True)
    needs = cfg.needs()
    world = distributed.current()  # torchrun's ranks (engine/train/distributed.py), or this process alone
    distributed.check_supported(cfg, world)
    out, device = start(cfg.output_dir, cfg.to_dict(), seed=cfg.seed, device=cfg.device, world=world)
    try:
        return _build(cfg, source, needs=needs, world=world, out=out, device=device)
    except BaseException:
        release(out, failed=True)  # the lock goes; a directory this run made, still empty, too
        raise


def _build(cfg: TrainConfig, source: BatchSource | None, *, needs: ObjectiveNeeds, world: distributed.World,
           out: Path, device) -> Run:
    """build_run's models, data, batches and finish, once output_dir is claimed."""
    models, step, pad_id = models_and_step(cfg, needs, device)
    if cfg.online:
        source, total_steps = online_batches(cfg, models, out, world, source)
        return finish(cfg, out=out, device=device, needs=needs, models=models, step=step, source=source,
                      total_steps=total_steps, pad_id=pad_id, world=world)
    train_data, eval_data, advantages = offline_data(cfg, needs, models, pad_id)
    offline, source, total_steps = offline_batches(cfg, needs, train_data, eval_data=eval_data, pad_id=pad_id,
                                                   world=world, source=source, order=priority_order(cfg, advantages))
    references = reference_caches(cfg, needs, models, step, {"train": train_data, "eval": eval_data},
                                  baseline=offline.baseline, pad_id=pad_id, out=out, world=world, device=device)
    held_out = None if eval_data is None else partial(
        held_out_batches, eval_data, needs, batch_size=cfg.per_device_eval_batch_size, pad_id=pad_id,
        max_length=cfg.max_length, baseline=offline.baseline, world=world)
    return finish(cfg, out=out, device=device, needs=needs, models=models, step=step, source=source,
                  total_steps=total_steps, pad_id=pad_id, world=world, eval_data=eval_data, held_out=held_out,
                  references=references)


# -- the seams of a run, in the order build_run takes them ---------------------------------------------------------

def start(output_dir, config: dict, *, seed: int, device: str, world: distributed.World) -> tuple[Path, torch.device]:
    """(output_dir, the device to train on): output_dir claimed for this run on rank 0 (its lock; a used one refused
    unless the run resumes or overwrites it: engine/train/output_dir.py; nothing else is written before every
    setting and the data are checked: resume() writes train_config.json), python's, numpy's and torch's generators
    seeded; the device is the rank's under torchrun, else `device` (auto: CUDA when there is one)."""
    out = Path(output_dir)
    claim(out, resuming=bool(config.get("resume_from_checkpoint")), overwrite=bool(config.get("overwrite_output_dir")),
          main=world.main)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    device = world.device if world.distributed else torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if device.type == "cpu":
        return_freed_memory()  # PREFUSE_CPU_ALLOCATOR=release: freed activations go back (engine/train/allocator.py)
    return out, device


def _value_reference(cfg: TrainConfig) -> bool:
    """A-LoL's value head reads the reference's prompt states V_ref(x)."""
    return cfg.advantages == "value_head" and cfg.ref_model_name_or_path is not None


def models_and_step(cfg: TrainConfig, needs: ObjectiveNeeds, device) -> tuple[Models, Step, int]:
    """(the policy, reference and tokenizer; the step that turns a batch into loss and metrics: a Step, or
    OFS-DPO's FastSlowStep with its slow adapter added; the pad token id)."""
    # online methods that sample from the reference or the mixture need it even when their loss does not
    samples_reference = cfg.online and (needs.reference or "sample" in needs.roles or "nash_md" in cfg.loss_type
                                        or cfg.online_sampler == "mixture")
    models = load_models(cfg.model_config(), device=device,
                         need_reference=needs.reference or samples_reference or _value_reference(cfg))
    tokenizer = models.tokenizer
    if tokenizer is None:
        raise ValueError(f"model_name_or_path: {cfg.model_name_or_path} has no tokenizer files")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head_temperature, row_temperature = online_temperatures(cfg, head_of(models.policy))
    loss_fn = PreferenceLoss(cfg.objective, beta=cfg.beta, loss_weights=cfg.loss_weights,
                             softcap=head_of(models.policy).softcap, temperature=head_temperature,
                             **cfg.objective_hparams)
    if needs.slow_adapter:
        add_slow_adapter(models.policy)
        step = FastSlowStep(models, loss_fn, needs, bf16=cfg.bf16, interval=cfg.ofs_chasing_interval,
                            swap_mode=cfg.ofs_swap_mode)
    else:
        step = Step(models, loss_fn, needs, bf16=cfg.bf16, row_temperature=row_temperature,
                    padding_free=cfg.padding_free, padding_free_row_tokens=cfg.padding_free_row_tokens)
    return models, step, pad_id


def total_steps_of(cfg, batches_per_epoch: int) -> int:
    """max_steps, else num_train_epochs' worth of optimizer steps (gradient_accumulation_steps batches each)."""
    return cfg.max_steps if cfg.max_steps > 0 else math.ceil(
        cfg.num_train_epochs * batches_per_epoch / cfg.gradient_accumulation_steps)


def online_batches(cfg: TrainConfig, models: Models, out: Path, world: distributed.World,
                   source: BatchSource | None) -> tuple[BatchSource, int]:
    """(the batch source: `source`, else the online source of dataset_name's prompts, this rank's share; the
    run's optimizer steps, counted by the online source's prompts)."""
    online = shard_online(online_source(cfg, models, models.tokenizer, out), world,  # its own prompts
                          sharded=bool(cfg.fsdp))
    return (online if source is None else source), total_steps_of(cfg, online.batches_per_epoch)


def offline_data(cfg: TrainConfig, needs: ObjectiveNeeds, models: Models,
                 pad_id: int) -> tuple[TokenizedData, TokenizedData | None, object]:
    """(training examples, held-out ones or None, A-LoL's advantages or None), reported in `data:` lines; the
    reference is let go when only A-LoL's value head read it."""
    train_data, eval_data = load_data(cfg, models.tokenizer, needs, processor=models.processor)
    print(f"data: {len(train_data)} training examples ({train_data.format})"
          + (f", {len(eval_data)} held out" if eval_data is not None else "")
          + (f", {train_data.skipped.count} bad rows skipped" if train_data.skipped.count else ""), flush=True)
    if train_data.unlearnable:
        print(f"data: {train_data.truncation_report()}", flush=True)
    if needs.revision and sum(revision_unlearnable(train_data)):
        print(f"data: {revision_report(train_data)}", flush=True)
    # A-LoL: rewards (data or judge), advantages (--advantages), once before training
    train_data, eval_data, advantages = prepare_advantages(cfg, models, models.tokenizer, train_data, eval_data,
                                                           pad_id)
    if _value_reference(cfg) and not needs.reference:
        models.reference = None  # loaded only for the value head's prompt states
    return train_data, eval_data, advantages


def offline_batches(cfg: TrainConfig, needs: ObjectiveNeeds, train_data: TokenizedData, *,
                    eval_data: TokenizedData | None, pad_id: int, world: distributed.World,
                    source: BatchSource | None = None, order=None) -> tuple[OfflineSource, BatchSource, int]:
    """(the offline source of the training examples, in global batches; the batch source the run draws from:
    `source`, else that one, sharded over the ranks under torchrun; the run's optimizer steps)."""
    global_batch = cfg.per_device_train_batch_size * world.size  # every rank takes its share of each
    check_last_batch(len(train_data), global_batch, world, "per_device_train_batch_size")
    if eval_data is not None:
        check_last_batch(len(eval_data), cfg.per_device_eval_batch_size * world.size, world,
                         "per_device_eval_batch_size")
    offline = OfflineSource(train_data, needs, batch_size=global_batch, seed=cfg.seed,
                            pad_id=pad_id, max_length=cfg.max_length, order=order)
    source = (ShardedSource(offline, world) if world.distributed else offline) if source is None else source
    total_steps = priority_steps(cfg, source, total_steps_of(cfg, source.batches_per_epoch))  # good_priority:
    return offline, source, total_steps  # max_steps x the positive fraction


def reference_caches(cfg: TrainConfig, needs: ObjectiveNeeds, models: Models, step: Step, splits: dict, *,
                     baseline: float, pad_id: int, out: Path, world: distributed.World, device) -> dict:
    """{split: ReferenceCache} of the reference's log-prob sums of every split's examples (`splits`: name ->
    data or None), loaded or built (rank 0 writes them), with --precompute_ref_log_probs; the reference model is
    then let go. {} otherwise."""
    references = {}
    if not (cfg.precompute_ref_log_probs and needs.reference):
        return references
    parts = (cfg.dataset_name, cfg.model_name_or_path, cfg.ref_model_name_or_path, cfg.torch_dtype, cfg.bf16,
             needs.roles)
    for split, data in splits.items():
        if data is not None:
            walk = batches(data, needs, batch_size=cfg.per_device_eval_batch_size, pad_id=pad_id,
                           max_length=cfg.max_length, baseline=baseline)
            references[split] = world.main_first(lambda: ReferenceCache.load_or_build(  # rank 0 writes it
                cache_path(out, split, parts, data.examples), len(data), walk, step.reference_sums, device))
    models.reference = None  # the cache replaces it
    return references


def finish(cfg: TrainConfig, *, out: Path, device, needs: ObjectiveNeeds, models: Models, step: Step,
           source: BatchSource, total_steps: int, pad_id: int, world: distributed.World,
           eval_data: TokenizedData | None = None, held_out=None, references: dict | None = None) -> Run:
    """The Run: the step wrapped for the ranks, the optimizer and schedule, the monitor, COFS-DPO's starting
    adapters, the resumed state and the log."""
    step = world.wrap(step, models, fsdp=cfg.fsdp, bf16=cfg.bf16)  # DDP / FSDP2 around the step (distributed.py)
    groups = (param_groups(models.policy, cfg.learning_rate, cfg.ofs_slow_lr_ratio) if needs.slow_adapter
              else None)
    params, optimizer, scheduler = optimizer_and_schedule(cfg, models.policy, total_steps, groups=groups)
    monitor = build_monitor(cfg, models, eval_data, out, pad_id)
    if cfg.init_adapters:  # COFS-DPO's next domain: the previous one's adapters (and OFS roles), a fresh optimizer
        step.load_state_dict(load_weights(cfg.init_adapters, model=models.policy).get("step_state", {}))
        print(f"adapters from {cfg.init_adapters}", flush=True)
    state = resume(cfg, out, model=models.policy, optimizer=optimizer, scheduler=scheduler, source=source,
                   step=step, world=world, total_steps=total_steps)
    if state and monitor is not None:
        monitor.load_state_dict(state.get("monitor"))
    return Run(cfg=cfg, out=out, device=device, policy=models.policy, step=step, source=source, params=params,
               optimizer=optimizer, scheduler=scheduler, log=open_log(cfg, out, state, world),
               total_steps=total_steps, start_step=int(state.get("step", 0)),
               num_tokens=int(state.get("num_tokens", 0)),
               nonfinite_steps_skipped=int(state.get("nonfinite_steps_skipped", 0)), held_out=held_out, references=references or {},
               monitor=monitor, world=world, needs=needs, eval_data=eval_data)


def optimizer_and_schedule(cfg, model: torch.nn.Module, total_steps: int,
                           groups: list[dict] | None = None) -> tuple[list, torch.optim.Optimizer, object]:
    """(the trainable parameters, AdamW over them (or over `groups`: OFS-DPO's two adapters), the learning-rate
    schedule cfg.lr_scheduler_type with warmup_steps, over total_steps)."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(groups or [{"params": params}], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    return params, optimizer, scheduler


def resume(cfg, out: Path, *, model, optimizer, scheduler, source: BatchSource, step,
           world: distributed.World, total_steps: int | None = None) -> dict:
    """The trainer state of cfg.resume_from_checkpoint ('latest' in out, or a directory), with the model, optimizer,
    schedule, generators, batch source and step restored from it; {} for a fresh run. Called once every setting
    and the data are checked: a fresh run with --overwrite_output_dir clears the earlier run's files here, and
    train_config.json is written here (rank 0). A resumed run's settings that change the run must be those its
    checkpoint recorded (else one line naming each, unless --resume_with_changed_settings applies them); the
    schedule is this run's (its learning rate, warmup and total_steps), continued from the checkpoint's step."""
    config = settings_of(cfg)
    path = resolve_checkpoint(out, cfg.resume_from_checkpoint) if cfg.resume_from_checkpoint else None
    changes = _checked_changes(cfg, path, config)
    if world.main:
        if path is None and getattr(cfg, "overwrite_output_dir", False):
            gone = clear_old_run(out)
            if gone:
                print(f"output_dir: {out}: the earlier run's {', '.join(gone)} removed (--overwrite_output_dir)",
                      flush=True)
        (out / "train_config.json").write_text(json.dumps(config, indent=1))
    if path is None:
        return {}
    fresh_rates = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]  # this run's schedule
    state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, output_dir=out)
    world.restore_rank_rng(state)  # each rank's own generators, when it ran on as many ranks
    source.load_state_dict(state["batches"])
    step.load_state_dict(state.get("step_state", {}))
    at = int(state["step"])
    print(f"resumed from {path} at step {at}", flush=True)
    longer = total_steps is not None and state.get("total_steps") not in (None, total_steps)
    if longer or any(key in SCHEDULE for key, _, _ in changes):
        continue_schedule(optimizer, scheduler, fresh_rates, at)
        print(f"resume: the schedule is this run's ({cfg.lr_scheduler_type}, learning_rate {cfg.learning_rate}, "
              f"{total_steps} steps), continued from step {at} at learning rate "
              f"{scheduler.get_last_lr()[0]:.3g}", flush=True)
    if changes:
        state["changed_settings"] = {key: {"checkpoint": old, "now": new} for key, old, new in changes}
    return state


def _checked_changes(cfg, path: Path | None, config: dict) -> list:
    """The settings this run changes from checkpoint `path`'s record: refused in one line unless
    --resume_with_changed_settings (then said in one line and applied)."""
    if path is None:
        return []
    record = read_run_config(path)
    if record is None:
        print(f"resume: {path} records no settings (an older checkpoint); they are not compared", flush=True)
        return []
    changes = changed_settings(record, config, distributed.current().size)
    if changes and not getattr(cfg, "resume_with_changed_settings", False):
        raise ValueError(f"resume_from_checkpoint: this run's settings differ from {path}'s: {describe(changes)}; "
                         f"resume with the checkpoint's settings, or give --resume_with_changed_settings to apply "
                         f"the new ones")
    if changes:
        print(f"resume: applying changed settings (--resume_with_changed_settings): {describe(changes)}", flush=True)
    return changes


def continue_schedule(optimizer, scheduler, rates: list[float], step: int) -> None:
    """The learning-rate schedule built for this run (its peak `rates` per group, its warmup and total steps), at
    `step`: a resumed run that changed the schedule or the number of steps goes on from the checkpoint's step on
    the new schedule (instead of the old one's, which ends at learning rate 0)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return
    scheduler.base_lrs = list(rates)
    scheduler.last_epoch = step
    lrs = [rate * fn(step) for rate, fn in zip(rates, scheduler.lr_lambdas)]
    for group, rate, lr in zip(optimizer.param_groups, rates, lrs):
        group["initial_lr"], group["lr"] = rate, lr
    scheduler._last_lr = lrs


def open_log(cfg, out: Path, state: dict, world: distributed.World) -> MetricsLog:
    """The metrics log of output_dir (rank 0 writes it): a resumed run's keeps its lines up to the checkpoint and
    its open window; a fresh run's starts empty."""
    log = (MetricsLog if world.main else distributed.RankLog)(
        out, resume_step=int(state["step"]) if state else None, report_to=cfg.report_to,
        window=state.get("window"))
    if state and state.get("changed_settings") and world.main:  # --resume_with_changed_settings: recorded
        log.write({"step": int(state["step"]), "resumed_with_changed_settings": state["changed_settings"]})
    return log


def online_temperatures(cfg: TrainConfig, head) -> tuple[float, dict[str, float]]:
    """(the fused head's temperature, {role: temperature} of rows at their own) of a run: 1 and none offline;
    online, what the method's loss reads (engine/core/method_defaults.py). HyPO's online rows alone are at T: the
    online source's batches carry each sequence's temperature (Batch.temperature), which the fused head takes per
    row (any lm_head bias or softcap); row_temperature is the step's for batches without them."""
    if not cfg.online:
        return 1.0, {}

    method = online_method(cfg.loss_type)
    head_t, rows_t = loss_temperature(method, cfg.temperature)
    if LOSS_TEMPERATURE[method] != "one" and not cfg.temperature > 0:
        raise ValueError(f"temperature: {' '.join(cfg.loss_type)} take their log-probs at the sampling temperature, "
                         f"which must be > 0 (got {cfg.temperature}; greedy decoding has no log-probs to match)")
    where = (f"log-probs at temperature {head_t}" if rows_t == head_t
             else f"the online samples' log-probs at temperature {rows_t}, the offline pairs' at 1")
    print(f"online ({method}): the loss reads {where}", flush=True)
    if rows_t == head_t:
        return head_t, {}
    return 1.0, {"online": rows_t}


def online_source(cfg: TrainConfig, models, tokenizer, out: Path) -> OnlineSource:
    """The prompts of dataset_name, the judge the flags name and the rollout settings, as a batch source."""

    method = online_method(cfg.loss_type)
    # a vision-language model's prompts come with their images: samples are drawn with them and every row of a
    # batch gets its example's pixel values (engine/online/source.py)
    if method in PAIRED:  # HyPO, Mixed-DPO, Avg-DPO: the offline pairs themselves, their prompts sampled from
        prompts = paired_prompts(cfg, tokenizer, processor=models.processor)
    else:
        prompts = load_prompts(cfg.dataset_name, tokenizer, max_prompt_length=cfg.max_prompt_length,
                               skip_bad_rows=cfg.skip_bad_rows, processor=models.processor)
    print(f"data: {len(prompts)} {'pairs' if method in PAIRED else 'prompts'} ({prompts.format})"
          + (f", {prompts.skipped.count} bad rows skipped" if prompts.skipped.count else ""), flush=True)
    judge = None if method in JUDGELESS else make_judge(
        reward_funcs=cfg.reward_funcs, reward_weights=cfg.reward_weights, reward_model_path=cfg.reward_model_path,
        judge=cfg.judge, device=str(models.policy.device))
    rollout = RolloutConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            num_generations=cfg.num_generations, mixture_coef=cfg.mixture_coef)
    iterations = None
    if cfg.iterations > 1:  # max_steps is set (validated): the steps split evenly between the iterations
        iterations = Iterations(models, output_dir=out, count=cfg.iterations, reference=cfg.iteration_reference,
                                batches_per_iteration=math.ceil(cfg.max_steps / cfg.iterations)
                                * cfg.gradient_accumulation_steps)
    vllm = None
    if cfg.use_vllm:
        from prefuse.engine.online.vllm import VLLMSampler

        vllm = VLLMSampler(cfg.model_name_or_path, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                           seed=cfg.seed)
    return OnlineSource(prompts=prompts, loss_types=cfg.loss_type, models=models, tokenizer=tokenizer, judge=judge,
                        rollout=rollout, batch_size=cfg.per_device_train_batch_size * distributed.current().size,
                        seed=cfg.seed, sampler=cfg.online_sampler, missing_eos_penalty=cfg.missing_eos_penalty,
                        pair_samples=cfg.pair_samples,
                        iterations=iterations, iteration_slices=cfg.iteration_slices,
                        iteration_sampling=cfg.iteration_sampling, vllm=vllm,
                        mixed_p=cfg.objective_args.get("mixed_p", 0.5), avg_rejected=cfg.avg_rejected,
                        bdhs=_bdhs_settings(cfg))


def _bdhs_settings(cfg: TrainConfig) -> dict | None:
    """Online BDHS (--avg_rejected bdhs): its config and its embedder, loaded now (EmbedderError: one line)."""
    if cfg.avg_rejected != "bdhs":
        return None
    return {"regenerate": bdhs_rejected, "cfg": cfg.bdhs_config(), "embedder": load_embedder(cfg.embedder)}


def paired_prompts(cfg: TrainConfig, tokenizer, processor=None) -> TokenizedData:
    """The pairs of dataset_name (tokenized and cut as offline training cuts them; `images` with a
    vision-language model's processor), each example also with its `prompt` (text or messages) and `columns` as
    load_prompts gives them, for a judge of online samples of the same prompt (Mixed-DPO). A file of prompts only
    is refused in one line: these methods read the offline pairs."""

    records = load_records(cfg.dataset_name)
    if holds_prompts_only(records.column_names):
        raise DataError(f"dataset_name: {' '.join(cfg.loss_type)} with --online read each prompt's offline pair: "
                        f"{cfg.dataset_name} holds prompts only; give a pairs file (prompt, chosen, rejected)")
    data = load_preference_data(cfg.dataset_name, tokenizer, max_length=cfg.max_length,
                                max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation,
                                skip_bad_rows=cfg.skip_bad_rows, processor=processor)
    images = IMAGES_COLUMN in records.column_names  # the pairs hold them (read by the processor, not as text)
    texts = tokenize_prompts(records.remove_columns([IMAGES_COLUMN]) if images else records, tokenizer,
                             max_prompt_length=cfg.max_prompt_length, skip_bad_rows=True, fmt=data.format,
                             source=str(cfg.dataset_name))
    by_where = {e["where"]: e for e in texts.examples}
    for example in data.examples:  # a row whose pair tokenized has a readable prompt (the judge's `images`
        # column: the example's own images, OnlineSource._columns)
        prompt = by_where[example["where"]]
        example["prompt"], example["columns"] = prompt["prompt"], dict(prompt["columns"])
    return data


def load_data(cfg: TrainConfig, tokenizer, needs: ObjectiveNeeds,
              processor=None) -> tuple[TokenizedData, TokenizedData | None]:
    """The training examples and the held-out ones (eval_split, or eval_fraction of the file, drawn by the seed),
    as the objective reads them: pairs, or completions (scored pairs become two completions each). processor: a
    vision-language model's, for data with an `images` column (data/images.py)."""
    options = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation,
                   skip_bad_rows=cfg.skip_bad_rows)

    def load(path, split="train"):
        records = load_records(path, split=split)  # read once: its format decides what the objective gets
        fmt = detect_format(records)
        kind = "completions" if fmt in UNPAIRED_FORMATS else "pairs"
        if needs.data == "pairs" and kind == "completions":
            raise DataError(f"{path}: loss_type {cfg.loss_type} learns from pairs (prompt, chosen, rejected); "
                            f"this file holds unpaired completions")
        hint = (f"needed by loss_type {' '.join(cfg.loss_type)} (`prefuse objectives` lists the columns each "
                f"objective reads)")
        require, hint = required_columns(cfg, needs, kind, str(path), hint)  # a judge replaces reward columns
        data = tokenize_preferences(records, tokenizer, fmt=fmt, source=str(path), require=require,
                                    require_hint=hint, processor=processor, duplicate_rows=cfg.duplicate_rows,
                                    **options)
        for note in data.notes:  # prompts cut, duplicate rows: one line each, naming the file
            print(f"data: {path}: {note}", flush=True)
        check_response_tokens_left(data, str(path))
        if needs.revision and IMAGES_COLUMN in records.column_names:
            raise DataError(f"{path}: srpo's revision prompts are text and would lose the images; train srpo on "
                            f"text pairs")
        if needs.revision:  # SRPO: the four rows with a revision prompt
            data = add_revision_rows(data, records, tokenizer, template=cfg.revision_template, source=str(path),
                                     **options)
        return pairs_to_completions(data) if needs.data == "completions" and kind == "pairs" else data

    data = load(cfg.dataset_name)
    eval_data = None
    if cfg.eval_split:
        eval_data = (load(cfg.eval_split) if Path(cfg.eval_split).exists()
                     else load(cfg.dataset_name, split=cfg.eval_split))
    elif cfg.eval_fraction:
        held_out, kept = held_out_split(len(data), cfg.eval_fraction, cfg.seed)
        eval_data = TokenizedData(data.format, [data.examples[i] for i in held_out])
        data = TokenizedData(data.format, [data.examples[i] for i in kept], data.skipped)
    if len(data) == 0:
        raise DataError(f"dataset_name: {cfg.dataset_name} leaves no training examples")
    if eval_data is not None and len(eval_data) == 0:
        raise DataError("eval_split: the held-out set is empty")
    return data, eval_data
