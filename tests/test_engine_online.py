"""`prefuse train --online` end to end on a tiny Llama with a reward-function file: for every online objective the
mean judged score (`objective/scores`) rises over a short run; the batches' losses equal the objectives on float64
log-probs of the same samples; bad judges and files fail in one line; a killed run resumes with the same samples."""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import prefuse  # noqa: E402
from prefuse.cli import main  # noqa: E402
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")
REPO = Path(__file__).resolve().parents[1]

REWARDS = textwrap.dedent('''
    def brevity(prompts, completions, **columns):
        """Shorter answers score higher (the empty answer, EOS first, scores 0)."""
        return [-len(c) / 8 for c in completions]

    def with_column(prompts, completions, topic, **columns):
        return [float(len(t)) for t in topic]

    def broken(prompts, completions, **columns):
        raise RuntimeError("the judge is down")

    def short_list(prompts, completions, **columns):
        return [0.0]

    def zero(prompts, completions, **columns):
        return [0.0] * len(completions)

    def abstain(prompts, completions, **columns):
        return [None] * len(completions)
''')
# objective -> extra flags and steps; every one learns "answer briefly" from the judge's scores. The soft-label
# objectives (online IPO, Nash-MD) and IPO-MD (whose scores are the mixture's samples) move slower.
ONLINE = {
    "sigmoid": ([], 40),
    "ipo": ([], 40),
    "online_ipo": (["--learning_rate", "3e-3"], 80),
    "xpo": (["--alpha", "1e-4"], 40),
    "selm": ([], 40),
    "nash_md": ([], 80),
    "grpo": (["--beta", "0.0"], 40),
    "rloo": ([], 40),
    "ipo_md": (["--online_sampler", "mixture"], 80),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    torch.manual_seed(0)
    save_tiny_llama(root / "model", build_tokenizer())
    with open(DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(8)]
    prompts = [r["prompt"][:80] for r in rows]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p, "topic": p[:5]}) + "\n" for p in prompts))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"][:80], "chosen": r["chosen"][:60],
                                                          "rejected": r["rejected"][:60]}) + "\n" for r in rows))
    (root / "rewards.py").write_text(REWARDS)
    return {"model": root / "model", "prompts": root / "prompts.jsonl", "pairs": root / "pairs.jsonl",
            "rewards": root / "rewards.py"}


def online_argv(files, out, loss_type, *flags, steps=40, reward="brevity"):
    """Full fine-tuning of the tiny model (its lm_head included: a random model's EOS logit must rise), 8 prompts
    per step, 8 new tokens, temperature 1."""
    name = "ipo" if loss_type == "ipo_md" else loss_type
    return ["train", "--online", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files["prompts"]),
            "--output_dir", str(out), "--loss_type", name, "--reward_funcs", f"{files['rewards']}:{reward}",
            "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", "0", "--per_device_train_batch_size",
            "8", "--max_new_tokens", "8", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
            "--report_to", "none", "--temperature", "1.0", *flags]


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss_type", list(ONLINE))
def test_every_online_objective_raises_the_judged_score(files, tmp_path, loss_type, capsys):
    flags, steps = ONLINE[loss_type]
    assert main(online_argv(files, tmp_path, loss_type, *flags, steps=steps)) == 0, capsys.readouterr().err
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for record in records:
        assert {"objective/scores", "val/contain_eos_token", "rollout/tokens_per_second", "loss"} <= record.keys()
    scores = [r["objective/scores"] for r in records]
    first, last = sum(scores[:10]) / 10, sum(scores[-10:]) / 10
    assert last > first + 0.1, (loss_type, scores)


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_iterative_dpo_best_of_n_with_the_previous_iterate_as_reference(files, tmp_path, peft):
    """RLHF Workflow: 4 samples per prompt, the best against the worst; 2 iterations, the second with the policy
    after the first as its reference (written as iterate-1/, rewards measured from it: 0 at its first step)."""
    lora = ["--use_peft", "--lora_r", "8", "--lora_dropout", "0", "--learning_rate", "3e-2"] if peft else []
    assert main(online_argv(files, tmp_path, "sigmoid", "--pair_samples", "4", "--iterations", "2",
                            "--iteration_reference", "previous", *lora, steps=8)) == 0
    records = read_metrics(tmp_path)
    assert (tmp_path / "iterate-1" / "config.json").is_file()
    assert records[0]["rewards/margins"] == 0  # policy == reference
    # the second iteration starts at its reference: exactly (a copy) or to rounding (LoRA merged into the weights)
    assert abs(records[4]["rewards/margins"]) <= (1e-6 if peft else 0)
    assert records[3]["objective/kl"] != 0 and abs(records[4]["objective/kl"]) < 1e-5
    iterate = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "iterate-1")
    assert not any("lora" in name for name, _ in iterate.named_parameters())


def test_hypo_offline_pairs_with_the_online_kl_term(files, tmp_path):
    """HyPO: DPO on the dataset's pairs plus the RLOO KL term on 3 policy samples of each prompt; no judge."""
    argv = online_argv(files, tmp_path, "hypo", "--num_generations", "3", "--kl_coef", "0.5", steps=10)
    argv[argv.index("--dataset_name") + 1] = str(files["pairs"])
    i = argv.index("--reward_funcs")
    del argv[i:i + 2]
    assert main(argv) == 0
    records = read_metrics(tmp_path)
    assert records[0]["rewards/margins"] == 0 and records[-1]["rewards/margins"] > 0.05
    assert all("loss/kl" in r and "objective/kl" in r and "val/contain_eos_token" in r for r in records)
    assert records[-1]["objective/kl"] != 0  # the samples drift from the reference


def test_iterations_with_the_initial_model_as_reference(files, tmp_path):
    assert main(online_argv(files, tmp_path, "sigmoid", "--iterations", "2", "--iteration_reference", "initial",
                            steps=6)) == 0
    records = read_metrics(tmp_path)
    assert not (tmp_path / "iterate-1").exists() and records[3]["rewards/margins"] != 0  # the reference stayed


def test_selm_iterations_on_disjoint_slices_of_the_prompts(files, tmp_path, monkeypatch):
    """SELM with 2 iterations and iteration slices: the first iteration's prompts are the first half of the file,
    the second's the second half; the reference moves to the previous iterate."""
    from prefuse.engine.online import source as online

    seen = []
    original = online.OnlineSource._selm

    def spy(self, examples, indices, seed):
        seen.append((self.served, list(indices)))
        return original(self, examples, indices, seed)

    monkeypatch.setattr(online.OnlineSource, "_selm", spy)
    assert main(online_argv(files, tmp_path, "selm", "--iterations", "2", "--iteration_slices",
                            "--per_device_train_batch_size", "2", steps=4)) == 0
    first = {i for served, indices in seen if served <= 2 for i in indices}
    second = {i for served, indices in seen if served > 2 for i in indices}
    assert first <= set(range(4)) and second <= set(range(4, 8)) and first and second
    assert (tmp_path / "iterate-1" / "config.json").is_file()


def test_a_reward_model_from_train_rm_judges_an_online_run(files, tmp_path):
    """prefuse train-rm writes a Bradley-Terry model; --reward_model_path makes it the judge of an online run."""
    rm = tmp_path / "rm"
    assert main(["train-rm", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files["pairs"]),
                 "--output_dir", str(rm), "--max_steps", "3", "--per_device_train_batch_size", "4",
                 "--report_to", "none", "--save_steps", "0"]) == 0
    argv = online_argv(files, tmp_path / "online", "sigmoid", steps=2)
    i = argv.index("--reward_funcs")
    argv[i:i + 2] = ["--reward_model_path", str(rm)]
    assert main(argv) == 0
    records = read_metrics(tmp_path / "online")
    from prefuse.engine.judges import RewardModelJudge

    judge = RewardModelJudge(rm)
    scores = judge.score(["a", "a"], [" short", " a much longer answer"])
    assert scores[0] != scores[1]  # the judge distinguishes answers, and the run logged its scores
    assert all(math.isfinite(r["objective/scores"]) for r in records) and len(records) == 2


def test_trl_online_metric_names(files, tmp_path):
    assert main(online_argv(files, tmp_path, "sigmoid", steps=2)) == 0
    record = read_metrics(tmp_path)[-1]
    assert {"objective/kl", "objective/entropy", "rewards/margins", "rewards/chosen"} <= record.keys()
    assert record["objective/entropy"] > 0


def test_missing_eos_penalty_lowers_the_scores_of_unfinished_samples(files, tmp_path):
    assert main(online_argv(files, tmp_path, "sigmoid", "--missing_eos_penalty", "1.5", "--max_new_tokens", "3",
                            steps=3, reward="zero")) == 0
    for record in read_metrics(tmp_path):
        assert record["val/contain_eos_token"] < 1
        assert record["objective/scores"] == pytest.approx(-1.5 * (1 - record["val/contain_eos_token"]))


def test_reward_function_columns_reach_the_function(files, tmp_path):
    assert main(online_argv(files, tmp_path, "sigmoid", steps=1, reward="with_column")) == 0
    assert read_metrics(tmp_path)[-1]["objective/scores"] == 5.0  # len(topic) of every prompt


@pytest.mark.parametrize("change, expected", [
    ({"reward": "brevity", "file": "missing.py"}, "reward_funcs:"),
    ({"reward": "broken"}, "reward_funcs:"),
    ({"reward": "short_list"}, "reward_funcs:"),
    ({"reward": "abstain"}, "reward_funcs: no reward function scored sample(s)"),
    ({"loss_type": "kto"}, "loss_type: 'kto' does not run with --online"),
    ({"extra": ["--use_vllm"]}, "use_vllm: "),  # no vllm package and no CUDA here
])
def test_bad_online_input_fails_in_one_line_and_keeps_checkpoints(files, tmp_path, capsys, change, expected):
    argv = online_argv(files, tmp_path, change.get("loss_type", "sigmoid"), steps=2,
                       reward=change.get("reward", "brevity"))
    if "file" in change:
        argv[argv.index("--reward_funcs") + 1] = f"{tmp_path / change['file']}:brevity"
    argv += change.get("extra", [])
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(err) == 1 and err[0].startswith("prefuse train: error:") and expected in err[0], err
    assert not list(tmp_path.glob("checkpoint-*"))


def test_prompt_only_file_without_online_is_refused(files, tmp_path, capsys):
    argv = online_argv(files, tmp_path, "sigmoid", steps=1)
    argv.remove("--online")
    for flag in ("--reward_funcs",):
        i = argv.index(flag)
        del argv[i:i + 2]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--online" in err and "prompt" in err


@pytest.mark.parametrize("flags", [[], ["--iterations", "2", "--pair_samples", "3"]], ids=["plain", "iterations"])
def test_resume_after_sigkill_draws_the_same_samples(files, tmp_path, flags):
    """Killed after the checkpoint of step 4 (with iterations: inside the second, whose reference is reloaded
    from iterate-1/), the resumed run logs the uninterrupted run's losses, scores and margins, bit for bit: the
    three runs (this process, the killed one, the resumed `python -m prefuse`) on one thread each, since a matmul's
    float32 rounding may depend on how many threads split it."""
    assert torch.get_num_threads() == 1  # the one_thread fixture
    full, killed = tmp_path / "full", tmp_path / "killed"
    argv = online_argv(files, full, "sigmoid", *flags, steps=6)
    argv[argv.index("--save_steps") + 1] = "2"
    assert main(argv) == 0
    code = textwrap.dedent(f"""
        import os, signal, sys, torch
        torch.set_num_threads(1)
        from prefuse.engine import checkpoint
        original = checkpoint.save_checkpoint
        def save_then_die(out, step, **kw):
            path = original(out, step, **kw)
            if step == 4:
                os.kill(os.getpid(), signal.SIGKILL)
            return path
        checkpoint.save_checkpoint = save_then_die
        import prefuse.engine.train.loop as loop
        loop.save_checkpoint = save_then_die
        from prefuse.cli import main
        sys.exit(main({json.dumps([a if a != str(full) else str(killed) for a in argv])}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # torch's default thread count: 1
    died = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert died.returncode == -9, died.stderr[-2000:]
    resumed = subprocess.run([sys.executable, "-m", "prefuse", *[a if a != str(full) else str(killed) for a in argv],
                              "--resume_from_checkpoint", "latest"], cwd=REPO, env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = read_metrics(full), read_metrics(killed)
    assert [r["step"] for r in got] == list(range(1, 7))
    for key in ("loss", "objective/scores", "rewards/margins"):
        assert [r[key] for r in got] == [r[key] for r in expected], key


def row_temperatures(batch, head_t: float, rows_t: float) -> torch.Tensor:
    """[S, 1, 1] the temperature of each row: rows_t on HyPO's online rows, head_t elsewhere."""
    t = torch.full((batch.input_ids.shape[0],), head_t, dtype=torch.float64)
    if "online" in batch.roles:
        t[batch.roles["online"].reshape(-1)] = rows_t
    return t.view(-1, 1, 1)


def token_logps64(model, batch, temperature=1.0):
    """Per-position float64 log-probs [S, T] of the labels from the model's own logits divided by the rows'
    temperatures (log_softmax(logits / T)), 0 off the responses."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    logp = torch.log_softmax(logits / temperature, -1)
    keep = batch.labels != -100
    picked = logp.gather(-1, torch.where(keep, batch.labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked))


# the methods whose loss reads log-probs at the sampling temperature (all rows; HyPO: its online rows)
AT_SAMPLING_TEMPERATURE = {"nash_md", "grpo", "rloo", "hypo_kl"}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("loss_type", list(ONLINE) + ["hypo", "hypo_kl"])
def test_the_rollout_batch_loss_equals_the_objective_on_float64_log_probs(files, tmp_path, loss_type, temperature):
    """The step's loss on an online batch (sampled, judged, built into roles) equals the objective on float64
    log-probs of the same samples from the models' own logits (policy and reference): at T != 1, of
    log_softmax(logits / T) where the method's estimator reads the sampled distribution (Nash-MD, GRPO, RLOO,
    HyPO's KL rows: `AT_SAMPLING_TEMPERATURE`), of log_softmax(logits) for the contrastive losses (TRL's
    OnlineDPOTrainer)."""
    from prefuse.algorithms.roles import role_inputs
    from prefuse.engine.train.config import TrainConfig
    from prefuse.engine.train.build import build_run

    flags, _ = ONLINE.get(loss_type, ([], 0))
    name = "ipo" if loss_type == "ipo_md" else loss_type
    judgeless = loss_type in ("hypo", "hypo_kl")
    extra = dict(zip([f.lstrip("-") for f in flags[0::2]], flags[1::2]))
    hparams = {k: float(v) for k, v in extra.items() if k == "alpha"}
    cfg = TrainConfig(model_name_or_path=str(files["model"]),
                      dataset_name=str(files["pairs" if loss_type == "hypo" else "prompts"]),
                      output_dir=str(tmp_path), loss_type=[name], online=True,
                      reward_funcs=None if judgeless else [f"{files['rewards']}:brevity"],
                      per_device_train_batch_size=4, max_new_tokens=6,
                      temperature=temperature, report_to="none", max_steps=1, objective_args=hparams,
                      beta=float(extra.get("beta", 0.1)), online_sampler=extra.get("online_sampler", "policy"),
                      num_generations=3)
    run = build_run(cfg)
    torch.manual_seed(3)
    with torch.no_grad():  # the policy away from its reference, so that both terms matter
        for p in run.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = run.source.next_batch()
    run.policy.eval()  # the same network both ways (no dropout)
    loss, metrics = run.step(batch)
    reference = run.step.models.reference
    head_t = temperature if loss_type in AT_SAMPLING_TEMPERATURE else 1.0
    rows_t = temperature if loss_type in AT_SAMPLING_TEMPERATURE | {"hypo"} else 1.0
    temperatures = row_temperatures(batch, head_t, rows_t)
    # the batch carries each sample's temperature from the rollout to the head where the loss reads it
    if rows_t != 1.0:
        assert torch.equal(batch.temperature, temperatures.view(-1).float())
    else:
        assert batch.temperature is None or bool((batch.temperature == 1).all())
    policy = token_logps64(run.policy, batch, temperatures)
    ref = token_logps64(reference, batch, temperatures) if reference is not None else None
    mask = batch.labels != -100
    spec = prefuse.get_objective(name)
    inputs = {}
    for stat in role_inputs([spec]):
        if stat.role not in batch.roles or (stat.source == "ref" and ref is None):
            continue
        rows = batch.roles[stat.role]
        table = {("policy", "logps"): policy.sum(-1), ("ref", "logps"): None if ref is None else ref.sum(-1),
                 (None, "lengths"): mask.sum(-1),
                 ("policy", "token_logps"): policy, ("ref", "token_logps"): ref, (None, "token_mask"): mask}
        if (stat.source, stat.stat) in table:
            inputs[stat.name] = table[(stat.source, stat.stat)][rows]
    policy_leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if k.startswith("policy_")}
    inputs.update(policy_leaves)
    expected, _ = prefuse.objective_loss(name, beta=cfg.beta, **inputs, **batch.inputs, **hparams)
    assert abs(float(loss.detach()) - float(expected)) <= 1e-4 * (1 + abs(float(expected))), (float(loss),
                                                                                             float(expected))
    # TRL's online metrics over the sampled responses: KL = mean(log pi - log pi_ref), entropy = -mean(log pi)
    sampled = torch.cat([rows.reshape(-1) for role, rows in batch.roles.items() if role != "sample"])
    if loss_type != "grpo":  # grpo reads token log-probs only: no sums to report
        assert float(metrics["objective/entropy"]) == pytest.approx(-float(policy.sum(-1)[sampled].mean()),
                                                                    rel=1e-4)
    if ref is not None and "objective/kl" in metrics:
        want_kl = float((policy.sum(-1) - ref.sum(-1))[sampled].mean())
        assert float(metrics["objective/kl"]) == pytest.approx(want_kl, rel=1e-3, abs=1e-4)
    # gradients: the step's loss through the fused head equals the float64 objective's, chained through the
    # same per-row log-probs (compare d loss / d hidden via the policy statistics' gradients)
    grads = [torch.zeros_like(v) if g is None else g for v, g in zip(policy_leaves.values(), torch.autograd.grad(
        expected, list(policy_leaves.values()), allow_unused=True))]
    assert any(g.abs().max() > 0 for g in grads)
    params = [p for p in run.policy.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss, params)
    # the plain path: the objective's gradient w.r.t. each row's log-probs, pushed through the model's logits
    logits = run.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    logp = torch.log_softmax(logits / temperatures, -1).gather(-1, torch.where(mask, batch.labels, 0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    upstream = torch.zeros_like(logp)
    for (key, leaf), grad in zip(policy_leaves.items(), grads):
        stat = next(s for s in role_inputs([spec]) if s.name == key)
        rows = batch.roles[stat.role]
        if stat.stat == "logps":
            upstream.index_add_(0, rows.reshape(-1), grad.reshape(-1, 1).expand(-1, logp.shape[1]).double()
                                * mask[rows.reshape(-1)])
        else:
            upstream.index_add_(0, rows.reshape(-1), grad.reshape(-1, logp.shape[1]).double())
    want = torch.autograd.grad((logp * upstream).sum(), params)
    for g, w in zip(got, want):
        assert (g.double() - w).abs().max() <= 1e-3 * w.abs().max() + 1e-7
