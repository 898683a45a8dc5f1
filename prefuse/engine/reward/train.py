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
whole held-out set (means weighted by each batch's pairs; min and max over all), so eval_accuracy is the share of
held-out pairs the saved model ranks right.

It trains through `prefuse train`'s loop (engine/train/loop.py): a RewardStep (the kind's loss on the model's
logits of a batch's two sequences per pair) over a PairSource (pairs.py), with the same seeding, optimizer and
schedule, gradient accumulation, log, evaluation, checkpoints and exact resume.

The trained model is written to output_dir itself with its tokenizer, as TRL's `trainer.save_model(output_dir)`
does (LoRA merged in): `--reward_model_path out` / `--judge out` load it as it is. Data: `pairs.py`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from prefuse.engine.checks import check_field
from prefuse.engine.core.sources import Batch
from prefuse.engine.core.step import mean_over_examples
from prefuse.engine.models.gguf import plain_directory
from prefuse.engine.models.loading import (
    DTYPES,
    check_model_dir,
    check_vocabulary,
    check_weight_files,
    load_tokenizer,
    lora_targets,
)
from prefuse.engine.reward.pairs import KINDS, PairSource, RewardPairs, load_splits, pair_batch, walk_pairs
from prefuse.engine.train.build import Run, open_log, optimizer_and_schedule, resume, start, total_steps_of
from prefuse.engine.train.config import check_held_out_and_resume, check_training_settings
from prefuse.engine.train.distributed import World
from prefuse.engine.train.loop import train_run
from prefuse.engine.train.output_dir import release
from prefuse.engine.train.report import Report


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
    skip_bad_rows: bool = _setting(False, "skip rows that cannot be read (missing column, empty text), counted, "
                                          "instead of stopping at the first with its file:row")
    torch_dtype: str = _setting("float32", "dtype the model's weights load in: float32, bfloat16, float16 or auto")
    use_peft: bool = _setting(False, "train LoRA adapters (and the score head) instead of every weight")
    lora_r: int = _setting(16, "LoRA rank")
    lora_alpha: int = _setting(32, "LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)")
    lora_dropout: float = _setting(0.05, "dropout probability on the LoRA path")
    lora_target_modules: list[str] | None = _setting(None, "module names for LoRA (default: peft's for the "
                                                           "architecture); the score head is trained in full")
    disable_dropout: bool = _setting(True, "set every dropout probability to 0, as TRL does")
    learning_rate: float = _setting(1e-4, "AdamW's peak learning rate")
    per_device_train_batch_size: int = _setting(8, "pairs per micro-batch")
    per_device_eval_batch_size: int = _setting(8, "held-out pairs per evaluation batch")
    gradient_accumulation_steps: int = _setting(1, "micro-batches per optimizer step")
    max_steps: int = _setting(-1, "optimizer steps (-1: num_train_epochs decides)")
    num_train_epochs: float = _setting(1.0, "passes over the training pairs when max_steps is -1")
    lr_scheduler_type: str = _setting("linear", "learning-rate schedule after warmup, transformers' names (linear, "
                                                "cosine, constant, ...)")
    warmup_steps: int = _setting(0, "steps of linear warmup from 0 to learning_rate")
    max_grad_norm: float = _setting(1.0, "clip the gradient norm to this (0: no clipping)")
    weight_decay: float = _setting(0.0, "AdamW's decoupled weight decay")
    center_rewards_coefficient: float | None = _setting(None, "bradley_terry: weight of mean((r_chosen + "
                                                              "r_rejected)^2), which keeps rewards centred at 0")
    seed: int = _setting(42, "seed of the data order, the new score head and dropout")
    logging_steps: int = _setting(10, "log (metrics.jsonl, the console) every N steps")
    eval_steps: int | None = _setting(None, "evaluate every N steps (default: logging_steps) and at the end")
    save_steps: int = _setting(500, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int | None = _setting(None, "keep only the latest N checkpoints (default: all)")
    resume_from_checkpoint: str | None = _setting(None, "'latest' (in --output_dir) or a checkpoint directory")
    overwrite_output_dir: bool = _setting(False, "start afresh in an output_dir an earlier run used: its checkpoints, "
                                                 "metrics.jsonl and train_config.json are removed first")
    resume_with_changed_settings: bool = _setting(False, "resume although settings that change the run differ from "
                                                         "the checkpoint's: the new ones apply (recorded in "
                                                         "metrics.jsonl)")
    report_to: str = _setting("auto", "auto: TensorBoard when installed; none; tensorboard")
    device: str = _setting("auto", "auto (CUDA when there is one), cpu, cuda or cuda:N")

    def validate(self) -> "RewardModelConfig":
        """Raise ValueError with one line naming the first bad field; return self."""
        for name in ("model_name_or_path", "dataset_name", "output_dir"):
            check_field(bool(getattr(self, name)), name, "required")

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

def reward_tokenizer(cfg: RewardModelConfig):
    """model_name_or_path's tokenizer, its pad token set (else its EOS, as TRL): read before the model, so that the
    data are checked before the weights load."""
    check_model_dir(cfg.model_name_or_path, "model_name_or_path")
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    check_field(tokenizer is not None, "model_name_or_path", f"{cfg.model_name_or_path} has no tokenizer files")
    if tokenizer.pad_token is None:
        check_field(tokenizer.eos_token is not None, "model_name_or_path", "the tokenizer has neither a pad nor an EOS "
                    "token (set pad_token)")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_model(cfg: RewardModelConfig, device="cpu", tokenizer=None):
    """(model in train mode, tokenizer, pad_id): a one-logit sequence classifier from model_name_or_path, with
    `config.pad_token_id` set (the head pools the last token that is not padding) to the tokenizer's pad token,
    else its EOS (TRL); LoRA adapters when use_peft. `tokenizer`: reward_tokenizer(cfg), read already."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    tokenizer = tokenizer or reward_tokenizer(cfg)
    config = AutoConfig.from_pretrained(cfg.model_name_or_path, local_files_only=True)
    is_classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    check_field(not is_classifier or config.num_labels == 1, "model_name_or_path",
                f"{cfg.model_name_or_path} is a classifier with num_labels={config.num_labels}; a reward model has one")
    check_weight_files(cfg.model_name_or_path, "model_name_or_path")  # cut short: the file, in one line
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.model_name_or_path, num_labels=1, local_files_only=True, dtype=DTYPES[cfg.torch_dtype])
    check_vocabulary(model, tokenizer, cfg.model_name_or_path)
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


def pair_metrics(first: torch.Tensor, second: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's RewardTrainer metrics (module docstring), as 0-d tensors."""
    first, second = first.detach().float(), second.detach().float()
    both = torch.cat([first, second])
    return {"accuracy": (first > second).float().mean(), "margin": (first - second).mean(),
            "min_reward": both.min(), "mean_reward": both.mean(), "max_reward": both.max()}


def pair_logits(model, pairs: RewardPairs, indices: list[int], pad_id: int, device) -> tuple:
    """(first, second) float32 logits [B] of the pairs `indices`, and the batch's token count; one forward."""
    batch = pair_batch(pairs, indices, pad_id).to(device)
    first, second = RewardStep.logits(model, batch)
    return first, second, batch.n_tokens


# -- the step and the run: engine/train/loop.py trains them ------------------------------------------------------

class RewardStep:
    """(loss, metrics) of a Batch of pairs (`pairs.pair_batch`): one forward of the reward model over both
    sequences of every pair, the kind's loss on their logits; the step of engine/train/loop.py for `train-rm`."""

    def __init__(self, model, cfg: RewardModelConfig):
        self.model, self.cfg = model, cfg

    @staticmethod
    def logits(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(first, second) float32 logits [B]: rows 0..B-1 of the batch, then rows B..2B-1."""
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits[:, 0].float()
        return logits[: batch.n_examples], logits[batch.n_examples:]

    def __call__(self, batch: Batch, reference=None) -> tuple[torch.Tensor, dict]:
        first, second = self.logits(self.model, batch)
        return pair_loss(self.cfg, first, second), pair_metrics(first, second)

    def held_out_metrics(self, parts: list[tuple[int, torch.Tensor, dict]], world) -> dict[str, float]:
        """Means over the held-out pairs (weighted by each batch's); min_reward and max_reward over all of them."""
        metrics = mean_over_examples(parts, world)
        metrics["min_reward"] = min(float(m["min_reward"]) for _, _, m in parts)
        metrics["max_reward"] = max(float(m["max_reward"]) for _, _, m in parts)
        return metrics

    def after_update(self, step: int, metrics: dict, optimizer) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class RewardReport(Report):
    """What `train-rm` prints: TRL's RewardTrainer numbers (accuracy, margin); its records hold num_tokens."""

    eval_record_epoch = True

    def opening(self, run) -> str:
        cfg = run.cfg
        return (f"training {run.total_steps} steps of {cfg.gradient_accumulation_steps} x "
                f"{cfg.per_device_train_batch_size} pairs ({cfg.kind}); "
                f"{sum(p.numel() for p in run.params):,} trainable parameters")

    def postfix(self, metrics: dict) -> dict[str, str]:
        return {"loss": f"{metrics['loss']:.4f}", "accuracy": f"{metrics['accuracy']:.3f}"}

    def extra(self, run) -> dict[str, float]:
        return {"num_tokens": run.num_tokens}

    def step_line(self, step: int, total: int, record: dict) -> str:
        return (f"step {step}/{total}  loss {record['loss']:.4f}  accuracy {record['accuracy']:.3f}  margin "
                f"{record['margin']:+.4f}  lr {record['learning_rate']:.2e}")

    def eval_line(self, step: int, total: int, scores: dict) -> str:
        return (f"step {step}/{total}  eval_loss {scores['eval_loss']:.4f}  eval_accuracy "
                f"{scores['eval_accuracy']:.3f}  eval_margin {scores['eval_margin']:+.4f}")


def build_reward_run(cfg: RewardModelConfig) -> tuple[Run, object]:
    """(the Run of `cfg`, the tokenizer): the reward model, its pairs as a batch source and a held-out walk, and
    the start, optimizer, schedule, resume and log that `prefuse train` builds too (engine/train/build.py)."""
    cfg.validate()
    world = World()  # train-rm runs in one process
    out, device = start(cfg.output_dir, asdict(cfg), seed=cfg.seed, device=cfg.device, world=world)
    tokenizer = reward_tokenizer(cfg)
    train, held_out = load_splits(cfg, tokenizer)  # the data (file, columns, rows) checked before the model loads
    print(f"data: {len(train)} training pairs" + (f", {len(held_out)} held out" if held_out else "")
          + (f"; {train.dropped} pairs over max_length={cfg.max_length} dropped" if train.dropped else "")
          + (f"; {train.skipped.count} bad rows skipped" if train.skipped.count else ""), flush=True)
    model, tokenizer, pad_id = load_reward_model(cfg, device, tokenizer)
    source = PairSource(train, batch_size=cfg.per_device_train_batch_size, seed=cfg.seed, pad_id=pad_id)
    total_steps = total_steps_of(cfg, source.batches_per_epoch)
    step = RewardStep(model, cfg)
    params, optimizer, scheduler = optimizer_and_schedule(cfg, model, total_steps)
    state = resume(cfg, out, model=model, optimizer=optimizer, scheduler=scheduler, source=source, step=step,
                   world=world, total_steps=total_steps)
    walk = None if held_out is None else partial(
        walk_pairs, held_out, batch_size=cfg.per_device_eval_batch_size, pad_id=pad_id)
    run = Run(cfg=cfg, out=out, device=device, policy=model, step=step, source=source, params=params,
              optimizer=optimizer, scheduler=scheduler, log=open_log(cfg, out, state, world),
              total_steps=total_steps, start_step=int(state.get("step", 0)),
              num_tokens=int(state.get("num_tokens", 0)), held_out=walk, report=RewardReport(), world=world)
    return run, tokenizer


def train_reward_model(cfg: RewardModelConfig) -> dict[str, float]:
    """Train as `cfg` says and write the model to output_dir; return the last logged record."""
    try:
        run, tokenizer = build_reward_run(cfg)
    except BaseException:
        release(cfg.output_dir, failed=True)  # a run that did not start leaves output_dir as it found it
        raise
    try:
        last = train_run(run)
        save_reward_model(run.policy, tokenizer, run.out)
    finally:
        release(run.out)
    print(f"model: {run.out} ({'PairwiseJudge' if cfg.kind == 'pairwise' else 'RewardModelJudge'} reads it)",
          flush=True)
    return last


__all__ = ["RewardModelConfig", "train_reward_model", "build_reward_run", "RewardStep", "RewardReport",
           "load_reward_model", "reward_tokenizer", "save_reward_model", "bradley_terry_loss", "pairwise_loss",
           "pair_loss", "pair_metrics", "pair_logits"]
