"""Hyper-parameters that make an objective meaningless are refused by `prefuse train` in one line with the reason,
before anything is written: every registered objective x its bad values (algorithms/hparams.py's RULES)."""
import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.cli import main
from tests import test_engine_train

args = test_engine_train.args
files = test_engine_train.files  # its module fixture: a tiny Llama, its tokenizer and 16 pairs

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")

BETA_SCALES = ["sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "aot", "aot_unpaired", "apo_zero",
               "apo_down", "discopop", "sigmoid_norm", "kto", "apo_zero_unpaired", "mixed_dpo", "avg_dpo", "ofs_dpo",
               "selm", "hypo", "srpo"]  # today: a constant loss (0.6931 for sigmoid) and nothing learned, exit 0
BETA_DIVIDES = ["ipo", "sppo_hard", "simpo", "online_ipo"]  # today: ZeroDivisionError

CASES = (
    [(name, "--beta 0", f"beta: 0.0 is refused for {name}: 0 multiplies every log-ratio") for name in BETA_SCALES]
    + [(name, "--beta 0", f"beta: 0.0 is refused for {name}: 0 divides by zero") for name in BETA_DIVIDES]
    + [("cpo", "--beta 0", "beta: 0.0 is refused for cpo: 0 leaves cpo's preference term constant"),
       ("xpo", "--beta 0", "beta: 0.0 is refused for xpo: 0 leaves xpo's sigmoid term constant"),
       ("exo_pair", "--label_smoothing 0", "label_smoothing: 0 is refused for exo_pair: must lie in (0, 1)"),
       ("exo_pair", "--label_smoothing 1", "label_smoothing: 1 is refused for exo_pair: must lie in (0, 1)"),
       ("robust", "--label_smoothing 0.5", "label_smoothing: 0.5 is refused for robust: must lie in [0, 0.5)"),
       ("aot", "--label_smoothing 0.5", "label_smoothing: 0.5 is refused for aot: must lie in [0, 0.5)"),
       ("aot_unpaired", "--label_smoothing 0.7", "label_smoothing: 0.7 is refused for aot_unpaired"),
       ("simpo", "--label_smoothing -0.1", "label_smoothing: -0.1 is refused for simpo"),
       ("cpo", "--label_smoothing 0.5", "label_smoothing: 0.5 is refused for cpo"),
       ("cpo", "--cpo_alpha -1", "cpo_alpha: -1 is refused for cpo: must be >= 0"),
       ("discopop", "--discopop_tau 0", "discopop_tau: 0 is refused for discopop: must be > 0: discopop divides"),
       ("kto", "--desirable_weight -1", "desirable_weight: -1 is refused for kto: must be >= 0"),
       ("apo_zero_unpaired", "--desirable_weight 0 --undesirable_weight 0",
        "desirable_weight: 0 with undesirable_weight 0 is refused for apo_zero_unpaired"),
       ("ofs_dpo", "--ofs_alpha -0.1", "ofs_alpha: -0.1 is refused for ofs_dpo: must be >= 0"),
       ("ofs_dpo", "--ofs_clamp 0", "ofs_clamp: 0 is refused for ofs_dpo: must be > 0"),
       ("selm", "--alpha -1", "alpha: -1 is refused for selm: must be >= 0"),
       ("xpo", "--alpha -1", "alpha: -1 is refused for xpo: must be >= 0"),
       ("hypo", "--kl_coef -1", "kl_coef: -1 is refused for hypo: must be >= 0"),
       ("srpo", "--srpo_alpha 1.5", "srpo_alpha: 1.5 is refused for srpo: must lie in [0, 1]"),
       ("grpo", "--epsilon -0.1", "epsilon: -0.1 is refused for grpo: must be >= 0"),
       ("rloo", "--epsilon_high -1", "epsilon_high: -1 is refused for rloo: must be >= 0"),
       ("alol", "--ppo_clip -0.5", "ppo_clip: -0.5 is refused for alol: must be >= 0"),
       ("alol_seq", "--ppo_clip -1", "ppo_clip: -1 is refused for alol_seq"),
       ("r_lol", "--ppo_clip -1", "ppo_clip: -1 is refused for r_lol"),
       ("r_gold", "--gold_min_prob 1.5", "gold_min_prob: 1.5 is refused for r_gold: must lie in [0, 1]"),
       ("sigmoid sft", "--loss_weights 0 0", "loss_weights: [0.0, 0.0] leaves nothing to learn"),
       ("sigmoid sft", "--loss_weights 1 -1", "loss_weights: [1.0, -1.0] leaves nothing to learn or unlearns")])


@pytest.mark.parametrize("loss_type, flags, line", CASES, ids=[f"{c[0]} {c[1]}" for c in CASES])
def test_a_meaningless_hyper_parameter_is_refused_in_one_line(files, tmp_path, capsys, loss_type, flags, line):
    out = tmp_path / "out"
    argv = args(files, out, max_steps=2, save_steps=0, loss_type=loss_type) + flags.split()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [e for e in err.splitlines() if "error" in e.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"prefuse train: error: {line}"), err
    assert not out.exists() or not any(out.iterdir())  # refused before anything is written
