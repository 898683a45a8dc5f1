"""algorithms/hparams.py: every registered objective has its hyper-parameter rules, the values that divide by zero
or make the loss constant are refused in one line naming the field, and the defaults pass."""
import pytest
import torch

from prefuse.algorithms import get_objective, list_objectives, objective_loss
from prefuse.algorithms.hparams import RULES, check_hparams


def test_every_registered_objective_has_its_rules():
    assert sorted(RULES) == list_objectives()  # a new objective must say which of its values are meaningless
    for name, rules in RULES.items():
        accepted = {"beta", *get_objective(name).hparams}
        assert {rule.name for rule in rules} <= accepted, name


@pytest.mark.parametrize("name", list_objectives())
def test_the_defaults_pass(name):
    beta = {"grpo": 0.0, "rloo": 0.05, "selm": 0.01}.get(name, 0.1)
    check_hparams(name, beta, {})


@pytest.mark.parametrize("name", ["sft", "orpo", "nash_md", "hypo_kl", "grpo", "rloo", "alol", "alol_seq",
                                  "alol_ref_free", "alol_kl", "wbc", "r_lol", "r_gold"])
def test_beta_zero_is_meaningful_where_beta_is_a_kl_weight_or_unused(name):
    check_hparams(name, 0.0, {})


def test_beta_zero_really_makes_the_dpo_loss_constant_and_ipo_divide_by_zero():
    # what the rules stand on: sigmoid at beta 0 is log 2 with no gradient; ipo at beta 0 divides by zero
    chosen = torch.tensor([-3.0, -5.0], requires_grad=True)
    stats = {"policy_chosen_logps": chosen, "policy_rejected_logps": torch.tensor([-4.0, -2.0]),
             "ref_chosen_logps": torch.tensor([-3.5, -4.0]), "ref_rejected_logps": torch.tensor([-4.5, -2.5])}
    loss, _ = objective_loss("sigmoid", beta=0.0, **stats)
    loss.backward()
    assert loss.item() == pytest.approx(0.693147, abs=1e-6) and chosen.grad.abs().max() == 0
    with pytest.raises(ZeroDivisionError):
        objective_loss("ipo", beta=0.0, chosen_lengths=torch.tensor([2, 3]), rejected_lengths=torch.tensor([2, 3]),
                       **stats)


@pytest.mark.parametrize("name, beta, hparams, line", [
    ("ipo", 0.0, {}, "beta: 0.0 is refused for ipo: 0 divides by zero in ipo's 1/(2 beta)"),
    ("sigmoid", 0.0, {}, "beta: 0.0 is refused for sigmoid: 0 multiplies every log-ratio of sigmoid by 0"),
    ("exo_pair", 0.1, {"label_smoothing": 0.0}, "label_smoothing: 0.0 is refused for exo_pair: must lie in (0, 1)"),
    ("kto", 0.1, {"desirable_weight": 0, "undesirable_weight": 0},
     "desirable_weight: 0 with undesirable_weight 0 is refused for kto"),
    ("discopop", 0.1, {"discopop_tau": "x"}, "discopop_tau: 'x' is refused for discopop: must be > 0"),
])
def test_a_refusal_is_one_line_naming_the_field(name, beta, hparams, line):
    with pytest.raises(ValueError) as error:
        check_hparams(name, beta, hparams)
    assert str(error.value).startswith(line) and "\n" not in str(error.value)
