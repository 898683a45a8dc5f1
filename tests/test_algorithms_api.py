"""objective_loss: argument checking, combinations, and inputs at the edges (no NaN, ever)."""

from __future__ import annotations

import math

import pytest
import torch

from prefuse.algorithms import ObjectiveSpec, get_objective, list_objectives, objective_loss, register
from prefuse.algorithms.common import verbose_token_mask
from prefuse.algorithms.registry import OBJECTIVES

T, K = 5, 3


def pair(batch=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    stats = {
        k: -30 * torch.rand(batch, generator=g, dtype=dtype)
        for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    }
    stats["chosen_lengths"] = torch.randint(1, 10, (batch,), generator=g)
    stats["rejected_lengths"] = torch.randint(1, 10, (batch,), generator=g)
    return stats


# --- argument checking ---------------------------------------------------------------------------------------------


def test_unknown_objective_lists_accepted_names():
    with pytest.raises(ValueError) as error:
        objective_loss("dpo_plus_plus", **pair())
    message = str(error.value)
    for name in ("sigmoid", "ipo", "kto", "simpo", "srpo", "alol", "mixed_dpo"):
        assert name in message
    assert "slic" in message  # aliases are listed too


def test_unknown_hparam_lists_accepted_ones():
    with pytest.raises(ValueError) as error:
        objective_loss("robust", label_smothing=0.1, **pair())
    message = str(error.value)
    assert "label_smothing" in message and "label_smoothing" in message and "f_divergence_type" in message


def test_hparam_of_another_loss_is_rejected():
    # hinge does not read label_smoothing, and nca_pair has no f-divergence generalization (as in TRL 1.16)
    with pytest.raises(ValueError, match="label_smoothing"):
        objective_loss("hinge", label_smoothing=0.1, **pair())
    with pytest.raises(ValueError, match="f_divergence_type"):
        objective_loss("nca_pair", f_divergence_type="forward_kl", **pair())


def test_missing_reference_logps_are_named():
    stats = pair()
    del stats["ref_chosen_logps"], stats["ref_rejected_logps"]
    with pytest.raises(ValueError) as error:
        objective_loss("sigmoid", **stats)
    assert "ref_chosen_logps" in str(error.value) and "ref_rejected_logps" in str(error.value)


@pytest.mark.parametrize(
    "name, drop, hparams, missing",
    [
        ("ipo", ("chosen_lengths",), {}, "chosen_lengths"),
        ("sigmoid", (), {"ld_alpha": 0.5}, "policy_chosen_verbose_logps"),
        ("sigmoid", (), {"use_weighting": True}, "policy_chosen_log_sum_sq_probs"),
        ("simpo", ("rejected_lengths",), {}, "rejected_lengths"),
        ("selm", (), {}, "policy_sample_logps"),
    ],
)
def test_missing_inputs_for_an_option(name, drop, hparams, missing):
    stats = pair()
    for key in drop:
        del stats[key]
    with pytest.raises(ValueError, match=missing):
        objective_loss(name, **stats, **hparams)


def test_unpaired_objective_rejects_pair_inputs_and_names_its_own():
    with pytest.raises(ValueError) as error:
        objective_loss("kto", **pair())
    assert "policy_logps" in str(error.value) and "labels" in str(error.value)


@pytest.mark.parametrize(
    "name, hparams",
    [
        ("robust", {"label_smoothing": 0.5}),
        ("exo_pair", {"label_smoothing": 0.0}),
        ("sigmoid", {"f_divergence_type": "hellinger"}),
        ("sigmoid", {"ld_alpha": 1.5}),
        ("cpo", {"loss_type": "kto_pair"}),
    ],
)
def test_invalid_option_values(name, hparams):
    with pytest.raises(ValueError):
        objective_loss(name, **pair(), **hparams)


def test_batch_size_and_weight_count_mismatches():
    stats = pair()
    stats["ref_rejected_logps"] = stats["ref_rejected_logps"][:2]
    with pytest.raises(ValueError, match="batch sizes"):
        objective_loss("sigmoid", **stats)
    with pytest.raises(ValueError, match="loss_weights"):
        objective_loss(["sigmoid", "hinge"], loss_weights=[1.0], **pair())
    with pytest.raises(ValueError):
        objective_loss([], **pair())


def test_aliases_and_lookup():
    stats = pair()
    assert objective_loss("dpo", **stats)[0] == objective_loss("sigmoid", **stats)[0]
    assert objective_loss("slic", **stats)[0] == objective_loss("hinge", **stats)[0]
    assert get_objective("dpo") is get_objective("sigmoid")
    assert "dpo" not in list_objectives() and "sigmoid" in list_objectives()
    spec = get_objective("aot")
    assert isinstance(spec, ObjectiveSpec) and not spec.separable and spec.doc
    assert get_objective("sigmoid").separable and "ref_chosen_logps" in get_objective("sigmoid").requires
    assert get_objective("cpo").hparams["cpo_alpha"] == 1.0


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="twice"):
        register("sigmoid", requires=set(), hparams={})(lambda **kw: None)
    assert OBJECTIVES["sigmoid"].name == "sigmoid"


# --- combinations --------------------------------------------------------------------------------------------------


def test_loss_type_list_is_the_weighted_sum():
    stats = pair(batch=6, seed=3)
    names, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]
    combined, metrics = objective_loss(names, loss_weights=weights, **stats)
    separate = sum(w * objective_loss(n, **stats)[0] for n, w in zip(names, weights))
    torch.testing.assert_close(combined, separate)
    for name in names:
        torch.testing.assert_close(metrics[f"loss/{name}"], objective_loss(name, **stats)[0])
    # without weights, every loss counts once
    torch.testing.assert_close(
        objective_loss(["hinge", "apo_zero"], **stats)[0],
        objective_loss("hinge", **stats)[0] + objective_loss("apo_zero", **stats)[0],
    )


def test_combination_shares_options_and_gradients():
    stats = pair(batch=5, seed=4)
    stats["policy_chosen_logps"].requires_grad_(True)
    combined, _ = objective_loss(
        ["sigmoid", "ipo"], loss_weights=[0.5, 2.0], f_divergence_type="js_divergence", **stats
    )
    a, _ = objective_loss("sigmoid", f_divergence_type="js_divergence", **stats)
    b, _ = objective_loss("ipo", f_divergence_type="js_divergence", **stats)
    (g_combined,) = torch.autograd.grad(combined, stats["policy_chosen_logps"])
    (g_separate,) = torch.autograd.grad(0.5 * a + 2.0 * b, stats["policy_chosen_logps"])
    torch.testing.assert_close(g_combined, g_separate)


def test_offline_plus_online_kl_combination_with_different_batch_shapes():
    stats = pair(batch=4)
    online = {"policy_online_logps": -5 * torch.rand(3, K), "ref_online_logps": -5 * torch.rand(3, K)}
    combined, _ = objective_loss(["sigmoid", "hypo_kl"], loss_weights=[1.0, 0.1], **stats, **online)
    expected = objective_loss("sigmoid", **stats)[0] + 0.1 * objective_loss("hypo_kl", **online)[0]
    torch.testing.assert_close(combined, expected)
    del stats["chosen_lengths"], stats["rejected_lengths"]  # hypo does not read them
    hypo, _ = objective_loss("hypo", kl_coef=0.1, **stats, **online)
    torch.testing.assert_close(hypo, expected)


# --- edges: no NaN -------------------------------------------------------------------------------------------------

BOOL_INPUTS = ("labels", "use_offline", "token_mask", "online_token_mask")
OPTION_VARIANTS = {
    "sigmoid": [
        {"ld_alpha": 0.5, "use_weighting": True, "f_divergence_type": "forward_kl"},
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        {"f_divergence_type": "js_divergence"},
    ],
    "ipo": [{"ld_alpha": 0.0, "use_weighting": True}],
    "discopop": [{"f_divergence_type": "forward_kl"}],
    "exo_pair": [{"f_divergence_type": "alpha_divergence"}],
    "sft": [{"use_weighting": True, "ld_alpha": 0.5}],
    "cpo": [{"loss_type": "simpo", "alpha": 0.5}, {"loss_type": "ipo"}],
    "simpo": [{"alpha": 1.0}],
    "nash_md": [{"kl_estimator": "token"}],
    "hypo_kl": [{"kl_estimator": "per_token_k3"}],
    "ofs_dpo": [{"ofs_variant": "two_sided"}],
}
EXTRA_INPUTS = {
    "orpo": ("policy_chosen_prompt_logps", "chosen_prompt_lengths"),
    "selm": ("ref_sample_logps",),
    "mixed_dpo": ("use_offline",),
    "nash_md": ("policy_token_logps", "ref_token_logps", "token_mask"),
    "hypo_kl": ("policy_online_token_logps", "ref_online_token_logps", "online_token_mask"),
    "grpo": ("ref_online_token_logps",),
    "rloo": ("ref_online_logps",),
}
DPO_EXTRA = (
    "chosen_lengths",
    "rejected_lengths",
    "policy_chosen_verbose_logps",
    "policy_rejected_verbose_logps",
    "ref_chosen_verbose_logps",
    "ref_rejected_verbose_logps",
    "policy_chosen_log_sum_sq_probs",
    "policy_rejected_log_sum_sq_probs",
)


def edge_inputs(name, batch, policy_value, ref_value, length, dtype, same_pair=False):
    """Inputs for `name` with every log-prob at one value (policy_value for policy stats, ref_value for the rest)."""
    spec = get_objective(name)
    keys = set(spec.requires) | set(EXTRA_INPUTS.get(name, ()))
    if "policy_chosen_verbose_logps" in spec.optional:
        keys |= set(DPO_EXTRA) | {"policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps"}
    inputs = {}
    for key in sorted(keys):
        shape = (
            (batch, K, T)
            if "online_token" in key
            else (batch, T)
            if "token" in key
            else ((batch, K) if "online_logps" in key or (key == "rewards" and name in ("grpo", "rloo")) else (batch,))
        )
        if key in BOOL_INPUTS:
            inputs[key] = torch.arange(batch * math.prod(shape[1:])).reshape(shape) % 2 == 0
        elif key.endswith("lengths"):
            inputs[key] = torch.full(shape, length, dtype=torch.long)
        elif key in ("preference_probs", "advantages", "rewards"):
            inputs[key] = torch.full(shape, 0.75, dtype=dtype)
        else:
            value = policy_value if key.startswith(("policy_", "slow_")) else ref_value
            if "verbose" in key or "token" in key:
                value = value / T
            inputs[key] = torch.full(shape, value, dtype=dtype).requires_grad_(key.startswith(("policy_", "slow_")))
    if same_pair:
        for model in ("policy", "ref"):
            if f"{model}_rejected_logps" in inputs:
                inputs[f"{model}_rejected_logps"] = inputs[f"{model}_chosen_logps"]
    return inputs


EDGE_SCENARIOS = {
    # name: (batch, policy log-prob, reference log-prob, response length, dtype, chosen identical to rejected)
    "zero_length_responses": (3, 0.0, 0.0, 0, torch.float32, False),
    "batch_of_one": (1, -7.0, -6.0, 4, torch.float32, False),
    "chosen_equals_rejected": (4, -9.0, -9.0, 5, torch.float32, True),
    "large_negative_1e4": (3, -1e4, -2.0, 40, torch.float32, False),
    "huge_negative_1e30_both": (3, -1e30, -1e30, 40, torch.float32, False),
    "huge_negative_1e30_policy": (3, -1e30, -3.0, 40, torch.float32, False),
    "huge_negative_1e30_float64": (2, -1e30, -3.0, 40, torch.float64, False),
    "bf16": (4, -12.0, -11.0, 6, torch.bfloat16, False),
    "fp16": (4, -12.0, -11.0, 6, torch.float16, False),
}
EDGE_CASES = [(name, {}) for name in list_objectives()] + [
    (name, hp) for name, variants in OPTION_VARIANTS.items() for hp in variants
]


@pytest.mark.parametrize("scenario", list(EDGE_SCENARIOS))
@pytest.mark.parametrize(
    "name, hparams", EDGE_CASES, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values()))
)
def test_no_nan_at_the_edges(name, hparams, scenario):
    batch, policy_value, ref_value, length, dtype, same_pair = EDGE_SCENARIOS[scenario]
    inputs = edge_inputs(name, batch, policy_value, ref_value, length, dtype, same_pair)
    loss, metrics = objective_loss(name, beta=0.1, **inputs, **hparams)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert not torch.isnan(loss), f"loss is NaN for {name} {hparams} ({scenario})"
    if "1e30" not in scenario:  # squared losses may legitimately overflow to inf at 1e30-scale margins
        assert torch.isfinite(loss), f"loss is {loss} for {name} {hparams} ({scenario})"
    for key, value in metrics.items():
        assert not torch.isnan(value), f"metric {key} is NaN for {name} ({scenario})"
    leaves = [v for v in inputs.values() if v.requires_grad]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    for grad in grads:
        if grad is not None:
            assert not torch.isnan(grad).any(), f"gradient NaN for {name} {hparams} ({scenario})"
            assert grad.dtype == dtype  # the upcast happens inside; gradients come back in the caller's dtype


def test_zero_length_gives_the_documented_values():
    # an empty response has log-prob 0 and counts as one token: its per-token mean is 0, and sft over an all-empty
    # batch is 0
    stats = {
        k: torch.zeros(2)
        for k in ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    }
    stats["chosen_lengths"] = stats["rejected_lengths"] = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(objective_loss("ipo", beta=0.1, **stats)[0], torch.tensor(25.0))
    torch.testing.assert_close(objective_loss("sft", **stats)[0], torch.tensor(0.0))
    torch.testing.assert_close(objective_loss("sigmoid_norm", **stats)[0], torch.tensor(math.log(2.0)))


def test_bf16_matches_float32():
    stats32 = pair(batch=5, seed=9)
    stats16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in stats32.items()}
    rounded = {k: v.float() if v.is_floating_point() else v for k, v in stats16.items()}
    loss16, metrics16 = objective_loss("sigmoid", **stats16)
    loss32, metrics32 = objective_loss("sigmoid", **rounded)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32)
    torch.testing.assert_close(metrics16["rewards/margins"], metrics32["rewards/margins"])


def test_metrics_are_python_floats_and_sft_runs_without_reference():
    stats = pair()
    _, metrics = objective_loss(
        "sft", policy_chosen_logps=stats["policy_chosen_logps"], chosen_lengths=stats["chosen_lengths"]
    )
    assert set(metrics) == {"logps/chosen"}
    _, metrics = objective_loss(
        "kto",
        policy_logps=-torch.rand(4) * 10,
        ref_logps=-torch.rand(4) * 10,
        labels=torch.tensor([True, True, False, True]),
        policy_kl_logps=-torch.rand(4),
        ref_kl_logps=-torch.rand(4),
    )
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"} <= set(
        metrics
    )
    assert all(isinstance(float(v), float) and v.dim() == 0 for v in metrics.values())


def test_verbose_token_mask_marks_tokens_past_the_shared_length():
    completion_mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0]])
    shared = torch.tensor([2, 2])
    expected = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(verbose_token_mask(completion_mask, shared), expected)
