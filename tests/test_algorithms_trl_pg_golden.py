"""prefuse's grpo and rloo against a golden table of TRL 1.16 values (tests/golden/trl_pg_golden.json).

The table holds fixed rewards and per-token (GRPO) or per-sample (RLOO) log-probs, TRL's loss, its logged metrics,
its advantages and the gradient of the loss with respect to each per-token (GRPO) or summed (RLOO) log-prob;
tests/golden/make_trl_pg_golden.py produced it (in float32) from GRPOTrainer's and RLOOTrainer's own
_generate_and_score_completions and compute_loss. Here prefuse recomputes everything in float32 from the same
inputs. Tolerance: float32 rounding of sums taken in another order (about 1e-7 relative per operation, a few dozen
operations): rtol 1e-5 with atol 1e-6 for values, 1e-7 for gradients (each about 1 / tokens, or 0 where masked).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefuse.algorithms import objective_loss
from prefuse.algorithms.policy_gradient import GRPO_LOSS_TYPES, SCALE_REWARDS, group_advantages

GOLDEN = json.loads((Path(__file__).parent / "golden" / "trl_pg_golden.json").read_text())
CASES = GOLDEN["cases"]
VALUE_TOL = {"rtol": 1e-5, "atol": 1e-6}
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-7}


def _case_id(case):
    options = ",".join(f"{k}={v}" for k, v in case["options"].items())
    return f"{case['trainer']}[{options}]"


def _inputs(case):
    shape = case["shape"]
    inputs = {}
    for key, values in case["inputs"].items():
        rows = shape if key.endswith("token_logps") or key.endswith("token_mask") else shape[:2]
        if key == "online_token_mask":
            inputs[key] = torch.tensor(values, dtype=torch.bool).view(rows)
        elif key == "online_lengths":
            inputs[key] = torch.tensor(values, dtype=torch.long).view(rows)
        else:
            inputs[key] = torch.tensor(values, dtype=torch.float32).view(rows).requires_grad_(key.startswith("policy_"))
    return inputs


def _hparams(case):
    options = dict(case["options"])
    beta = options.pop("beta", 0.0 if case["trainer"] == "GRPOTrainer" else 0.05)
    if case["trainer"] == "GRPOTrainer":
        options["grpo_loss_type"] = options.pop("loss_type")
    return "grpo" if case["trainer"] == "GRPOTrainer" else "rloo", beta, options


def _close(actual, expected, tol, what):
    want = torch.tensor(expected, dtype=torch.float64).view(actual.shape)
    torch.testing.assert_close(actual.detach().double(), want, **tol, msg=lambda m: f"{what}: {m}")


# TRL 1.16's RLOOConfig.normalize_advantages (a batch statistic) is not offered: rloo is registered separable, so
# its in-forward and data-parallel paths see a part of the batch. The case stays in the table for when it is.
NOT_OFFERED = pytest.mark.xfail(raises=ValueError, strict=True, reason="rloo does not offer normalize_advantages")


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=NOT_OFFERED) if c["options"].get("normalize_advantages") else c for c in CASES],
    ids=_case_id,
)
def test_matches_trl(case):
    name, beta, hparams = _hparams(case)
    inputs = _inputs(case)
    expected = case["expected"]
    loss, metrics = objective_loss(name, beta=beta, **inputs, **hparams)
    assert loss.dtype == torch.float32
    _close(loss, expected["loss"], VALUE_TOL, "loss")
    assert set(expected["metrics"]) <= set(metrics), sorted(set(expected["metrics"]) - set(metrics))
    for key, value in expected["metrics"].items():
        _close(metrics[key], value, VALUE_TOL, key)

    grad_key = next(k for k in expected if k.startswith("grad_"))
    leaf = inputs[grad_key[len("grad_") :]]
    (grad,) = torch.autograd.grad(loss, leaf)
    _close(grad, expected[grad_key], GRAD_TOL, grad_key)
    if name == "grpo":
        rewards = inputs["rewards"]
        _close(group_advantages(rewards, hparams["scale_rewards"]), expected["advantages"], VALUE_TOL, "advantages")


def test_table_covers_every_loss_type_scaling_and_option():
    grpo = [c["options"] for c in CASES if c["trainer"] == "GRPOTrainer"]
    rloo = [c["options"] for c in CASES if c["trainer"] == "RLOOTrainer"]
    pairs = {(o["loss_type"], o["scale_rewards"]) for o in grpo}
    assert pairs >= {(t, s) for t in GRPO_LOSS_TYPES for s in SCALE_REWARDS}
    assert {o.get("use_bias_correction_kl", True) for o in grpo if o.get("beta", 0.0) != 0.0} == {True, False}
    assert any(o.get("epsilon_high") is not None for o in grpo) and any(o.get("epsilon_high") for o in rloo)
    assert {o.get("beta", 0.05) != 0.0 for o in rloo} == {True, False}
    # a group with all-equal rewards (std 0) in the table
    assert any(c["expected"]["metrics"]["frac_reward_zero_std"] > 0 for c in CASES)
    assert GOLDEN["trl_version"] == "1.16.0"
