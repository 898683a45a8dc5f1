"""PreferenceLoss over sequence roles against the objective on float64 statistics computed plainly.

For every registered objective: the rows of its roles are scattered through the batch (with rows no role reads,
prompts and padding ignored), the float64 reference takes full logits, log_softmax and gather per row
(tests/reference.py), forms each role's sums, counts and token values by indexing, and calls the objective.
Values, metrics and gradients of hidden and weight must agree, on both backends and in both modes.
"""
import pytest
import torch

import prefuse
from prefuse.algorithms.roles import role_inputs
from prefuse.preference import PreferenceLoss
from tests.reference import logprobs64

BACKENDS = [pytest.param("torch"), pytest.param("triton", marks=pytest.mark.interpreter)]
SAMPLES_PER_PROMPT = {"online": 3}  # roles read as k samples per prompt, index [P, k]
TOKEN_LEVEL = {"alol_seq": {}, "grpo": {}, "nash_md": {"kl_estimator": "token"},
               "hypo_kl": {"kl_estimator": "per_token_k3"}, "hypo": {"kl_estimator": "per_token_k3"}}
N_EXAMPLES, LENGTH, HIDDEN, VOCAB = 3, 8, 16, 150


def extras(name, gen):
    """The non-sequence inputs an objective takes, drawn at random: [B] per example ([B, k] for the
    objectives of k samples per prompt)."""
    spec = prefuse.get_objective(name)
    per_prompt = any(s.role in SAMPLES_PER_PROMPT for s in role_inputs([spec]))
    values = {
        "preference_probs": torch.rand(N_EXAMPLES, generator=gen, dtype=torch.float64),
        "advantages": torch.randn(N_EXAMPLES, generator=gen, dtype=torch.float64),
        "rewards": torch.rand((N_EXAMPLES, 3) if per_prompt else (N_EXAMPLES,), generator=gen, dtype=torch.float64),
        "labels": torch.tensor([True, False, True]),
        "use_offline": torch.tensor([True, False, False]),
        "slow_chosen_logps": -20 * torch.rand(N_EXAMPLES, generator=gen, dtype=torch.float64),
        "slow_rejected_logps": -20 * torch.rand(N_EXAMPLES, generator=gen, dtype=torch.float64),
    }
    return {k: v for k, v in values.items() if k in spec.requires}


def scattered_batch(name, seed=0, shared_rows=()):
    """hidden [S, T, H], weight, labels [S, T], ref_hidden, roles {role: [B] or [P, k]}: the roles' rows in a
    random order, two rows that no role reads, prompts of 2-3 tokens and some padding."""
    gen = torch.Generator().manual_seed(seed)
    roles = sorted({s.role for s in role_inputs([prefuse.get_objective(name)]) if s.required})
    shapes = {r: (N_EXAMPLES, SAMPLES_PER_PROMPT[r]) if r in SAMPLES_PER_PROMPT else (N_EXAMPLES,) for r in roles}
    n_seq = sum(torch.Size(s).numel() for s in shapes.values()) + 2
    order = torch.randperm(n_seq, generator=gen)
    index, start = {}, 0
    for role in roles:
        size = torch.Size(shapes[role]).numel()
        index[role] = order[start:start + size].view(shapes[role])
        start += size
    for role, other in shared_rows:  # a row read by two roles of the same example
        index[role] = index[other].clone()
    hidden = torch.randn(n_seq, LENGTH, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64) / 2
    labels = torch.randint(0, VOCAB, (n_seq, LENGTH), generator=gen)
    prompt = torch.randint(2, 4, (n_seq,), generator=gen)
    pad = torch.randint(0, 3, (n_seq,), generator=gen)
    positions = torch.arange(LENGTH)
    labels[(positions < prompt[:, None]) | (positions >= LENGTH - pad[:, None])] = -100
    ref_hidden = hidden + 0.3 * torch.randn(n_seq, LENGTH, HIDDEN, generator=gen, dtype=torch.float64)
    return hidden.requires_grad_(), weight.requires_grad_(), labels, ref_hidden, index


def plain_inputs(name, hidden, weight, labels, ref_hidden, roles):
    """Every role statistic of the objective from float64 full-logit log-probs, by indexing."""
    policy = logprobs64(hidden, weight, labels)                 # [S, T]
    ref = logprobs64(ref_hidden, weight.detach(), labels)
    mask = labels != -100
    tables = {("policy", "logps"): policy.sum(-1), ("ref", "logps"): ref.sum(-1), (None, "lengths"): mask.sum(-1),
              ("policy", "token_logps"): policy, ("ref", "token_logps"): ref, (None, "token_mask"): mask}
    out = {}
    for stat in role_inputs([prefuse.get_objective(name)]):
        if stat.stat == "verbose_logps":
            if {"chosen", "rejected"} <= set(roles):
                out[stat.name] = verbose64(policy if stat.source == "policy" else ref, mask, roles, stat.role)
        elif stat.role in roles:
            out[stat.name] = tables[(stat.source, stat.stat)][roles[stat.role]]
    return out


def verbose64(token_logps, mask, roles, role):
    """LD-DPO's verbose part, example by example: the response's log-probs after its first min(len_c, len_r)."""
    partner = "rejected" if role == "chosen" else "chosen"
    out = []
    for own, other in zip(roles[role].tolist(), roles[partner].tolist()):
        shared = min(int(mask[own].sum()), int(mask[other].sum()))
        values = token_logps[own][mask[own]]  # the response's tokens in order
        out.append(values[shared:].sum())
    return torch.stack(out)


def close(got, want, rel=2e-5):
    scale = 1 + want.double().abs().max().item()
    return (got.double() - want.double()).abs().max().item() <= rel * scale


def uses_reference(name):
    return any(s.source == "ref" for s in role_inputs([prefuse.get_objective(name)]))


def check_against_plain(name, backend, mode, hparams=None, shared_rows=()):
    hparams = dict(hparams or {})
    hidden, weight, labels, ref_hidden, roles = scattered_batch(name, shared_rows=shared_rows)
    gen = torch.Generator().manual_seed(1)
    extra = extras(name, gen)
    rows_per_example = max(int((labels[torch.cat([v[i].reshape(-1) for v in roles.values()]).unique()]
                                != -100).sum()) for i in range(N_EXAMPLES))
    loss_fn = PreferenceLoss(name, beta=0.2, mode=mode, backend=backend, chunk_size=rows_per_example + 2,
                             **hparams)
    ref_kw = {"ref_hidden": ref_hidden} if uses_reference(name) else {}
    loss, metrics = loss_fn(hidden, weight, labels, roles=roles, **ref_kw, **extra)
    expected, expected_metrics = prefuse.objective_loss(
        name, beta=0.2, **plain_inputs(name, hidden, weight, labels, ref_hidden, roles), **extra, **hparams)
    assert loss_fn.last_mode == mode
    assert close(loss, expected), (float(loss), float(expected))
    assert set(metrics) == set(expected_metrics)
    for key, value in expected_metrics.items():
        assert close(metrics[key], value), key
    got = torch.autograd.grad(loss, [hidden, weight])
    want = torch.autograd.grad(expected, [hidden, weight])
    assert want[0].abs().max() > 0  # the objective reaches the head: the comparison below can fail
    for g, w in zip(got, want):
        assert close(g, w)


ALL = prefuse.list_objectives()
SEPARABLE = [n for n in ALL if prefuse.get_objective(n).separable]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ALL)
def test_every_objective_recompute(name, backend):
    check_against_plain(name, backend, "recompute", TOKEN_LEVEL.get(name))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", SEPARABLE)
def test_every_separable_objective_in_forward(name, backend):
    check_against_plain(name, backend, "in_forward", TOKEN_LEVEL.get(name))


@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
@pytest.mark.parametrize("name,hparams", [("nash_md", {}), ("hypo_kl", {}), ("hypo", {})])
def test_sequence_level_options_of_token_objectives(name, hparams, mode):
    """The objectives with optional token inputs, with their default (sequence-level) estimators."""
    if mode == "in_forward" and not prefuse.get_objective(name).separable:
        pytest.skip("not separable")
    check_against_plain(name, "torch", mode, hparams)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "apo_zero"])
def test_ld_dpo_verbose_sums(name, mode, backend):
    """ld_alpha: the part of each response past the pair's shared length, from the role's token log-probs."""
    check_against_plain(name, backend, mode, {"ld_alpha": 0.3})


@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
def test_one_row_in_two_roles_of_an_example(mode):
    """XPO's sample is one side of its judged pair: the same row in two roles of one example still groups."""
    check_against_plain("xpo", "torch", mode, shared_rows=[("sample", "rejected")])


def test_a_row_shared_by_two_examples_is_not_grouped():
    hidden, weight, labels, ref_hidden, roles = scattered_batch("sigmoid")
    roles["rejected"] = roles["rejected"].clone()
    roles["rejected"][1] = roles["rejected"][0]  # examples 0 and 1 share a rejected response
    loss_fn = PreferenceLoss("sigmoid", beta=0.2)
    loss, _ = loss_fn(hidden, weight, labels, roles=roles, ref_hidden=ref_hidden)
    assert loss_fn.last_mode == "recompute"
    expected, _ = prefuse.objective_loss("sigmoid", beta=0.2,
                                         **plain_inputs("sigmoid", hidden, weight, labels, ref_hidden, roles))
    assert close(loss, expected)
    with pytest.raises(ValueError, match="no sequence shared by two examples"):
        PreferenceLoss("sigmoid", mode="in_forward")(hidden, weight, labels, roles=roles, ref_hidden=ref_hidden)


def test_rows_no_role_reads_never_reach_the_matmul(chunk_rows):
    hidden, weight, labels, ref_hidden, roles = scattered_batch("selm")
    read = torch.cat([v.reshape(-1) for v in roles.values()]).unique()
    PreferenceLoss("selm", beta=0.2)(hidden, weight, labels, roles=roles, ref_hidden=ref_hidden)
    # policy and reference each see exactly the labeled rows of the read sequences
    assert sum(chunk_rows) == 2 * int((labels[read] != -100).sum())


def test_policy_equal_to_reference_gives_zero_rewards_with_roles():
    hidden, weight, labels, _, roles = scattered_batch("selm")
    for mode in ("in_forward", "recompute"):
        _, metrics = PreferenceLoss("selm", mode=mode)(hidden, weight, labels, roles=roles,
                                                       ref_hidden=hidden.detach())
        assert metrics["rewards/chosen"] == 0 and metrics["rewards/margins"] == 0


def test_role_errors_name_the_role():
    hidden, weight, labels, ref_hidden, roles = scattered_batch("selm")
    loss_fn = PreferenceLoss("selm")
    without_sample = {k: v for k, v in roles.items() if k != "sample"}
    with pytest.raises(ValueError, match=r"policy_sample_logps: \['selm'\] need it; pass roles=\{'sample'"):
        loss_fn(hidden, weight, labels, roles=without_sample, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match=r"roles: \['online'\] not read by \['selm'\]"):
        loss_fn(hidden, weight, labels, roles={**roles, "online": roles["sample"]}, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match=r"roles\['sample'\]: row indices must lie in \[0, "):
        loss_fn(hidden, weight, labels, roles={**roles, "sample": roles["sample"] + 100}, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="ref_chosen_logps: .* pass ref_hidden"):
        loss_fn(hidden, weight, labels, roles=roles)


def test_precomputed_reference_per_role():
    """ref_<role>_logps given for every role: no reference pass, the same loss as with ref_hidden."""
    hidden, weight, labels, ref_hidden, roles = scattered_batch("selm")
    plain = plain_inputs("selm", hidden, weight, labels, ref_hidden, roles)
    given = {k: v.detach() for k, v in plain.items() if k.startswith("ref_")}
    loss, _ = PreferenceLoss("selm", beta=0.2)(hidden, weight, labels, roles=roles, **given)
    expected, _ = prefuse.objective_loss("selm", beta=0.2, **plain)
    assert close(loss, expected)
