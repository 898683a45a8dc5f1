"""`prefuse demo` (what `make demo` runs): warm-up to a wrong habit, DPO through LoRA, and the judge's win rate rises
to the band README.md states (measured under other CPUs' rounding, thread counts, seeds and initial weights)."""
import json

import pytest

from prefuse.cli import main
from prefuse.commands import demo

# README.md: "0.00 -> 0.81 ... between 0.797 and 0.809"; 0.809 is the ceiling (every held-out prompt copied exactly).
BAND = (0.78, 0.81)


def test_demo_improves_the_judges_win_rate_into_the_stated_band(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--output_dir", str(out)])  # the defaults: what `make demo` prints
    results = json.loads((out / "demo_results.json").read_text())
    before, after = results["before"], results["after"]
    assert code == 0, capsys.readouterr().out[-2000:]
    assert before["win_rate"] <= 0.05 and before["exact_copies"] == 0.0  # the wrong habit: greedy answers shift
    assert BAND[0] <= after["win_rate"] <= BAND[1], after
    assert after["exact_copies"] >= 0.95 and after["mean_score"] >= 0.95, after
    assert after["win_rate_95"][0] > before["win_rate_95"][1] + 0.5
    with open(out / "demo_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "win_rate" in capsys.readouterr().out


def test_held_out_prompts_are_distinct_and_never_drawn_in_training():
    from prefuse.commands.demo import CopyTask, build_tokenizer

    letters = list("abcd")
    tok = build_tokenizer(letters)
    held = CopyTask(tok, letters, 3, 1).distinct_prompts(40)
    assert len({tuple(p) for p in held}) == 40
    task = CopyTask(tok, letters, 3, 0, held_out=held)
    drawn = {tuple(task.prompt()) for _ in range(2000)}
    assert len(drawn) == 4 ** 3 - 40 and not drawn & {tuple(p) for p in held}


@pytest.mark.parametrize("score", range(6))
def test_the_exact_win_rate_is_the_judges_against_drawn_opponents(score):
    """win_rate's per-prompt figure (exact over the opponent's answers) is what drawing opponents converges to."""
    from prefuse.commands.demo import CopyTask, build_tokenizer

    letters = [chr(ord("a") + i) for i in range(8)]
    task = CopyTask(build_tokenizer(letters), letters, 5, 3)
    theirs = demo.opponent_scores(5, 8, 0.2)
    exact = sum(theirs[:score]) + 0.5 * theirs[score]
    wins, n = 0.0, 20000
    for _ in range(n):
        p = task.prompt()
        mine = p[:score] + [task.ids[(task.ids.index(c) + 1) % 8] for c in p[score:]]  # `score` letters right
        other = task.score(p, task.noisy(p, 0.2))
        assert task.score(p, mine) == score
        wins += 1.0 if score > other else 0.5 if score == other else 0.0
    assert abs(wins / n - exact) < 0.015


def test_online_demo_raises_the_judged_score(tmp_path, capsys):
    """`prefuse demo --online`: online DPO on the policy's own samples; the judge's score of the samples rises."""
    out = tmp_path / "online"
    code = main(["demo", "--online", "--output_dir", str(out), "--sft_steps", "200", "--online_steps", "80",
                 "--eval_prompts", "50"])
    results = json.loads((out / "demo_results.json").read_text())
    assert code == 0, capsys.readouterr().out[-2000:]
    assert results["after"]["judged_score"] >= results["before"]["judged_score"] + 0.2
    with open(out / "demo_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "judged_score" in capsys.readouterr().out
