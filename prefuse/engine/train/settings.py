"""The loop's sections of `prefuse train`'s settings: optimisation and schedule (engine/train/build.py's optimizer,
engine/train/loop.py), and the run's output, logging, checkpoints and resume."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prefuse.engine.checks import check_field, setting

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
REPORT_TO = ("auto", "none", "tensorboard")
FSDP = ("", "full_shard")


@dataclass
class OptimisationSettings:
    learning_rate: float = setting(1e-6, "AdamW's peak learning rate")
    per_device_train_batch_size: int = setting(8, "training examples per micro-batch on each device")
    per_device_eval_batch_size: int = setting(8, "held-out examples per batch on each device")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    max_steps: int = setting(-1, "optimizer steps (-1: num_train_epochs decides)")
    num_train_epochs: float = setting(1.0, "passes over the training data, when max_steps is -1")
    lr_scheduler_type: str = setting("linear", f"the learning rate's schedule, one of {', '.join(SCHEDULERS)}")
    warmup_steps: int = setting(0, "optimizer steps of the schedule's warmup")
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0: no clipping)")
    skip_nonfinite_steps: int = setting(0, "skip up to N optimizer steps whose loss or gradient norm is NaN or "
                                           "infinite (no update; counted as nonfinite_steps_skipped) and stop at "
                                           "the N+1st; 0: stop at the first")
    weight_decay: float = setting(0.0, "AdamW's weight decay")
    bf16: bool = setting(False, "bfloat16 autocast around the decoder")
    seed: int = setting(42, "seed of the run's random draws (data order, initialisation, sampling)")
    fsdp: str = setting("", "under torchrun: shard the policy with FSDP2 (full_shard: fully_shard per decoder layer "
                            "and at the root; --fsdp alone means full_shard); empty: DDP")

    def check(self) -> None:
        """One-line ValueErrors naming the field."""
        check_optimisation(self)
        check_field(self.fsdp in FSDP, "fsdp", f"{self.fsdp!r} is not full_shard (or empty: DDP)")
        check_field(self.skip_nonfinite_steps >= 0, "skip_nonfinite_steps",
                    f"must be >= 0 (0: stop at the first non-finite step), got {self.skip_nonfinite_steps}")


@dataclass
class RunSettings:
    output_dir: str = setting("", "where metrics.jsonl, checkpoints and cached reference log-probs go")
    logging_steps: int = setting(10, "log the metrics every N optimizer steps")
    save_steps: int = setting(500, "checkpoint every N steps (0: only at the end)")
    save_total_limit: int | None = setting(None, "keep only the newest N checkpoints (default: all)")
    eval_steps: int | None = setting(None, "evaluate the held-out set every N steps (default: logging_steps, when "
                                           "there is one)")
    resume_from_checkpoint: str | None = setting(None, "'latest' (in --output_dir) or a checkpoint directory")
    overwrite_output_dir: bool = setting(False, "start afresh in an output_dir an earlier run used: its checkpoints, "
                                                "metrics.jsonl and train_config.json are removed first")
    resume_with_changed_settings: bool = setting(False, "resume although settings that change the run differ from "
                                                        "the checkpoint's: the new ones apply (recorded in "
                                                        "metrics.jsonl)")
    init_adapters: str | None = setting(None, "a checkpoint of a LoRA run whose adapters start this one (fresh "
                                              "optimizer)")
    report_to: str = setting("auto", "auto: TensorBoard when installed; none; tensorboard")
    device: str = setting("auto", "auto (CUDA when available, else the CPU) or a torch device (cpu, cuda:1)")

    def check(self) -> None:
        """One-line ValueErrors naming the field."""
        check_logging_and_saving(self)
        check_resume(self)
        check_field(self.init_adapters is None or (Path(self.init_adapters) / "checkpoint.json").is_file(),
                    "init_adapters", f"{self.init_adapters} is not a prefuse checkpoint directory (checkpoint-<step>)")


def check_optimisation(cfg) -> None:
    """The optimisation settings of any training config (TrainConfig, RewardModelConfig)."""
    check_field(cfg.lr_scheduler_type in SCHEDULERS, "lr_scheduler_type",
                f"{cfg.lr_scheduler_type!r} is not one of {SCHEDULERS}")
    check_field(cfg.learning_rate > 0, "learning_rate", f"must be positive, got {cfg.learning_rate}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check_field(int(getattr(cfg, name)) >= 1, name, f"must be at least 1, got {getattr(cfg, name)}")
    check_field(cfg.max_steps > 0 or cfg.num_train_epochs > 0, "max_steps", "set max_steps > 0 or num_train_epochs > 0")
    check_field(cfg.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {cfg.warmup_steps}")
    check_field(cfg.weight_decay >= 0, "weight_decay", f"must be >= 0, got {cfg.weight_decay}")


def check_logging_and_saving(cfg) -> None:
    """report_to, logging_steps, save_steps, save_total_limit and eval_steps of any training config."""
    check_field(cfg.report_to in REPORT_TO, "report_to", "must be auto, none or tensorboard")
    check_field(int(cfg.logging_steps) >= 1, "logging_steps", f"must be at least 1, got {cfg.logging_steps}")
    check_field(cfg.save_steps >= 0, "save_steps", f"must be >= 0 (0: never), got {cfg.save_steps}")
    check_field(cfg.save_total_limit is None or cfg.save_total_limit >= 1, "save_total_limit",
                f"must be >= 1, got {cfg.save_total_limit}")
    check_field(cfg.eval_steps is None or cfg.eval_steps >= 1, "eval_steps", f"must be >= 1, got {cfg.eval_steps}")


def check_resume(cfg) -> None:
    """resume_from_checkpoint: "latest", or a checkpoint directory (as given, or in output_dir)."""
    if cfg.resume_from_checkpoint not in (None, "latest"):
        check_field(Path(cfg.resume_from_checkpoint).is_dir()
                    or (Path(cfg.output_dir) / cfg.resume_from_checkpoint).is_dir(),
                    "resume_from_checkpoint", f"no such checkpoint directory: {cfg.resume_from_checkpoint}")
