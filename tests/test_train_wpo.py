"""`prefuse train --use_weighting` (WPO, TRL's use_weighting): 2 steps on the tiny Llama of test_engine_train.py, a
loss that differs from the unweighted run's, and a one-line refusal for objectives outside the DPO family."""
import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.cli import main
from tests import test_engine_train as engine
from tests.test_engine_train import args, read_metrics

files = engine.files  # the tiny Llama and the pairs (a module-scoped fixture)

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


def run(files, out, **flags):
    argv = args(files, out, loss_type="sigmoid", per_device_train_batch_size=4, max_steps=2, logging_steps=1,
                save_steps=0, learning_rate=1e-2, **flags)
    assert main(argv) == 0
    return read_metrics(out)


def test_use_weighting_trains_two_steps(files, tmp_path):
    weighted = run(files, tmp_path / "wpo", use_weighting="true")
    plain = run(files, tmp_path / "plain")
    assert [r["step"] for r in weighted] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in weighted)
    # step 1: policy == reference, so the plain loss is log 2 and the weighted one log 2 times the pairs' weights
    assert plain[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    assert abs(weighted[0]["loss"] - plain[0]["loss"]) > 1e-4
    assert weighted[0]["rewards/margins"] == plain[0]["rewards/margins"] == 0.0


def test_use_weighting_outside_the_dpo_family_is_one_line(files, tmp_path, capsys):
    argv = args(files, tmp_path, loss_type="kto", max_steps=1, save_steps=0, use_weighting="true")
    assert main(argv) != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "use_weighting" in errors[0], errors
