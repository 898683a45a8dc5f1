"""The loop's guard on the numbers of each optimizer step, before the update applies them.

- A NaN or infinite loss or gradient norm stops the run with one line naming the step and which of the two it was
  (`NonFiniteStep`, a ValueError: `prefuse train: error: ...`, exit status 2): the optimizer never applies it, so no
  checkpoint ever holds weights it made. With `--skip_nonfinite_steps N` such a step is skipped instead (gradients
  cleared, no optimizer update; the schedule still advances so the learning rate stays a function of the step),
  counted as `nonfinite_steps_skipped` in metrics.jsonl, and the run stops at the (N+1)th.
- A gradient norm of exactly 0 for ZERO_STEPS steps in a row after a non-zero one is said in one warning line naming
  the steps, once per such stretch: with a loss above 0 the model saturated (a learning rate so high that no gradient
  reaches the weights any more: the issue's loss 8.4e7 at step 2, then grad_norm 0.0); with a loss of 0 every
  example's term is saturated (a hinge margin met) and nothing more is learned from those batches.
"""
from __future__ import annotations

import math

ZERO_STEPS = 3  # consecutive steps of an exactly-zero gradient norm that make the saturation warning


class NonFiniteStep(ValueError):
    """A step whose loss or gradient norm is NaN or infinite, beyond --skip_nonfinite_steps."""


class StepGuard:
    def __init__(self, *, limit: int = 0, skipped: int = 0, learning_rate: float | None = None):
        self.limit = limit              # --skip_nonfinite_steps
        self.skipped = skipped          # steps skipped so far (a resumed run's from its checkpoint)
        self.learning_rate = learning_rate
        self.zero_run: list[int] = []   # the steps of the current stretch of exactly-zero gradient norms
        self.last_nonzero: tuple[int, float] | None = None  # (step, grad_norm) before that stretch

    def nonfinite(self, step: int, loss: float, grad_norm: float) -> bool:
        """True when step `step` must be skipped (its loss or gradient norm is not finite and the budget allows it);
        NonFiniteStep when the budget is spent; False for a finite step."""
        which = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", grad_norm)
        if math.isfinite(which[1]):
            return False
        if self.skipped < self.limit:
            self.skipped += 1
            return True
        rate = f" (now {self.learning_rate:g})" if self.learning_rate is not None else ""
        past = (f"{self.skipped} earlier non-finite step(s) were skipped, the most --skip_nonfinite_steps "
                f"{self.limit} allows; " if self.limit else "")
        raise NonFiniteStep(
            f"step {step}: the {which[0]} is {which[1]} before the optimizer update; {past}the update was not "
            f"applied and the checkpoints hold only earlier steps' weights; lower --learning_rate{rate} (or "
            f"--max_grad_norm), or give --skip_nonfinite_steps N to skip up to N such steps")

    def saturation(self, step: int, grad_norm: float, loss: float) -> str | None:
        """The warning line when the gradient norm has been exactly 0 for ZERO_STEPS steps after a non-zero one."""
        if grad_norm != 0.0:
            self.last_nonzero, self.zero_run = (step, grad_norm), []
            return None
        self.zero_run.append(step)
        if self.last_nonzero is None or len(self.zero_run) != ZERO_STEPS:
            return None
        at, norm = self.last_nonzero
        rate = f" (now {self.learning_rate:g})" if self.learning_rate is not None else ""
        why = ("the loss is 0 on these batches (every example's term saturated, e.g. a hinge margin met): nothing "
               "more is learned from them" if loss == 0 else
               f"the loss is {loss:.4g} but no gradient reaches the weights: the model saturated and learns nothing; "
               f"lower --learning_rate{rate}")
        return (f"warning: step {step}: the gradient norm has been exactly 0 for {ZERO_STEPS} steps (since step "
                f"{self.zero_run[0]}; {norm:.4g} at step {at}): {why}")
