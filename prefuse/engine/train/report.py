"""What a training run says while the loop drives it: its opening line, each logged step's line, each evaluation's
line, and what its logged records hold beside the window's metrics.

    report = Report()                        # `prefuse train`'s: objective, rewards/margins, tokens per second
    print(report.opening(run))               # training N steps of A x B examples; objective [...]; P parameters

The loop (engine/train/loop.py) is the same for every run; a run that trains something else (the reward models of
`prefuse train-rm`, engine/reward/train.py) brings a Report of its own.
"""
from __future__ import annotations


class Report:
    """The lines and record fields of a preference run (`prefuse train`)."""

    # an evaluation logged at a step without a training record: does it carry the epoch?
    eval_record_epoch = False

    def opening(self, run) -> str:
        """The line before the first step."""
        cfg = run.cfg
        return (f"training {run.total_steps} steps of {cfg.gradient_accumulation_steps} x "
                f"{cfg.per_device_train_batch_size} examples; objective {cfg.loss_type}; "
                f"{sum(p.numel() for p in run.params):,} trainable parameters")

    def postfix(self, metrics: dict) -> dict[str, str]:
        """The progress bar's numbers after a step (a terminal only)."""
        return {"loss": f"{metrics['loss']:.4f}",
                **({"margin": f"{metrics['rewards/margins']:+.3f}"} if "rewards/margins" in metrics else {})}

    def extra(self, run) -> dict[str, float]:
        """Fields a logged training record holds beside the window's metrics (and the evaluation's)."""
        return {}

    def step_line(self, step: int, total: int, record: dict) -> str:
        """The line of a logged training record."""
        pairs = (f"  margin {record['rewards/margins']:+.4f}  acc {record.get('rewards/accuracies', 0):.2f}"
                 if "rewards/margins" in record else "")  # objectives without a chosen/rejected pair have none
        return (f"step {step}/{total}  loss {record['loss']:.4f}{pairs}"
                f"  lr {record['learning_rate']:.2e}  {record['tokens_per_second']:.0f} tok/s")

    def eval_line(self, step: int, total: int, scores: dict) -> str:
        """The line of an evaluation (scores: eval_loss, eval_<metric>, ...)."""
        margin = (f"  eval margin {scores['eval_rewards/margins']:+.4f}" if "eval_rewards/margins" in scores
                  else "")
        return f"step {step}/{total}  eval_loss {scores['eval_loss']:.4f}{margin}"


__all__ = ["Report"]
