"""`prefuse train-rm`: train the reward models the judges read, from local preference pairs.

    cfg = RewardModelConfig(model_name_or_path="tiny", dataset_name="pairs.jsonl", output_dir="out")
    metrics = train_reward_model(cfg)   # -> out/: the model + tokenizer, metrics.jsonl, checkpoint-<step>/

A one-logit `AutoModelForSequenceClassification`, initialized from a local causal LM (its `score` head new) or an
existing one-logit classifier, full fine-tuning or LoRA (task SEQ_CLS, the `score` head trained in full):

    kind bradley_terry   TRL's RewardTrainer: loss = -logsigmoid(r_chosen - r_rejected)
                         (+ center_rewards_coefficient * mean((r_chosen + r_rejected)^2))   -> RewardModelJudge
    kind pairwise        PairRM-style: the logit of PAIRWISE_TEMPLATE(prompt, first, second) is the log-odds that
                         first is better; BCE with logits on (chosen, rejected) -> 1 and (rejected, chosen) -> 0
                                                                                            -> PairwiseJudge

Metrics (output_dir/metrics.jsonl, TRL's RewardTrainer names; held-out ones prefixed eval_): loss, accuracy (pairs
whose first sequence gets the higher logit: chosen over rejected; for pairwise, PairwiseJudge.compare(chosen,
rejected) > 1/2), margin (mean logit difference, first - second), min_reward / mean_reward / max_reward (over the
batch's logits), num_tokens (training tokens so far), learning_rate, grad_norm, epoch. Held-out metrics are over the
whole held-out set at once, so eval_accuracy is exactly the share of held-out pairs the saved model ranks right.

The trained model is written to output_dir itself with its tokenizer, as TRL's `trainer.save_model(output_dir)`
does (LoRA merged in): `--reward_model_path out` / `--judge out` load it as it is. Data: `reward_pairs.py`.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prefuse.engine.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from prefuse.engine.core.checks import check_field
from prefuse.engine.train.config import check_held_out_and_resume, check_training_settings
from prefuse.engine.data import PairBatches
from prefuse.engine.core.metrics import MetricsLog
from prefuse.engine.models.loading import DTYPES, check_model_dir, lora_targets, load_tokenizer
from prefuse.engine.reward.pairs import KINDS, RewardPairs, collate_pair_batch, load_splits


def _setting(default, help: str):
    """A field with its help text in the metadata (the CLI's --help shows it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class RewardModelConfig:
    """Every setting of `prefuse train-rm`, named as TRL's RewardConfig / ModelConfig name them (their defaults too:
    learning_rate 1e-4, max_length 1024, disable_dropout)."""
    model_name_or_path: str = _setting("", "local causal LM or one-logit classifier directory, with its tokenizer")
    dataset_name: str = _setting("", "local .jsonl/.json/.parquet file or save_to_disk folder of preference pairs")
    output_dir: str = _setting("", "where the trained model, metrics.jsonl and checkpoints go")
    kind: str = _setting("bradley_terry", f"one of {KINDS}: a reward model (RewardModelJudge) or a pairwise "
                                          f"preference model (PairwiseJudge)")
    eval_split: str | None = _setting(None, "held-out pairs: a file, or a split of a saved dataset folder")
    eval_fraction: float = _setting(0.0, "held-out pairs: this fraction of the training pairs")
    max_length: int | None = _setting(1024, "pairs with a sequence over this many tokens are dropped, as in TRL")
    skip_bad_rows: bool = False
    torch_dtype: str = "float32"
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = _setting(None, "module names for LoRA (default: peft's for the "
                                                           "architecture); the score head is trained in full")
    disable_dropout: bool = _setting(True, "set every dropout probability to 0, as TRL does")
    learning_rate: float = 1e-4
    per_device_train_batch_size: int = _setting(8, "pairs per micro-batch")
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_steps: int = _setting(-1, "optimizer steps (-1: num_train_epochs decides)")
    num_train_epochs: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    max_grad_norm: float = _setting(1.0, "clip the gradient norm to this (0: no clipping)")
    weight_decay: float = 0.0
    center_rewards_coefficient: float | None = _setting(None, "bradley_terry: weight of mean((r_chosen + "
                                                              "r_rejected)^2), which keeps rewards centred at 0")
    seed: int = 42
    logging_steps: int = 10
    eval_steps: int | None = _setting(None, "evaluate every N steps (default: logging_steps) and at the end")
    save_steps: int = _setting(500, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int | None = None
    resume_from_checkpoint: str | None = _setting(None, "'latest' (in --output_dir) or a checkpoint directory")
    report_to: str = _setting("auto", "auto: TensorBoard when installed; none; tensorboard")
    device: str = "auto"

    def validate(self) -> "RewardModelConfig":
        """Raise ValueError with one line naming the first bad field; return self."""
        for name in ("model_name_or_path", "dataset_name", "output_dir"):
            check_field(bool(getattr(self, name)), name, "required")
        from prefuse.engine.models.gguf import plain_directory

        self.model_name_or_path = plain_directory(self.model_name_or_path)  # a GGUF file: its plain copy
        check_field(Path(self.model_name_or_path).is_dir(), "model_name_or_path",
                    f"no such model directory: {self.model_name_or_path} (a local directory written by "
                    f"save_pretrained)")
        check_field(Path(self.dataset_name).exists(), "dataset_name", f"no such file or directory: {self.dataset_name}")
        check_field(self.kind in KINDS, "kind", f"{self.kind!r} is not one of {KINDS}")
        check_training_settings(self)
        check_field(self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
                    "center_rewards_coefficient", f"must be >= 0, got {self.center_rewards_coefficient}")
        check_field(self.center_rewards_coefficient is None or self.kind == "bradley_terry",
                    "center_rewards_coefficient",
                    "centres the rewards of kind bradley_terry; a pairwise model's logits are log-odds")
        check_field(self.max_length is None or self.max_length >= 2, "max_length",
                    f"must be >= 2, got {self.max_length}")
        check_held_out_and_resume(self)
        return self


# -- the model ----------------------------------------------------------------------------------------------------

def load_reward_model(cfg: RewardModelConfig, device="cpu"):
    """(model in train mode, tokenizer, pad_id): a one-logit sequence classifier from model_name_or_path, with
    `config.pad_token_id` set (the head pools the last token that is not padding) to the tokenizer's pad token,
    else its EOS (TRL); LoRA adapters when use_peft."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_model_dir(cfg.model_name_or_path, "model_name_or_path")
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    check_field(tokenizer is not None, "model_name_or_path", f"{cfg.model_name_or_path} has no tokenizer files")
    if tokenizer.pad_token is None:
        check_field(tokenizer.eos_token is not None, "model_name_or_path", "the tokenizer has neither a pad nor an EOS "
                    "token (set pad_token)")
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(cfg.model_name_or_path, local_files_only=True)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    check_field(not is_classifier or config.num_labels == 1, "model_name_or_path",
                f"{cfg.model_name_or_path} is a classifier with num_labels={config.num_labels}; a reward model has one")
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model_name_or_path, num_labels=1, local_files_only=True, dtype=DTYPES[cfg.torch_dtype])
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.use_peft:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(task_type="SEQ_CLS", r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=lora_targets(model, cfg.lora_target_modules), modules_to_save=["score"])
        model = get_peft_model(model, lora)
    if cfg.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model.to(device).train(), tokenizer, tokenizer.pad_token_id


def save_reward_model(model, tokenizer, directory) -> Path:
    """A plain `save_pretrained` classifier directory with its tokenizer (LoRA merged in), as the judges load it."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


# -- loss and metrics: pure functions of the logits of the first and second sequences [B] ---------------------------

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """TRL's RewardTrainer loss: mean -logsigmoid(r_chosen - r_rejected) (+ coef * mean((r_c + r_r)^2))."""
    loss = -F.logsigmoid(chosen - rejected).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


def pairwise_loss(chosen_first: torch.Tensor, rejected_first: torch.Tensor) -> torch.Tensor:
    """BCE with logits over the 2B texts: (chosen, rejected) -> 1, (rejected, chosen) -> 0."""
    logits = torch.cat([chosen_first, rejected_first])
    targets = torch.cat([torch.ones_like(chosen_first), torch.zeros_like(rejected_first)])
    return F.binary_cross_entropy_with_logits(logits, targets)


def pair_loss(cfg: RewardModelConfig, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    if cfg.kind == "pairwise":
        return pairwise_loss(first, second)
    return bradley_terry_loss(first, second, cfg.center_rewards_coefficient)


def pair_metrics(first: torch.Tensor, second: torch.Tensor) -> dict[str, float]:
    """TRL's RewardTrainer metrics (module docstring)."""
    first, second = first.detach().float(), second.detach().float()
    both = torch.cat([first, second])
    return {"accuracy": float((first > second).float().mean()), "margin": float((first - second).mean()),
            "min_reward": float(both.min()), "mean_reward": float(both.mean()), "max_reward": float(both.max())}


def pair_logits(model, pairs: RewardPairs, indices: list[int], pad_id: int, device) -> tuple:
    """(first, second) float32 logits [B] of the pairs `indices`, and the batch's token count; one forward."""
    batch = {k: v.to(device) for k, v in collate_pair_batch(pairs, indices, pad_id).items()}
    logits = model(**batch, use_cache=False).logits[:, 0].float()
    return logits[: len(indices)], logits[len(indices):], int(batch["attention_mask"].sum())


# -- the loop -----------------------------------------------------------------------------------------------------

def evaluate(cfg: RewardModelConfig, model, pairs: RewardPairs, pad_id: int, device) -> dict[str, float]:
    """eval_loss and eval_ metrics over every held-out pair at once (in eval mode, without gradient)."""
    was_training = model.training
    model.eval()
    firsts, seconds = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), cfg.per_device_eval_batch_size):
            indices = list(range(start, min(start + cfg.per_device_eval_batch_size, len(pairs))))
            first, second, _ = pair_logits(model, pairs, indices, pad_id, device)
            firsts.append(first)
            seconds.append(second)
    model.train(was_training)
    first, second = torch.cat(firsts), torch.cat(seconds)
    metrics = {"loss": float(pair_loss(cfg, first, second)), **pair_metrics(first, second)}
    return {f"eval_{key}": value for key, value in metrics.items()}


def train_reward_model(cfg: RewardModelConfig) -> dict[str, float]:
    """Train as `cfg` says and write the model to output_dir; return the last logged record."""
    from transformers import get_scheduler

    cfg.validate()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    model, tokenizer, pad_id = load_reward_model(cfg, device)
    train, held_out = load_splits(cfg, tokenizer)
    print(f"data: {len(train)} training pairs" + (f", {len(held_out)} held out" if held_out else "")
          + (f"; {train.dropped} pairs over max_length={cfg.max_length} dropped" if train.dropped else "")
          + (f"; {train.skipped.count} bad rows skipped" if train.skipped.count else ""), flush=True)

    order = PairBatches(len(train), batch_size=cfg.per_device_train_batch_size, seed=cfg.seed)
    total_steps = (cfg.max_steps if cfg.max_steps > 0
                   else math.ceil(cfg.num_train_epochs * len(order) / cfg.gradient_accumulation_steps))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                              num_training_steps=total_steps)
    step, window, num_tokens = 0, None, 0
    if cfg.resume_from_checkpoint:
        path = resolve_checkpoint(out, cfg.resume_from_checkpoint)
        state = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, output_dir=out)
        step, window, num_tokens = int(state["step"]), state.get("window"), int(state.get("num_tokens", 0))
        order.load_state_dict(state["batches"])
        print(f"resumed from {path} at step {step}", flush=True)
    log = MetricsLog(out, resume_step=step if cfg.resume_from_checkpoint else None, report_to=cfg.report_to,
                     window=window)
    batches = iter(order)

    def next_indices() -> list[int]:
        nonlocal batches
        indices = next(batches, None)
        if indices is None:  # the epoch is done: PairBatches starts the next one
            batches = iter(order)
            indices = next(batches)
        return indices

    print(f"training {total_steps} steps of {cfg.gradient_accumulation_steps} x {cfg.per_device_train_batch_size} "
          f"pairs ({cfg.kind}); {sum(p.numel() for p in params):,} trainable parameters", flush=True)
    eval_steps, last = cfg.eval_steps or cfg.logging_steps, {}
    while step < total_steps:
        started = time.perf_counter()
        micro_batches = [next_indices() for _ in range(cfg.gradient_accumulation_steps)]
        n_pairs = sum(len(indices) for indices in micro_batches)
        metrics, tokens = {}, 0
        for indices in micro_batches:
            share = len(indices) / n_pairs  # the step's loss is the mean over all its pairs
            first, second, batch_tokens = pair_logits(model, train, indices, pad_id, device)
            loss = pair_loss(cfg, first, second)
            (loss * share).backward()
            for key, value in {"loss": float(loss.detach()), **pair_metrics(first, second)}.items():
                metrics[key] = metrics.get(key, 0.0) + value * share
            tokens += batch_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        metrics["learning_rate"] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        num_tokens += tokens
        metrics["grad_norm"] = float(grad_norm)
        log.add(metrics, tokens=tokens, seconds=time.perf_counter() - started)

        scores = (evaluate(cfg, model, held_out, pad_id, device)
                  if held_out is not None and (step % eval_steps == 0 or step == total_steps) else {})
        epoch = order.epoch + order.position / len(order)
        record = {}
        if step % cfg.logging_steps == 0 or step == total_steps:
            record = log.flush(step, epoch=epoch, extra={"num_tokens": num_tokens, **scores})
            print(f"step {step}/{total_steps}  loss {record['loss']:.4f}  accuracy {record['accuracy']:.3f}  margin "
                  f"{record['margin']:+.4f}  lr {record['learning_rate']:.2e}", flush=True)
        elif scores:
            record = {"step": step, "epoch": epoch, **scores}
            log.write(record)
        if scores:
            print(f"step {step}/{total_steps}  eval_loss {scores['eval_loss']:.4f}  eval_accuracy "
                  f"{scores['eval_accuracy']:.3f}  eval_margin {scores['eval_margin']:+.4f}", flush=True)
        last = record or last
        if (cfg.save_steps and step % cfg.save_steps == 0) or step == total_steps:
            save_checkpoint(out, step, model=model, optimizer=optimizer, scheduler=scheduler,
                            save_total_limit=cfg.save_total_limit,
                            trainer_state={"step": step, "batches": order.state_dict(), "num_tokens": num_tokens,
                                           "window": log.window_state(), "total_steps": total_steps})
    log.close()
    save_reward_model(model, tokenizer, out)
    print(f"model: {out} ({'PairwiseJudge' if cfg.kind == 'pairwise' else 'RewardModelJudge'} reads it)", flush=True)
    return last


__all__ = ["RewardModelConfig", "train_reward_model", "load_reward_model", "save_reward_model", "evaluate",
           "bradley_terry_loss", "pairwise_loss", "pair_loss", "pair_metrics", "pair_logits"]
