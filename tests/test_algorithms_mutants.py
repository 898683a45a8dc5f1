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
    "grpo": {"epsilon": 0.2, "epsilon_high": None, "scale_rewards": "group", "grpo_loss_type": "dapo",
             "use_bias_correction_kl": True},
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
    x["online_lengths"] = torch.randint(1, 9, x["policy_online_logps"].shape)  # rloo's per-token kl metric
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


@pytest.mark.parametrize("optional", [True, False], ids=["all_inputs", "required_only"])
@pytest.mark.parametrize("name", list_objectives())
def test_metrics_carry_no_graph(name, optional):
    """Metrics are logged values: detached (common.reward_metrics and every family's own), so logging them keeps
    no autograd graph alive. With every input it reads and with the required ones (and the lengths) only: mixed_dpo
    without a draw, selm without its reference sample, grpo and rloo without a reference (beta 0), ..."""
    spec = get_objective(name)
    inputs = _inputs_for(name, _all_inputs())
    beta = 0.1
    if not optional:
        keep = spec.requires | {"chosen_lengths", "rejected_lengths"}
        inputs = {k: v for k, v in inputs.items() if k in keep}
        beta = 0.0 if name in ("grpo", "rloo") else beta
    inputs = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inputs.items()}
    losses, metrics = spec.fn(beta=beta, **inputs)
    assert losses.requires_grad
    for key, value in metrics.items():
        assert not torch.as_tensor(value).requires_grad, f"{name}: metric {key} carries a graph"


def test_reduce_metrics_detaches_and_reports_an_empty_metric_as_zero():
    from prefuse.algorithms.loss import reduce_metrics

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
    close(metrics["logps/chosen"], PAIR["policy_chosen_logps"])
    close(metrics["logps/rejected"], PAIR["policy_rejected_logps"])


def test_online_kl_surrogate_defaults_to_the_rloo_baseline():
    """ALGORITHMS.md section 5 (f): the default estimator is sequence-level REINFORCE with the RLOO baseline."""
    from prefuse.algorithms.online import online_kl_surrogate

    policy, ref = torch.tensor([[-3.0, -5.0]], dtype=F64), torch.tensor([[-4.0, -2.0]], dtype=F64)
    close(online_kl_surrogate(policy, ref), [4.0])  # the k = 2 closed form above


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


# -------------------------------------------------------------------------------------------------------- OFS-DPO
def test_ofs_two_sided_default_clamp_is_ten():
    """ALGORITHMS.md section 1, option B: the chasing terms' inner value beta (m_F - m_S) is clamped to [-10, 10].
    Pair 0 has beta (m_F - m_S) = 12 (clamped to 10), pair 1 has 7 (inside)."""
    beta, alpha = 1.0, 0.1
    fast = {"policy_chosen_logps": vec(-3.0, -4.0), "policy_rejected_logps": vec(-20.0, -12.0)}  # m_F = 17, 8
    slow = {"slow_chosen_logps": vec(-5.0, -6.0), "slow_rejected_logps": vec(-10.0, -7.0)}  # m_S = 5, 1
    ref = {"ref_chosen_logps": vec(-4.0, -4.0), "ref_rejected_logps": vec(-9.0, -9.0)}  # m_ref = 5, 5
    losses, metrics = get_objective("ofs_dpo").fn(beta=beta, ofs_variant="two_sided", **fast, **slow, **ref)
    fast_dpo, slow_dpo = [-logsigmoid(17.0 - 5.0), -logsigmoid(8.0 - 5.0)], [-logsigmoid(0.0), -logsigmoid(-4.0)]
    chase = [-logsigmoid(10.0), -logsigmoid(7.0)]  # -logsigmoid(clamp(beta (m_F - sg m_S)))
    flee = chase  # -logsigmoid(clamp(beta (sg m_F - m_S))): the same value
    close(losses, [fast_dpo[i] + alpha * chase[i] + slow_dpo[i] - alpha * flee[i] for i in range(2)])
    close(metrics["ofs/gap"], chase)
    close(metrics["ofs/fast_dpo_loss"], fast_dpo)
    close(metrics["ofs/slow_dpo_loss"], slow_dpo)
    # the clamp cuts the gradient of pair 0's chasing terms: d loss / d m_F = -beta sigmoid(-z) for the DPO term,
    # and -alpha beta sigmoid(-7) for pair 1's chase (its flee term has no gradient to the fast module)
    leaf = fast["policy_chosen_logps"].clone().requires_grad_(True)
    losses, _ = get_objective("ofs_dpo").fn(beta=beta, ofs_variant="two_sided", **{**fast, "policy_chosen_logps": leaf},
                                            **slow, **ref)
    (grad,) = torch.autograd.grad(losses.sum(), [leaf])
    close(grad, [-sigmoid(-12.0), -sigmoid(-3.0) - alpha * sigmoid(-7.0)])


# ------------------------------------------------------------------------------------------- online IPO, SELM, XPO
def test_online_ipo_metrics():
    """The pair's TRL metrics from the whole-response log-ratios, and the judge's probabilities."""
    beta = 0.5
    probs = vec(0.9, 0.2)
    losses, metrics = get_objective("online_ipo").fn(beta=beta, preference_probs=probs, **PAIR)
    close(losses, [((H["chosen"][i] - H["rejected"][i]) - (p - 0.5) / beta) ** 2 for i, p in enumerate((0.9, 0.2))])
    close(metrics["rewards/chosen"], [beta * c for c in H["chosen"]])
    close(metrics["rewards/rejected"], [beta * r for r in H["rejected"]])
    close(metrics["rewards/margins"], [beta * (c - r) for c, r in zip(H["chosen"], H["rejected"])])
    close(metrics["logps/chosen"], PAIR["policy_chosen_logps"])
    close(metrics["logps/rejected"], PAIR["policy_rejected_logps"])
    close(metrics["rewards/probabilities"], [0.9, 0.2])


# ------------------------------------------------------------------------------------------- DPO family: options
def test_alpha_divergence_near_one_is_the_reverse_kl():
    """f'(t) = (t^(a-1) - 1) / (a - 1) tends to log t as a -> 1; within 1e-6 of 1 the log-ratio itself is used
    (the general form there would differ from it by about (a - 1) h^2 / 2)."""
    from prefuse.algorithms.pair_scores import f_divergence_scores

    h = vec(-4.0, 0.5, 6.0)
    for a in (1.0, 1.0 + 7e-7, 1.0 - 7e-7):
        close(f_divergence_scores(h, "alpha_divergence", a), h, rtol=0, atol=0)
    a = 1.0 + 1e-4  # outside: the general form
    close(f_divergence_scores(h, "alpha_divergence", a), [math.expm1((a - 1) * v) / (a - 1) for v in (-4.0, 0.5, 6.0)])


def test_wpo_weight_of_one_response():
    """WPO: w = exp((sum_t log pi(y_t) - sum_t log sum_v pi(v)^2) / len), no gradient; an empty response counts as one
    token."""
    from prefuse.algorithms.pair_scores import wpo_weights

    logps = vec(-6.0, -1.0, -3.0, grad=True)
    weights = wpo_weights(logps, vec(-2.0, -0.5, -1.0), torch.tensor([2, 0, 4]))
    close(weights, [math.exp(-2.0), math.exp(-0.5), math.exp(-0.5)])
    assert not weights.requires_grad


def test_sft_with_only_the_chosen_reference_reports_no_rewards():
    """The rewards metrics need the whole pair: a chosen reference without a rejected one gives log-probs only."""
    losses, metrics = get_objective("sft").fn(beta=0.1, policy_chosen_logps=vec(-6.0, -2.0),
                                              chosen_lengths=torch.tensor([3, 1]), ref_chosen_logps=vec(-5.0, -1.0))
    close(losses, [2.0, 2.0])
    assert set(metrics) == {"logps/chosen"}


# -------------------------------------------------------------------------------------------------- GRPO and RLOO
def test_grpo_and_rloo_rewards_get_no_gradient():
    """The rewards are the judge's scores: constants of the policy gradient (group_advantages and
    leave_one_out_advantages work on sg(rewards))."""
    from prefuse.algorithms.policy_gradient import group_advantages, leave_one_out_advantages

    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.2, 0.8]], dtype=F64, requires_grad=True)
    assert not group_advantages(rewards).requires_grad and not group_advantages(rewards, "batch").requires_grad
    assert not leave_one_out_advantages(rewards).requires_grad
    token_logps = -torch.rand(2, 3, 4, dtype=F64).requires_grad_(True)
    loss, _ = objective_loss("grpo", policy_online_token_logps=token_logps,
                             online_token_mask=torch.ones(2, 3, 4, dtype=torch.bool), rewards=rewards, beta=0.0)
    no_grad(torch.autograd.grad(loss, [rewards], allow_unused=True)[0], "rewards (grpo)")
    sums = -5 * torch.rand(2, 3, dtype=F64).requires_grad_(True)
    loss, _ = objective_loss("rloo", policy_online_logps=sums, rewards=rewards, beta=0.0)
    no_grad(torch.autograd.grad(loss, [rewards], allow_unused=True)[0], "rewards (rloo)")
    sums = torch.tensor([[-3.0, -5.0], [-1.0, -2.0]], dtype=F64)
    ref = (sums - torch.tensor([[1.0, -3.0], [0.5, -1.0]], dtype=F64)).requires_grad_(True)
    leaf = sums.clone().requires_grad_(True)
    loss, _ = objective_loss("rloo", policy_online_logps=leaf, ref_online_logps=ref, rewards=rewards[:, :2], beta=0.05)
    no_grad(torch.autograd.grad(loss, [ref], allow_unused=True)[0], "ref_online_logps (rloo's KL penalty)")


def _grpo_one_token(**options):
    """P = 1 prompt, k = 2 samples of T = 2 tokens; one unmasked token in the whole batch."""
    logps = torch.tensor([[[-1.0, -9.0], [-2.0, -9.0]]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[[-1.5, 3.0], [-2.0, 3.0]]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[[True, False], [False, False]]])
    rewards = torch.tensor([[1.0, 0.0]], dtype=F64)
    losses, metrics = get_objective("grpo").fn(policy_online_token_logps=logps, online_token_mask=mask,
                                               rewards=rewards, ref_online_token_logps=ref, **options)
    return losses, metrics, logps, ref


def test_grpo_normalizers_and_kl_metric_with_one_token():
    """dapo: the batch's token sum over its token count (1 here), spread as n = 2 per-sample terms; the kl metric is
    the mean of k3 = e^d - d - 1 (d = log pi_ref - log pi) over the unmasked tokens; the reference gets no gradient."""
    beta = 0.5
    losses, metrics, logps, ref = _grpo_one_token(beta=beta)
    advantage = 0.5 / (math.sqrt(0.5) + 1e-4)  # (r - mean) / (std + 1e-4), std of (1, 0) = sqrt(1/2)
    d = -0.5
    k3 = math.exp(d) - d - 1
    close(losses, [2 * (-advantage + beta * k3), 0.0])
    close(metrics["kl"], k3)
    grad_ref = torch.autograd.grad(losses.mean(), [ref], allow_unused=True)[0]
    no_grad(grad_ref, "ref_online_token_logps")
    losses, _, _, _ = _grpo_one_token(beta=beta, grpo_loss_type="grpo")  # each sample's token mean, then the mean
    close(losses, [-advantage + beta * k3, 0.0])


def test_grpo_clip_metrics_use_strict_bounds():
    """TRL's clip_ratio/*: ratio < 1 - epsilon (with A < 0) and ratio > 1 + epsilon_high (with A > 0), strictly; the
    on-policy ratio is exactly 1, so even a zero-width clip range clips nothing. k = 8 samples with one rewarded
    (advantage 7 / sqrt(8) = 2.47 for it)."""
    logps = -torch.rand(1, 8, 3, dtype=F64)
    mask = torch.ones(1, 8, 3, dtype=torch.bool)
    rewards = torch.tensor([[1.0] + [0.0] * 7], dtype=F64)
    for options in ({"epsilon": 0.0}, {"epsilon": 0.2, "epsilon_high": 0.0}, {}):
        _, metrics = get_objective("grpo").fn(policy_online_token_logps=logps, online_token_mask=mask,
                                              rewards=rewards, beta=0.0, **options)
        for name in ("low_mean", "high_mean", "region_mean"):
            assert float(metrics[f"clip_ratio/{name}"]) == 0.0, (options, name)
    for options in ({"epsilon": 0.0}, {"epsilon": 0.2, "epsilon_high": 0.0}, {}):
        _, metrics = get_objective("rloo").fn(policy_online_logps=logps.sum(-1), rewards=5 * rewards, beta=0.0,
                                              **options)
        for name in ("low_mean", "high_mean", "region_mean"):
            assert float(metrics[f"clip_ratio/{name}"]) == 0.0, (options, name)


def test_clip_metrics_off_policy():
    """TRL's clip fractions where the ratio is not 1 (as after a second update on the same samples): low = r < 0.8
    with A < 0, high = r > 1 + epsilon_high with A > 0, region = either; shares of the unmasked entries."""
    from prefuse.algorithms.policy_gradient import _clip_metrics

    ratio = vec(0.5, 0.8, 0.7, 1.2, 1.3, 1.3, 0.5, 0.3)
    advantages = vec(-1.0, -1.0, 1.0, 1.0, 1.0, 0.0, 0.0, -1.0)
    mask = torch.tensor([True] * 7 + [False])  # the last one would count as low-clipped
    got = _clip_metrics(ratio, advantages, 0.2, None, mask)
    close(got["clip_ratio/low_mean"], 1 / 7, rtol=1e-6)
    close(got["clip_ratio/high_mean"], 1 / 7, rtol=1e-6)
    close(got["clip_ratio/region_mean"], 2 / 7, rtol=1e-6)
    got = _clip_metrics(ratio, advantages, 0.2, 0.05, mask)  # 1.2 > 1.05 now clips too
    close(got["clip_ratio/high_mean"], 2 / 7, rtol=1e-6)
    close(got["clip_ratio/region_mean"], 3 / 7, rtol=1e-6)
    got = _clip_metrics(ratio[:1], advantages[:1], 0.2, None, torch.tensor([False]))  # nothing unmasked: 0
    assert float(got["clip_ratio/region_mean"]) == 0.0
    got = _clip_metrics(ratio[:1], advantages[:1], 0.2, None, torch.tensor([True]))  # one token, clipped
    assert float(got["clip_ratio/region_mean"]) == 1.0


def test_clipped_surrogate_off_policy():
    """TRL's per-token loss -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) and its gradient in log r: -r A where
    the unclipped term is the minimum, 0 where the clipped one is (and r outside the range)."""
    from prefuse.algorithms.policy_gradient import _clipped_surrogate

    r = [0.5, 0.9, 1.5, 1.5, 0.5]
    advantages = vec(1.0, -1.0, 1.0, -1.0, -1.0)
    log_ratio = torch.log(vec(*r)).requires_grad_(True)
    losses, ratio = _clipped_surrogate(log_ratio, advantages, 0.2, None)
    close(ratio, r, rtol=1e-14)
    close(losses, [-0.5, 0.9, -1.2, 1.5, 0.8], rtol=1e-14)
    (grad,) = torch.autograd.grad(losses.sum(), [log_ratio])
    close(grad, [-0.5, 0.9, 0.0, 1.5, 0.0], rtol=1e-14)
    losses, _ = _clipped_surrogate(log_ratio, advantages, 0.2, 0.4)
    close(losses, [-0.5, 0.9, -1.4, 1.5, 0.8], rtol=1e-14)


@pytest.mark.parametrize("scale_rewards, frac", [("group", 0.5), ("none", 0.5), ("batch", 0.0)])
def test_grpo_frac_reward_zero_std(scale_rewards, frac):
    """TRL: the share of samples whose advantage std is 0 (isclose to 0): the group's std, or the batch's with
    scale_rewards="batch". Group 0 is constant."""
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], dtype=F64)
    logps = -torch.rand(2, 3, 2, dtype=F64)
    _, metrics = get_objective("grpo").fn(policy_online_token_logps=logps, online_token_mask=torch.ones(2, 3, 2,
                                          dtype=torch.bool), rewards=rewards, beta=0.0, scale_rewards=scale_rewards)
    close(metrics["frac_reward_zero_std"], frac, rtol=1e-7)
    close(metrics["reward"], 4 / 6, rtol=1e-7)


def test_zero_std_is_isclose_std_to_zero():
    """TRL's torch.isclose(std, 0): |std| <= atol = 1e-8 (no relative part). A std of 1.000005e-8 is not zero."""
    std = 1.000005e-8
    rewards = torch.tensor([[0.0, std * math.sqrt(2.0)]], dtype=F64)  # Bessel std of two values: |a - b| / sqrt(2)
    logps = -torch.rand(1, 2, 2, dtype=F64)
    _, metrics = get_objective("grpo").fn(policy_online_token_logps=logps,
                                          online_token_mask=torch.ones(1, 2, 2, dtype=torch.bool), rewards=rewards,
                                          beta=0.0)
    assert float(metrics["frac_reward_zero_std"]) == 0.0
    _, metrics = get_objective("rloo").fn(policy_online_logps=logps.sum(-1), rewards=rewards, beta=0.0)
    assert float(metrics["frac_reward_zero_std"]) == 0.0


def test_rloo_metrics():
    """TRL 1.16's RLOO logs reward and reward_std (over the batch) of the judged rewards, frac_reward_zero_std of the
    groups, and kl = the summed log-ratios over the batch's token count."""
    import statistics

    rewards = torch.tensor([[5.0, 0.0], [1.0, 1.0]], dtype=F64)
    policy = torch.tensor([[-3.0, -5.0], [-1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[-4.0, -2.0], [-1.5, -1.0]], dtype=F64)  # log-ratios (1, -3), (0.5, -1)
    for lengths, kl in (([[2, 3], [1, 4]], -2.5 / 10), ([[1, 0], [0, 0]], -2.5)):
        _, metrics = get_objective("rloo").fn(policy_online_logps=policy, ref_online_logps=ref, rewards=rewards,
                                              online_lengths=torch.tensor(lengths), beta=0.05)
        close(metrics["kl"], kl)
        close(metrics["reward"], 7 / 4, rtol=1e-7)
        close(metrics["reward_std"], statistics.stdev([5.0, 0.0, 1.0, 1.0]), rtol=1e-6)
        for name in ("low_mean", "high_mean", "region_mean"):
            assert float(metrics[f"clip_ratio/{name}"]) == 0.0
    _, metrics = get_objective("rloo").fn(policy_online_logps=policy, rewards=rewards, beta=0.0)
    close(metrics["frac_reward_zero_std"], 0.5, rtol=1e-7)
    assert "kl" not in metrics


# ------------------------------------------------------------------------------------------------ A-LoL family
def test_alol_seq_default_clip_and_one_token_rows():
    """ALGORITHMS.md section 8: per-token ratios clamped to [1 - 0.9, 1 + 0.9] by default; alol/weights is the mean
    clamped ratio over a row's tokens times A+. Row 0 has one token (ratio e^1.5 -> 1.9), row 1 two (e^-3 -> 0.1,
    e^0.25 inside); the padding holds garbage."""
    policy = torch.tensor([[-1.0, 5.0], [-4.0, -0.5]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-2.5, -7.0], [-1.0, -0.75]], dtype=F64)
    mask = torch.tensor([[True, False], [True, True]])
    losses, metrics = get_objective("alol_seq").fn(policy_token_logps=policy, ref_token_logps=ref, token_mask=mask,
                                                   advantages=vec(2.0, 0.5), beta=0.1)
    w = [[1.9], [0.1, math.exp(0.25)]]
    close(losses, [-(-1.0 * w[0][0]) * 2.0, -(-4.0 * w[1][0] - 0.5 * w[1][1]) * 0.5])
    close(metrics["alol/weights"], [w[0][0] * 2.0, (w[1][0] + w[1][1]) / 2 * 0.5])
    close(metrics["logps/chosen"], [-1.0, -4.5])
    close(metrics["objective/kl"], [1.5, -2.75])


def test_r_gold_default_floor_and_one_token_rows():
    """R-GOLD: sum_t NLL_t * max(pi(y_t), 0.1) * R, the weight without gradient and at most 1 (a log-prob rounded above
    0 still weighs 1); alol/weights the row's mean weight times R."""
    policy = torch.tensor([[-3.0, 9.0], [-0.5, 1e-3]], dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    losses, metrics = get_objective("r_gold").fn(policy_token_logps=policy, token_mask=mask, rewards=vec(1.5, -2.0),
                                                 beta=0.1)
    w = [[0.1], [math.exp(-0.5), 1.0]]  # e^-3 = 0.05 is floored at 0.1
    close(losses, [-(-3.0 * 0.1) * 1.5, -(-0.5 * w[1][0] + 1e-3 * 1.0) * -2.0])
    close(metrics["alol/weights"], [0.1 * 1.5, (w[1][0] + 1.0) / 2 * -2.0])
    (grad,) = torch.autograd.grad(losses.sum(), [policy])
    close(grad, [[-0.1 * 1.5, 0.0], [-w[1][0] * -2.0, -1.0 * -2.0]])


def test_alol_signs_and_weights():
    """A-LoL: NLL * clamp(pi / pi_ref) * A+ (gradient -w per log-prob); A-LoL KL: NLL * A+ + beta (log pi - log pi_ref)
    (gradient -A+ + beta, and -beta for the reference); ref-free: NLL * A (A not clipped)."""
    policy, ref, advantages = vec(-2.0, -3.0, grad=True), vec(-2.5, -1.0, grad=True), vec(1.5, -0.5)
    losses, metrics = get_objective("alol").fn(policy_logps=policy, ref_logps=ref, advantages=advantages, beta=0.1)
    w = [math.exp(0.5) * 1.5, math.exp(-2.0) * 0.0]
    close(losses, [2.0 * w[0], 3.0 * w[1]])
    close(metrics["alol/weights"], w)
    close(metrics["objective/kl"], [0.5, -2.0])
    beta = 0.3
    losses, metrics = get_objective("alol_kl").fn(policy_logps=policy, ref_logps=ref, advantages=advantages,
                                                  beta=beta)
    close(losses, [2.0 * 1.5 + beta * 0.5, 0.0 + beta * -2.0])
    grads = torch.autograd.grad(losses.sum(), [policy, ref])
    close(grads[0], [-1.5 + beta, 0.0 + beta])
    close(grads[1], [-beta, -beta])
    close(metrics["alol/weights"], [1.5, 0.0])
    losses, metrics = get_objective("alol_ref_free").fn(policy_logps=policy, advantages=advantages, beta=0.1)
    close(losses, [2.0 * 1.5, 3.0 * -0.5])
    close(metrics["alol/weights"], [1.5, -0.5])
    assert "objective/kl" not in metrics


# --------------------------------------------------------------------------------------------------------- ORPO
def test_orpo_prompt_inputs_come_together():
    stats = {"policy_chosen_logps": vec(-6.0), "policy_rejected_logps": vec(-9.0),
             "chosen_lengths": torch.tensor([3]), "rejected_lengths": torch.tensor([3])}
    for extra in ({"policy_chosen_prompt_logps": vec(-4.0)}, {"chosen_prompt_lengths": torch.tensor([2])}):
        with pytest.raises(ValueError):
            get_objective("orpo").fn(beta=0.1, **stats, **extra)


def test_orpo_response_of_probability_one_stays_finite():
    """ORPO's log odds log(p / (1 - p)) of the per-token mean log-prob avg, with avg kept at most -1e-12 (a response
    of probability 1 would give log(1 - 1) = -inf): chosen avg 0 -> log odds -1e-12 - log(1 - e^-1e-12)."""
    beta = 0.5
    stats = {"policy_chosen_logps": vec(0.0), "policy_rejected_logps": vec(-3.0),
             "chosen_lengths": torch.tensor([2]), "rejected_lengths": torch.tensor([3])}
    losses, metrics = get_objective("orpo").fn(beta=beta, **stats)
    avg_c, avg_r = -1e-12, -1.0
    log_odds = (avg_c - math.log(-math.expm1(avg_c))) - (avg_r - math.log(-math.expm1(avg_r)))
    close(metrics["log_odds_chosen"], [log_odds])
    close(losses, [0.0 - beta * logsigmoid(log_odds)])


# ------------------------------------------------------------------------------------------------ SFT without pairs
def test_sft_metrics_without_a_reference():
    losses, metrics = get_objective("sft").fn(beta=0.1, policy_chosen_logps=vec(-6.0, -2.0, grad=True),
                                              policy_rejected_logps=vec(-7.0, -1.0, grad=True),
                                              chosen_lengths=torch.tensor([3, 1]))
    close(losses, [2.0, 2.0])
    assert set(metrics) == {"logps/chosen", "logps/rejected"}
    assert not any(value.requires_grad for value in metrics.values())
    close(metrics["logps/chosen"], [-6.0, -2.0])
    close(metrics["logps/rejected"], [-7.0, -1.0])


# ------------------------------------------------------------------------------------------ API and registry
def test_a_list_of_objectives_logs_each_loss():
    """objective_loss([...]): the weighted sum of the batch means (weights 1 by default), and loss/<name> for each
    objective only when there are several."""
    beta = 0.5
    margins = [H["chosen"][i] - H["rejected"][i] for i in range(2)]
    sigmoid_mean = sum(-logsigmoid(beta * m) for m in margins) / 2
    hinge_mean = sum(max(0.0, 1 - beta * m) for m in margins) / 2
    loss, metrics = objective_loss(["sigmoid", "hinge"], beta=beta, **PAIR)
    close(loss, sigmoid_mean + hinge_mean)
    close(metrics["loss/sigmoid"], sigmoid_mean, rtol=1e-6)
    close(metrics["loss/hinge"], hinge_mean, rtol=1e-6)
    loss, metrics = objective_loss(["sigmoid", "hinge"], loss_weights=[0.25, 2.0], beta=beta, **PAIR)
    close(loss, 0.25 * sigmoid_mean + 2.0 * hinge_mean)
    _, metrics = objective_loss("sigmoid", beta=beta, **PAIR)
    assert "loss/sigmoid" not in metrics


def test_objective_spec_is_frozen_with_its_defaults():
    import dataclasses

    from prefuse.algorithms.registry import ObjectiveSpec

    spec = ObjectiveSpec(name="x", fn=lambda **_: None, requires=frozenset({"a"}), hparams={})
    assert spec.separable is True and spec.optional == frozenset() and spec.aliases == () and spec.doc == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.separable = False
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_objective("sigmoid").separable = False


def test_accepts_lists_inputs_and_hparams():
    assert get_objective("wbc").accepts() == (
        "'wbc': inputs [policy_logps, rewards], optional inputs [-], hparams [beta, -]")
    assert get_objective("selm").accepts() == (
        "'selm': inputs [policy_chosen_logps, policy_rejected_logps, policy_sample_logps, ref_chosen_logps, "
        "ref_rejected_logps], optional inputs [ref_sample_logps], hparams [beta, alpha=0.001]")


# ----------------------------------------------------------------------------------------------------------- roles
def test_input_names_of_role_statistics():
    """roles' module docstring: policy_<role>_logps, ref_<role>_logps, <role>_lengths, <role>_token_mask, ...; the role
    "completion" is written without its name, except in completion_lengths."""
    from prefuse.algorithms.roles import COMPLETION, input_name

    assert input_name("chosen", "logps", "policy") == "policy_chosen_logps"
    assert input_name("online", "token_logps", "ref") == "ref_online_token_logps"
    assert input_name("rejected", "verbose_logps", "policy") == "policy_rejected_verbose_logps"
    assert input_name("chosen", "lengths") == "chosen_lengths"
    assert input_name("online", "token_mask") == "online_token_mask"
    assert input_name(COMPLETION, "logps", "ref") == "ref_logps"
    assert input_name(COMPLETION, "token_logps", "policy") == "policy_token_logps"
    assert input_name(COMPLETION, "token_mask") == "token_mask"
    assert input_name(COMPLETION, "lengths") == "completion_lengths"


def test_parse_input():
    from prefuse.algorithms.roles import COMPLETION, RoleInput, parse_input

    assert parse_input("policy_chosen_logps") == RoleInput("policy_chosen_logps", "chosen", "logps", "policy", True)
    assert parse_input("ref_logps", required=False) == RoleInput("ref_logps", COMPLETION, "logps", "ref", False)
    assert parse_input("policy_token_logps") == RoleInput("policy_token_logps", COMPLETION, "token_logps", "policy")
    assert parse_input("ref_online_token_logps") == RoleInput("ref_online_token_logps", "online", "token_logps", "ref")
    assert parse_input("policy_chosen_given_rejected_logps").role == "chosen_given_rejected"
    assert parse_input("ref_rejected_verbose_logps") == RoleInput("ref_rejected_verbose_logps", "rejected",
                                                                  "verbose_logps", "ref")
    assert parse_input("chosen_lengths") == RoleInput("chosen_lengths", "chosen", "lengths", None)
    assert parse_input("token_mask") == RoleInput("token_mask", COMPLETION, "token_mask", None)
    assert parse_input("online_token_mask", required=False) == RoleInput("online_token_mask", "online", "token_mask",
                                                                         None, False)
    for passed_through in ("policy_sample_verbose_logps", "lengths", "preference_probs", "labels", "advantages",
                           "slow_chosen_logps", "policy_chosen_log_sum_sq_probs", "policy_xlogps", "refs_logps"):
        assert parse_input(passed_through) is None, passed_through
    assert RoleInput("n", "r", "logps", "policy").required is True


def test_role_input_is_frozen_and_partners_pair_up():
    import dataclasses

    from prefuse.algorithms.roles import PARTNER, RoleInput

    with pytest.raises(dataclasses.FrozenInstanceError):
        RoleInput("n", "r", "logps", "policy").required = False
    # LD-DPO measures a response's verbose part against the other response of its pair
    assert PARTNER == {"chosen": "rejected", "rejected": "chosen"}


def test_role_inputs_required_wins_over_optional():
    from prefuse.algorithms.roles import declared_roles, role_inputs

    sft, sigmoid = get_objective("sft"), get_objective("sigmoid")
    alone = {item.name: item.required for item in role_inputs([sft])}
    assert alone["policy_chosen_logps"] and alone["chosen_lengths"]
    assert not alone["policy_rejected_logps"] and not alone["ref_chosen_logps"]
    assert "policy_chosen_log_sum_sq_probs" not in alone  # a pass-through input
    for specs in ([sft, sigmoid], [sigmoid, sft]):
        items = role_inputs(specs)
        assert [item.name for item in items] == sorted(item.name for item in items)
        required = {item.name: item.required for item in items}
        assert required["policy_rejected_logps"] and required["ref_chosen_logps"] and required["chosen_lengths"]
        assert not required["rejected_lengths"]  # optional in both
    assert declared_roles([sft]) == ["chosen", "rejected"]
    assert declared_roles([get_objective("kto")]) == ["completion", "kl"]
    assert declared_roles([get_objective("hypo_kl")]) == ["online"]
