"""The numbers of `prefuse eval`, as pure float64 functions of per-prompt wins and lengths.

    wins = score_wins(model_scores, baseline_scores)     # 1 where the model scores higher, 1/2 on a tie, else 0
    rate = win_rate(wins)                                 # the mean
    low, high = wilson_interval(rate, len(wins))          # the 95% Wilson score interval
    lc = length_controlled(wins, model_lengths, baseline_lengths)   # AlpacaEval 2's LC win rate (see below)

The length-controlled win rate follows AlpacaEval 2 (Dubois et al. 2024, "Length-Controlled AlpacaEval"): a
logistic regression (a GLM with the logit link) predicts each prompt's win from the standardised length difference,

    P(win_i) = sigmoid(theta + phi * tanh(d_i / sd(d))),   d_i = length(model answer i) - length(baseline answer i),

sd the sample standard deviation of d (n - 1 in the denominator), and the LC win rate is the model's predicted win
with the length term set to zero, the mean over prompts of sigmoid(theta) = sigmoid(theta). AlpacaEval's GLM has
two more terms that need many models evaluated on the same instructions (a per-instruction difficulty, and
regularisation towards "gamed" baselines); with one model against one baseline they are not identifiable, so this
is AlpacaEval's minimal GLM (`length_controlled_minimal`: tanh of the standardised length difference and the
model's own term, no regularisation). Wins may be fractional (ties 1/2, a pairwise judge's probability): the fit
maximises the Bernoulli log-likelihood with those targets (as AlpacaEval does with its soft preferences), by Newton's
method (IRLS) in float64. When every d is equal (sd = 0) the length term is zero and LC equals the raw win rate.
When the data are separated (a length threshold splits every win from every loss, or every prompt is won or every
one lost) the maximum-likelihood fit runs off to infinity: all wins equal gives that value as LC (the limit),
separation by length gives None and a reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def score_wins(model_scores, baseline_scores) -> list[float]:
    """1.0 where the model's score is higher, 0.5 where they are equal, 0.0 where the baseline's is higher."""
    if len(model_scores) != len(baseline_scores):
        raise ValueError(f"scores: {len(model_scores)} model scores for {len(baseline_scores)} baseline scores")
    return [1.0 if m > b else 0.5 if m == b else 0.0 for m, b in zip(model_scores, baseline_scores)]


def win_rate(wins) -> float:
    if len(wins) == 0:
        raise ValueError("wins: no prompts to compute a win rate over")
    return math.fsum(float(w) for w in wins) / len(wins)


def wilson_interval(rate: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion `rate` out of n: (p + z^2/2n -/+ z sqrt(p(1-p)/n + z^2/4n^2)) /
    (1 + z^2/n). A fractional win (a tie's 1/2, a judge's probability) counts by its mean, as if n Bernoulli trials
    had that success rate."""
    if n < 1:
        raise ValueError(f"n: the interval needs at least one prompt, got {n}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate: a win rate is in [0, 1], got {rate}")
    z2 = z * z
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class LengthControlled:
    """The LC win rate (None when the fit has no finite answer), the fitted theta (the model's term) and phi (the
    length term's weight), and a reason when rate is None or the fit is a limit."""

    rate: float | None
    theta: float | None
    phi: float | None
    note: str = ""


def length_features(model_lengths, baseline_lengths) -> torch.Tensor:
    """tanh(d / sd(d)) as float64 [n], d = model - baseline lengths; zeros when sd(d) is 0 (or n < 2)."""
    d = torch.tensor([float(m) - float(b) for m, b in zip(model_lengths, baseline_lengths)], dtype=torch.float64)
    if len(d) < 2:
        return torch.zeros_like(d)
    sd = d.std(correction=1)
    return torch.zeros_like(d) if sd == 0 else torch.tanh(d / sd)


def logistic_fit(x: torch.Tensor, y: torch.Tensor, *, max_iterations: int = 100,
                 tolerance: float = 1e-12) -> tuple[torch.Tensor, bool]:
    """Maximum-likelihood logistic regression by Newton's method (IRLS), float64: x [n, k] design (with its own
    intercept column), y [n] targets in [0, 1]. Returns (coefficients [k], converged); not converged means the
    likelihood has no finite maximum (separated data) or the Hessian is singular."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    beta = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(max_iterations):
        p = torch.sigmoid(x @ beta)
        w = p * (1 - p)
        gradient = x.T @ (y - p)
        hessian = (x * w[:, None]).T @ x
        try:
            step = torch.linalg.solve(hessian, gradient)
        except RuntimeError:  # torch.linalg.LinAlgError: singular
            return beta, False
        if not torch.isfinite(step).all():
            return beta, False
        beta = beta + step
        if step.abs().max() < tolerance * (1 + beta.abs().max()):
            return beta, bool(beta.abs().max() < 30)
    return beta, False


def length_controlled(wins, model_lengths, baseline_lengths) -> LengthControlled:
    """AlpacaEval 2's length-controlled win rate (module docstring) of per-prompt wins in [0, 1] and the two sides'
    answer lengths."""
    n = len(wins)
    if n == 0 or len(model_lengths) != n or len(baseline_lengths) != n:
        raise ValueError(f"wins: {n} wins, {len(model_lengths)} model lengths and {len(baseline_lengths)} baseline "
                         f"lengths (give one of each per prompt)")
    y = torch.tensor([float(w) for w in wins], dtype=torch.float64)
    feature = length_features(model_lengths, baseline_lengths)
    if bool((y == y[0]).all()):  # every prompt won (lost, tied) alike: the fit's limit is that value
        return LengthControlled(float(y[0]), None, None, "every prompt has the same win: LC = that win")
    if bool((feature == 0).all()):  # no length difference to control for: the intercept-only fit, logit(mean)
        rate = win_rate(wins)
        return LengthControlled(rate, math.log(rate / (1 - rate)), 0.0, "no length difference: LC = the win rate")
    x = torch.stack([torch.ones_like(feature), feature], dim=1)
    beta, converged = logistic_fit(x, y)
    if not converged:
        return LengthControlled(None, None, None, "the logistic regression has no finite fit (the wins are "
                                                  "separated by the length difference)")
    theta, phi = float(beta[0]), float(beta[1])
    return LengthControlled(float(torch.sigmoid(beta[0])), theta, phi)
