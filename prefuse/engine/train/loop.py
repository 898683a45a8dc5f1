"""The training loop of `prefuse train`: optimizer steps over micro-batches, logging, evaluation, checkpoints.

    run = build_run(cfg)          # engine/train/build.py: models, data, batch source, step, optimizer, resume
    train(cfg)                    # = build_run + the loop below, top to bottom

The loop knows nothing about objectives: a batch source gives batches, the step turns one into (loss, metrics).
Each micro-batch's mean loss weighs by its share of the step's examples, so the step's loss is the mean over all
of them, also when the last batch of an epoch is short.
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
from prefuse.engine.core.sources import BatchSource


def train(cfg: TrainConfig, source: BatchSource | None = None) -> dict:
    """Train as `cfg` says; return the last logged metrics (and eval metrics) as a dict of floats. source: where
    the training batches come from instead of dataset_name's examples (any BatchSource). Under torchrun, every
    rank runs this with its share of each global batch (engine/train/distributed.py)."""
    with launch():  # torchrun's process group for the duration; a single process: nothing to set up
        return _train(build_run(cfg, source))


def _train(run: Run) -> dict:
    cfg, step, last = run.cfg, run.start_step, {}
    if run.monitor and run.monitor.stopped:  # resumed from the checkpoint where --early_stopping stopped the run
        print(run.monitor.stopped_message(step), flush=True)
        run.log.close()
        return last
    eval_steps = cfg.eval_steps or cfg.logging_steps
    print(f"training {run.total_steps} steps of {cfg.gradient_accumulation_steps} x "
          f"{cfg.per_device_train_batch_size} examples; objective {cfg.loss_type}; "
          f"{sum(p.numel() for p in run.params):,} trainable parameters", flush=True)
    run.policy.train()
    # a progress bar on a terminal (disable=None: off when stderr is not a TTY, as in CI); the log lines stay
    bar = tqdm(total=run.total_steps, initial=step, desc="train", disable=None if run.world.main else True,
               dynamic_ncols=True)
    while step < run.total_steps:
        started = time.perf_counter()
        micro_batches = [run.source.next_batch().to(run.device) for _ in range(cfg.gradient_accumulation_steps)]
        n_examples = run.world.total(sum(b.n_examples for b in micro_batches))  # the global step's, all ranks
        metrics, shares, tokens = {}, {}, 0
        for number, batch in enumerate(micro_batches):
            share = batch.n_examples / n_examples
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
        tokens = int(tokens["n"])
        grad_norm = clip_grad_norms(run.optimizer, cfg.max_grad_norm)
        rates = run.scheduler.get_last_lr()
        metrics["learning_rate"] = rates[0]
        for group, rate in list(zip(run.optimizer.param_groups, rates))[1:]:  # OFS-DPO's slow adapter
            metrics[f"learning_rate/{group.get('name', 'group')}"] = rate
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics["grad_norm"] = grad_norm
        metrics.update(run.step.after_update(step, metrics, run.optimizer))
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", **({"margin": f"{metrics['rewards/margins']:+.3f}"}
                                                           if "rewards/margins" in metrics else {}))
        run.log.add(metrics, tokens=tokens, seconds=time.perf_counter() - started)

        scores = (evaluate(run) if run.eval_data is not None and (step % eval_steps == 0 or step == run.total_steps)
                  else {})
        monitored, stop = run.monitor.after_step(step, lambda d: save(run, step, d)) if run.monitor else ({}, False)
        scores.update(monitored)  # the over-optimisation monitor's indicators (engine/methods/monitor.py)
        record = {}
        if step % cfg.logging_steps == 0 or step == run.total_steps or stop:
            record = run.log.flush(step, epoch=run.source.epoch, extra=scores)
            pairs = (f"  margin {record['rewards/margins']:+.4f}  acc {record.get('rewards/accuracies', 0):.2f}"
                     if "rewards/margins" in record else "")  # objectives without a chosen/rejected pair have none
            bar.write(f"step {step}/{run.total_steps}  loss {record['loss']:.4f}{pairs}"
                      f"  lr {record['learning_rate']:.2e}  {record['tokens_per_second']:.0f} tok/s")
        elif scores:
            record = {"step": step, **scores}
            run.log.write(record)
        if "eval_loss" in scores:
            margin = (f"  eval margin {scores['eval_rewards/margins']:+.4f}" if "eval_rewards/margins" in scores
                      else "")
            bar.write(f"step {step}/{run.total_steps}  eval_loss {scores['eval_loss']:.4f}{margin}")
        last = record or last
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == run.total_steps or stop:
            save(run, step)
        if stop:  # --early_stopping: the monitor saw the turn; output_dir/best/ holds the peak
            break
    bar.close()
    run.log.close()
    return last


def clip_grad_norms(optimizer: torch.optim.Optimizer, max_norm: float) -> float:
    """Clip each parameter group's gradient to max_norm on its own (a group is one optimizer's worth: OFS-DPO's
    two adapters); return the norm of all of them together, before clipping."""
    norms = [torch.nn.utils.clip_grad_norm_(group["params"], max_norm if max_norm > 0 else math.inf)
             for group in optimizer.param_groups]
    return float(torch.stack([n.float() for n in norms]).norm())


def evaluate(run: Run) -> dict[str, float]:
    """Mean loss and metrics over the held-out set (weighted by examples), named eval_*."""
    was_training = run.policy.training
    run.policy.eval()
    sums, count = {}, 0
    with torch.no_grad():
        for batch in run.eval_batches():
            loss, metrics = run.step(batch.to(run.device), run.references.get("eval"))
            for key, value in {"loss": loss, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * batch.n_examples
            count += batch.n_examples
    sums, count = run.world.sum_metrics(sums), run.world.total(count)  # over the ranks' shares of the batches
    run.policy.train(was_training)
    return {f"eval_{key}": value / count for key, value in sums.items()}


def save(run: Run, step: int, output_dir=None):
    """The run's checkpoint of `step` in output_dir/checkpoint-{step} (default: the run's; the monitor's best/ is
    staged in another); returns its path."""
    state = {"step": step, "epoch": run.source.epoch, "batches": run.source.state_dict(),
             "window": run.log.window_state(), "total_steps": run.total_steps, "step_state": run.step.state_dict(),
             **({"monitor": run.monitor.state_dict()} if run.monitor else {}), **run.world.rank_rng_state()}
    # rank 0 writes (the ranks' weights and optimizer states are the same; FSDP2: every rank its shards first)
    return run.world.save_checkpoint(output_dir or run.out, step, model=run.policy, optimizer=run.optimizer,
                                     scheduler=run.scheduler, trainer_state=state,
                                     save_total_limit=None if output_dir else run.cfg.save_total_limit)


__all__ = ["train", "evaluate", "TrainConfig", "peak_memory_mib"]
