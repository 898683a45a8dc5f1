"""The single-process training loop of `prefuse train`: one function, `train(cfg)`, that reads top to bottom.

    seed -> models -> data -> (reference log-probs, once) -> optimizer and schedule -> resume ->
    per step: next_batch() x accumulation -> decoder -> fused head -> objective -> backward -> clip -> step ->
              log (metrics.jsonl) -> eval -> checkpoint

Batches come from one seam, `next_batch()`: an online method (generate -> judge -> build the batch) replaces it.
Paired objectives go through `PreferenceLoss` (hidden states and the lm_head, never the logits); unpaired ones (KTO)
through the same fused head for per-sequence sums, then `objective_loss`. KTO's KL term pairs each prompt with the
completion of the previous example in its batch (TRL's mismatched pairs).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prefuse.algorithms import get_objective, objective_loss
from prefuse.engine.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from prefuse.engine.config import TrainConfig
from prefuse.engine.data import (DataError, PairBatches, TokenizedData, collate_pairs, collate_unpaired,
                                 load_preference_data)
from prefuse.engine.metrics import MetricsLog, peak_memory_mib
from prefuse.engine.model import decoder_hidden_states, head_of, load_models, reference_hidden_states
from prefuse.kernels import linear_logprobs
from prefuse.preference import PreferenceLoss


def train(cfg: TrainConfig) -> dict:
    """Train as `cfg` says; return the last logged metrics (and eval metrics) as a dict of floats."""
    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    unpaired = cfg.unpaired
    specs = [get_objective(name) for name in cfg.loss_type]

    # -- models ----------------------------------------------------------------------------------------------------
    models = load_models(cfg.model_config(), device=device, need_reference=cfg.needs_reference)
    policy, tokenizer = models.policy, models.tokenizer
    if tokenizer is None:
        raise ValueError(f"model_name_or_path: {cfg.model_name_or_path} has no tokenizer files")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    head = head_of(policy)
    ref_head = head_of(models.reference) if models.reference is not None else head

    def amp():  # bf16 autocast around the decoders only; the fused head accumulates in fp32 itself
        return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()

    def policy_hidden(batch):
        with amp():
            hidden = decoder_hidden_states(policy, batch["input_ids"], batch["attention_mask"])
        return hidden.to(head.weight.dtype)

    def reference_sums(input_ids, attention_mask, labels):
        """The reference's per-sequence log-prob sums [N], without gradient."""
        with amp():
            hidden = reference_hidden_states(models, input_ids, attention_mask)
        with torch.no_grad():
            return linear_logprobs(hidden.to(ref_head.weight.dtype), ref_head.weight.detach(), labels,
                                   bias=None if ref_head.bias is None else ref_head.bias.detach(),
                                   softcap=ref_head.softcap).sum(-1)

    # -- data ------------------------------------------------------------------------------------------------------
    train_data, eval_data = _load_data(cfg, tokenizer)
    print(f"data: {len(train_data)} training examples ({train_data.format})"
          + (f", {len(eval_data)} held out" if eval_data is not None else "")
          + (f", {train_data.skipped.count} bad rows skipped" if train_data.skipped.count else ""), flush=True)
    collate = collate_unpaired if unpaired else collate_pairs
    batches = PairBatches(len(train_data), batch_size=cfg.per_device_train_batch_size, seed=cfg.seed)
    accum = cfg.gradient_accumulation_steps
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * len(batches) / accum)

    # reference log-probs once, cached beside the checkpoints; then the reference model is no longer needed
    ref_tables = {}
    if cfg.precompute_ref_log_probs and cfg.needs_reference:
        for name, data in (("train", train_data), ("eval", eval_data)):
            if data is not None:
                ref_tables[name] = _reference_table(cfg, out, name, data, pad_id, device, reference_sums)
        models.reference = None

    # -- optimizer and schedule ------------------------------------------------------------------------------------
    from transformers import get_scheduler

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    loss_fn = None if unpaired else PreferenceLoss(cfg.objective, beta=cfg.beta, loss_weights=cfg.loss_weights,
                                                   softcap=head.softcap, **cfg.objective_args)

    # -- resume ----------------------------------------------------------------------------------------------------
    step, window = 0, None
    if cfg.resume_from_checkpoint:
        path = resolve_checkpoint(out, cfg.resume_from_checkpoint)
        state = load_checkpoint(path, model=policy, optimizer=optimizer, scheduler=scheduler, output_dir=out)
        step, window = int(state["step"]), state.get("window")
        batches.load_state_dict(state["batches"])
        print(f"resumed from {path} at step {step}", flush=True)
    log = MetricsLog(out, resume_step=step if cfg.resume_from_checkpoint else None, report_to=cfg.report_to,
                     window=window)

    # -- the seam: where batches come from --------------------------------------------------------------------------
    order = iter(batches)

    def next_batch() -> dict:
        """The next training batch as tensors on the device; `index` [B] holds the examples' positions."""
        nonlocal order
        indices = next(order, None)
        if indices is None:  # the epoch is done: PairBatches starts the next one
            order = iter(batches)
            indices = next(order)
        return _make_batch(train_data, indices, collate, pad_id, device, cfg.max_length if unpaired else None)

    # -- the loss of one batch -------------------------------------------------------------------------------------
    def batch_loss(batch, table=None):
        """(loss: 0-d, mean over the batch's examples; metrics: dict of 0-d tensors) for one batch."""
        if not unpaired:
            ref = {}
            if cfg.needs_reference and table is not None:
                ref = dict(ref_chosen_logps=table["chosen"][batch["index"]],
                           ref_rejected_logps=table["rejected"][batch["index"]])
            elif cfg.needs_reference:
                with amp():
                    ref_hidden = reference_hidden_states(models, batch["input_ids"], batch["attention_mask"])
                ref = dict(ref_hidden=ref_hidden.to(ref_head.weight.dtype), ref_weight=ref_head.weight.detach(),
                           ref_bias=None if ref_head.bias is None else ref_head.bias.detach())
            return loss_fn(policy_hidden(batch), head.weight, batch["labels"], bias=head.bias, **ref)
        policy_logps = linear_logprobs(policy_hidden(batch), head.weight, batch["labels"], bias=head.bias,
                                       softcap=head.softcap).sum(-1)
        stats = dict(policy_logps=policy_logps, labels=batch["desirable"],
                     ref_logps=reference_sums(batch["input_ids"], batch["attention_mask"], batch["labels"]))
        if any("policy_kl_logps" in spec.inputs for spec in specs):
            kl = batch["kl"]
            with torch.no_grad():
                stats["policy_kl_logps"] = linear_logprobs(policy_hidden(kl), head.weight, kl["labels"],
                                                           bias=head.bias, softcap=head.softcap).sum(-1)
            stats["ref_kl_logps"] = reference_sums(kl["input_ids"], kl["attention_mask"], kl["labels"])
        return objective_loss(cfg.objective, beta=cfg.beta, loss_weights=cfg.loss_weights, **stats,
                              **cfg.objective_args)

    def evaluate() -> dict[str, float]:
        """Mean loss and metrics over the held-out set (weighted by examples), named eval_*."""
        was_training = policy.training
        policy.eval()
        sums, count = {}, 0
        with torch.no_grad():
            for start in range(0, len(eval_data), cfg.per_device_eval_batch_size):
                indices = list(range(start, min(start + cfg.per_device_eval_batch_size, len(eval_data))))
                batch = _make_batch(eval_data, indices, collate, pad_id, device, cfg.max_length if unpaired else None)
                loss, metrics = batch_loss(batch, ref_tables.get("eval"))
                for key, value in {"loss": loss, **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + float(value) * len(indices)
                count += len(indices)
        policy.train(was_training)
        return {f"eval_{key}": value / count for key, value in sums.items()}

    # -- training --------------------------------------------------------------------------------------------------
    eval_steps = cfg.eval_steps or cfg.logging_steps
    print(f"training {total_steps} steps of {accum} x {cfg.per_device_train_batch_size} examples; "
          f"objective {cfg.loss_type}; {sum(p.numel() for p in params):,} trainable parameters", flush=True)
    last = {}
    policy.train()
    # a progress bar on a terminal (disable=None: off when stderr is not a TTY, as in CI); the log lines stay
    bar = tqdm(total=total_steps, initial=step, desc="train", disable=None, dynamic_ncols=True)
    while step < total_steps:
        started = time.perf_counter()
        micro_batches = [next_batch() for _ in range(accum)]
        # each micro-batch's mean loss weighs by its share of the step's examples: the step's loss is the mean over
        # all its examples, also when the last batch of an epoch is short
        n_examples = sum(len(b["index"]) for b in micro_batches)
        step_metrics, tokens = {}, 0
        for batch in micro_batches:
            share = len(batch["index"]) / n_examples
            loss, metrics = batch_loss(batch, ref_tables.get("train"))
            (loss * share).backward()
            for key, value in {"loss": loss, **metrics}.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + float(value.detach()) * share
            tokens += int(batch["attention_mask"].sum()) + (int(batch["kl"]["attention_mask"].sum())
                                                            if "kl" in batch else 0)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        step_metrics["learning_rate"] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        step_metrics["grad_norm"] = float(grad_norm)
        bar.update(1)
        bar.set_postfix(loss=f"{step_metrics['loss']:.4f}",
                        margin=f"{step_metrics.get('rewards/margins', float('nan')):+.3f}")
        log.add(step_metrics, tokens=tokens, seconds=time.perf_counter() - started)

        scores = evaluate() if eval_data is not None and (step % eval_steps == 0 or step == total_steps) else {}
        record = {}
        if step % cfg.logging_steps == 0 or step == total_steps:
            record = log.flush(step, epoch=_epoch(batches), extra=scores)
            bar.write(f"step {step}/{total_steps}  loss {record['loss']:.4f}  margin "
                      f"{record.get('rewards/margins', float('nan')):+.4f}  acc "
                      f"{record.get('rewards/accuracies', 0):.2f}  lr {record['learning_rate']:.2e}  "
                      f"{record['tokens_per_second']:.0f} tok/s")
        elif scores:
            record = {"step": step, **scores}
            log.write(record)
        if scores:
            bar.write(f"step {step}/{total_steps}  eval_loss {scores['eval_loss']:.4f}  eval margin "
                      f"{scores.get('eval_rewards/margins', float('nan')):+.4f}")
        last = record or last
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == total_steps:
            save_checkpoint(out, step, model=policy, optimizer=optimizer, scheduler=scheduler,
                            save_total_limit=cfg.save_total_limit,
                            trainer_state={"step": step, "epoch": _epoch(batches), "batches": batches.state_dict(),
                                           "window": log.window_state(), "total_steps": total_steps})
    bar.close()
    log.close()
    return last


def _epoch(batches: PairBatches) -> float:
    """Epochs served so far, as a float (TRL's `epoch`)."""
    return batches.epoch + batches.position / max(len(batches), 1)


def _make_batch(data: TokenizedData, indices: list[int], collate, pad_id: int, device, kl_max_length) -> dict:
    """Collated tensors of data.examples[indices] on `device`, plus `index` [B]; for unpaired data also `kl`: each
    prompt with the previous example's completion (KTO's mismatched pairs), cut to kl_max_length."""
    examples = [data.examples[i] for i in indices]
    batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
    batch["index"] = torch.tensor(indices, dtype=torch.long, device=device)
    if collate is collate_unpaired:
        kl_examples = []
        for i, example in enumerate(examples):
            completion = examples[i - 1]["completion_ids"]
            room = len(completion) if kl_max_length is None else max(kl_max_length - len(example["prompt_ids"]), 1)
            kl_examples.append({"prompt_ids": example["prompt_ids"], "completion_ids": completion[:room],
                                "label": example["label"]})
        batch["kl"] = {k: v.to(device) for k, v in collate_unpaired(kl_examples, pad_id).items()}
    return batch


def _load_data(cfg: TrainConfig, tokenizer) -> tuple[TokenizedData, TokenizedData | None]:
    """The training examples and the held-out ones (eval_split, or eval_fraction of the file, drawn by the seed)."""
    needs = "unpaired" if cfg.unpaired else "pairs"
    options = dict(needs=needs, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                   truncation=cfg.truncation, skip_bad_rows=cfg.skip_bad_rows)
    data = load_preference_data(cfg.dataset_name, tokenizer, **options)
    eval_data = None
    if cfg.eval_split:
        if Path(cfg.eval_split).exists():
            eval_data = load_preference_data(cfg.eval_split, tokenizer, **options)
        else:
            eval_data = load_preference_data(cfg.dataset_name, tokenizer, split=cfg.eval_split, **options)
    elif cfg.eval_fraction:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = max(1, round(cfg.eval_fraction * len(data)))
        held_out = sorted(order[:n_eval])
        kept = sorted(order[n_eval:])
        eval_data = TokenizedData(data.format, [data.examples[i] for i in held_out])
        data = TokenizedData(data.format, [data.examples[i] for i in kept], data.skipped)
    if len(data) == 0:
        raise DataError(f"dataset_name: {cfg.dataset_name} leaves no training examples")
    if eval_data is not None and len(eval_data) == 0:
        raise DataError("eval_split: the held-out set is empty")
    return data, eval_data


def _reference_table(cfg: TrainConfig, out: Path, name: str, data: TokenizedData, pad_id: int, device,
                     reference_sums) -> dict[str, torch.Tensor]:
    """The reference's chosen and rejected sums [N] of every example, computed once and cached in
    `output_dir/ref_logps-<name>-<hash>.safetensors`; the hash covers the token ids, the data file and the models."""
    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256()
    for part in (cfg.dataset_name, cfg.model_name_or_path, cfg.ref_model_name_or_path, cfg.torch_dtype, cfg.bf16):
        digest.update(repr(part).encode())
    if Path(cfg.dataset_name).is_file():
        digest.update(Path(cfg.dataset_name).read_bytes())
    digest.update(json.dumps([[e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]] for e in data.examples]).encode())
    path = out / f"ref_logps-{name}-{digest.hexdigest()[:16]}.safetensors"
    if path.is_file():
        table = load_file(str(path))
        if table["chosen"].shape[0] == len(data):
            return {k: v.to(device) for k, v in table.items()}
    chosen, rejected = [], []
    for start in range(0, len(data), cfg.per_device_eval_batch_size):
        indices = list(range(start, min(start + cfg.per_device_eval_batch_size, len(data))))
        batch = _make_batch(data, indices, collate_pairs, pad_id, device, None)
        sums = reference_sums(batch["input_ids"], batch["attention_mask"], batch["labels"]).float()
        chosen.append(sums[:len(indices)].cpu())
        rejected.append(sums[len(indices):].cpu())
    table = {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}
    temp = path.with_suffix(".tmp")
    save_file(table, str(temp))
    os.replace(temp, path)
    print(f"reference log-probs of {len(data)} {name} pairs cached in {path}", flush=True)
    return {k: v.to(device) for k, v in table.items()}


__all__ = ["train", "TrainConfig", "peak_memory_mib"]
