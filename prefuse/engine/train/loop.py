"""The training loop of `prefuse train` and `prefuse train-rm`: optimizer steps over micro-batches, logging,
evaluation, checkpoints.

    run = build_run(cfg)          # engine/train/build.py: models, data, batch source, step, optimizer, resume
    train(cfg)                    # = build_run + train_run(run), the loop below, top to bottom

The loop knows nothing about objectives: a batch source gives batches, the step turns one into (loss, metrics),
the run's Report (engine/train/report.py) says what is printed. Each micro-batch's mean loss weighs by its share
of the step's examples, so the step's loss is the mean over all of them, also when the last batch of an epoch is
short.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from prefuse.engine.train.config import TrainConfig
from prefuse.engine.train.distributed import launch
from prefuse.engine.core.metrics import peak_memory_mib
from prefuse.engine.train.build import Run, build_run
from prefuse.engine.train.nonfinite import NonFiniteStep, StepGuard
from prefuse.engine.train.output_dir import release, run_record, settings_of
from prefuse.engine.train.signals import StopSignals
from prefuse.engine.core.sources import BatchSource


def train(cfg: TrainConfig, source: BatchSource | None = None) -> dict:
    """Train as `cfg` says; return the last logged metrics (and eval metrics) as a dict of floats. source: where
    the training batches come from instead of dataset_name's examples (any BatchSource). Under torchrun, every
    rank runs this with its share of each global batch (engine/train/distributed.py)."""
    with launch():  # torchrun's process group for the duration; a single process: nothing to set up
        run = build_run(cfg, source)
        try:
            return train_run(run)
        finally:
            release(run.out)  # output_dir's lock (engine/train/output_dir.py)


def train_run(run: Run) -> dict:
    """Drive `run` from its start_step to total_steps (or the monitor's early stop); return the last logged
    record (training metrics and eval metrics) as a dict of floats. SIGINT / SIGTERM: the step under way ends,
    its checkpoint is saved, one line says so and the process exits with 130 / 143 (engine/train/signals.py)."""
    with StopSignals() as signals:
        return _train_steps(run, signals)


def _train_steps(run: Run, signals: StopSignals) -> dict:
    """train_run's loop, `signals` checked after every optimizer step."""
    cfg, step, last = run.cfg, run.start_step, {}
    if run.monitor and run.monitor.stopped:  # resumed from the checkpoint where --early_stopping stopped the run
        print(run.monitor.stopped_message(step), flush=True)
        run.log.close()
        return last
    eval_steps = cfg.eval_steps or cfg.logging_steps
    print(run.report.opening(run), flush=True)
    run.policy.train()
    # a progress bar on a terminal (disable=None: off when stderr is not a TTY, as in CI); the log lines stay
    bar = tqdm(total=run.total_steps, initial=step, desc="train", disable=None if run.world.main else True,
               dynamic_ncols=True)
    # a non-finite loss or gradient stops the run before the update (or is skipped: --skip_nonfinite_steps)
    guard = StepGuard(limit=getattr(cfg, "skip_nonfinite_steps", 0), skipped=run.nonfinite_steps_skipped,
                      learning_rate=cfg.learning_rate)
    while step < run.total_steps:
        started = time.perf_counter()
        micro_batches = [run.source.next_batch().to(run.device) for _ in range(cfg.gradient_accumulation_steps)]
        metrics, tokens = accumulate(run, micro_batches)
        step += 1
        skipped_before = guard.skipped
        updated = update(run, guard, step, metrics["loss"])
        run.num_tokens += tokens
        run.nonfinite_steps_skipped = guard.skipped
        if guard.skipped > skipped_before:  # skipped, no update: only the schedule and the count go into the window
            metrics = {k: v for k, v in updated.items() if k != "grad_norm"}
        else:
            metrics.update(updated)
            metrics.update(run.step.after_update(step, metrics, run.optimizer))
            warning = guard.saturation(step, metrics["grad_norm"], metrics["loss"])
            if warning:
                bar.write(warning)
        bar.update(1)
        if "loss" in metrics:  # not after a skipped step
            bar.set_postfix(**run.report.postfix(metrics))
        run.log.add(metrics, tokens=tokens, seconds=time.perf_counter() - started)

        scores = (evaluate(run) if run.held_out is not None and (step % eval_steps == 0 or step == run.total_steps)
                  else {})
        monitored, stop = run.monitor.after_step(step, lambda d: save(run, step, d)) if run.monitor else ({}, False)
        scores.update(monitored)  # the over-optimisation monitor's indicators (engine/methods/monitor.py)
        record = {}
        if step % cfg.logging_steps == 0 or step == run.total_steps or stop:
            record = run.log.flush(step, epoch=run.source.epoch, extra={**run.report.extra(run), **scores})
            bar.write(run.report.step_line(step, run.total_steps, record) if "loss" in record else
                      f"step {step}/{run.total_steps}  skipped: not finite ({guard.skipped} skipped so far)")
        elif scores:
            record = {"step": step, **({"epoch": run.source.epoch} if run.report.eval_record_epoch else {}),
                      **scores}
            run.log.write(record)
        if "eval_loss" in scores:
            bar.write(run.report.eval_line(step, run.total_steps, scores))
        last = record or last
        saved = (save(run, step) if (cfg.save_steps and step % cfg.save_steps == 0) or step == run.total_steps
                 or stop else None)
        if signals.stop(run.world):  # SIGINT / SIGTERM on any rank: this step's checkpoint, then exit 128 + signal
            path = saved or save(run, step)
            bar.close()
            run.log.close()
            raise signals.exit(step, path, say=run.world.main)
        if stop:  # --early_stopping: the monitor saw the turn; output_dir/best/ holds the peak
            break
    bar.close()
    run.log.close()
    return last


def accumulate(run: Run, micro_batches: list) -> tuple[dict[str, float], int]:
    """Forward and backward of one optimizer step's micro-batches (gradients synchronized over the ranks on the
    last one only); return (the step's metrics: each the mean over the global step's examples, or over its loss
    units where batches count them otherwise (Batch.loss_units: an SFT batch's trained tokens), the step's tokens
    over all ranks)."""
    n_units = run.world.total(sum(b.loss_units for b in micro_batches))  # the global step's, all ranks
    metrics, shares, tokens = {}, {}, 0
    for number, batch in enumerate(micro_batches):
        share = batch.loss_units / max(n_units, 1)
        with run.world.micro_batch(last=number == len(micro_batches) - 1):  # no gradient sync before the last
            loss, batch_metrics = run.step(batch, run.references.get("train"))
            (loss * share * run.world.size).backward()  # x ranks: DDP averages the ranks' gradients
        for key, value in {"loss": loss, **batch_metrics}.items():
            metrics[key] = metrics.get(key, 0.0) + float(value.detach()) * share
            shares.setdefault(key, []).append(share)
        tokens += batch.n_tokens
    # a metric some micro-batches lack (Mixed-DPO's judge scores) is the mean over those that have it
    metrics, weights, counts, tokens = run.world.sum_metrics(  # each a sum over the ranks
        metrics, {k: sum(v) for k, v in shares.items()}, {k: len(v) for k, v in shares.items()}, {"n": tokens})
    metrics = {key: value if counts[key] == len(micro_batches) * run.world.size else value / weights[key]
               for key, value in metrics.items()}
    return metrics, int(tokens["n"])


def update(run: Run, guard: StepGuard | None = None, step: int = 0, loss: float = 0.0) -> dict[str, float]:
    """Clip, step the optimizer and the schedule, clear the gradients; return learning_rate (each extra parameter
    group's as learning_rate/<name>: OFS-DPO's slow adapter) and grad_norm (before clipping). guard: a NaN or
    infinite loss or gradient norm of optimizer step `step` raises NonFiniteStep before the optimizer applies it,
    or skips the update (--skip_nonfinite_steps; then nonfinite_steps_skipped is in the metrics)."""
    grad_norm = clip_grad_norms(run.optimizer, run.cfg.max_grad_norm)
    rates = run.scheduler.get_last_lr()
    metrics = {"learning_rate": rates[0]}
    for group, rate in list(zip(run.optimizer.param_groups, rates))[1:]:  # OFS-DPO's slow adapter
        metrics[f"learning_rate/{group.get('name', 'group')}"] = rate
    if guard is None or not guard.nonfinite(step, loss, grad_norm):
        run.optimizer.step()
    run.scheduler.step()  # also after a skipped step: the schedule stays a function of the step
    if guard is not None and guard.limit:
        metrics["nonfinite_steps_skipped"] = guard.skipped
    run.optimizer.zero_grad(set_to_none=True)
    metrics["grad_norm"] = grad_norm
    return metrics


def clip_grad_norms(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip each parameter group's gradient to max_norm on its own (a group is one optimizer's worth: OFS-DPO's
    two adapters); return the norm of all of them together, before clipping."""
    norms = [torch.nn.utils.clip_grad_norm_(group["params"], max_norm if max_norm > 0 else math.inf)
             for group in optimizer.param_groups]
    return float(torch.stack([n.float() for n in norms]).norm())


def evaluate(run: Run) -> dict[str, float]:
    """The held-out set's loss and metrics, named eval_*: the step's held_out_metrics over its batches (a mean
    weighted by examples, unless the step says otherwise)."""
    was_training = run.policy.training
    run.policy.eval()
    with torch.no_grad():
        parts = [(batch.n_examples, *run.step(batch.to(run.device), run.references.get("eval")))
                 for batch in run.eval_batches()]
        scores = run.step.held_out_metrics(parts, run.world)  # over the ranks' shares of the batches
    run.policy.train(was_training)
    return {f"eval_{key}": value for key, value in scores.items()}


def save(run: Run, step: int, output_dir=None):
    """The run's checkpoint of `step` in output_dir/checkpoint-{step} (default: the run's; the monitor's best/ is
    staged in another); returns its path. Weights that are not finite are never saved (NonFiniteStep)."""
    check_finite_weights(run, step)
    state = {"step": step, "epoch": run.source.epoch, "batches": run.source.state_dict(),
             "nonfinite_steps_skipped": run.nonfinite_steps_skipped,
             "window": run.log.window_state(), "total_steps": run.total_steps, "num_tokens": run.num_tokens,
             "step_state": run.step.state_dict(),
             **({"monitor": run.monitor.state_dict()} if run.monitor else {}), **run.world.rank_rng_state()}
    # rank 0 writes (the ranks' weights and optimizer states are the same; FSDP2: every rank its shards first)
    return run.world.save_checkpoint(output_dir or run.out, step, model=run.policy, optimizer=run.optimizer,
                                     scheduler=run.scheduler, trainer_state=state,
                                     save_total_limit=None if output_dir else run.cfg.save_total_limit,
                                     run_config=run_record(settings_of(run.cfg), run.world.size))  # what export rebuilds


def check_finite_weights(run: Run, step: int) -> None:
    """NonFiniteStep naming the first trainable parameter holding a NaN or an infinity (each rank checks its own
    shard; every rank stops when one finds one), before a checkpoint of `step` is written."""
    bad = ""
    for name, param in run.policy.named_parameters():
        if not param.requires_grad:  # frozen weights are the loaded ones
            continue
        local = param.detach().to_local() if hasattr(param, "to_local") else param.detach()  # FSDP2: the shard
        if not bool(torch.isfinite(local).all()):
            bad = name
            break
    if run.world.total(int(bool(bad))):
        raise NonFiniteStep(f"step {step}: the trained parameter {bad or '(on another rank)'} holds NaN or infinite "
                            f"values; checkpoint-{step} was not written (earlier checkpoints are intact); lower "
                            f"--learning_rate")


__all__ = ["train", "train_run", "evaluate", "TrainConfig", "peak_memory_mib"]
