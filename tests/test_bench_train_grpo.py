"""`prefuse bench --task train --objective grpo`: prefuse train's online GRPO step and TRL 1.16's GRPOTrainer on the
same fixed completions give the same losses, kl, reward statistics and trained policy (LoRA and full fine-tuning,
beta 0 and > 0), and so does prefuse's drop-in PrefuseGRPOTrainer; the check that says so fails when prefuse's GRPO objective is broken (its loss's sign, the KL
term's sign, the KL term's gradient, the gradient's sign at an unchanged value); the command refuses bad arguments
in one line."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from prefuse.algorithms import registry
from prefuse.bench import train, train_grpo, train_grpo_workers
from prefuse.cli import main

pytest.importorskip("trl")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """`prefuse bench --task train --objective grpo --quick`: both modes at beta 0.04, each path 3 steps."""
    work = tmp_path_factory.mktemp("bench_grpo")
    proc = subprocess.run([sys.executable, "-m", "prefuse", "bench", "--task", "train", "--objective", "grpo",
                           "--quick", "--json", "grpo.json", "--markdown", "grpo.md"], check=False, cwd=work,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads((work / "grpo.json").read_text()), (work / "grpo.md").read_text()


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("path", ["trl", "trl_prefuse"])
def test_quick_grpo_losses_of_prefuse_and_trl_agree_at_every_step(quick, mode, path):
    """TRL's GRPOTrainer, and prefuse's drop-in for it, against prefuse train's step."""
    _, data, markdown = quick
    records = {r["path"]: r for r in data["records"] if r["peft"] == mode}
    assert set(records) == set(train_grpo.GRPO_PATHS)
    ours, theirs = records["prefuse"], records[path]
    assert ours["beta"] == theirs["beta"] == 0.04
    assert not ours["errors"] and not theirs["errors"], (ours["errors"], theirs["errors"])
    assert len(ours["losses"]) == len(theirs["losses"]) == 3  # one warm-up step and two timed ones
    for got, want in zip(theirs["losses"], ours["losses"]):
        assert abs(got - want) <= train.LOSS_TOLERANCE
    assert ours["batch_digest"] == theirs["batch_digest"] and ours["tokens_per_step"] == theirs["tokens_per_step"]
    assert abs(theirs["final_logp"] - ours["final_logp"]) <= train_grpo.FINAL_LOGP_TOLERANCE
    kl = [m["kl"] for m in ours["metrics"]]  # the reference is read: kl grows as the policy moves away from it
    assert kl[-1] > kl[0] >= 0
    for got, want in zip([m["kl"] for m in theirs["metrics"]], kl):
        assert abs(got - want) <= train_grpo.kl_bound(want)
    for rec in (ours, theirs):
        assert rec["rounds"] == 2 and 0 < rec["time_min_s"] <= rec["time_median_s"] <= rec["time_max_s"]
        assert rec["peak_mib"] > 100 and rec["step_extra_mib"] >= 0
        assert rec["num_generations"] == 4 and rec["prompts"] == train.QUICK_SHAPE.pairs
    assert f"| {mode} | 0.04 | {path} |" in markdown


def test_quick_grpo_writes_its_command_and_table(quick):
    proc, data, markdown = quick
    assert data["command"].startswith("prefuse bench --task train --objective grpo")
    assert markdown.startswith("    prefuse bench --task train --objective grpo")
    assert "| model | peft | beta | path |" in proc.stdout


# -- in one process: the check fails when prefuse's objective is broken ---------------------------------------------

STEPS = 3


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    work = tmp_path_factory.mktemp("grpo_groups")
    model_dir, pairs_file = train.prepare(train.QUICK_SHAPE, work)
    groups_file, prompts_file = train_grpo.write_groups(model_dir, pairs_file, work, train_grpo.GRPOSettings())
    return work, model_dir, groups_file, prompts_file


def spec_of(groups, path, beta, name):
    work, model_dir, groups_file, prompts_file = groups
    return {"path": path, "mode": "lora", "beta": beta, "device": "cpu", "model_dir": str(model_dir),
            "groups_file": str(groups_file), "prompts_file": str(prompts_file), "output_dir": str(work / name),
            "max_completion_length": 64, "steps": STEPS, "warmup": 1, "learning_rate": train.LEARNING_RATE["lora"]}


def record(path, beta, losses, metrics, final_logp, digest):
    return {"path": path, "peft": "lora", "beta": beta, "losses": losses, "errors": [], "final_logp": final_logp,
            "metrics": [{k: float(m[k]) for k in train_grpo_workers.GRPO_METRICS if k in m} for m in metrics],
            "batch_digest": digest}


def prefuse_record(groups, beta, name):
    from prefuse.bench.train_workers import prefuse_steps

    run, cfg = train_grpo_workers.prefuse_grpo_run(spec_of(groups, "prefuse", beta, name))
    steps = list(prefuse_steps(run, cfg, STEPS))
    batch = steps[-1][2]
    return record("prefuse", beta, [loss for loss, _, _ in steps], [m for _, m, _ in steps],
                  train_grpo_workers.prefuse_final_logp(run, batch),
                  train_grpo_workers.groups_digest(batch.input_ids, batch.attention_mask))


@pytest.fixture(scope="module", params=[0.0, 0.04], ids=["beta0", "beta0.04"])
def trl_record(request, groups):
    torch.manual_seed(0)
    beta, seen = request.param, []

    def stepped(loss, metrics, inputs):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        seen.append((loss, dict(metrics), train_grpo_workers.groups_digest(ids, mask)))

    trainer = train_grpo_workers.trl_grpo_trainer(spec_of(groups, "trl", beta, f"trl_{beta}"), stepped=stepped)
    trainer.train()
    return record("trl", beta, [s[0] for s in seen], [s[1] for s in seen],
                  train_grpo_workers.trl_final_logp(trainer), seen[-1][2])


def broken(how):
    """prefuse's GRPO objective, broken one way (the registry's entry replaced for one test)."""
    fn = registry.OBJECTIVES["grpo"].fn

    def objective(**kwargs):
        losses, metrics = fn(**kwargs)
        if how == "loss_sign":
            return -losses, metrics
        if how == "gradient_sign":  # the same value, the gradient reversed
            return 2 * losses.detach() - losses, metrics
        without_kl, _ = fn(**{**kwargs, "beta": 0.0})
        if how == "kl_sign":
            return 2 * without_kl - losses, metrics
        if how == "kl_gradient":  # the same value, the KL term's gradient dropped
            return without_kl + (losses - without_kl).detach(), metrics
        raise AssertionError(how)

    return dataclasses.replace(registry.OBJECTIVES["grpo"], fn=objective)


def test_in_one_process_prefuse_and_trl_agree(groups, trl_record):
    beta = trl_record["beta"]
    ours = prefuse_record(groups, beta, f"prefuse_{beta}")
    records = [ours, trl_record]
    train_grpo.check_losses(records)
    assert trl_record["errors"] == [], trl_record["errors"]
    assert trl_record["loss_max_diff"] <= train.LOSS_TOLERANCE
    assert trl_record["final_logp_diff"] <= train_grpo.FINAL_LOGP_TOLERANCE


@pytest.mark.parametrize("how,trl_record,caught", [
    ("loss_sign", 0.0, "losses differ"), ("gradient_sign", 0.0, "final_logp differs"),
    ("kl_sign", 0.04, "kl differs"), ("kl_gradient", 0.04, "kl differs")], indirect=["trl_record"])
def test_a_broken_grpo_objective_fails_the_check(groups, trl_record, monkeypatch, how, caught):
    """Each break is caught by the check named: the loss's value, the trained policy (final_logp), TRL's kl."""
    monkeypatch.setitem(registry.OBJECTIVES, "grpo", broken(how))
    ours = prefuse_record(groups, trl_record["beta"], f"broken_{how}")
    theirs = dict(trl_record, errors=[])
    train_grpo.check_losses([ours, theirs])
    print(how, theirs["errors"])
    assert any(caught in error for error in theirs["errors"]), (how, theirs["errors"])


def test_the_groups_are_prompts_and_cut_responses(groups):
    work, _, groups_file, prompts_file = groups
    data = json.loads(groups_file.read_text())
    assert len(data["prompt_ids"]) == len(data["completion_ids"]) == train.QUICK_SHAPE.pairs
    for group in data["completion_ids"]:
        assert len(group) == 4 and all(32 <= len(ids) <= 64 for ids in group)
        assert len({len(ids) for ids in group}) > 1  # unequal lengths: the dapo normalization sees them
        rewards = train_grpo_workers.distinct_token_reward(group)
        assert len(set(rewards)) > 1  # a group's advantages are not all zero
    assert [json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()] == [
        json.loads(line)["prompt"] for line in (work / "pairs.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("argv,message", [
    (["--task", "train", "--objective", "grpo", "--num_generations", "1"], "--num_generations: GRPO compares"),
    (["--task", "train", "--objective", "grpo", "--max_completion_length", "1"], "--max_completion_length: expected"),
    (["--task", "train", "--objective", "grpo", "--beta", "-0.1"], "--beta: expected finite values >= 0"),
    (["--task", "train", "--objective", "grpo", "--paths", "trl"], "--paths: --objective grpo runs ['prefuse', "),
    (["--task", "train", "--objective", "grpo", "--paths", "prefuse", "trl_liger"], "prefuse among them"),
    (["--task", "train", "--beta", "0.1"], "--beta: for --objective grpo"),
    (["--task", "head", "--objective", "grpo"], "--objective: for --task train"),
])
def test_bad_grpo_arguments_are_one_line_errors(argv, message, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prefuse bench: error: ") and message in err, err
