"""WPO (`use_weighting=True`) in PreferenceLoss: TRL 1.16's own loss code on a tiny head
(tests/golden/trl_wpo_golden.json, written by tests/golden/make_wpo_golden.py) and a float64 computation from the
definition (Zhou et al. 2024, Eq. 2: w = exp(mean over the response of log p(y_t) - log sum_v p(v)^2), the pair's
loss times w_chosen * w_rejected, the weights without gradient)."""
import json
from pathlib import Path

import pytest
import torch

from prefuse.preference import PreferenceLoss

GOLDEN = json.loads((Path(__file__).parent / "golden" / "trl_wpo_golden.json").read_text())
MODES = ["in_forward", "recompute", "frozen_weight"]


def tensors(case, dtype=torch.float32):
    hidden = torch.tensor(case["hidden"], dtype=dtype).requires_grad_()
    weight = torch.tensor(case["weight"], dtype=dtype).requires_grad_()
    return hidden, weight, torch.tensor(case["ref_hidden"], dtype=dtype), torch.tensor(case["labels"])


def loss_of(case, mode, hidden, weight, ref_hidden, labels):
    opts = case["options"]
    names = opts["loss_type"] if len(opts["loss_type"]) > 1 else opts["loss_type"][0]
    fn = PreferenceLoss(names, beta=opts["beta"], loss_weights=opts.get("loss_weights"), use_weighting=True,
                        mode=mode, backend="torch")
    return fn(hidden, weight if mode != "frozen_weight" else weight.detach(), labels, ref_hidden=ref_hidden), fn


def close(got, want, rel=2e-5):
    want = torch.as_tensor(want, dtype=torch.float64)
    assert (got.double() - want).abs().max() <= rel * (1 + want.abs().max()), (got, want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("index", range(len(GOLDEN["cases"])))
def test_preference_loss_matches_trl(index, mode):
    case = GOLDEN["cases"][index]
    hidden, weight, ref_hidden, labels = tensors(case)
    (loss, metrics), fn = loss_of(case, mode, hidden, weight, ref_hidden, labels)
    assert fn.last_mode == mode
    expected = case["expected"]
    close(loss.detach(), expected["loss"])
    loss.backward()
    close(hidden.grad, expected["grad_hidden"])
    if mode != "frozen_weight":
        close(weight.grad, expected["grad_weight"])
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        close(metrics[name].detach(), expected["metrics"][name])


def definition64(hidden, weight, ref_hidden, labels, beta):
    """sigmoid DPO with WPO weights, float64, written from the paper's definition."""
    keep = labels != -100
    idx = labels.clamp(min=0).unsqueeze(-1)

    def token_logps(h, w=weight):
        return torch.log_softmax(h @ w.T, -1).gather(-1, idx).squeeze(-1) * keep

    logp_all = torch.log_softmax(hidden @ weight.T, -1)
    log_sum_sq = torch.log((logp_all.exp() ** 2).sum(-1)) * keep
    policy, ref = token_logps(hidden), token_logps(ref_hidden, weight.detach())
    lengths = keep.sum(-1).clamp(min=1)
    weights = torch.exp(((policy - log_sum_sq).sum(-1) / lengths).detach())
    b = hidden.shape[0] // 2
    margin = (policy.sum(-1) - ref.sum(-1))
    loss = -torch.nn.functional.logsigmoid(beta * (margin[:b] - margin[b:]))
    return (loss * weights[:b] * weights[b:]).mean()


def test_float64_definition_and_weights_carry_no_gradient():
    case = GOLDEN["cases"][0]
    hidden, weight, ref_hidden, labels = tensors(case, torch.float64)
    want = definition64(hidden, weight, ref_hidden, labels, case["options"]["beta"])
    g_hidden, g_weight = torch.autograd.grad(want, [hidden, weight])
    h32, w32, r32, _ = tensors(case)
    (loss, _), _ = loss_of(case, "recompute", h32, w32, r32, labels)
    loss.backward()
    close(loss.detach(), float(want.detach()))
    close(h32.grad, g_hidden)
    close(w32.grad, g_weight)
    # without the weighting the loss differs (the weights are far from 1 here)
    plain, _ = PreferenceLoss("sigmoid", beta=case["options"]["beta"])(h32, w32, labels, ref_hidden=r32)
    assert abs(float(plain.detach()) - float(loss.detach())) > 1e-3


def test_given_log_sum_sq_inputs_are_used_as_is():
    case = GOLDEN["cases"][0]
    hidden, weight, ref_hidden, labels = tensors(case)
    fn = PreferenceLoss("sigmoid", use_weighting=True, backend="torch")
    _, _, inputs = fn(hidden, weight, labels, ref_hidden=ref_hidden, return_inputs=True)
    b = hidden.shape[0] // 2
    given = {f"policy_{r}_log_sum_sq_probs": inputs[f"policy_{r}_log_sum_sq_probs"] for r in ("chosen", "rejected")}
    assert given["policy_chosen_log_sum_sq_probs"].shape == (b,)
    a, _ = fn(hidden, weight, labels, ref_hidden=ref_hidden)
    c, _ = fn(hidden, weight, labels, ref_hidden=ref_hidden, **given)
    assert torch.equal(a.detach(), c.detach())
    zero = {k: torch.zeros_like(v) for k, v in given.items()}
    d, _ = fn(hidden, weight, labels, ref_hidden=ref_hidden, **zero)
    assert not torch.equal(a.detach(), d.detach())


@pytest.mark.interpreter
def test_triton_backend_matches_trl():
    case = GOLDEN["cases"][0]
    hidden, weight, ref_hidden, labels = tensors(case)
    fn = PreferenceLoss("sigmoid", beta=case["options"]["beta"], use_weighting=True, backend="triton")
    loss, _ = fn(hidden, weight, labels, ref_hidden=ref_hidden)
    close(loss.detach(), case["expected"]["loss"])
    loss.backward()
    close(hidden.grad, case["expected"]["grad_hidden"])
    close(weight.grad, case["expected"]["grad_weight"])
