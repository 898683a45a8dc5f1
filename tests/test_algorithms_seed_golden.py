"""The seed objectives against their authors' code (tests/golden/seed_golden.json), plus OFS-DPO from its definition.

tests/golden/make_seed_golden.py ran the authors' code (SELM's `optimistic_dpo_loss`, TRL 0.23.1's XPO and Nash-MD
losses, LoL-RL's training-loop losses, the community SRPO loss) on fixed tensors and stored the batch loss, the
gradient with respect to every input and the logged metrics; its docstring names the commits. Here prefuse recomputes
them from the same inputs. Every prefuse metric is asserted by value under its own name (and the expected values of a
case are checked to be pairwise distinct, so a swap of two names fails). Inputs that must carry no gradient
(SELM's reference sample term, preference probabilities, advantages and rewards, the reference log-probs that only
enter through importance weights) are leaves with requires_grad=True whose gradient must be None or exactly zero.

Where prefuse deliberately differs from the authors' code, the documented relation is tested instead:
- XPO: TRL logs logps/chosen (rejected) as mean(policy) + mean(reference) log-probs of the chosen (rejected) side;
  prefuse logs the policy's alone, as TRL's DPO does.
- SRPO: the community code logs rewards/* as the unscaled log-ratio; prefuse logs beta * log-ratio (TRL's convention).
- Nash-MD: TRL's per-token KL term is kl_estimator="token"; prefuse's default "sequence" is checked in closed form.
- R-LoL: prefuse clips the reward at 0 (a no-op for the authors' rewards in [0, 1]); the authors' loop does not.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from prefuse.algorithms import get_objective, list_objectives, objective_loss

GOLDEN = json.loads((Path(__file__).parent / "golden" / "seed_golden.json").read_text())
PARTS = GOLDEN["parts"]
DTYPES = {"float32": torch.float32, "float64": torch.float64}
TOL = {"float64": {"rtol": 1e-9, "atol": 1e-12}, "float32": {"rtol": 2e-5, "atol": 2e-6}}
METRIC_TOL = {"float64": {"rtol": 1e-9, "atol": 1e-12}, "float32": {"rtol": 2e-5, "atol": 2e-6}}
# the authors reduce some metrics in float32 (accuracies, TRL's gathered means)
FLOAT32_METRIC_TOL = {"rtol": 1e-6, "atol": 1e-7}


def _tensor(values, dtype, grad=False):
    return torch.tensor(values, dtype=dtype).requires_grad_(grad)


def _close(got, want, tol, what):
    want = torch.as_tensor(want, dtype=torch.float64)
    torch.testing.assert_close(got.detach().double(), want, **tol, msg=lambda m: f"{what}: {m}")


def _no_grad(grad, what):
    assert grad is None or torch.count_nonzero(grad) == 0, f"{what} must get no gradient, got {grad}"


def _grads(loss, leaves):
    got = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, retain_graph=True)
    return dict(zip(leaves, got))


def _check_metrics(metrics, expected, tol, loose=()):
    """metrics: name -> per-example or 0-d tensor (the objective's own); expected: name -> value. Same names, each
    value under its own name; the expected values are pairwise distinct, so swapping two names cannot pass."""
    assert set(metrics) == set(expected)
    for a, b in itertools.combinations(sorted(expected), 2):
        assert abs(expected[a] - expected[b]) > 1e-4 * max(1.0, abs(expected[a])), f"{a} and {b} coincide"
    for name, value in expected.items():
        _close(metrics[name].double().mean(), value, FLOAT32_METRIC_TOL if name in loose else tol, f"metric {name}")


def _case_ids(part):
    return [",".join(f"{k}={v}" for k, v in case["options"].items()) for case in PARTS[part]["cases"]]


def test_golden_sources_are_pinned():
    assert PARTS["selm"]["source"]["commit"] == "0ba546a9831d89874f70522c6f6b1277ac31ad92"
    assert PARTS["selm"]["versions"]["trl"] == "0.8.6"
    assert PARTS["alol"]["source"]["commit"] == "9f8d81660bfa0bad17ae5d7835185987f028812e"
    assert PARTS["srpo"]["source"]["commit"] == "295b8e835db464828fd27093dac6d4f328b4c2d5"
    assert PARTS["xpo"]["versions"]["trl"] == PARTS["nash_md"]["versions"]["trl"] == "0.23.1"
    algorithms = {case["options"]["algorithm"] for case in PARTS["alol"]["cases"]}
    assert algorithms == {"a_lol", "a_lol_seq", "a_lol_ref_free", "wbc", "r_lol", "r_gold"}
    assert any(case["options"]["kl_beta"] > 0 for case in PARTS["alol"]["cases"])  # A-LoL KL


# -------------------------------------------------------------------------------------------------------------- SELM
SELM_NAMES = {
    "policy_chosen_logps": "policy_chosen_logps",
    "policy_rejected_logps": "policy_rejected_logps",
    "policy_response_logps": "policy_sample_logps",
    "reference_chosen_logps": "ref_chosen_logps",
    "reference_rejected_logps": "ref_rejected_logps",
    "reference_response_logps": "ref_sample_logps",
}


@pytest.mark.parametrize("case", PARTS["selm"]["cases"], ids=_case_ids("selm"))
def test_selm_matches_authors(case):
    options, expected, dtype = case["options"], case["expected"], case["options"]["dtype"]
    leaves = {ours: _tensor(case["inputs"][theirs], DTYPES[dtype], True) for theirs, ours in SELM_NAMES.items()}
    losses, metrics = get_objective("selm").fn(beta=options["beta"], alpha=options["alpha"], **leaves)
    assert losses.dtype == DTYPES[dtype]
    _close(losses, expected["losses"], TOL[dtype], "losses")
    grads = _grads(losses.mean(), leaves)
    for theirs, ours in SELM_NAMES.items():
        if theirs.startswith("policy_"):
            _close(grads[ours], expected["grads"][theirs], TOL[dtype], f"d loss / d {ours}")
    _no_grad(grads["ref_sample_logps"], "SELM's reference sample term")
    for side in ("chosen", "rejected"):  # the DPO reference enters as -policy (a constant the caller supplies)
        _close(grads[f"ref_{side}_logps"], [-g for g in expected["grads"][f"policy_{side}_logps"]], TOL[dtype], side)

    dpo = torch.tensor(expected["losses_alpha0"], dtype=torch.float64)
    want = {k: v for k, v in expected["metrics"].items() if k.split("/")[1] in ("chosen", "rejected", "accuracies",
                                                                                "margins")}
    want.update({"loss/dpo": float(dpo.mean()),
                 "loss/optimism": float((torch.tensor(expected["losses"], dtype=torch.float64) - dpo).mean())})
    _check_metrics(metrics, want, METRIC_TOL[dtype], loose={"rewards/accuracies"})

    loss, reduced = objective_loss("selm", beta=options["beta"], alpha=options["alpha"], **leaves)
    _close(loss, expected["loss"], TOL[dtype], "batch loss")
    assert set(reduced) == set(want)


# --------------------------------------------------------------------------------------------------------------- XPO
def _masked_sum(tokens, mask):
    return torch.where(mask.bool(), tokens, torch.zeros_like(tokens)).sum(-1)


@pytest.mark.parametrize("case", PARTS["xpo"]["cases"], ids=_case_ids("xpo"))
def test_xpo_matches_trl(case):
    """TRL's pair is (policy sample y_m, reference sample y_r) ordered by the judge; y_r is also the XPO term's."""
    options, expected, dtype = case["options"], case["expected"], case["options"]["dtype"]
    x = case["inputs"]
    leaves = {k: _tensor(x[k], DTYPES[dtype], True) for k in ("model_logprobs_model_data", "model_logprobs_ref_data")}
    consts = {k: _tensor(x[k], DTYPES[dtype]) for k in ("ref_logprobs_model_data", "ref_logprobs_ref_data")}
    model_mask, ref_mask = torch.tensor(x["model_mask"]), torch.tensor(x["ref_mask"])
    chosen = torch.tensor(x["chosen_mask"])
    policy_m = _masked_sum(leaves["model_logprobs_model_data"], model_mask)
    policy_r = _masked_sum(leaves["model_logprobs_ref_data"], ref_mask)
    ref_m = _masked_sum(consts["ref_logprobs_model_data"], model_mask)
    ref_r = _masked_sum(consts["ref_logprobs_ref_data"], ref_mask)
    inputs = {
        "policy_chosen_logps": torch.where(chosen, policy_m, policy_r),
        "policy_rejected_logps": torch.where(chosen, policy_r, policy_m),
        "ref_chosen_logps": torch.where(chosen, ref_m, ref_r),
        "ref_rejected_logps": torch.where(chosen, ref_r, ref_m),
        "policy_sample_logps": policy_r,
    }
    hparams = {"alpha": options["alpha"], "loss_type": options["loss_type"]}
    losses, metrics = get_objective("xpo").fn(beta=options["beta"], **inputs, **hparams)
    _close(losses.mean(), expected["loss"], TOL[dtype], "batch loss")
    grads = _grads(losses.mean(), leaves)
    for key, grad in grads.items():
        _close(grad, expected["grads"][key], TOL[dtype], f"d loss / d {key}")

    trl = expected["metrics"]
    want = {k: trl[k] for k in ("loss/dpo", "loss/xpo", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                "rewards/accuracies")}
    # TRL adds the reference's mean log-prob to its logps/*; prefuse logs the policy's alone (see the docstring)
    want["logps/chosen"] = trl["logps/chosen"] - float(inputs["ref_chosen_logps"].double().mean())
    want["logps/rejected"] = trl["logps/rejected"] - float(inputs["ref_rejected_logps"].double().mean())
    _check_metrics(metrics, want, METRIC_TOL[dtype], loose={"rewards/accuracies"})
    _close(torch.tensor(expected["xpo_losses"]).mean(), trl["loss/xpo"], FLOAT32_METRIC_TOL, "TRL's own loss/xpo")


# ----------------------------------------------------------------------------------------------------------- Nash-MD
def _nash_inputs(case, dtype):
    x = case["inputs"]
    tokens = _tensor(x["model_logprobs_model_data"], DTYPES[dtype], True)
    ref_tokens = _tensor(x["ref_logprobs_model_data"], DTYPES[dtype], True)
    mask = torch.tensor(x["mask"])
    probs = _tensor(x["probability"], DTYPES[dtype], True)
    inputs = {
        "policy_logps": _masked_sum(tokens, mask),
        "ref_logps": _masked_sum(ref_tokens, mask),
        "preference_probs": probs,
        "policy_token_logps": tokens,
        "ref_token_logps": ref_tokens,
        "token_mask": mask,
    }
    return inputs, {"model_logprobs_model_data": tokens, "ref_logprobs_model_data": ref_tokens, "probability": probs}


def _nash_metrics(case):
    trl = case["expected"]["metrics"]
    return {k: trl[k] for k in ("loss/score", "loss/kl", "rewards/probabilities", "logps/chosen")}


@pytest.mark.parametrize("case", PARTS["nash_md"]["cases"], ids=_case_ids("nash_md"))
def test_nash_md_token_estimator_matches_trl(case):
    options, expected, dtype = case["options"], case["expected"], case["options"]["dtype"]
    inputs, leaves = _nash_inputs(case, dtype)
    losses, metrics = get_objective("nash_md").fn(beta=options["beta"], kl_estimator="token", **inputs)
    _close(losses.mean(), expected["loss"], TOL[dtype], "batch loss")
    grads = _grads(losses.mean(), leaves)
    _close(grads["model_logprobs_model_data"], expected["grads"]["model_logprobs_model_data"], TOL[dtype], "policy")
    _no_grad(grads["ref_logprobs_model_data"], "the reference log-probs")
    _no_grad(grads["probability"], "the preference probabilities")
    _check_metrics(metrics, _nash_metrics(case), METRIC_TOL[dtype])


@pytest.mark.parametrize("case", PARTS["nash_md"]["cases"], ids=_case_ids("nash_md"))
def test_nash_md_sequence_estimator(case):
    """The default estimator: beta sg(d) log pi(y) - (p - 1/2) log pi(y), d the sequence log-ratio; same metrics."""
    options, dtype = case["options"], case["options"]["dtype"]
    inputs, leaves = _nash_inputs(case, dtype)
    losses, metrics = get_objective("nash_md").fn(beta=options["beta"], **inputs)
    lp, rl = inputs["policy_logps"].detach().double(), inputs["ref_logps"].detach().double()
    p = inputs["preference_probs"].detach().double()
    _close(losses, options["beta"] * (lp - rl) * lp - (p - 0.5) * lp, TOL[dtype], "losses")
    grads = _grads(losses.mean(), leaves)
    mask = inputs["token_mask"].double()
    per_row = (options["beta"] * (lp - rl) - (p - 0.5)) / lp.numel()
    _close(grads["model_logprobs_model_data"], per_row[:, None] * mask, TOL[dtype], "policy")
    _no_grad(grads["ref_logprobs_model_data"], "the reference log-probs")
    _no_grad(grads["probability"], "the preference probabilities")
    _check_metrics(metrics, _nash_metrics(case), METRIC_TOL[dtype])


def test_online_ipo_preference_probabilities_carry_no_gradient():
    """Online IPO (ALGORITHMS.md section 6, no code to compare with): ((h - h') - (p - 1/2) / tau)^2, p a constant."""
    g = torch.Generator().manual_seed(1)
    x = {k: -30 * torch.rand(5, generator=g, dtype=torch.float64) for k in
         ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")}
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    probs = torch.rand(5, generator=g, dtype=torch.float64).requires_grad_(True)
    tau = 0.2
    losses, metrics = get_objective("online_ipo").fn(beta=tau, preference_probs=probs, **leaves)
    h = (x["policy_chosen_logps"] - x["ref_chosen_logps"]) - (x["policy_rejected_logps"] - x["ref_rejected_logps"])
    residual = h - (probs.detach() - 0.5) / tau
    _close(losses, residual**2, TOL["float64"], "losses")
    grads = _grads(losses.mean(), {**leaves, "preference_probs": probs})
    _no_grad(grads["preference_probs"], "the preference probabilities")
    _close(grads["policy_chosen_logps"], 2 * residual / 5, TOL["float64"], "d loss / d policy_chosen_logps")
    _close(metrics["rewards/probabilities"], probs.detach(), TOL["float64"], "rewards/probabilities")


# ------------------------------------------------------------------------------------------------------ A-LoL family
def _alol_name(options):
    if options["algorithm"] == "a_lol" and options["kl_beta"] > 0:
        return "alol_kl"
    return {"a_lol": "alol", "a_lol_seq": "alol_seq", "a_lol_ref_free": "alol_ref_free", "wbc": "wbc",
            "r_lol": "r_lol", "r_gold": "r_gold"}[options["algorithm"]]


def _alol_expected_metrics(name, case, policy_logps, ref_logps):
    """prefuse's metrics from what the authors' loop logged (postfix) and formed (its importance ratios, A+)."""
    options, x, e = case["options"], case["inputs"], case["expected"]
    postfix, internal = e["postfix"], {k: torch.tensor(v, dtype=torch.float64) for k, v in e["internal"].items()}
    mask = torch.tensor(x["response_mask"], dtype=torch.float64)
    rewards = torch.tensor(x["rewards"], dtype=torch.float64)
    nll_key = {"alol_ref_free": "avg_loss_/wo_adv", "wbc": "avg_loss_/wo_reward", "r_gold": "avg_loss_/wo_reward"}
    want = {"logps/chosen": -postfix[nll_key.get(name, "avg_loss_/wo_IS_or_KL")]}
    if name == "alol":
        want["alol/weights"] = float((internal["importance_sampling_ratio"] * internal["advantage"]).mean())
    elif name == "alol_seq":
        per_token = internal["importance_sampling_ratio_per_token"]
        want["alol/weights"] = float(((per_token * mask).sum(1) / mask.sum(1) * internal["advantage"]).mean())
    elif name in ("alol_kl", "alol_ref_free"):
        want["alol/weights"] = postfix["avg_advantage"]
    elif name == "wbc":
        want["alol/weights"] = postfix["avg_reward"]
    elif name == "r_lol":
        want["alol/weights"] = float((internal["importance_sampling_ratio"] * rewards.clamp(min=0)).mean())
    elif name == "r_gold":
        weights = internal["lower_bound_per_token_probs"]
        want["alol/weights"] = float(((weights * mask).sum(1) / mask.sum(1) * rewards).mean())
    if name in ("alol", "r_lol", "alol_kl"):  # their baseline NLL minus the policy's: log pi - log pi_ref
        kl = internal["baseline_full_seq_log_probs"] - internal["copy_full_seq_log_probs"]
        want["objective/kl"] = float(kl.mean())
        if name == "alol_kl":
            assert abs(postfix["avg_kl_penalty"] - options["kl_beta"] * float(kl.mean())) < 1e-12
    elif name == "alol_seq":
        want["objective/kl"] = float((policy_logps - ref_logps).detach().double().mean())
    return want


@pytest.mark.parametrize("case", PARTS["alol"]["cases"], ids=_case_ids("alol"))
def test_alol_family_matches_authors(case):
    options, expected, dtype = case["options"], case["expected"], case["options"]["dtype"]
    name = _alol_name(options)
    if name not in list_objectives():
        pytest.fail(f"prefuse has no objective {name!r} for the authors' {options['algorithm']}")
    x = case["inputs"]
    tokens = _tensor(x["policy_token_logps"], DTYPES[dtype], True)
    ref_tokens = _tensor(x["ref_token_logps"], DTYPES[dtype], True)
    mask = torch.tensor(x["response_mask"])
    advantages = _tensor(x["advantages"], DTYPES[dtype], True)
    rewards = _tensor(x["rewards"], DTYPES[dtype], True)
    policy_logps, ref_logps = _masked_sum(tokens, mask), _masked_sum(ref_tokens, mask)
    available = {
        "policy_logps": policy_logps, "ref_logps": ref_logps, "advantages": advantages, "rewards": rewards,
        "policy_token_logps": tokens, "ref_token_logps": ref_tokens, "token_mask": mask,
    }
    spec = get_objective(name)
    inputs = {k: v for k, v in available.items() if k in spec.inputs}
    hparams = {"ppo_clip": options["ppo_clip"]} if "ppo_clip" in spec.hparams else {}
    beta = options["kl_beta"] if name == "alol_kl" else 0.1
    losses, metrics = spec.fn(beta=beta, **inputs, **hparams)
    # R-GOLD's floor is torch.tensor(0.1) in the authors' loop: a float32 0.1, 1.5e-8 above prefuse's float64 one
    tol = {"rtol": 1e-7, "atol": 1e-12} if name == "r_gold" and dtype == "float64" else TOL[dtype]
    _close(losses.mean(), expected["loss"], tol, "batch loss")
    grads = _grads(losses.mean(), {"policy_token_logps": tokens, "ref_token_logps": ref_tokens,
                                   "advantages": advantages, "rewards": rewards})
    _close(grads["policy_token_logps"], expected["grads"]["policy_token_logps"], tol, "d loss / d policy")
    _no_grad(grads["advantages"], "the advantages")
    _no_grad(grads["rewards"], "the rewards")
    if name == "alol_kl":  # the KL penalty's reference term: -beta / B per token (the authors compute it no_grad)
        _close(grads["ref_token_logps"], -beta * mask.double() / mask.shape[0], TOL[dtype], "d loss / d ref")
    else:  # the reference enters only through importance weights, which carry no gradient
        _no_grad(grads["ref_token_logps"], "the reference log-probs (importance weights)")
    _check_metrics(metrics, _alol_expected_metrics(name, case, policy_logps, ref_logps), tol)


def test_r_lol_clips_negative_rewards_where_the_authors_do_not():
    """The documented difference: R-LoL weights max(R, 0); the authors' rewards are sigmoid scores (never < 0)."""
    cases = PARTS["alol"]["cases"]
    (case,) = [c for c in cases if (c["options"]["algorithm"], c["options"]["ppo_clip"]) == ("r_lol", 0.9)]
    x, internal = case["inputs"], case["expected"]["internal"]
    mask = torch.tensor(x["response_mask"])
    policy_logps = _masked_sum(torch.tensor(x["policy_token_logps"], dtype=torch.float64), mask)
    ref_logps = _masked_sum(torch.tensor(x["ref_token_logps"], dtype=torch.float64), mask)
    rewards = torch.tensor(x["rewards"], dtype=torch.float64) * torch.tensor([1.0, -1, 1, -1, 1, 1])
    losses, _ = get_objective("r_lol").fn(policy_logps=policy_logps, ref_logps=ref_logps, rewards=rewards, beta=0.1)
    ratio = torch.tensor(internal["importance_sampling_ratio"], dtype=torch.float64)
    _close(losses, -policy_logps * ratio * rewards.clamp(min=0), TOL["float64"], "losses")


# -------------------------------------------------------------------------------------------------------------- SRPO
def _srpo_name(theirs):
    model, rest = theirs.split("_", 1)
    ours = "ref" if model == "reference" else "policy"
    if "_improved_to_given_" in rest:
        answer, context = rest.split("_improved_to_given_")
        return f"{ours}_{answer}_given_{context}_logps"
    return f"{ours}_{rest}_logps"


@pytest.mark.parametrize("case", PARTS["srpo"]["cases"], ids=_case_ids("srpo"))
def test_srpo_matches_community_code(case):
    options, expected, dtype = case["options"], case["expected"], case["options"]["dtype"]
    leaves = {_srpo_name(k): _tensor(v, DTYPES[dtype], True) for k, v in case["inputs"].items()}
    assert len(leaves) == 12
    losses, metrics = get_objective("srpo").fn(beta=options["beta"], srpo_alpha=options["alpha"], **leaves)
    _close(losses, expected["losses"], TOL[dtype], "losses")
    grads = _grads(losses.mean(), leaves)
    for theirs in case["inputs"]:
        if theirs.startswith("policy_"):
            _close(grads[_srpo_name(theirs)], expected["grads"][theirs], TOL[dtype], f"d loss / d {theirs}")
            # the reference is a constant the caller supplies; its log-prob enters as -policy
            reference = _srpo_name(theirs.replace("policy_", "reference_", 1))
            _close(grads[reference], [-g for g in expected["grads"][theirs]], TOL[dtype], f"d loss / d {reference}")

    theirs, beta = expected["metrics"], options["beta"]
    want = {
        "rewards/chosen": beta * theirs["rewards/chosen"],  # the community code logs the unscaled log-ratio
        "rewards/rejected": beta * theirs["rewards/rejected"],
        "rewards/margins": beta * theirs["rewards/margins"],
        "rewards/accuracies": theirs["rewards/accuracies"],
        "logps/chosen": theirs["logps/chosen"],
        "logps/rejected": theirs["logps/rejected"],
        "loss/generate": theirs["ratios/generative_loss"],
        "loss/improve": theirs["ratios/self_improvement_loss"],
    }
    _check_metrics(metrics, want, METRIC_TOL[dtype], loose={"rewards/accuracies"})


# ----------------------------------------------------------------------------------------------------------- OFS-DPO
def _softplus(z):
    return torch.log1p(torch.exp(-z.abs())) + z.clamp(min=0)


def _ofs_case(seed):
    g = torch.Generator().manual_seed(seed)
    fast = {s: -40 * torch.rand(6, generator=g, dtype=torch.float64) - 5 for s in ("chosen", "rejected")}
    slow = {s: fast[s] + 20 * torch.rand(6, generator=g, dtype=torch.float64) - 10 for s in fast}
    ref = {s: fast[s] + 20 * torch.rand(6, generator=g, dtype=torch.float64) - 10 for s in fast}
    return fast, slow, ref


OFS_CASES = [
    {"ofs_variant": "slow_chases_fast", "ofs_alpha": 0.1, "beta": 0.1, "ofs_clamp": 10.0},
    {"ofs_variant": "slow_chases_fast", "ofs_alpha": 0.7, "beta": 0.3, "ofs_clamp": 10.0},
    {"ofs_variant": "two_sided", "ofs_alpha": 0.1, "beta": 0.1, "ofs_clamp": 10.0},
    {"ofs_variant": "two_sided", "ofs_alpha": 0.5, "beta": 0.3, "ofs_clamp": 1.0},  # the clamp is active
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("options", OFS_CASES, ids=lambda o: f"{o['ofs_variant']},alpha={o['ofs_alpha']}")
def test_ofs_dpo_from_its_definition(options, seed):
    """ALGORITHMS.md section 1, in closed form (float64): values, hand-derived gradients of both modules, metrics.

    m = log pi(y_w) - log pi(y_l) of a module, d(m) = beta (m - m_ref), softplus(-z) = -logsigmoid(z).
    Option A: softplus(-d(m_F)) + softplus(-d(m_S)) + alpha softplus(-beta (m_S - sg m_F)).
    Option B: softplus(-d(m_F)) + alpha softplus(-c(beta (m_F - sg m_S))) + softplus(-d(m_S))
              - alpha softplus(-c(beta (sg m_F - m_S))), c = clamp to [-ofs_clamp, ofs_clamp].
    """
    fast, slow, ref = _ofs_case(seed)
    beta, alpha, bound = options["beta"], options["ofs_alpha"], options["ofs_clamp"]
    m_f, m_s, m_ref = (d["chosen"] - d["rejected"] for d in (fast, slow, ref))
    n = m_f.numel()
    sig = torch.sigmoid
    fast_dpo, slow_dpo = _softplus(-beta * (m_f - m_ref)), _softplus(-beta * (m_s - m_ref))
    if options["ofs_variant"] == "slow_chases_fast":
        gap = _softplus(-beta * (m_s - m_f))
        value = fast_dpo + slow_dpo + alpha * gap
        d_fast = -beta * sig(-beta * (m_f - m_ref))
        d_slow = -beta * sig(-beta * (m_s - m_ref)) - alpha * beta * sig(-beta * (m_s - m_f))
    else:
        z = beta * (m_f - m_s)
        inside = (z.abs() < bound).double()
        gap = _softplus(-z.clamp(-bound, bound))
        value = fast_dpo + alpha * gap + slow_dpo - alpha * gap
        d_fast = -beta * sig(-beta * (m_f - m_ref)) - alpha * beta * sig(-z.clamp(-bound, bound)) * inside
        d_slow = -beta * sig(-beta * (m_s - m_ref)) - alpha * beta * sig(-z.clamp(-bound, bound)) * inside
        assert options["ofs_clamp"] > 5 or inside.min() == 0  # the clamped case has a clamped example

    leaves = {f"policy_{s}_logps": fast[s].clone().requires_grad_(True) for s in fast}
    leaves.update({f"slow_{s}_logps": slow[s].clone().requires_grad_(True) for s in slow})
    leaves.update({f"ref_{s}_logps": ref[s].clone() for s in ref})
    hparams = {k: v for k, v in options.items() if k != "beta"}
    losses, metrics = get_objective("ofs_dpo").fn(beta=beta, **leaves, **hparams)
    _close(losses, value, TOL["float64"], "losses")
    grads = _grads(losses.mean(), {k: v for k, v in leaves.items() if not k.startswith("ref_")})
    for module, d_m in (("policy", d_fast), ("slow", d_slow)):
        _close(grads[f"{module}_chosen_logps"], d_m / n, TOL["float64"], f"d loss / d {module}_chosen_logps")
        _close(grads[f"{module}_rejected_logps"], -d_m / n, TOL["float64"], f"d loss / d {module}_rejected_logps")

    rewards = {s: beta * (fast[s] - ref[s]) for s in fast}
    want = {
        "rewards/chosen": rewards["chosen"].mean(),
        "rewards/rejected": rewards["rejected"].mean(),
        "rewards/margins": (rewards["chosen"] - rewards["rejected"]).mean(),
        "rewards/accuracies": (rewards["chosen"] > rewards["rejected"]).double().mean(),
        "logps/chosen": fast["chosen"].mean(),
        "logps/rejected": fast["rejected"].mean(),
        "ofs/fast_dpo_loss": fast_dpo.mean(),
        "ofs/slow_dpo_loss": slow_dpo.mean(),
        "ofs/gap": gap.mean(),
    }
    _check_metrics(metrics, {k: float(v) for k, v in want.items()}, TOL["float64"])
