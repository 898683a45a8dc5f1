"""prefuse's objectives against a golden table of TRL 1.16 values (tests/golden/trl_dpo_golden.json).

The table holds fixed sequence statistics, TRL's batch loss, its logged metrics and the gradient of the loss with
respect to each summed log-prob; tests/golden/make_trl_golden.py produced it (in float32) from TRL's own loss code.
Here prefuse recomputes everything in float32 from the same statistics. Tolerance: rtol 1e-4, atol 1e-5 for
values, atol 1e-6 for gradients (the float32 sums are formed in a different order from TRL's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefuse.algorithms import objective_loss
from tests.test_algorithms_reference import DPO_TYPES

GOLDEN = json.loads((Path(__file__).parent / "golden" / "trl_dpo_golden.json").read_text())
CASES = GOLDEN["cases"]
VALUE_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}

PAIR_KEYS = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
LD_KEYS = tuple(k.replace("_logps", "_verbose_logps") for k in PAIR_KEYS)
WPO_KEYS = ("policy_chosen_log_sum_sq_probs", "policy_rejected_log_sum_sq_probs")


def _tensor(values, key):
    if key.endswith("lengths"):
        return torch.tensor(values, dtype=torch.long)
    if key == "labels":
        return torch.tensor(values, dtype=torch.bool)
    leaf = torch.tensor(values, dtype=torch.float32)
    return leaf.requires_grad_(key.startswith("policy_"))


def _case_id(case):
    options = ",".join(f"{k}={v}" for k, v in case["options"].items())
    return f"{case['trainer']}[{options}]"


def _dpo_call(case):
    options = dict(case["options"])
    names = options.pop("loss_type")
    call = {"name": names, "beta": options.pop("beta", 0.1), "loss_weights": options.pop("loss_weights", None)}
    keys = list(PAIR_KEYS) + ["chosen_lengths", "rejected_lengths"]
    if options.get("ld_alpha") is not None:
        keys += LD_KEYS
    if options.get("use_weighting"):
        keys += WPO_KEYS
    return call, keys, options


def _cpo_calls(case):
    options = dict(case["options"])
    beta = options.pop("beta")
    keys = ["policy_chosen_logps", "policy_rejected_logps", "chosen_lengths", "rejected_lengths"]
    calls = [({"name": "cpo", "beta": beta}, keys, options)]
    if options["loss_type"] == "simpo" and options["cpo_alpha"] == 0.0:
        simpo_options = {k: options[k] for k in ("simpo_gamma", "label_smoothing", "alpha")}
        calls.append(({"name": "simpo", "beta": beta}, keys, simpo_options))
    return calls


def _calls(case):
    """(call arguments, input keys, hyper-parameters) of each prefuse call that should reproduce the case."""
    trainer = case["trainer"]
    if trainer == "DPOTrainer":
        return [_dpo_call(case)]
    if trainer == "CPOTrainer":
        return _cpo_calls(case)
    if trainer == "ORPOTrainer":
        return [({"name": "orpo", "beta": case["options"]["beta"]}, list(case["inputs"]), {})]
    options = dict(case["options"])
    options.pop("all_desirable", None)
    name = options.pop("loss_type", "kto")
    return [({"name": name, "beta": options.pop("beta", 0.1)}, list(case["inputs"]), options)]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_trl(case):
    expected = case["expected"]
    for call, keys, hparams in _calls(case):
        inputs = {key: _tensor(case["inputs"][key], key) for key in keys}
        loss, metrics = objective_loss(**call, **inputs, **hparams)
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss.double(), torch.tensor(expected["loss"], dtype=torch.float64), **VALUE_TOL)

        for key, value in expected["metrics"].items():
            if key in ("nll_loss", "kl") and key not in metrics:
                # TRL logs a placeholder 0 for a term the loss does not have (cpo_alpha = 0, apo_zero_unpaired)
                assert value == 0.0
                continue
            torch.testing.assert_close(metrics[key].double(), torch.tensor(value, dtype=torch.float64), **VALUE_TOL)

        grad_keys = [k for k in expected if k.startswith("grad_")]
        grads = torch.autograd.grad(loss, [inputs[k[len("grad_") :]] for k in grad_keys], allow_unused=True)
        for key, grad in zip(grad_keys, grads):
            grad = torch.zeros_like(inputs[key[len("grad_") :]]) if grad is None else grad
            known = [i for i, v in enumerate(expected[key]) if v is not None]
            want = torch.tensor([expected[key][i] for i in known], dtype=torch.float64)
            torch.testing.assert_close(grad.double()[known], want, **GRAD_TOL, msg=lambda m: f"{key}: {m}")


def test_table_covers_every_trl_loss_type_and_option():
    dpo_cases = [c["options"] for c in CASES if c["trainer"] == "DPOTrainer"]
    loss_types = {t for options in dpo_cases for t in options["loss_type"]}
    assert loss_types == set(DPO_TYPES)
    option_keys = {k for options in dpo_cases for k in options}
    assert {
        "label_smoothing",
        "f_divergence_type",
        "f_alpha_divergence_coef",
        "ld_alpha",
        "use_weighting",
        "loss_weights",
        "discopop_tau",
        "beta",
    } <= option_keys
    assert {c["trainer"] for c in CASES} == {"DPOTrainer", "CPOTrainer", "ORPOTrainer", "KTOTrainer"}
    assert GOLDEN["trl_version"] == "1.16.0"
