"""Cases that kill the mutants of prefuse/algorithms/ which the other objective tests let through.

tests/golden/mutate_algorithms.py mutates every module of prefuse/algorithms/ (operators, signs, constants, detaches,
reductions, defaults, metric names) and runs the fast objective tests against each mutant. The cases below pin down
what those tests left open: hyper-parameter defaults, option bounds, metrics by value, gradients that must not flow,
edge counts (k = 1 or 2 samples, one-token and empty responses) and inputs where the clamps bind.

Expected values come from the definitions (ALGORITHMS.md, TRL 1.16's configs and losses, the formulas in the
docstrings), written here in plain float64 Python (`math`, lists) or as hand-worked numbers; never from prefuse's own
helpers.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from prefuse.algorithms import get_objective, list_objectives, objective_loss

F64 = torch.float64


def vec(*values, grad=False):
    return torch.tensor(values, dtype=F64, requires_grad=grad)


def sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z))


def logsigmoid(z):
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def close(got, want, rtol=1e-10, atol=1e-12, what=""):
    got = torch.as_tensor(got).detach().double()
    want = torch.as_tensor(want, dtype=F64)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def metric(metrics, name):
    """A metric as a python float (the batch mean, as the API reduces it)."""
    return float(torch.as_tensor(metrics[name]).double().mean())


def no_grad(grad, what):
    assert grad is None or torch.count_nonzero(grad) == 0, f"{what} must get no gradient, got {grad}"


# -------------------------------------------------------------------------------------------------------- registry
# Documented defaults: TRL 1.16's configs (DPOConfig, CPOConfig, KTOConfig, GRPOConfig, RLOOConfig, XPOConfig) and
# ALGORITHMS.md (section 1 OFS-DPO alpha = 0.1; 2 Mixed-DPO p = 0.5, Avg-DPO gamma = 0.5; 3 SELM alpha = 0.001;
# 5 HyPO lambda = 0.1 with the RLOO estimator; 7 SRPO alpha = 0.8; 8 A-LoL ppo_clip 0.9, R-GOLD floor 0.1).
DPO_OPTIONS = {"ld_alpha": None, "use_weighting": False}
F_OPTIONS = {"f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}
DOCUMENTED_DEFAULTS = {
    **{name: {**DPO_OPTIONS, **F_OPTIONS} for name in ("sigmoid", "hinge", "ipo", "sigmoid_norm")},
    **{name: DPO_OPTIONS for name in ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "sft")},
    "exo_pair": {**DPO_OPTIONS, **F_OPTIONS, "label_smoothing": 1e-3},  # the EXO paper's epsilon
    "robust": {**DPO_OPTIONS, **F_OPTIONS, "label_smoothing": 0.0},
    "discopop": {**DPO_OPTIONS, **F_OPTIONS, "discopop_tau": 0.05},
    "aot": {"ld_alpha": None, "label_smoothing": 0.0},
    "aot_unpaired": {"ld_alpha": None, "label_smoothing": 0.0},
    "cpo": {"loss_type": "sigmoid", "cpo_alpha": 1.0, "simpo_gamma": 0.5, "label_smoothing": 0.0, "alpha": 0.0},
    "simpo": {"simpo_gamma": 0.5, "label_smoothing": 0.0, "alpha": 0.0},
    "orpo": {},
    "kto": {"desirable_weight": 1.0, "undesirable_weight": 1.0},
    "apo_zero_unpaired": {"desirable_weight": 1.0, "undesirable_weight": 1.0},
    "selm": {"alpha": 0.001},
    "xpo": {"alpha": 1e-5, "loss_type": "sigmoid"},
    "online_ipo": {"average_log_prob": False},
    "nash_md": {"kl_estimator": "sequence"},
    "hypo_kl": {"kl_estimator": "reinforce_rloo"},
    "hypo": {"kl_coef": 0.1, "kl_estimator": "reinforce_rloo"},
    "ofs_dpo": {"ofs_alpha": 0.1, "ofs_variant": "slow_chases_fast", "ofs_clamp": 10.0},
    "srpo": {"srpo_alpha": 0.8, "srpo_variant": "community"},
    "mixed_dpo": {"mixed_p": 0.5},
    "avg_dpo": {"avg_gamma": 0.5},
    **{name: {"ppo_clip": 0.9} for name in ("alol", "alol_seq", "r_lol")},
    **{name: {} for name in ("alol_ref_free", "alol_kl", "wbc")},
    "r_gold": {"gold_min_prob": 0.1},
    "grpo": {"epsilon": 0.2, "epsilon_high": None, "scale_rewards": "group", "grpo_loss_type": "dapo"},
    "rloo": {"epsilon": 0.2, "epsilon_high": None},
}


def test_documented_defaults():
    assert set(DOCUMENTED_DEFAULTS) == set(list_objectives())
    for name, defaults in DOCUMENTED_DEFAULTS.items():
        hparams = get_objective(name).hparams
        for key, value in defaults.items():
            assert key in hparams and hparams[key] == value, f"{name}: {key} defaults to {hparams.get(key)!r}"


def test_registry_defaults_are_the_functions_defaults():
    """What the registry advertises (`prefuse objectives`, error messages) is what a call without the option uses."""
    from prefuse.algorithms import pair_scores

    shared = inspect.signature(pair_scores.build_pair_scores).parameters  # the DPO family's options
    for name in list_objectives():
        spec = get_objective(name)
        own = inspect.signature(spec.fn).parameters
        for key, value in spec.hparams.items():
            parameter = own.get(key) or shared.get(key)
            assert parameter is not None and parameter.default is not inspect.Parameter.empty, (name, key)
            assert parameter.default == value, f"{name}: {key} is {value!r} in the registry, {parameter.default!r}"


def _all_inputs(seed=0, batch=4):
    from tests.test_algorithms_reference import make_inputs

    x = {k: v.detach() for k, v in make_inputs(seed, batch).items()}
    return x


def _inputs_for(name, x):
    spec = get_objective(name)
    inputs = {k: x[k] for k in spec.inputs if k in x}
    if name in ("grpo", "rloo"):
        inputs["rewards"] = x["group_rewards"]
    return inputs


def _perturb_first_example(inputs):
    """Example (or prompt) 0 changed in every input, by a different amount per input; the others untouched."""
    out = {}
    for i, (key, value) in enumerate(sorted(inputs.items())):
        value = value.clone()
        if value.dtype == torch.bool:
            first = value[0].reshape(-1)
            first[-1] = ~first[-1]  # one flag of example 0 (a mask keeps its other tokens)
            value[0] = first.reshape(value[0].shape) if value.dim() > 1 else first[0]
        elif not value.is_floating_point():
            value[0] = value[0] + 2
        else:  # a different shift for every element of example 0 (a uniform one cancels in RLOO baselines)
            ramp = 1.0 + 0.1 * torch.arange(value[0].numel(), dtype=value.dtype).reshape(value[0].shape)
            value[0] = value[0] + (40.0 + 7.0 * i) * ramp
        out[key] = value
    return out


@pytest.mark.parametrize("name", list_objectives())
def test_separable_means_no_example_reads_another(name):
    """registry.ObjectiveSpec.separable: example i's loss depends only on example i's statistics (a [P, k] input's
    example is its prompt). Changing example 0 leaves the others' losses alone exactly when the flag says so."""
    spec = get_objective(name)
    inputs = _inputs_for(name, _all_inputs())
    before, _ = spec.fn(beta=0.1, **inputs)
    after, _ = spec.fn(beta=0.1, **_perturb_first_example(inputs))
    rows = 4
    others_before, others_after = before.reshape(rows, -1)[1:], after.reshape(rows, -1)[1:]
    unchanged = torch.allclose(others_before, others_after, rtol=1e-12, atol=1e-12)
    assert unchanged == spec.separable, f"{name}: separable={spec.separable} but the others' losses " + (
        "did not change" if unchanged else "changed")


@pytest.mark.parametrize("name", list_objectives())
def test_metrics_carry_no_graph(name):
    """Metrics are logged values: detached (common.reward_metrics and every family's own), so logging them keeps
    no autograd graph alive."""
    spec = get_objective(name)
    inputs = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in _inputs_for(name, _all_inputs()).items()}
    losses, metrics = spec.fn(beta=0.1, **inputs)
    assert losses.requires_grad
    for key, value in metrics.items():
        assert not torch.as_tensor(value).requires_grad, f"{name}: metric {key} carries a graph"


def test_reduce_metrics_detaches_and_reports_an_empty_metric_as_zero():
    from prefuse.algorithms.api import reduce_metrics

    leaf = vec(1.0, 2.0, 6.0, grad=True)
    reduced = reduce_metrics({"a": leaf * 2, "empty": torch.zeros(0, dtype=F64), "scalar": 4})
    assert not reduced["a"].requires_grad
    close(reduced["a"], 6.0)
    close(reduced["empty"], 0.0)
    close(reduced["scalar"], 4.0)
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in reduced.values())


def test_objective_loss_default_beta_is_trls():
    """beta defaults to 0.1 (TRL's DPOConfig): DPO of one pair with margin h_c - h_r = 3."""
    pair = {"policy_chosen_logps": vec(-2.0), "policy_rejected_logps": vec(-4.0),
            "ref_chosen_logps": vec(-3.0), "ref_rejected_logps": vec(-2.0)}
    loss, metrics = objective_loss("sigmoid", **pair)
    close(loss, -logsigmoid(0.1 * 3.0))
    close(metrics["rewards/margins"], 0.3, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- common helpers
def test_token_counts_and_token_means_count_an_empty_response_as_one_token():
    from prefuse.algorithms import common

    close(common.token_counts(torch.tensor([0, 1, 3]), vec(0.0)), [1.0, 1.0, 3.0])
    assert common.token_counts(torch.tensor([2]), torch.zeros(1, dtype=torch.float32)).dtype == torch.float32
    close(common.per_token_mean(vec(-6.0, -2.0, 0.0), torch.tensor([3, 1, 0])), [-2.0, -2.0, 0.0])
    # the batch NLL divides the summed log-probs by the batch's token count, at least 1
    close(common.batch_token_mean_nll(vec(-6.0, -2.0), torch.tensor([3, 1])), 2.0)
    close(common.batch_token_mean_nll(vec(-2.5, -1.5), torch.tensor([0, 0])), 4.0)
    close(common.batch_token_mean_nll(vec(0.0, 0.0), torch.tensor([0, 0])), 0.0)


def test_safe_exp_clamps_the_exponent_at_80():
    from prefuse.algorithms import common

    assert common.EXP_CLAMP == 80.0
    close(common.safe_exp(vec(1.0, 50.0, 80.0, 81.0, 1e4, -3.0)),
          [math.e, math.exp(50.0), math.exp(80.0), math.exp(80.0), math.exp(80.0), math.exp(-3.0)], rtol=1e-14)


def test_reward_metrics_by_value_with_a_tie():
    """TRL's names: rewards/* = beta * log-ratio, accuracies count STRICT wins (a tie is not a win)."""
    from prefuse.algorithms.common import reward_metrics

    got = reward_metrics(0.5, vec(2.0, 1.0, -1.0), vec(1.0, 1.0, 3.0), vec(-7.0, -8.0, -9.0), vec(-1.0, -2.0, -3.0))
    close(got["rewards/chosen"], [1.0, 0.5, -0.5])
    close(got["rewards/rejected"], [0.5, 0.5, 1.5])
    close(got["rewards/margins"], [0.5, 0.0, -2.0])
    close(got["rewards/accuracies"], [1.0, 0.0, 0.0])
    close(got["logps/chosen"], [-7.0, -8.0, -9.0])
    close(got["logps/rejected"], [-1.0, -2.0, -3.0])


def test_verbose_token_mask_counts_response_tokens_only():
    from prefuse.algorithms.common import verbose_token_mask

    completion = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0, 0]])
    shared = torch.tensor([3, 0, 2])
    want = torch.tensor([[0, 0, 0, 0, 0, 1, 0], [1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(verbose_token_mask(completion, shared), want)


# --------------------------------------------------------------------------------------- DPO family: option bounds
PAIR = {"policy_chosen_logps": vec(-5.0, -9.0), "policy_rejected_logps": vec(-7.0, -6.0),
        "ref_chosen_logps": vec(-6.0, -8.5), "ref_rejected_logps": vec(-6.5, -7.0)}


@pytest.mark.parametrize("name, accepted, refused", [
    ("exo_pair", (1e-3, 0.5, 0.999), (0.0, 1.0, -0.1, 1.5)),  # eps in (0, 1): both ends would give log(0)
    ("robust", (0.0, 0.2, 0.499), (-0.01, 0.5, 0.7)),  # a flip probability in [0, 1/2): 1/(1 - 2 eps) blows up
])
def test_label_smoothing_bounds(name, accepted, refused):
    for eps in accepted:
        losses, _ = get_objective(name).fn(beta=0.1, label_smoothing=eps, **PAIR)
        assert torch.isfinite(losses).all()
    for eps in refused:
        with pytest.raises(ValueError, match="label_smoothing"):
            get_objective(name).fn(beta=0.1, label_smoothing=eps, **PAIR)


def test_ld_alpha_bounds():
    verbose = {k.replace("_logps", "_verbose_logps"): vec(-1.0, 0.0) for k in PAIR}
    for ld_alpha in (0.0, 0.5, 1.0):
        get_objective("sigmoid").fn(beta=0.1, ld_alpha=ld_alpha, **PAIR, **verbose)
    for ld_alpha in (-0.01, 1.01):
        with pytest.raises(ValueError, match="ld_alpha"):
            get_objective("sigmoid").fn(beta=0.1, ld_alpha=ld_alpha, **PAIR, **verbose)


# ------------------------------------------------------------------------------------------------------------ KTO
def _kto_batch(ref_kl):
    return {"policy_logps": vec(-2.0, -6.0, -3.0, grad=True), "ref_logps": vec(-3.0, -4.0, -3.5, grad=True),
            "labels": torch.tensor([True, False, True]),
            "policy_kl_logps": vec(-5.0, -7.0, -4.0, grad=True), "ref_kl_logps": vec(*ref_kl, grad=True)}


@pytest.mark.parametrize("ref_kl, z0", [((-6.0, -8.0, -5.75), 1.25),  # KL log-ratios (1, 1, 1.75): mean 1.25
                                        ((-6.0, -4.0, -4.0), 0.0)])  # mean -1, clamped at 0
def test_kto_reference_point_is_a_clamped_detached_batch_mean(ref_kl, z0):
    """KTO (TRL 1.16): z0 = max(0, mean(log pi - log pi_ref) over the KL completions), no gradient through it;
    desirable 1 - sigmoid(beta (h - z0)), undesirable 1 - sigmoid(beta (z0 - h)), h = log-ratio."""
    beta, inputs = 0.5, _kto_batch(ref_kl)
    losses, metrics = get_objective("kto").fn(beta=beta, **inputs)
    h = [1.0, -2.0, 0.5]
    want = [1 - sigmoid(beta * (h[0] - z0)), 1 - sigmoid(beta * (z0 - h[1])), 1 - sigmoid(beta * (h[2] - z0))]
    close(losses, want)
    close(metrics["kl"], z0)
    close(metric(metrics, "rewards/chosen"), beta * (h[0] + h[2]) / 2)
    close(metric(metrics, "rewards/rejected"), beta * h[1])
    close(metric(metrics, "rewards/margins"), beta * ((h[0] + h[2]) / 2 - h[1]))
    close(metric(metrics, "logps/chosen"), (-2.0 - 3.0) / 2)
    close(metric(metrics, "logps/rejected"), -6.0)
    grads = torch.autograd.grad(losses.sum(), [inputs["policy_kl_logps"], inputs["ref_kl_logps"],
                                               inputs["policy_logps"]], allow_unused=True)
    no_grad(grads[0], "policy_kl_logps")
    no_grad(grads[1], "ref_kl_logps")
    # d/dh of 1 - sigmoid(beta (h - z0)) is -beta s (1 - s); of 1 - sigmoid(beta (z0 - h)) is +beta s (1 - s)
    s = [sigmoid(beta * (h[0] - z0)), sigmoid(beta * (z0 - h[1])), sigmoid(beta * (h[2] - z0))]
    close(grads[2], [-beta * s[0] * (1 - s[0]), beta * s[1] * (1 - s[1]), -beta * s[2] * (1 - s[2])])


def test_unpaired_metrics_with_one_side_only():
    """With only desirable examples there is no rejected side and no margin (TRL logs none)."""
    inputs = {"policy_logps": vec(-2.0, -4.0), "ref_logps": vec(-3.0, -3.0), "labels": torch.tensor([True, True])}
    losses, metrics = get_objective("apo_zero_unpaired").fn(beta=1.0, **inputs)
    assert set(metrics) == {"rewards/chosen", "logps/chosen"}
    close(metrics["rewards/chosen"], 0.0)
    close(metrics["logps/chosen"], -3.0)
    close(losses, [1 - sigmoid(1.0), 1 - sigmoid(-1.0)])
    _, metrics = get_objective("apo_zero_unpaired").fn(beta=1.0, **{**inputs, "labels": torch.tensor([False, False])})
    assert set(metrics) == {"rewards/rejected", "logps/rejected"}


def test_unpaired_weights_apply_per_side():
    inputs = {"policy_logps": vec(-2.0, -4.0), "ref_logps": vec(-3.0, -3.0), "labels": torch.tensor([True, False])}
    losses, _ = get_objective("apo_zero_unpaired").fn(beta=1.0, desirable_weight=2.0, undesirable_weight=0.25,
                                                      **inputs)
    close(losses, [2.0 * (1 - sigmoid(1.0)), 0.25 * sigmoid(-1.0)])


# --------------------------------------------------------------------------------------------- Mixed and Avg-DPO
ONLINE_PAIR = {"policy_online_chosen_logps": vec(-4.0, -3.0), "policy_online_rejected_logps": vec(-8.0, -2.0),
               "ref_online_chosen_logps": vec(-5.0, -3.5), "ref_online_rejected_logps": vec(-6.0, -2.5)}
# log-ratios: offline chosen (1, -0.5), rejected (-0.5, 1); online chosen (1, 0.5), rejected (-2, 0.5)
H = {"chosen": (1.0, -0.5), "rejected": (-0.5, 1.0), "online_chosen": (1.0, 0.5), "online_rejected": (-2.0, 0.5)}


def _dpo(beta, hc, hr):
    return -logsigmoid(beta * (hc - hr))


@pytest.mark.parametrize("use_offline", [None, (True, False)])
def test_mixed_dpo_metrics(use_offline):
    """ALGORITHMS.md section 2, eq. 4: a DPO(offline) + (1 - a) DPO(online), a = the draw (or mixed_p). Metrics:
    with a draw, rewards/* and logps/* of the pair each example drew and loss/* its loss under that pair (0 under
    the other); without one, rewards/* of the offline pair and loss/* the two DPO terms."""
    beta, p = 0.5, 0.3
    extra = {} if use_offline is None else {"use_offline": torch.tensor(use_offline)}
    losses, metrics = get_objective("mixed_dpo").fn(beta=beta, mixed_p=p, **PAIR, **ONLINE_PAIR, **extra)
    offline = [_dpo(beta, H["chosen"][i], H["rejected"][i]) for i in range(2)]
    online = [_dpo(beta, H["online_chosen"][i], H["online_rejected"][i]) for i in range(2)]
    if use_offline is None:
        close(losses, [p * offline[i] + (1 - p) * online[i] for i in range(2)])
        close(metrics["loss/offline"], offline)
        close(metrics["loss/online"], online)
        chosen, rejected = H["chosen"], H["rejected"]
        logps = (PAIR["policy_chosen_logps"], PAIR["policy_rejected_logps"])
    else:
        close(losses, [offline[0], online[1]])
        close(metrics["loss/offline"], [offline[0], 0.0])
        close(metrics["loss/online"], [0.0, online[1]])
        chosen, rejected = (H["chosen"][0], H["online_chosen"][1]), (H["rejected"][0], H["online_rejected"][1])
        logps = (vec(-5.0, -3.0), vec(-7.0, -2.0))
    close(metrics["rewards/chosen"], [beta * c for c in chosen])
    close(metrics["rewards/rejected"], [beta * r for r in rejected])
    close(metrics["rewards/margins"], [beta * (c - r) for c, r in zip(chosen, rejected)])
    close(metrics["rewards/accuracies"], [float(c > r) for c, r in zip(chosen, rejected)])
    close(metrics["logps/chosen"], logps[0])
    close(metrics["logps/rejected"], logps[1])


def test_avg_dpo_metrics():
    """ALGORITHMS.md section 2, eq. 5: gamma DPO(y+, y-) + (1 - gamma) DPO(y+, y~-), the same y+ in both."""
    beta, gamma = 0.5, 0.25
    online = {k: ONLINE_PAIR[k] for k in ("policy_online_rejected_logps", "ref_online_rejected_logps")}
    losses, metrics = get_objective("avg_dpo").fn(beta=beta, avg_gamma=gamma, **PAIR, **online)
    external = [_dpo(beta, H["chosen"][i], H["rejected"][i]) for i in range(2)]
    generated = [_dpo(beta, H["chosen"][i], H["online_rejected"][i]) for i in range(2)]
    close(losses, [gamma * external[i] + (1 - gamma) * generated[i] for i in range(2)])
    close(metrics["loss/external_rejected"], external)
    close(metrics["loss/generated_rejected"], generated)
    close(metrics["rewards/chosen"], [beta * c for c in H["chosen"]])
    close(metrics["rewards/rejected"], [beta * r for r in H["rejected"]])
    close(metrics["logps/rejected"], PAIR["policy_rejected_logps"])


# ----------------------------------------------------------------------------------------------------------- HyPO
@pytest.mark.parametrize("policy, ref, rloo, plain", [
    # k = 1: no baseline (b = 0): d = 1
    ([[-3.0]], [[-4.0]], -3.0, -3.0),
    # k = 2: d = (1, -3), b = (-3, 1), d - b = (4, -4): (4 * -3 + -4 * -5) / 2 = 4; without baseline (-3 + 15) / 2
    ([[-3.0, -5.0]], [[-4.0, -2.0]], 4.0, 6.0),
    # k = 3: d = (1, -3, 2), b = (-0.5, 1.5, -1), d - b = (1.5, -4.5, 3): (-4.5 + 22.5 - 3) / 3 = 5
    ([[-3.0, -5.0, -1.0]], [[-4.0, -2.0, -3.0]], 5.0, (-3.0 + 15.0 - 2.0) / 3),
])
def test_hypo_kl_rloo_baseline_closed_forms(policy, ref, rloo, plain):
    """ALGORITHMS.md section 5: L_KL = (1/k) sum_i (d_i - b_i) log pi(y_i), d = sg(log-ratio), b_i the mean of the
    other samples' d (b = 0 for k = 1); reinforce_nobaseline drops b. The gradient is (d_i - b_i) / k."""
    k = len(policy[0])
    d = [p - r for p, r in zip(policy[0], ref[0])]
    baseline = [0.0] * k if k == 1 else [(sum(d) - d[i]) / (k - 1) for i in range(k)]
    for estimator, value, b in (("reinforce_rloo", rloo, baseline), ("reinforce_nobaseline", plain, [0.0] * k)):
        leaf = torch.tensor(policy, dtype=F64, requires_grad=True)
        ref_leaf = torch.tensor(ref, dtype=F64, requires_grad=True)
        losses, metrics = get_objective("hypo_kl").fn(policy_online_logps=leaf, ref_online_logps=ref_leaf,
                                                      beta=0.1, kl_estimator=estimator)
        close(losses, [value], what=estimator)
        close(metrics["objective/kl"], [sum(d) / k])
        grad, ref_grad = torch.autograd.grad(losses.sum(), [leaf, ref_leaf], allow_unused=True)
        close(grad, [[(d[i] - b[i]) / k for i in range(k)]], what=f"{estimator} gradient")
        no_grad(ref_grad, "ref_online_logps")


def test_hypo_adds_the_mean_kl_over_prompts_and_logs_it():
    """HyPO = DPO per pair + kl_coef * mean over prompts of L_KL (a constant added to every pair)."""
    beta, kl_coef = 0.5, 0.7
    online = {"policy_online_logps": torch.tensor([[-3.0, -5.0], [-1.0, -2.0]], dtype=F64),
              "ref_online_logps": torch.tensor([[-4.0, -2.0], [-1.5, -1.0]], dtype=F64)}
    # prompt 0: L_KL = 4 (see the closed forms); prompt 1: d = (0.5, -1), b = (-1, 0.5), d - b = (1.5, -1.5):
    # (1.5 * -1 + -1.5 * -2) / 2 = 0.75
    losses, metrics = get_objective("hypo").fn(beta=beta, kl_coef=kl_coef, **PAIR, **online)
    dpo = [_dpo(beta, H["chosen"][i], H["rejected"][i]) for i in range(2)]
    close(losses, [dpo[i] + kl_coef * (4.0 + 0.75) / 2 for i in range(2)])
    close(metrics["loss/dpo"], dpo)
    close(metrics["loss/kl"], (4.0 + 0.75) / 2)
    close(metrics["objective/kl"], (1.0 - 3.0 + 0.5 - 1.0) / 4)
    close(metrics["rewards/chosen"], [beta * c for c in H["chosen"]])
    close(metrics["rewards/rejected"], [beta * r for r in H["rejected"]])


# ----------------------------------------------------------------------------------------------------------- SRPO
def test_srpo_default_alpha_is_the_community_value():
    """ALGORITHMS.md section 7: L = (1 - alpha) L_gen + alpha L_imp with the community code's alpha = 0.8."""
    beta = 0.5
    stats = {f"{m}_{p}_logps": vec(v) for m, values in (("policy", (-1.0, -2.0, -3.0, -4.0, -5.0, -6.0)),
                                                          ("ref", (-1.5, -1.0, -3.0, -5.0, -4.0, -6.5)))
             for p, v in zip(("chosen", "rejected", "chosen_given_chosen", "chosen_given_rejected",
                              "rejected_given_chosen", "rejected_given_rejected"), values)}
    # h: chosen 0.5, rejected -1, cc 0, cr 1, rc -1, rr 0.5
    improve = (0.5 - beta * (1.0 - 0.5)) ** 2 + (0.5 - beta * (0.0 - (-1.0))) ** 2
    generate = (beta * (1.0 + 0.5 - (-1.0) - (-1.0)) - 1) ** 2
    losses, metrics = get_objective("srpo").fn(beta=beta, **stats)
    close(losses, [0.2 * generate + 0.8 * improve])
    close(metrics["loss/improve"], [improve])
    close(metrics["loss/generate"], [generate])
