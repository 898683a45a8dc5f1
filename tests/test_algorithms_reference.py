"""Every registered objective against a float64 reference written out from its formula, values and gradients.

The references below use plain torch ops only (nothing from prefuse). For each case, seed and batch size we check:
the per-example losses of the registered function, the batch loss of `objective_loss`, and the gradient of the batch
loss with respect to every policy statistic (torch.autograd.grad on both sides).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from prefuse.algorithms import get_objective, list_objectives, objective_loss

logsig, sig = F.logsigmoid, torch.sigmoid
SEEDS = (0, 1, 2)
BATCH_SIZES = (1, 7)
T, K = 6, 3  # tokens per row of the per-token inputs, online samples per prompt
CONTEXTS = ("chosen_given_chosen", "chosen_given_rejected", "rejected_given_chosen", "rejected_given_rejected")


def make_inputs(seed: int, batch: int) -> dict[str, torch.Tensor]:
    """Random statistics for every input name any objective reads; the policy ones are leaves with gradients."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)

    def logps(*shape):
        return -uniform(*shape, low=0.5, high=30.0)

    def near(policy):  # reference log-probs within a few nats of the policy's, as in training
        return policy + 3.0 * torch.randn(policy.shape, generator=g, dtype=torch.float64)

    x = {}
    for side in ("chosen", "rejected"):
        x[f"policy_{side}_logps"] = logps(batch)
        x[f"ref_{side}_logps"] = near(x[f"policy_{side}_logps"])
        x[f"{side}_lengths"] = torch.randint(1, 20, (batch,), generator=g)
        for model in ("policy", "ref"):
            x[f"{model}_{side}_verbose_logps"] = uniform(batch) * x[f"{model}_{side}_logps"] * (uniform(batch) < 0.6)
        x[f"policy_{side}_log_sum_sq_probs"] = -uniform(batch) * x[f"{side}_lengths"]
        x[f"slow_{side}_logps"] = near(x[f"policy_{side}_logps"])
        x[f"policy_online_{side}_logps"] = logps(batch)
        x[f"ref_online_{side}_logps"] = near(x[f"policy_online_{side}_logps"])
    for context in CONTEXTS:
        x[f"policy_{context}_logps"] = logps(batch)
        x[f"ref_{context}_logps"] = near(x[f"policy_{context}_logps"])
    x["policy_chosen_prompt_logps"] = logps(batch)
    x["chosen_prompt_lengths"] = torch.randint(0, 10, (batch,), generator=g)
    x["use_offline"] = uniform(batch) < 0.5

    x["policy_logps"] = logps(batch)
    x["ref_logps"] = near(x["policy_logps"])
    x["labels"] = uniform(batch) < 0.5
    x["policy_kl_logps"] = logps(batch)
    x["ref_kl_logps"] = near(x["policy_kl_logps"]) - 1.0
    x["policy_sample_logps"] = logps(batch)
    x["ref_sample_logps"] = near(x["policy_sample_logps"])
    x["preference_probs"] = uniform(batch)
    x["advantages"] = torch.randn(batch, generator=g, dtype=torch.float64)
    x["rewards"] = uniform(batch, low=-0.2, high=1.0)
    x["group_rewards"] = uniform(batch, K, low=-0.2, high=1.0)  # `rewards` of the k samples per prompt

    x["token_mask"] = uniform(batch, T) < 0.8
    x["policy_token_logps"] = logps(batch, T) / T
    x["ref_token_logps"] = x["policy_token_logps"] + 0.3 * torch.randn(batch, T, generator=g, dtype=torch.float64)
    x["policy_online_logps"] = logps(batch, K)
    x["ref_online_logps"] = near(x["policy_online_logps"])
    x["online_token_mask"] = uniform(batch, K, T) < 0.8
    x["policy_online_token_logps"] = logps(batch, K, T) / T
    x["ref_online_token_logps"] = x["policy_online_token_logps"] + 0.3 * torch.randn(
        batch, K, T, generator=g, dtype=torch.float64
    )
    for key, value in x.items():
        if key.startswith(("policy_", "slow_")):
            value.requires_grad_(True)
    return x


# ----------------------------------------------------------------------------------------------------------------
# References, one formula each. `x` holds the inputs (fresh leaves), `b` is beta; each returns per-example losses.
# ----------------------------------------------------------------------------------------------------------------


def lengths(x, side):
    return x[f"{side}_lengths"].double().clamp(min=1)


def dpo_reference(
    loss_type,
    x,
    b,
    *,
    ld_alpha=None,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=0.5,
    label_smoothing=None,
    discopop_tau=0.05,
    use_weighting=False,
):
    pc, pr, rc, rr = (
        x["policy_chosen_logps"],
        x["policy_rejected_logps"],
        x["ref_chosen_logps"],
        x["ref_rejected_logps"],
    )
    if ld_alpha is not None:  # public + alpha * verbose, with public = total - verbose
        pc = pc - (1 - ld_alpha) * x["policy_chosen_verbose_logps"]
        pr = pr - (1 - ld_alpha) * x["policy_rejected_verbose_logps"]
        rc = rc - (1 - ld_alpha) * x["ref_chosen_verbose_logps"]
        rr = rr - (1 - ld_alpha) * x["ref_rejected_verbose_logps"]
    hc, hr = pc - rc, pr - rr

    def score(h):
        if f_divergence_type == "forward_kl":
            return 1 - torch.exp(-h)
        if f_divergence_type == "js_divergence":
            return math.log(2) + logsig(h)
        if f_divergence_type == "alpha_divergence" and f_alpha_divergence_coef != 1.0:
            a = f_alpha_divergence_coef
            return (torch.exp((a - 1) * h) - 1) / (a - 1)  # its a -> 1 limit is log t = h
        return h

    sc, sr = score(hc), score(hr)
    d = sc - sr
    if label_smoothing is None:  # prefuse's defaults: the EXO paper's 1e-3 for exo_pair, else 0
        label_smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
    eps = label_smoothing
    lc, lr = lengths(x, "chosen"), lengths(x, "rejected")
    if loss_type == "sigmoid":
        loss = -logsig(b * d)
    elif loss_type == "hinge":
        loss = torch.clamp(1 - b * d, min=0)
    elif loss_type == "ipo":
        loss = (sc / lc - sr / lr - 1 / (2 * b)) ** 2
    elif loss_type == "exo_pair":
        q = sig(b * d)
        loss = q * (torch.log(q) - math.log(1 - eps)) + (1 - q) * (torch.log(1 - q) - math.log(eps))
    elif loss_type == "nca_pair":
        loss = -logsig(b * hc) - 0.5 * logsig(-b * hc) - 0.5 * logsig(-b * hr)
    elif loss_type == "robust":
        loss = ((1 - eps) * -logsig(b * d) - eps * -logsig(-b * d)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        loss = -logsig(b * hc) - logsig(-b * hr)
    elif loss_type == "sppo_hard":
        loss = (hc - 1 / (2 * b)) ** 2 + (hr + 1 / (2 * b)) ** 2
    elif loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        else:
            delta = torch.sort(hc).values - torch.sort(hr).values
        loss = -(1 - eps) * logsig(b * delta) - eps * logsig(-b * delta)
    elif loss_type == "apo_zero":
        loss = (1 - sig(b * hc)) + sig(b * hr)
    elif loss_type == "apo_down":
        loss = sig(b * hc) + (1 - sig(b * (hc - hr)))
    elif loss_type == "discopop":
        z = b * d
        m = sig(z / discopop_tau)
        loss = -logsig(z) * (1 - m) + torch.exp(-z) * m
    elif loss_type == "sft":
        raw = x["policy_chosen_logps"]
        loss = (-raw.sum() / x["chosen_lengths"].double().sum()).expand(raw.shape[0])
    elif loss_type == "sigmoid_norm":
        loss = -logsig(b * (sc / lc - sr / lr))
    else:
        raise AssertionError(loss_type)
    if use_weighting:
        with torch.no_grad():
            wc = torch.exp((x["policy_chosen_logps"] - x["policy_chosen_log_sum_sq_probs"]) / lc)
            wr = torch.exp((x["policy_rejected_logps"] - x["policy_rejected_log_sum_sq_probs"]) / lr)
        loss = loss * wc * wr
    return loss


def cpo_reference(x, b, *, loss_type="sigmoid", cpo_alpha=1.0, simpo_gamma=0.5, label_smoothing=0.0, alpha=0.0):
    c, r = x["policy_chosen_logps"], x["policy_rejected_logps"]
    if loss_type in ("ipo", "simpo"):
        c, r = c / lengths(x, "chosen"), r / lengths(x, "rejected")
    if alpha != 0:
        c, r = (1 - torch.exp(-alpha * c)) / alpha, (1 - torch.exp(-alpha * r)) / alpha
    z = c - r
    if loss_type == "simpo":
        z = z - simpo_gamma / b
    if loss_type in ("sigmoid", "simpo"):
        loss = -(1 - label_smoothing) * logsig(b * z) - label_smoothing * logsig(-b * z)
    elif loss_type == "hinge":
        loss = torch.clamp(1 - b * z, min=0)
    else:
        loss = (z - 1 / (2 * b)) ** 2
    nll = -x["policy_chosen_logps"].sum() / x["chosen_lengths"].double().sum()
    return loss + cpo_alpha * nll


def orpo_reference(x, b, *, with_prompt=False):
    ac = x["policy_chosen_logps"] / lengths(x, "chosen")
    ar = x["policy_rejected_logps"] / lengths(x, "rejected")
    log_odds = (ac - torch.log(1 - torch.exp(ac))) - (ar - torch.log(1 - torch.exp(ar)))
    nll_sum, nll_count = x["policy_chosen_logps"].sum(), x["chosen_lengths"].double().sum()
    if with_prompt:
        nll_sum = nll_sum + x["policy_chosen_prompt_logps"].sum()
        nll_count = nll_count + x["chosen_prompt_lengths"].double().sum()
    return -nll_sum / nll_count - b * logsig(log_odds)


def kto_reference(x, b, *, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0):
    h = x["policy_logps"] - x["ref_logps"]
    z0 = 0.0
    if loss_type == "kto":
        z0 = torch.clamp((x["policy_kl_logps"] - x["ref_kl_logps"]).mean(), min=0).detach()
    good = x["labels"]
    if loss_type == "kto":
        loss = torch.where(good, 1 - sig(b * (h - z0)), 1 - sig(b * (z0 - h)))
    else:
        loss = torch.where(good, 1 - sig(b * h), sig(b * h))
    return loss * torch.where(good, desirable_weight, undesirable_weight)


def dpo_margin(x, b, prefix=""):
    hc = x[f"policy_{prefix}chosen_logps"] - x[f"ref_{prefix}chosen_logps"]
    hr = x[f"policy_{prefix}rejected_logps"] - x[f"ref_{prefix}rejected_logps"]
    return hc - hr


def selm_reference(x, b, *, alpha=0.001, with_ref=False):
    bonus = x["policy_sample_logps"] - (x["ref_sample_logps"].detach() if with_ref else 0)
    return -logsig(b * dpo_margin(x, b)) + alpha * b * bonus


def xpo_reference(x, b, *, alpha=1e-5, loss_type="sigmoid"):
    d = dpo_margin(x, b)
    base = -logsig(b * d) if loss_type == "sigmoid" else (d - 1 / (2 * b)) ** 2
    return base + alpha * x["policy_sample_logps"]


def online_ipo_reference(x, b, *, per_token=False):
    """tau on whole-response log-ratios, or (per_token) on their means per token as the offline ipo reads it."""
    if not per_token:
        return (dpo_margin(x, b) - (x["preference_probs"] - 0.5) / b) ** 2
    hc = (x["policy_chosen_logps"] - x["ref_chosen_logps"]) / x["chosen_lengths"].double()
    hr = (x["policy_rejected_logps"] - x["ref_rejected_logps"]) / x["rejected_lengths"].double()
    return (hc - hr - (x["preference_probs"] - 0.5) / b) ** 2


def nash_md_reference(x, b, *, kl_estimator="sequence"):
    pl, rl = x["policy_logps"], x["ref_logps"]
    if kl_estimator == "sequence":
        kl = (pl - rl).detach() * pl
    else:
        pt, rt, m = x["policy_token_logps"], x["ref_token_logps"], x["token_mask"].double()
        kl = ((pt - rt).detach() * pt * m).sum(-1)
    return b * kl - (x["preference_probs"] - 0.5) * pl


def hypo_kl_reference(x, b, *, kl_estimator="reinforce_rloo"):
    po, ro = x["policy_online_logps"], x["ref_online_logps"]
    if kl_estimator == "per_token_k3":
        # value: k3 summed over tokens; gradient: sum_t (reward-to-go of sg(log-ratio)) * grad log pi_t (score function)
        pt, rt, m = x["policy_online_token_logps"], x["ref_online_token_logps"], x["online_token_mask"].double()
        d = (pt - rt).detach() * m
        k3 = (torch.exp(-d) + d - 1) * m
        to_go = torch.stack([d[..., t:].sum(-1) for t in range(d.shape[-1])], -1)
        return (k3.sum(-1) + (to_go * (pt - pt.detach()) * m).sum(-1)).mean(-1)
    d = (po - ro).detach()
    total = torch.zeros_like(po[:, 0])
    for i in range(K):
        others = [d[:, j] for j in range(K) if j != i]
        baseline = sum(others) / len(others) if kl_estimator == "reinforce_rloo" else 0.0
        total = total + (d[:, i] - baseline) * po[:, i]
    return total / K


def hypo_reference(x, b, *, kl_coef=0.1, kl_estimator="reinforce_rloo"):
    return -logsig(b * dpo_margin(x, b)) + kl_coef * hypo_kl_reference(x, b, kl_estimator=kl_estimator).mean()


def ofs_reference(x, b, *, ofs_alpha=0.1, ofs_variant="slow_chases_fast", ofs_clamp=10.0):
    ref_m = x["ref_chosen_logps"] - x["ref_rejected_logps"]
    fast_m = x["policy_chosen_logps"] - x["policy_rejected_logps"]
    slow_m = x["slow_chosen_logps"] - x["slow_rejected_logps"]
    fast = -logsig(b * (fast_m - ref_m))
    slow = -logsig(b * (slow_m - ref_m))
    if ofs_variant == "slow_chases_fast":
        return fast + slow + ofs_alpha * -logsig(b * (slow_m - fast_m.detach()))
    chase = -logsig(torch.clamp(b * (fast_m - slow_m.detach()), -ofs_clamp, ofs_clamp))
    flee = -logsig(torch.clamp(b * (fast_m.detach() - slow_m), -ofs_clamp, ofs_clamp))
    return fast + ofs_alpha * chase + slow - ofs_alpha * flee


def srpo_reference(x, b, *, srpo_alpha=0.8):
    def h(name):
        return x[f"policy_{name}_logps"] - x[f"ref_{name}_logps"]

    imp = (0.5 - b * (h("chosen_given_rejected") - h("rejected_given_rejected"))) ** 2
    imp = imp + (0.5 - b * (h("chosen_given_chosen") - h("rejected_given_chosen"))) ** 2
    gen = (b * (h("chosen_given_rejected") + h("chosen") - h("rejected_given_chosen") - h("rejected")) - 1) ** 2
    return (1 - srpo_alpha) * gen + srpo_alpha * imp


def ratio(p, r, eps):
    return torch.clamp(torch.exp((p - r).detach()), 1 - eps, 1 + eps)


def alol_reference(kind, x, b, *, ppo_clip=0.9):
    p, r, a = x["policy_logps"], x["ref_logps"], x["advantages"]
    if kind == "alol":
        return -p * ratio(p, r, ppo_clip) * a.clamp(min=0)
    if kind == "alol_seq":
        pt, rt, m = x["policy_token_logps"], x["ref_token_logps"], x["token_mask"].double()
        return -(pt * ratio(pt, rt, ppo_clip) * m).sum(-1) * a.clamp(min=0)
    if kind == "alol_ref_free":
        return -p * a
    if kind == "alol_kl":
        return -p * a.clamp(min=0) + b * (p - r)
    if kind == "wbc":
        return -p * x["rewards"]
    if kind == "r_gold":  # GOLD's token weight max(pi(y_t), 0.1), without gradient, times the reward
        pt, m = x["policy_token_logps"], x["token_mask"].double()
        return -(pt * torch.clamp(torch.exp(pt.detach()), min=0.1) * m).sum(-1) * x["rewards"]
    return -p * ratio(p, r, ppo_clip) * x["rewards"].clamp(min=0)  # r_lol


def mixed_reference(x, b, *, mixed_p=0.5, with_draw=False):
    offline = -logsig(b * dpo_margin(x, b))
    online = -logsig(b * dpo_margin(x, b, "online_"))
    a = x["use_offline"].double() if with_draw else mixed_p
    return a * offline + (1 - a) * online


def avg_reference(x, b, *, avg_gamma=0.5):
    hc = x["policy_chosen_logps"] - x["ref_chosen_logps"]
    external = -logsig(b * (hc - (x["policy_rejected_logps"] - x["ref_rejected_logps"])))
    generated = -logsig(b * (hc - (x["policy_online_rejected_logps"] - x["ref_online_rejected_logps"])))
    return avg_gamma * external + (1 - avg_gamma) * generated


# ----------------------------------------------------------------------------------------------------------------
# Cases: (objective name, hyper-parameters, extra optional inputs to pass, reference)
# ----------------------------------------------------------------------------------------------------------------

LD = (
    "policy_chosen_verbose_logps",
    "policy_rejected_verbose_logps",
    "ref_chosen_verbose_logps",
    "ref_rejected_verbose_logps",
)
WPO = ("policy_chosen_log_sum_sq_probs", "policy_rejected_log_sum_sq_probs")
LENGTHS = ("chosen_lengths", "rejected_lengths")
DPO_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm")


PAIR = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _dpo_case(loss_type, extra=(), **hp):
    return (loss_type, hp, PAIR + LENGTHS + tuple(extra), lambda x, b: dpo_reference(loss_type, x, b, **hp))


CASES = [_dpo_case(t) for t in DPO_TYPES]
CASES += [
    _dpo_case("exo_pair", label_smoothing=0.05),
    _dpo_case("robust", label_smoothing=0.2),
    _dpo_case("aot", label_smoothing=0.1),
    _dpo_case("aot_unpaired", label_smoothing=0.3),
    _dpo_case("discopop", discopop_tau=0.5),
]
CASES += [
    _dpo_case(t, f_divergence_type=f)
    for t in F_DIVERGENCE_TYPES
    for f in ("forward_kl", "js_divergence", "alpha_divergence")
]
CASES += [
    _dpo_case("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    _dpo_case("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
    _dpo_case("hinge", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5),
]
CASES += [_dpo_case(t, LD, ld_alpha=0.4) for t in DPO_TYPES]
CASES += [_dpo_case(t, WPO, use_weighting=True) for t in DPO_TYPES if t not in ("aot", "aot_unpaired")]
CASES += [
    _dpo_case("sigmoid", LD + WPO, ld_alpha=0.0, use_weighting=True),
    _dpo_case("ipo", LD, ld_alpha=1.0, f_divergence_type="js_divergence"),
]
CASES += [
    ("cpo", {}, (), cpo_reference),
    *[
        ("cpo", {"loss_type": t}, (), lambda x, b, t=t: cpo_reference(x, b, loss_type=t))
        for t in ("hinge", "ipo", "simpo")
    ],
    (
        "cpo",
        {"label_smoothing": 0.1, "cpo_alpha": 0.3},
        (),
        lambda x, b: cpo_reference(x, b, label_smoothing=0.1, cpo_alpha=0.3),
    ),
    ("cpo", {"alpha": 0.05, "loss_type": "hinge"}, (), lambda x, b: cpo_reference(x, b, alpha=0.05, loss_type="hinge")),
    ("simpo", {}, (), lambda x, b: cpo_reference(x, b, loss_type="simpo", cpo_alpha=0.0)),
    (
        "simpo",
        {"simpo_gamma": 1.0, "label_smoothing": 0.1, "alpha": 0.3},
        (),
        lambda x, b: cpo_reference(
            x, b, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=1.0, label_smoothing=0.1, alpha=0.3
        ),
    ),
    ("orpo", {}, (), orpo_reference),
    (
        "orpo",
        {},
        ("policy_chosen_prompt_logps", "chosen_prompt_lengths"),
        lambda x, b: orpo_reference(x, b, with_prompt=True),
    ),
    ("kto", {}, (), kto_reference),
    (
        "kto",
        {"desirable_weight": 1.3, "undesirable_weight": 0.6},
        (),
        lambda x, b: kto_reference(x, b, desirable_weight=1.3, undesirable_weight=0.6),
    ),
    ("apo_zero_unpaired", {}, (), lambda x, b: kto_reference(x, b, loss_type="apo_zero_unpaired")),
    (
        "apo_zero_unpaired",
        {"undesirable_weight": 2.0},
        (),
        lambda x, b: kto_reference(x, b, loss_type="apo_zero_unpaired", undesirable_weight=2.0),
    ),
    ("selm", {}, (), selm_reference),
    ("selm", {"alpha": 0.05}, ("ref_sample_logps",), lambda x, b: selm_reference(x, b, alpha=0.05, with_ref=True)),
    ("xpo", {}, (), xpo_reference),
    ("xpo", {"alpha": 0.01, "loss_type": "ipo"}, (), lambda x, b: xpo_reference(x, b, alpha=0.01, loss_type="ipo")),
    ("online_ipo", {}, (), online_ipo_reference),
    ("online_ipo", {"average_log_prob": True}, LENGTHS, lambda x, b: online_ipo_reference(x, b, per_token=True)),
    ("nash_md", {}, (), nash_md_reference),
    (
        "nash_md",
        {"kl_estimator": "token"},
        ("policy_token_logps", "ref_token_logps", "token_mask"),
        lambda x, b: nash_md_reference(x, b, kl_estimator="token"),
    ),
    ("hypo_kl", {}, (), hypo_kl_reference),
    (
        "hypo_kl",
        {"kl_estimator": "reinforce_nobaseline"},
        (),
        lambda x, b: hypo_kl_reference(x, b, kl_estimator="reinforce_nobaseline"),
    ),
    (
        "hypo_kl",
        {"kl_estimator": "per_token_k3"},
        ("policy_online_token_logps", "ref_online_token_logps", "online_token_mask"),
        lambda x, b: hypo_kl_reference(x, b, kl_estimator="per_token_k3"),
    ),
    ("hypo", {}, (), hypo_reference),
    (
        "hypo",
        {"kl_coef": 0.7, "kl_estimator": "reinforce_nobaseline"},
        (),
        lambda x, b: hypo_reference(x, b, kl_coef=0.7, kl_estimator="reinforce_nobaseline"),
    ),
    ("ofs_dpo", {}, (), ofs_reference),
    (
        "ofs_dpo",
        {"ofs_variant": "two_sided", "ofs_alpha": 0.5, "ofs_clamp": 0.3},
        (),
        lambda x, b: ofs_reference(x, b, ofs_variant="two_sided", ofs_alpha=0.5, ofs_clamp=0.3),
    ),
    ("srpo", {}, (), srpo_reference),
    ("srpo", {"srpo_alpha": 0.3}, (), lambda x, b: srpo_reference(x, b, srpo_alpha=0.3)),
    *[
        (kind, {}, (), lambda x, b, kind=kind: alol_reference(kind, x, b))
        for kind in ("alol", "alol_seq", "alol_ref_free", "alol_kl", "wbc", "r_lol", "r_gold")
    ],
    ("alol", {"ppo_clip": 0.2}, (), lambda x, b: alol_reference("alol", x, b, ppo_clip=0.2)),
    ("alol_seq", {"ppo_clip": 0.2}, (), lambda x, b: alol_reference("alol_seq", x, b, ppo_clip=0.2)),
    ("mixed_dpo", {}, (), mixed_reference),
    ("mixed_dpo", {"mixed_p": 0.8}, ("use_offline",), lambda x, b: mixed_reference(x, b, with_draw=True)),
    ("mixed_dpo", {"mixed_p": 0.8}, (), lambda x, b: mixed_reference(x, b, mixed_p=0.8)),
    ("avg_dpo", {}, (), avg_reference),
    ("avg_dpo", {"avg_gamma": 0.25}, (), lambda x, b: avg_reference(x, b, avg_gamma=0.25)),
]


def grpo_reference(x, b, *, grpo_loss_type="dapo", epsilon=0.2):
    """TRL 1.16's GRPO loss, per sample so that the mean is the batch loss; old policy = the current one."""
    lp, m, r = x["policy_online_token_logps"], x["online_token_mask"].double(), x["rewards"]
    adv = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-4)).unsqueeze(-1)
    coef_1 = torch.exp(lp - lp.detach())
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if b != 0:
        d = x["ref_online_token_logps"] - lp
        # TRL 1.16's default use_bias_correction_kl: k3 times the ratio pi / sg(pi) (1 in value; the reverse KL's
        # gradient, -d per token, instead of the forward KL's 1 - exp(d))
        per_token = per_token + b * (torch.exp(d) - d - 1) * coef_1
    sums = (per_token * m).sum(-1).reshape(-1)
    if grpo_loss_type == "grpo":
        return sums / m.sum(-1).reshape(-1).clamp(min=1)
    return sums * sums.numel() / m.sum()


def rloo_reference(x, b, *, epsilon=0.2):
    """TRL 1.16's RLOO loss per sample: the KL penalty in the reward, leave-one-out baseline, clipped ratio."""
    lp, r = x["policy_online_logps"], x["rewards"]
    r = r - b * (lp.detach() - x["ref_online_logps"])
    k = r.shape[-1]
    adv = r - (r.sum(-1, keepdim=True) - r) / (k - 1)
    coef_1 = torch.exp(lp - lp.detach())
    return (-torch.min(coef_1 * adv, torch.clamp(coef_1, 1 - epsilon, 1 + epsilon) * adv)).reshape(-1)


GROUP_OBJECTIVES = ("grpo", "rloo")
CASES += [
    ("grpo", {}, ("ref_online_token_logps",), grpo_reference),
    ("grpo", {"grpo_loss_type": "grpo"}, ("ref_online_token_logps",),
     lambda x, b: grpo_reference(x, b, grpo_loss_type="grpo")),
    ("rloo", {}, ("ref_online_logps",), rloo_reference),
]


def _case_id(case):
    name, hp, extra, _ = case
    options = ",".join(f"{k}={v}" for k, v in hp.items())
    return f"{name}[{options}]" if options else name


def _leaves(x, keys):
    return {k: x[k].detach().clone().requires_grad_(x[k].requires_grad) for k in keys}


@pytest.mark.parametrize("batch", BATCH_SIZES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_objective_matches_reference(case, seed, batch):
    name, hparams, extra, reference = case
    spec = get_objective(name)
    beta = 0.1 if seed != 2 else 0.7
    x = make_inputs(seed, batch)
    if name in GROUP_OBJECTIVES:
        x["rewards"] = x["group_rewards"]
    keys = sorted(spec.requires | set(extra))
    ours, theirs = _leaves(x, keys), _leaves(x, x.keys())

    losses, metrics = spec.fn(beta=beta, **_leaves(x, keys), **hparams)
    expected = reference(theirs, beta)
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
    assert losses.dtype == torch.float64

    loss, reduced = objective_loss(name, beta=beta, **ours, **hparams)
    expected_mean = expected.mean()
    torch.testing.assert_close(loss, expected_mean, rtol=1e-10, atol=1e-12)
    assert all(v.dim() == 0 and math.isfinite(float(v)) for v in reduced.values())

    grad_keys = [k for k in keys if ours[k].requires_grad]
    assert grad_keys, "every objective has a policy statistic to differentiate"
    got = torch.autograd.grad(loss, [ours[k] for k in grad_keys], allow_unused=True)
    want = torch.autograd.grad(expected_mean, [theirs[k] for k in grad_keys], allow_unused=True)
    for key, g_got, g_want in zip(grad_keys, got, want):
        g_got = torch.zeros_like(ours[key]) if g_got is None else g_got
        g_want = torch.zeros_like(ours[key]) if g_want is None else g_want
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12, msg=lambda m: f"d loss / d {key}: {m}")


def test_every_objective_has_a_reference_case():
    covered = {case[0] for case in CASES}
    assert set(list_objectives()) == covered


def test_trl_metric_names_for_pair_objectives():
    x = make_inputs(0, 7)
    keys = ("policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps")
    _, metrics = objective_loss("sigmoid", beta=0.1, **{k: x[k] for k in keys})
    assert set(metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    margins = 0.1 * (
        (x["policy_chosen_logps"] - x["ref_chosen_logps"]) - (x["policy_rejected_logps"] - x["ref_rejected_logps"])
    )
    torch.testing.assert_close(metrics["rewards/margins"], margins.mean().float().detach())
    torch.testing.assert_close(metrics["rewards/accuracies"], (margins > 0).float().mean())
