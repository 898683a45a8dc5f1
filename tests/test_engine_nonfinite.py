"""Non-finite values through `prefuse train`: a NaN loss or gradient stops the run before the update (or is skipped
and counted), no checkpoint holds non-finite weights, metrics.jsonl is strict JSON, a saturated model is said so."""
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors.torch import load_file

from prefuse.cli import main
from prefuse.engine.core.metrics import MetricsLog
from prefuse.engine.train import loop
from prefuse.engine.train.distributed import World
from prefuse.engine.train.nonfinite import NonFiniteStep, StepGuard
from tests import test_engine_train

args = test_engine_train.args
files = test_engine_train.files  # its module fixture: a tiny Llama, its tokenizer and 16 pairs

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


def strict_lines(out) -> list[dict]:
    """Every line of metrics.jsonl parsed by a strict parser: a bare NaN / Infinity token fails the test."""
    def reject(token):
        raise AssertionError(f"metrics.jsonl holds the non-JSON token {token}")
    return [json.loads(line, parse_constant=reject) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out) -> dict[int, Path]:
    return {int(p.name.split("-")[1]): p for p in Path(out).glob("checkpoint-*")}


def all_finite(checkpoint: Path) -> bool:
    tensors = load_file(checkpoint / "model.safetensors")
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("prefuse train: error: "), err
    return errors[0]


def test_a_nonfinite_step_stops_the_run_before_the_update(files, tmp_path, capsys):
    # --learning_rate 1e8: the weights blow up and the loss is NaN from step 3 (the issue's case); it used to run on,
    # saving all-NaN checkpoints and writing bare NaN tokens into metrics.jsonl, and exit 0
    out = tmp_path / "run"
    status = main(args(files, out, max_steps=8, save_steps=1, learning_rate=1e8, logging_steps=1,
                       per_device_train_batch_size=4))
    line = one_error(capsys)
    assert status == 2
    found = re.search(r"error: step (\d+): the (loss|gradient norm) is (nan|inf|-inf) before the optimizer update;",
                      line)
    assert found, line
    assert "--skip_nonfinite_steps N" in line and "--learning_rate (now 1e+08)" in line
    bad_step = int(found.group(1))
    assert 1 < bad_step <= 8
    saved = checkpoints(out)
    assert sorted(saved) == list(range(1, bad_step)), sorted(saved)  # the steps before it, none from it on
    assert all(all_finite(path) for path in saved.values())
    records = strict_lines(out)
    assert [r["step"] for r in records] == list(range(1, bad_step))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)


def test_skip_nonfinite_steps_skips_counts_and_stops_past_n(files, tmp_path, capsys):
    out = tmp_path / "skip"
    status = main(args(files, out, max_steps=8, save_steps=0, learning_rate=1e8, logging_steps=1,
                       per_device_train_batch_size=4, skip_nonfinite_steps=2))
    line = one_error(capsys)
    assert status == 2
    found = re.search(r"error: step (\d+): the (loss|gradient norm) is \S+ before the optimizer update; 2 earlier "
                      r"non-finite step\(s\) were skipped, the most --skip_nonfinite_steps 2 allows;", line)
    assert found, line
    bad_step = int(found.group(1))
    records = strict_lines(out)
    assert [r["step"] for r in records] == list(range(1, bad_step))
    counts = [r["nonfinite_steps_skipped"] for r in records]
    assert counts[-2:] == [1, 2] and counts[0] == 0, counts
    skipped = [r for r in records if r["nonfinite_steps_skipped"] > 0 and "loss" not in r]
    assert len(skipped) == 2  # a skipped step logs its count and learning rate, no NaN loss
    assert not checkpoints(out)  # save_steps 0: only the final checkpoint, never reached


def test_skipped_steps_leave_the_weights_finite_to_the_end(files, tmp_path, capsys):
    out = tmp_path / "skip_all"
    assert main(args(files, out, max_steps=5, save_steps=0, learning_rate=1e8, logging_steps=5,
                     per_device_train_batch_size=4, skip_nonfinite_steps=10)) == 0
    (record,) = strict_lines(out)
    assert record["step"] == 5 and 1 <= record["nonfinite_steps_skipped"] < 5
    assert math.isfinite(record["loss"])  # the mean over the steps that were applied
    assert sorted(checkpoints(out)) == [5] and all_finite(checkpoints(out)[5])
    state = json.loads((checkpoints(out)[5] / "trainer_state.json").read_text())
    assert state["nonfinite_steps_skipped"] == record["nonfinite_steps_skipped"]


def test_a_gradient_exactly_zero_for_three_steps_is_said_in_one_line(files, tmp_path, capsys):
    # hinge at beta 1 over the whole data set each step: once every margin is met the gradient is exactly 0, step
    # after step; the run used to go on without a word (as the issue's --learning_rate 1e3 run did)
    out = tmp_path / "saturated"
    assert main(args(files, out, max_steps=10, save_steps=0, learning_rate=0.3, logging_steps=1, loss_type="hinge",
                     beta=1.0, per_device_train_batch_size=16)) == 0
    captured = capsys.readouterr()
    records = strict_lines(out)
    zeros = [r["step"] for r in records if r["grad_norm"] == 0.0]
    first = zeros[0]
    assert zeros[:3] == [first, first + 1, first + 2] and first > 1, [(r["loss"], r["grad_norm"]) for r in records]
    warnings = [line for line in (captured.out + captured.err).splitlines() if "warning:" in line]
    assert len(warnings) == 1, warnings  # once per stretch of zeros
    assert re.fullmatch(rf"warning: step {first + 2}: the gradient norm has been exactly 0 for 3 steps \(since step "
                        rf"{first}; \S+ at step {first - 1}\): the loss is 0 on these batches \(every example's term "
                        r"saturated, e\.g\. a hinge margin met\): nothing more is learned from them", warnings[0]), \
        warnings[0]


def test_the_issues_saturated_model_gets_its_warning():
    # the issue's --learning_rate 1e3 numbers: loss 8.4e7 at step 2, then a gradient norm of exactly 0 at every step
    guard = StepGuard(learning_rate=1e3)
    said = [guard.saturation(step, norm, loss) for step, norm, loss in
            [(1, 2.7, 0.69), (2, 4.1e5, 8.4e7), (3, 0.0, 8.4e7), (4, 0.0, 8.4e7), (5, 0.0, 8.4e7), (6, 0.0, 8.4e7)]]
    assert said[:4] == [None] * 4 and said[5] is None
    assert said[4] == ("warning: step 5: the gradient norm has been exactly 0 for 3 steps (since step 3; 4.1e+05 at "
                       "step 2): the loss is 8.4e+07 but no gradient reaches the weights: the model saturated and "
                       "learns nothing; lower --learning_rate (now 1000)")


def test_a_healthy_run_has_no_guard_line(files, tmp_path, capsys):
    out = tmp_path / "healthy"
    assert main(args(files, out, max_steps=3, save_steps=0, learning_rate=1e-3, logging_steps=1,
                     per_device_train_batch_size=4)) == 0
    captured = capsys.readouterr()
    assert "warning:" not in captured.out + captured.err and "error" not in captured.err.lower()
    assert all("nonfinite_steps_skipped" not in r for r in strict_lines(out))


def test_metrics_jsonl_writes_nan_and_infinity_as_null(tmp_path):
    log = MetricsLog(tmp_path, report_to="none")
    log.write({"step": 1, "loss": float("nan"), "eval_loss": float("inf"), "nested": {"x": -math.inf}, "ok": 0.5})
    (record,) = strict_lines(tmp_path)
    assert record == {"step": 1, "loss": None, "eval_loss": None, "nested": {"x": None}, "ok": 0.5}


@pytest.mark.parametrize("value, expected", [("-1", "skip_nonfinite_steps: must be >= 0")])
def test_skip_nonfinite_steps_is_checked(files, tmp_path, capsys, value, expected):
    assert main(args(files, tmp_path / "bad", max_steps=1, skip_nonfinite_steps=value)) == 2
    assert expected in one_error(capsys)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_a_checkpoint_is_never_written_from_non_finite_weights(tmp_path):
    # the last line of defence behind the step guard: save() checks the trained tensors before writing anything
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    model[0].weight.data[0, 0] = float("nan")  # a frozen weight is the loaded one: not the run's doing
    run = SimpleNamespace(policy=model, world=World(), out=tmp_path)
    loop.check_finite_weights(run, 4)
    model[1].bias.data[1] = float("inf")
    with pytest.raises(NonFiniteStep) as error:
        loop.save(run, 4)
    assert str(error.value) == ("step 4: the trained parameter 1.bias holds NaN or infinite values; checkpoint-4 "
                                "was not written (earlier checkpoints are intact); lower --learning_rate")
    assert not any(tmp_path.iterdir())


def test_the_guard_names_the_step_and_which_value():
    guard = StepGuard(learning_rate=1e-3)
    assert guard.nonfinite(1, 0.69, 2.5) is False
    with pytest.raises(NonFiniteStep, match=r"^step 7: the gradient norm is inf before the optimizer update; the "):
        guard.nonfinite(7, 0.69, math.inf)
    with pytest.raises(NonFiniteStep, match=r"^step 8: the loss is nan before"):
        guard.nonfinite(8, math.nan, math.nan)  # the loss first: it is what made the gradient
    budget = StepGuard(limit=1)
    assert budget.nonfinite(3, math.nan, math.nan) is True and budget.skipped == 1
    with pytest.raises(NonFiniteStep, match=r"1 earlier non-finite step\(s\) were skipped, the most "
                                            r"--skip_nonfinite_steps 1 allows"):
        budget.nonfinite(4, 0.5, -math.inf)
