"""Every online method with every judge kind its paper allows, through `prefuse train --online`: reward functions,
a Bradley-Terry reward model, a pairwise preference model and a vision-language judge (tiny models saved with
save_pretrained and loaded by the judges' own code); the pairs a batch holds are the ones the judge prefers (checked against the judge's own
calls); SELM ranks {y_1, y_2, y_ref}; RLHF Workflow's best-of-n drops and counts the prompts whose samples all
tie; GRPO and RLOO refuse a judge that gives no scores."""
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.cli import main  # noqa: E402
from tests.tokenizer_fixture import (DATA_DIR, build_tokenizer, save_tiny_classifier, save_tiny_llama,
                                     save_tiny_llava)  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")

REWARDS = '''
def brevity(prompts, completions, **columns):
    return [-len(c) / 8 for c in completions]

def ties_where_flagged(prompts, completions, tie, **columns):
    """0 for every sample of a flagged prompt (all its samples tie), else shorter is better."""
    return [0.0 if t else -len(c) / 8 for c, t in zip(completions, tie)]

def zero(prompts, completions, **columns):
    return [0.0] * len(completions)

def length_mod_5(prompts, completions, **columns):
    return [float(len(c) % 5) for c in completions]
'''


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_judges")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    save_tiny_llama(root / "model", tokenizer)
    save_tiny_classifier(root / "reward_model", tokenizer)
    save_tiny_classifier(root / "pairwise", tokenizer)
    save_tiny_llava(root / "vlm_judge", tokenizer)  # a vision-language judge: log-odds of " yes" after the response
    with open(DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(8)]
    (root / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"][:60], "tie": i % 2 == 0}) + "\n" for i, r in enumerate(rows)))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"][:60], "chosen": r["chosen"][:40],
                                                          "rejected": r["rejected"][:40]}) + "\n" for r in rows))
    (root / "rewards.py").write_text(REWARDS)
    return {"model": root / "model", "prompts": root / "prompts.jsonl", "pairs": root / "pairs.jsonl",
            "rewards": root / "rewards.py", "reward_model": root / "reward_model", "pairwise": root / "pairwise",
            "vlm_judge": root / "vlm_judge"}


def judge_flags(files, kind: str) -> list[str]:
    return {"reward_funcs": ["--reward_funcs", f"{files['rewards']}:brevity"],
            "reward_model": ["--reward_model_path", str(files["reward_model"])],
            "pairwise": ["--judge", str(files["pairwise"])],
            "vision_language": ["--judge", str(files["vlm_judge"])]}[kind]


# method -> (loss_type, extra flags); IPO-MD: ipo with both samples from the mixture; RLHF Workflow: best of 3
METHODS = {
    "online_dpo": ("sigmoid", []),
    "rlhf_workflow": ("sigmoid", ["--pair_samples", "3"]),
    "ipo_md": ("ipo", ["--online_sampler", "mixture"]),
    "online_ipo": ("online_ipo", []),
    "xpo": ("xpo", []),
    "selm": ("selm", []),
    "nash_md": ("nash_md", []),
    "mixed_dpo": ("mixed_dpo", ["--mixed_p", "0.25"]),
}


def argv(files, out, loss_type, *flags, steps=2, data="prompts"):
    return ["train", "--online", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files[data]),
            "--output_dir", str(out), "--loss_type", loss_type, "--max_steps", str(steps), "--logging_steps", "1",
            "--save_steps", "0", "--per_device_train_batch_size", "4", "--max_new_tokens", "6",
            "--learning_rate", "1e-3", "--report_to", "none", *flags]


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["reward_funcs", "reward_model", "pairwise", "vision_language"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_judged_method_trains_with_every_judge_kind(files, tmp_path, method, kind, capsys):
    loss_type, flags = METHODS[method]
    data = "pairs" if method == "mixed_dpo" else "prompts"
    code = main(argv(files, tmp_path, loss_type, *flags, *judge_flags(files, kind), data=data))
    assert code == 0, capsys.readouterr().err
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert all(v == v for v in record.values() if isinstance(v, float))  # no NaN
        if kind == "pairwise":  # no scores to log; where a pair was judged, its mean P(chosen > rejected)
            assert "objective/scores" not in record
        elif record.get("mixed/online_fraction", 1) > 0:
            assert "objective/scores" in record
    if kind == "pairwise" and method in ("online_dpo", "rlhf_workflow", "xpo", "selm"):
        assert all(0.5 <= r["objective/chosen_prob"] <= 1 for r in records)


class Recorder:
    """A judge that records every call's arguments and answers, passing them through."""

    def __init__(self, judge):
        self.judge, self.calls = judge, []

    def compare(self, prompts, first, second, **columns):
        out = self.judge.compare(prompts, first, second, **columns)
        self.calls.append(("compare", list(prompts), list(first), list(second), out.clone()))
        return out

    def score(self, prompts, completions, **columns):
        out = self.judge.score(prompts, completions, **columns)
        self.calls.append(("score", list(prompts), list(completions), None, out.clone()))
        return out


def build(files, tmp_path, loss_type, judge=None, reward=None, data="prompts", **settings):
    from prefuse.engine.train.config import TrainConfig
    from prefuse.engine.train.build import build_run

    settings = {"per_device_train_batch_size": 4, "max_new_tokens": 6, "max_steps": 1, **settings}
    cfg = TrainConfig(model_name_or_path=str(files["model"]), dataset_name=str(files[data]), output_dir=str(tmp_path),
                      loss_type=[loss_type], online=True, report_to="none", judge=judge,
                      reward_funcs=[f"{files['rewards']}:{reward}"] if reward else None, **settings)
    return build_run(cfg)


def texts(run, batch, rows) -> list[str]:
    """The decoded responses of batch rows (labels != -100 are the response tokens)."""
    tokenizer = run.source.tokenizer
    out = []
    for r in rows.tolist():
        ids = [t for t, lab in zip(batch.input_ids[r].tolist()[1:], batch.labels[r].tolist()) if lab != -100]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


@pytest.mark.parametrize("loss_type", ["xpo", "sigmoid"])
def test_a_pairwise_judge_picks_the_pairs_of_a_batch(files, tmp_path, loss_type):
    """With the pairwise model, each pair's chosen is the response the model prefers: its own compare() of the
    batch's chosen against its rejected is >= 1/2 (XPO: the policy's sample against the reference's)."""
    from prefuse.engine.judges import PairwiseJudge

    run = build(files, tmp_path, loss_type, judge=str(files["pairwise"]))
    batch = run.source.next_batch()
    judge = PairwiseJudge(files["pairwise"])
    prompts = [run.source.prompts.examples[i]["prompt"] for i in batch.index.tolist()]
    probs = judge.compare(prompts, texts(run, batch, batch.roles["chosen"]), texts(run, batch, batch.roles["rejected"]))
    assert (probs >= 0.5).all(), probs
    assert batch.metrics["objective/chosen_prob"] == pytest.approx(float(probs.mean()), abs=1e-5)
    assert "objective/scores" not in batch.metrics


def test_nash_md_and_online_ipo_preferences_are_the_pairwise_judges(files, tmp_path):
    """preference_probs are the judge's P(y > y') of the two samples each example drew, in the drawn order."""
    run = build(files, tmp_path / "nash", "nash_md", judge=str(files["pairwise"]))
    run.source.judge = recorder = Recorder(run.source.judge)
    batch = run.source.next_batch()
    (call,) = recorder.calls
    assert call[0] == "compare" and call[2] == texts(run, batch, batch.roles["completion"])
    torch.testing.assert_close(batch.inputs["preference_probs"], call[4])
    run = build(files, tmp_path / "ipo", "online_ipo", judge=str(files["pairwise"]))
    run.source.judge = recorder = Recorder(run.source.judge)
    batch = run.source.next_batch()
    (call,) = recorder.calls
    assert call[2] == texts(run, batch, batch.roles["chosen"]) and call[3] == texts(run, batch, batch.roles["rejected"])
    torch.testing.assert_close(batch.inputs["preference_probs"], call[4])


def test_nash_md_preference_takes_the_missing_eos_penalty(files, tmp_path):
    """A scoring judge's P(y > y') is sigmoid of the scores after the missing-EOS penalty (TRL's Nash-MD): with
    every score 0 and y' reported finished, P = sigmoid(-2) where y did not end and 1/2 where it did."""
    run = build(files, tmp_path, "nash_md", reward="zero", missing_eos_penalty=2.0, max_new_tokens=2)
    drawn, sample = {}, run.source._sample

    def finished_mixture(kind, examples, seed, k, **kw):
        samples = sample(kind, examples, seed, k, **kw)
        if kind == "mixture":
            samples.contains_eos = [True] * len(samples.contains_eos)
        drawn[kind] = samples
        return samples

    run.source._sample = finished_mixture
    batch = run.source.next_batch()
    ended = torch.tensor(drawn["policy"].contains_eos)
    assert not ended.all()
    want = torch.where(ended, torch.tensor(0.5), torch.sigmoid(torch.tensor(-2.0)))
    torch.testing.assert_close(batch.inputs["preference_probs"], want)


def first_max_last_min(strength: torch.Tensor) -> tuple[int, int]:
    """The ranking's tie rule: the first drawn of the best, the last of the worst."""
    values = strength.tolist()
    return values.index(max(values)), len(values) - 1 - values[::-1].index(min(values))


def test_selm_ranks_the_reference_response_with_the_samples(files, tmp_path):
    """SELM's batch: chosen and rejected are the best and the worst of {y_1, y_2, y_ref} by the judge's scores, and
    `sample` is y_ref, the reference's greedy response: over a few batches y_ref is both chosen and rejected."""
    run = build(files, tmp_path, "selm", reward="brevity", temperature=1.0)
    run.source.judge = recorder = Recorder(run.source.judge)
    seen = {"chosen": 0, "rejected": 0, "neither": 0}
    for _ in range(4):
        recorder.calls.clear()
        batch = run.source.next_batch()
        (call,) = recorder.calls  # one score() call over the three candidates of each example, grouped by prompt
        scores = call[4].view(-1, 3)
        candidates = [call[2][i:i + 3] for i in range(0, len(call[2]), 3)]
        chosen, rejected = texts(run, batch, batch.roles["chosen"]), texts(run, batch, batch.roles["rejected"])
        sample = texts(run, batch, batch.roles["sample"])
        for j, (cands, s) in enumerate(zip(candidates, scores)):
            assert s.max() > s.min()  # brevity on 6 sampled tokens: no example ties here
            best, worst = first_max_last_min(s)
            assert chosen[j] == cands[best] and rejected[j] == cands[worst]
            assert sample[j] == cands[2]  # y_ref is the third candidate
            seen["chosen" if best == 2 else "rejected" if worst == 2 else "neither"] += 1
        # y_ref is the reference's greedy answer: the reference decoding greedily gives the same text
        from prefuse.engine.online.rollout import RolloutConfig, sample_reference

        prompts = [run.source.prompts.examples[i]["prompt_ids"] for i in batch.index.tolist()]
        greedy = sample_reference(run.source.models, prompts, RolloutConfig(max_new_tokens=6, temperature=0.0,
                                                                            num_generations=1),
                                  seed=0, eos_id=run.source.eos_id, pad_id=run.source.pad_id)
        assert sample == run.source.tokenizer.batch_decode(greedy.completion_ids, skip_special_tokens=True)
        assert batch.metrics["selm/reference_chosen"] == pytest.approx(
            sum(first_max_last_min(s)[0] == 2 for s in scores) / len(scores))
    assert seen["chosen"] > 0 and seen["rejected"] > 0, seen


def test_selm_ranking_with_a_pairwise_judge_is_a_round_robin(files, tmp_path):
    """Three candidates, a pairwise judge: all three pairs compared; chosen has the largest sum of P(a > b)."""
    run = build(files, tmp_path, "selm", judge=str(files["pairwise"]))
    run.source.judge = recorder = Recorder(run.source.judge)
    batch = run.source.next_batch()
    (call,) = recorder.calls
    n = len(batch.index)
    probs = call[4].view(n, 3)  # pairs (0, 1), (0, 2), (1, 2) of each example
    wins = torch.stack([probs[:, 0] + probs[:, 1], 1 - probs[:, 0] + probs[:, 2], 2 - probs[:, 1] - probs[:, 2]], 1)
    firsts = [call[2][i * 3:(i + 1) * 3] for i in range(n)]
    candidates = [[f[0], f[2], call[3][i * 3 + 1]] for i, f in enumerate(firsts)]  # y_1, y_2, y_ref
    chosen, rejected = texts(run, batch, batch.roles["chosen"]), texts(run, batch, batch.roles["rejected"])
    for j in range(n):
        best, worst = first_max_last_min(wins[j])
        assert chosen[j] == candidates[j][best] and rejected[j] == candidates[j][worst]


def test_best_of_n_drops_and_counts_the_prompts_whose_samples_all_tie(files, tmp_path):
    """RLHF Workflow: a prompt whose 3 samples get equal rewards is dropped and counted; the others are kept."""
    run = build(files, tmp_path, "sigmoid", reward="ties_where_flagged", pair_samples=3, temperature=1.0)
    drawn, judged_pair = [], run.source._judged_pair

    def recording(examples, indices, seed):
        drawn.extend(examples)
        return judged_pair(examples, indices, seed)

    run.source._judged_pair = recording
    tied = 0
    for _ in range(3):
        drawn.clear()
        batch = run.source.next_batch()
        flags = [e["columns"]["tie"] for e in drawn]
        kept = [run.source.prompts.examples[i]["columns"]["tie"] for i in batch.index.tolist()]
        assert not any(kept) and len(kept) == flags.count(False)  # exactly the prompts that did not tie
        assert batch.metrics["online/tied_prompts"] == flags.count(True)
        tied += flags.count(True)
    assert tied > 0  # half the prompts are flagged


def error_lines(capsys) -> list[str]:
    """The command's error lines (stderr also holds transformers' loading progress bars)."""
    return [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def test_a_run_whose_samples_always_tie_stops_in_one_line(files, tmp_path, capsys):
    code = main(argv(files, tmp_path, "sigmoid", "--pair_samples", "3", "--reward_funcs", f"{files['rewards']}:zero"))
    (error,) = error_lines(capsys)
    assert code == 2 and "every sample of every prompt tied" in error


@pytest.mark.parametrize("loss_type", ["grpo", "rloo"])
def test_grpo_and_rloo_refuse_a_pairwise_judge(files, tmp_path, loss_type, capsys):
    assert main(argv(files, tmp_path, loss_type, "--judge", str(files["pairwise"]))) == 2
    (error,) = error_lines(capsys)
    assert "gives no scores" in error and "--reward_model_path" in error


def test_iterations_default_to_each_papers_reference(files, tmp_path):
    """RLHF Workflow's iterative DPO keeps the SFT model as the reference; SELM's is the previous iterate."""
    from prefuse.engine.train.config import TrainConfig

    def resolved(loss_type):
        cfg = TrainConfig(model_name_or_path=str(files["model"]), dataset_name=str(files["prompts"]),
                          output_dir=str(tmp_path), loss_type=[loss_type], online=True, iterations=2, max_steps=4,
                          reward_funcs=[f"{files['rewards']}:brevity"])
        filled = cfg.apply_defaults()
        return cfg.validate().iteration_reference, filled

    reference, applied = resolved("sigmoid")
    assert reference == "initial" and any(a.startswith("iteration_reference initial (RLHF Workflow") for a in applied)
    assert resolved("selm")[0] == "previous"


def test_iterations_sample_each_iterations_pairs_once_from_its_policy(files, tmp_path):
    """--iteration_sampling once (the authors' loop): at an iteration's first batch every prompt is sampled once
    from the policy as it is then, judged, and the iteration serves those batches in turn (a third batch of a
    2-batch pool is the first again); the next iteration samples anew; a resumed source reads the saved pool."""
    settings = dict(reward="brevity", pair_samples=3, iterations=2, max_steps=6, iteration_sampling="once",
                    temperature=1.0)
    run = build(files, tmp_path, "sigmoid", **settings)
    sampled, sample = [], run.source._sample

    def recording(kind, examples, seed, k, **kw):  # when the policy is sampled, and with which weights
        sampled.append((len(served), kind, float(sum(p.double().sum() for p in run.policy.parameters()))))
        return sample(kind, examples, seed, k, **kw)

    run.source._sample = recording
    served = []
    for i in range(6):
        if i == 3:  # the policy moves before iteration 2: its pool must be sampled from the moved policy
            with torch.no_grad():
                for p in run.policy.parameters():
                    p.add_(0.5 * torch.randn_like(p))
            state = run.source.state_dict()
        served.append(run.source.next_batch())
    moved = float(sum(p.double().sum() for p in run.policy.parameters()))
    # 8 prompts in batches of 4: each iteration samples its 2 batches at its first batch, and only then
    assert [(i, kind) for i, kind, _ in sampled] == [(0, "policy"), (0, "policy"), (3, "policy"), (3, "policy")]
    assert [w == moved for *_, w in sampled] == [False, False, True, True]
    assert torch.equal(served[0].input_ids, served[2].input_ids)  # the pool of 2 batches, served in turn
    assert not torch.equal(served[0].input_ids, served[1].input_ids)
    assert torch.equal(served[3].input_ids, served[5].input_ids)
    first = served[0].index.tolist() + served[1].index.tolist()
    assert len(set(first)) == len(first)  # each prompt at most once in an iteration's pool
    assert (tmp_path / "iteration-0-batches.pt").is_file() and (tmp_path / "iteration-1-batches.pt").is_file()
    resumed = build(files, tmp_path, "sigmoid", **settings)
    resumed.source.load_state_dict(state)
    for want in served[3:]:
        got = resumed.source.next_batch()  # read from iteration-1-batches.pt: the same pairs, not new samples
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)


def length_mod_5(text: str) -> float:
    return float(len(text) % 5)


def test_selm_data_ranks_each_pair_with_the_reference_greedy_response(files, tmp_path, capsys):
    """prefuse selm-data: for each pair, y_ref = the model's greedy response (checked against transformers'
    generate), {y_w, y_l, y_ref} scored by the judge, chosen = the best, rejected = the worst, y_ref kept as
    reference_response; the file then trains offline SELM."""
    out = tmp_path / "selm.jsonl"
    assert main(["selm-data", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files["pairs"]),
                 "--output", str(out), "--reward_funcs", f"{files['rewards']}:length_mod_5",
                 "--max_new_tokens", "6", "--device", "cpu"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = {json.loads(line)["prompt"]: json.loads(line) for line in files["pairs"].read_text().splitlines()}
    tokenizer = transformers.AutoTokenizer.from_pretrained(files["model"])
    model = transformers.AutoModelForCausalLM.from_pretrained(files["model"]).eval()
    reference_sides = set()
    for row in rows:
        ids = tokenizer(row["prompt"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, do_sample=False, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id,
                                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        y_ref = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
        assert row["reference_response"] == y_ref
        pair = pairs[row["prompt"]]
        candidates = [pair["chosen"], pair["rejected"], y_ref]
        scores = [length_mod_5(c) for c in candidates]
        best, worst = first_max_last_min(torch.tensor(scores))
        assert (row["chosen"], row["rejected"]) == (candidates[best], candidates[worst])
        reference_sides.add("chosen" if best == 2 else "rejected" if worst == 2 else "neither")
    assert 0 < len(rows) <= len(pairs)
    assert len(reference_sides) >= 2  # y_ref is ranked, not always on one side
    train = ["train", "--model_name_or_path", str(files["model"]), "--dataset_name", str(out), "--output_dir",
             str(tmp_path / "run"), "--loss_type", "selm", "--max_steps", "1", "--save_steps", "0",
             "--report_to", "none", "--per_device_train_batch_size", "2"]
    assert main(train) == 0
    assert "loss/optimism" in read_metrics(tmp_path / "run")[0]  # the reference_response reached SELM's term


def test_selm_data_with_a_pairwise_judge(files, tmp_path, capsys):
    out = tmp_path / "selm.jsonl"
    assert main(["selm-data", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files["pairs"]),
                 "--output", str(out), "--judge", str(files["pairwise"]), "--max_new_tokens", "6",
                 "--device", "cpu"]) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    from prefuse.engine.judges import PairwiseJudge

    judge = PairwiseJudge(files["pairwise"])
    probs = judge.compare([r["prompt"] for r in rows], [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    assert len(rows) > 0 and (probs >= 0.5).all()
