"""Mutation check of the seed objectives' tests: each mutation below must make at least one test fail ("killed").

    .venv/bin/python tests/golden/mutations.py            # every mutation: killed/survived; exit 1 if one survived
    .venv/bin/python tests/golden/mutations.py -k detach  # only the mutations whose name contains "detach"
    .venv/bin/python tests/golden/mutations.py --list

Each mutation is one exact text replacement in one file of prefuse/algorithms/ (the original text must occur exactly
once, so a refactor that moves it makes the script fail loudly instead of reporting a false "killed"). The source
tree is never touched: prefuse/ and the tests needed are copied to a temporary folder, the copy is mutated, and
pytest runs there, in a child forked from this process with that folder first on sys.path (each run checks that the
copy is what got imported). The unmutated copy must pass first. About 1.5 s per mutation on one core.
tests/test_seed_mutations.py runs the whole list when PREFUSE_MUTATIONS=1 is set.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch  # noqa: F401  (imported once here, so each forked test run starts with it loaded)

ROOT = Path(__file__).resolve().parents[2]
SEED = "tests/test_algorithms_seed_golden.py"
HYPO = "tests/test_algorithms_hypo_kl.py"
MUTANTS = "tests/test_algorithms_mutants.py"  # it borrows make_inputs from the reference test
TEST_FILES = ["tests/__init__.py", "tests/conftest.py", "tests/golden/seed_golden.json", SEED, HYPO, MUTANTS,
              "tests/test_algorithms_reference.py"]

ONLINE, ALOL, OFS, SRPO, COMMON = (f"prefuse/algorithms/{m}.py" for m in ("online", "alol", "ofs", "srpo", "common"))
KTO, MIXED, PG, DPO = (f"prefuse/algorithms/{m}.py" for m in ("kto", "mixed", "policy_gradient", "dpo"))

# name -> (file, original text, mutated text, test file that must fail)
MUTATIONS = {
    # dropped detaches
    "selm_ref_sample_detach": (
        ONLINE, "policy_sample_logps - ref_sample_logps.detach()", "policy_sample_logps - ref_sample_logps", SEED),
    "online_ipo_probs_detach": (
        ONLINE, "target = (preference_probs.detach() - 0.5) / beta", "target = (preference_probs - 0.5) / beta", SEED),
    "nash_md_probs_detach": (
        ONLINE, "score = (preference_probs.detach() - 0.5) * policy_logps",
        "score = (preference_probs - 0.5) * policy_logps", SEED),
    "nash_md_sequence_kl_detach": (
        ONLINE, "sequence_logratios = (policy_logps - ref_logps).detach()",
        "sequence_logratios = (policy_logps - ref_logps)", SEED),
    "nash_md_token_kl_detach": (
        ONLINE, "per_token = (policy_token_logps - ref_token_logps).detach() * policy_token_logps",
        "per_token = (policy_token_logps - ref_token_logps) * policy_token_logps", SEED),
    "alol_advantages_detach": (
        ALOL, "clipped_ratio(policy_logps, ref_logps, ppo_clip) * advantages.detach().clamp(min=0)",
        "clipped_ratio(policy_logps, ref_logps, ppo_clip) * advantages.clamp(min=0)", SEED),
    "alol_seq_advantages_detach": (
        ALOL, "positive = advantages.detach().clamp(min=0)", "positive = advantages.clamp(min=0)", SEED),
    "alol_ref_free_advantages_detach": (
        ALOL, "weights = advantages.detach()\n    return -policy_logps * weights, _metrics(policy_logps, None",
        "weights = advantages\n    return -policy_logps * weights, _metrics(policy_logps, None", SEED),
    "alol_kl_advantages_detach": (
        ALOL, "weights = advantages.detach().clamp(min=0)\n    return -policy_logps * weights + beta",
        "weights = advantages.clamp(min=0)\n    return -policy_logps * weights + beta", SEED),
    "wbc_rewards_detach": (ALOL, "weights = rewards.detach()\n", "weights = rewards\n", SEED),
    "r_lol_rewards_detach": (
        ALOL, "ppo_clip) * rewards.detach().clamp(min=0)", "ppo_clip) * rewards.clamp(min=0)", SEED),
    "importance_weight_detach": (
        ALOL, "log_ratio = (policy_logps - ref_logps).detach().clamp(", "log_ratio = (policy_logps - ref_logps).clamp(",
        SEED),
    "ofs_chasing_target_detach": (
        OFS, "beta * (slow_margin - fast_margin.detach())", "beta * (slow_margin - fast_margin)", SEED),
    "ofs_two_sided_detach": (
        OFS, "beta * (fast_margin - slow_margin.detach())", "beta * (fast_margin - slow_margin)", SEED),
    # swapped metric names
    "ofs_fast_slow_metric_swap": (
        OFS, '"ofs/fast_dpo_loss": fast_dpo.detach(), "ofs/slow_dpo_loss": slow_dpo.detach()',
        '"ofs/fast_dpo_loss": slow_dpo.detach(), "ofs/slow_dpo_loss": fast_dpo.detach()', SEED),
    "selm_metric_swap": (
        ONLINE, '"loss/dpo": dpo_losses.detach(), "loss/optimism": optimism.detach()',
        '"loss/dpo": optimism.detach(), "loss/optimism": dpo_losses.detach()', SEED),
    "xpo_metric_swap": (
        ONLINE, '"loss/dpo": dpo_losses.detach(), "loss/xpo": exploration.detach()',
        '"loss/dpo": exploration.detach(), "loss/xpo": dpo_losses.detach()', SEED),
    "nash_md_metric_swap": (
        ONLINE, '"loss/score": score.detach(),\n        "loss/kl": sequence_logratios,',
        '"loss/score": sequence_logratios,\n        "loss/kl": score.detach(),', SEED),
    "srpo_metric_swap": (
        SRPO, '"loss/generate": generate.detach(), "loss/improve": improve.detach()',
        '"loss/generate": improve.detach(), "loss/improve": generate.detach()', SEED),
    "reward_metrics_logps_swap": (
        COMMON, '"logps/chosen": chosen_logps.detach(),\n        "logps/rejected": rejected_logps.detach(),',
        '"logps/chosen": rejected_logps.detach(),\n        "logps/rejected": chosen_logps.detach(),', SEED),
    "alol_metric_swap": (
        ALOL, '{"logps/chosen": policy_logps.detach(), "alol/weights": weights.detach()}',
        '{"logps/chosen": weights.detach(), "alol/weights": policy_logps.detach()}', SEED),
    # flipped signs
    "nash_md_kl_metric_negated": (ONLINE, '"loss/kl": sequence_logratios,', '"loss/kl": -sequence_logratios,', SEED),
    "selm_optimism_sign": (
        ONLINE, "optimism = alpha * beta * sample_logratios", "optimism = -alpha * beta * sample_logratios", SEED),
    "xpo_exploration_sign": (
        ONLINE, "exploration = alpha * policy_sample_logps", "exploration = -alpha * policy_sample_logps", SEED),
    "nash_md_score_sign": (ONLINE, "return beta * kl_term - score, metrics", "return beta * kl_term + score, metrics",
                           SEED),
    "srpo_improve_sign": (
        SRPO, '(0.5 - beta * (h("chosen_given_rejected") - h("rejected_given_rejected")))',
        '(0.5 + beta * (h("chosen_given_rejected") - h("rejected_given_rejected")))', SEED),
    "ofs_two_sided_sign": (
        OFS, "slow_dpo - ofs_alpha * slow_gap", "slow_dpo + ofs_alpha * slow_gap", SEED),
    "alol_kl_sign": (ALOL, "+ beta * (policy_logps - ref_logps)", "- beta * (policy_logps - ref_logps)", SEED),
    # HyPO's per_token_k3 back to the pathwise gradient of k3 (the forward KL's)
    "hypo_k3_pathwise": (
        ONLINE, "ref_minus_policy = masked(ref_online_token_logps - policy_online_token_logps).detach()",
        "ref_minus_policy = masked(ref_online_token_logps - policy_online_token_logps)", HYPO),
    # survivors of an audit of the algorithm and preference-loss tests, killed by tests/test_algorithms_mutants.py
    "hypo_rloo_baseline_at_k1": (ONLINE, "and num_samples > 1", "and num_samples >= 1", MUTANTS),
    "hypo_rloo_baseline_mean": (ONLINE, "/ (num_samples - 1)", "/ num_samples", MUTANTS),
    "kto_ref_kl_detach": (
        KTO, "ref_kl_logps.detach()).mean().clamp(min=0)", "ref_kl_logps).mean().clamp(min=0)", MUTANTS),
    "kto_kl_point_clamp": (
        KTO, "ref_kl_logps.detach()).mean().clamp(min=0)", "ref_kl_logps.detach()).mean()", MUTANTS),
    "mixed_drawn_pair_metrics": (
        MIXED, "return torch.where(drawn, offline_value, online_value)",
        "return torch.where(drawn, online_value, offline_value)", MUTANTS),
    "mixed_drawn_loss_metric_swap": (
        MIXED, '"loss/offline": (weight * offline).detach(), "loss/online": ((1 - weight) * online).detach()',
        '"loss/offline": ((1 - weight) * online).detach(), "loss/online": (weight * offline).detach()', MUTANTS),
    "grpo_clip_low_bound": (
        PG, "low = (ratio < 1 - epsilon) & (advantages < 0)", "low = (ratio <= 1 - epsilon) & (advantages < 0)",
        MUTANTS),
    "grpo_clip_high_bound": (
        PG, "high = (ratio > 1 + (epsilon if", "high = (ratio >= 1 + (epsilon if", MUTANTS),
    "alol_kl_metric_sign": (
        ALOL, 'metrics["objective/kl"] = (policy_logps - ref_logps).detach()',
        'metrics["objective/kl"] = (ref_logps - policy_logps).detach()', MUTANTS),
    "alol_seq_sign": (
        ALOL, "losses = -masked_sum(policy_token_logps * token_weights) * positive",
        "losses = masked_sum(policy_token_logps * token_weights) * positive", MUTANTS),
    "srpo_default_alpha": (SRPO, 'hparams={"srpo_alpha": 0.8', 'hparams={"srpo_alpha": 0.5', MUTANTS),
    "exo_label_smoothing_upper_bound": (
        DPO, "if not 0.0 < label_smoothing < 1.0:", "if not 0.0 < label_smoothing <= 1.0:", MUTANTS),
    "robust_label_smoothing_upper_bound": (
        DPO, "if not 0.0 <= label_smoothing < 0.5:", "if not 0.0 <= label_smoothing <= 0.5:", MUTANTS),
    "token_counts_zero_clamp": (
        COMMON, ".to(like.dtype).clamp(min=1.0)", ".to(like.dtype).clamp(min=0.5)", MUTANTS),
    "batch_nll_zero_clamp": (COMMON, ".sum().clamp(min=1.0)", ".sum().clamp(min=0.5)", MUTANTS),
}


def make_copy(folder: Path) -> None:
    shutil.copytree(ROOT / "prefuse", folder / "prefuse", ignore=shutil.ignore_patterns("__pycache__"))
    for name in TEST_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, folder / name)


PYTEST_ARGS = ["-q", "-x", "-p", "no:cacheprovider"]


def run_tests(folder: Path, test_file: str) -> tuple[int, str]:
    """(pytest's exit code, its last line) for test_file in the copy. Where os.fork exists, a child forked from
    this process (which has torch and pytest imported, and no prefuse) runs pytest.main; else a subprocess does.
    Fork only from a process that has run no torch op (its thread pools would deadlock the child): run this script
    as its own process, as tests/test_seed_mutations.py does."""
    log = folder / "pytest.log"
    if hasattr(os, "fork"):
        pid = os.fork()
        if pid == 0:  # the child: import prefuse from the copy only, run the tests, report through the exit code
            code = 99
            try:
                out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(out, 1)
                os.dup2(out, 2)
                os.chdir(folder)
                sys.path.insert(0, str(folder))
                for name in [m for m in sys.modules if m.split(".")[0] in ("prefuse", "tests")]:
                    del sys.modules[name]  # when run from inside a pytest session that imported them already
                code = int(pytest.main([*PYTEST_ARGS, test_file]))
                import prefuse

                if not prefuse.__file__.startswith(str(folder)):
                    print(f"imported the wrong prefuse: {prefuse.__file__}")
                    code = 98
            finally:
                sys.stdout.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
    else:
        check = "import prefuse, sys; assert prefuse.__file__.startswith(sys.argv[1]), prefuse.__file__"
        subprocess.run([sys.executable, "-c", check, str(folder)], cwd=folder, check=True)
        with open(log, "w") as out:
            code = subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS, test_file], cwd=folder, stdout=out,
                                  stderr=subprocess.STDOUT).returncode
    lines = log.read_text().strip().splitlines()
    if code in (98, 99):  # not a test failure: the run itself went wrong
        raise RuntimeError(f"the test run in {folder} failed to run: {lines[-5:]}")
    return code, lines[-1] if lines else ""


def apply(folder: Path, file: str, old: str, new: str) -> str:
    path = folder / file
    text = path.read_text()
    count = text.count(old)
    if count != 1:
        raise SystemExit(f"{file}: the original text of a mutation occurs {count} times, not once: {old!r}")
    path.write_text(text.replace(old, new))
    return text


def check(names: list[str]) -> dict[str, bool]:
    """name -> killed. Raises SystemExit when the unmutated copy does not pass."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="prefuse_mutations_") as tmp:
        folder = Path(tmp)
        make_copy(folder)
        for test_file in sorted({MUTATIONS[n][3] for n in names}):
            code, summary = run_tests(folder, test_file)
            if code != 0:
                raise SystemExit(f"the unmutated tests fail ({test_file}): {summary}")
        for name in names:
            file, old, new, test_file = MUTATIONS[name]
            original = apply(folder, file, old, new)
            try:
                start = time.time()
                code, summary = run_tests(folder, test_file)
            finally:
                (folder / file).write_text(original)
            results[name] = code != 0
            verdict = "killed" if code != 0 else "SURVIVED"
            print(f"{verdict:9} {name:34} {time.time() - start:4.1f}s  {summary}", flush=True)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="run only the mutations whose name contains this")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    names = [n for n in MUTATIONS if args.k in n]
    if args.list:
        print("\n".join(f"{n}: {MUTATIONS[n][0]}" for n in names))
        return 0
    results = check(names)
    survived = [n for n, killed in results.items() if not killed]
    print(f"{len(results) - len(survived)} killed, {len(survived)} survived" + (f": {survived}" if survived else ""))
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
