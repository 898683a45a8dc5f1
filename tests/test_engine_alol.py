"""A-LoL's own machinery: the value head on the reference's prompt states, the advantages computed once and cached,
good_priority sampling, R-GOLD, and every A-LoL variant through `prefuse train` on UltraFeedback rewards joined
from the shared `.meta.jsonl` scores."""
import json
import math
import random
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.cli import main  # noqa: E402
from prefuse.engine.data.order import PriorityBatches  # noqa: E402
from prefuse.engine.methods.alol_value_head import (  # noqa: E402
    PromptEncoder,
    ValueHead,
    attention_heads,
    fit_value_head,
    predict_values,
)
from prefuse.engine.models.loading import Models  # noqa: E402
from prefuse.preference import PreferenceLoss  # noqa: E402
from tests.test_engine_objectives import train_argv  # noqa: E402  (the same short LoRA run)
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")
SOURCE = "ultrafeedback_binarized_sample_train"
VARIANTS = ("alol", "alol_seq", "alol_ref_free", "alol_kl", "wbc", "r_lol", "r_gold")
N_PAIRS = 16


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama; 16 UltraFeedback pairs with their scores joined from the meta file by source_row (rewards
    score / 10, in [0, 1] as A-LoL's); the same pairs as unpaired completions without any reward column; a reward
    function file."""
    root = tmp_path_factory.mktemp("alol")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = save_tiny_llama(root / "model", tokenizer)
    with open(DATA_DIR / f"{SOURCE}.jsonl", encoding="utf-8") as f:
        pairs = [json.loads(next(f)) for _ in range(N_PAIRS)]
    with open(DATA_DIR / f"{SOURCE}.meta.jsonl", encoding="utf-8") as f:
        meta = {m["source_row"]: m for m in map(json.loads, f)}
    rows = [{"prompt": p["prompt"][-200:], "chosen": p["chosen"], "rejected": p["rejected"],
             "score_chosen": meta[i]["score_chosen"] / 10, "score_rejected": meta[i]["score_rejected"] / 10}
            for i, p in enumerate(pairs)]
    paths = {"model": root / "model", "pairs": jsonl(root / "scored_pairs.jsonl", rows), "tokenizer": tokenizer,
             "model_object": model,
             "scores": {(r["prompt"], side): r[f"score_{side}"] for r in rows for side in ("chosen", "rejected")}}
    paths["unscored"] = jsonl(root / "unscored.jsonl", [
        {"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"}
        for r in rows for side in ("chosen", "rejected")])
    paths["rewards_py"] = root / "rewards.py"
    paths["rewards_py"].write_text(
        "def vowels(prompts, completions, **kwargs):\n"
        "    return [sum(ch in 'aeiou' for ch in c) / max(len(c), 1) for c in completions]\n")
    return paths


VALUE_FLAGS = dict(advantages="value_head", value_fraction=0.25, value_head_epochs=2, value_head_lr=1e-3)


def read_metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def errors(capsys) -> list[str]:
    """The error lines of stderr (progress bars of model loading share it)."""
    return [line for line in capsys.readouterr().err.splitlines() if "error" in line]


def read_cache(out) -> dict:
    from safetensors.torch import load_file

    (path,) = out.glob("advantages-*.safetensors")
    return load_file(str(path))


# -- the value head -----------------------------------------------------------------------------------------------

def test_value_head_shapes_and_heads():
    assert attention_heads(32) == 8 and attention_heads(12) == 6 and attention_heads(7) == 7
    head = ValueHead(12, low=-1.0, high=3.0)
    hidden, mask = torch.randn(3, 5, 12), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).bool()
    values = head.eval()(hidden, mask)
    assert values.shape == (3,) and ((values > -1) & (values < 3)).all()
    hidden[0, 2:] = 1e4  # padding is masked out of the attention: it cannot change V
    assert torch.equal(head(hidden, mask)[0], values[0])


def test_value_head_validation_loss_falls_when_the_reward_depends_on_the_prompt(files):
    """Prompts starting with "good" are worth 0.8, with "bad" 0.2 (plus noise): the value split's MSE falls from
    the untrained head's, and V predicts held-out prompts far better than the best constant."""
    tokenizer, rng = files["tokenizer"], random.Random(0)
    words = "the a of and to in is that it was for on are with as".split()

    def prompts(n):
        kinds = ["good" if i % 2 == 0 else "bad" for i in range(n)]
        ids = [tokenizer(f"{k} " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))))["input_ids"]
               for k in kinds]
        return ids, [0.8 if k == "good" else 0.2 for k in kinds]

    fit_prompts, fit_rewards = prompts(48)
    test_prompts, test_rewards = prompts(24)
    encoder = PromptEncoder(Models(files["model_object"].eval(), None, tokenizer), pad_id=0)
    lines = []
    fit = fit_value_head(encoder, fit_prompts, [(i, r + 0.05 * rng.gauss(0, 1)) for i, r in enumerate(fit_rewards)],
                         epochs=10, lr=1e-2, batch_size=8, seed=0, log=lines.append)
    assert len(fit.losses) == 10 and len(lines) == 11  # the loss before training, then one line per epoch
    assert fit.best_loss == min(fit.losses) and fit.best_loss < 0.2 * fit.initial_loss, (fit.initial_loss, fit.losses)
    assert fit.losses[-1] < fit.losses[0] < fit.initial_loss
    values = predict_values(fit.head, encoder, test_prompts)
    target = torch.tensor(test_rewards)
    assert ((values - target) ** 2).mean() < 0.1 * target.var(unbiased=False)  # 0.09 for the best constant


# -- good_priority sampling ---------------------------------------------------------------------------------------

ADVANTAGES = torch.tensor([-0.5, 0.0, 0.1, 0.4, 1.0, -2.0, 0.5, 2.0])


def counts_of(order, batches):
    counts = torch.zeros(len(ADVANTAGES))
    for _ in range(batches):
        for i in next(iter(order)):
            counts[i] += 1
    return counts


def chi_square(counts, probs):
    keep = probs > 0
    expected = counts.sum() * probs[keep]
    return float(((counts[keep] - expected) ** 2 / expected).sum())


def test_priority_sampling_draws_in_proportion_to_positive_advantage():
    """20,000 seeded draws: never an example with A <= 0, and the counts of the others fit A+ / sum A+ (chi-square
    with 4 degrees of freedom under 18.47, its 0.999 quantile); uniform over the positive ones is rejected."""
    order = PriorityBatches(ADVANTAGES, batch_size=4, seed=0)
    counts = counts_of(order, 5000)
    assert counts.sum() == 20000
    assert counts[ADVANTAGES <= 0].sum() == 0
    probs = ADVANTAGES.clamp(min=0) / ADVANTAGES.clamp(min=0).sum()
    assert chi_square(counts, probs) < 18.47
    uniform = (ADVANTAGES > 0).double() / (ADVANTAGES > 0).sum()
    assert chi_square(counts, uniform) > 1000  # the test has the power to see a wrong weighting
    assert len(order) == 2 and order.positive_fraction == 5 / 8  # an epoch: the 5 positive examples' worth


def test_priority_sampling_resumes_with_the_same_batches():
    order = PriorityBatches(ADVANTAGES, batch_size=3, seed=7)
    first = [next(iter(order)) for _ in range(3)]
    state = order.state_dict()
    expected = [next(iter(order)) for _ in range(5)]
    restored = PriorityBatches(ADVANTAGES, batch_size=3, seed=7)
    restored.load_state_dict(state)
    assert [next(iter(restored)) for _ in range(5)] == expected
    assert expected != first[:1] * 5 and len({tuple(b) for b in expected}) > 1
    other = PriorityBatches(ADVANTAGES * 2 - 0.1, batch_size=3, seed=7)
    with pytest.raises(ValueError, match="cannot resume: saved advantages="):
        other.load_state_dict(state)


def test_priority_sampling_needs_a_positive_advantage():
    with pytest.raises(ValueError, match="sampling_strategy: good_priority draws examples of positive advantage"):
        PriorityBatches(torch.tensor([-1.0, 0.0]), batch_size=2)


# -- R-GOLD -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
def test_r_gold_matches_its_definition_from_full_logits(mode):
    """L = mean_i R_i * sum_t -log p(y_t) * max(p(y_t), 0.1), p(y_t) without gradient, from float64 logits."""
    gen = torch.Generator().manual_seed(3)
    rows, length, hidden_size, vocab = 4, 7, 16, 40
    hidden = torch.randn(rows, length, hidden_size, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) / 3).requires_grad_()
    labels = torch.randint(0, vocab, (rows, length), generator=gen)
    labels[:, :2] = -100
    labels[1, 5:] = -100
    rewards = torch.tensor([0.9, 0.2, -0.3, 0.6], dtype=torch.float64)
    loss = PreferenceLoss("r_gold", mode=mode, backend="torch")(hidden, weight, labels,
                                                               roles={"completion": torch.arange(rows)},
                                                               rewards=rewards)[0]

    def plain(detach):
        logp = torch.log_softmax(hidden @ weight.T, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        prob = torch.exp(logp.detach() if detach else logp)
        per_token = torch.where(labels != -100, -logp * torch.clamp(prob, min=0.1), torch.zeros_like(logp))
        return (per_token.sum(-1) * rewards).mean()

    expected = plain(detach=True)
    probs = torch.exp(torch.log_softmax(hidden @ weight.T, -1).gather(-1, labels.clamp(min=0)[..., None]))
    assert ((probs > 0.1) & (labels[..., None] != -100)).any()  # both sides of the max are exercised
    assert ((probs < 0.1) & (labels[..., None] != -100)).any()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-9)
    got = torch.autograd.grad(loss, [hidden, weight])
    want = torch.autograd.grad(expected, [hidden, weight])
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-8)
    undetached = torch.autograd.grad(plain(detach=False), [hidden])[0]
    assert (undetached - want[0]).abs().max() > 1e-3  # a dropped detach would change the gradient


# -- through prefuse train ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_type", VARIANTS)
def test_every_variant_trains_with_the_value_head(files, tmp_path, loss_type, capsys):
    assert main(train_argv(files, tmp_path, loss_type, **VALUE_FLAGS)) == 0, capsys.readouterr().err
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert math.isfinite(record["loss"]) and record["grad_norm"] > 0, record
    assert len({r["loss"] for r in records}) > 1
    report = json.loads((tmp_path / "value_head.json").read_text())
    assert len(report["epoch_mse"]) == 2 and report["value_prompts"] == 4 and report["value_rows"] == 8
    out = capsys.readouterr().out
    assert "value head: epoch 2/2 validation MSE" in out and "advantages (value_head): 24 training examples" in out


def test_advantages_are_reward_minus_value_computed_once_and_cached(files, tmp_path, capsys):
    """The training examples' advantages are R - V(x) with R the meta file's scores; the value split's prompts are
    not trained on; a second run over the same output_dir reads the cache instead of fitting again."""
    from prefuse.cli import _train_config, build_parser
    from prefuse.engine.train.build import build_run

    argv = train_argv(files, tmp_path, "alol", **VALUE_FLAGS)
    run = build_run(_train_config(build_parser().parse_args(argv)))
    assert "value head: epoch 1/2" in capsys.readouterr().out
    table = read_cache(tmp_path)
    examples = run.source.data.examples
    tokenizer = files["tokenizer"]
    assert len(examples) == 24 and len(table["value_rewards"]) == 8
    advantages = torch.tensor([e["advantage"] for e in examples], dtype=torch.float64)
    torch.testing.assert_close(advantages, table["train_rewards"] - table["train_values"])
    assert table["train_values"].std() > 0  # V depends on the prompt
    prompts = {tuple(e["prompt_ids"]) for e in examples}
    scores = files["scores"]
    for example in examples:  # each reward is the meta file's score of that response
        prompt = next(p for (p, _) in scores if tokenizer(p)["input_ids"][-24:] == example["prompt_ids"])
        side = "chosen" if example["label"] else "rejected"
        assert example["reward"] == pytest.approx(scores[(prompt, side)])
    batch = run.source.next_batch()
    torch.testing.assert_close(batch.inputs["advantages"], advantages[batch.index].float())

    again = build_run(_train_config(build_parser().parse_args(argv)))
    out = capsys.readouterr().out
    assert "read from" in out and "value head: epoch" not in out
    assert [e["advantage"] for e in again.source.data.examples] == advantages.tolist()
    assert {tuple(e["prompt_ids"]) for e in again.source.data.examples} == prompts


def test_good_priority_run_resumes_exactly_and_reuses_the_cache(files, tmp_path, capsys):
    """good_priority with the value head: max_steps scaled by the positive fraction, only positive-advantage
    examples in the batches, and a resume from checkpoint-2 repeats the uninterrupted run's later steps exactly."""
    argv = train_argv(files, tmp_path, "alol", **VALUE_FLAGS, sampling_strategy="good_priority") + [
        "--max_steps", "8", "--save_steps", "2", "--lora_dropout", "0.1"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    positive = json.loads((tmp_path / "value_head.json").read_text())["positive_fraction"]
    steps = max(1, math.floor(8 * positive))
    assert f"-> {steps}" in out and 2 < steps < 8
    full = read_metrics(tmp_path)
    assert [r["step"] for r in full] == list(range(1, steps + 1))
    assert all(r["alol/weights"] > 0 for r in full)
    shutil.rmtree(tmp_path / f"checkpoint-{steps}")
    assert main(argv + ["--resume_from_checkpoint", str(tmp_path / "checkpoint-2")]) == 0
    out = capsys.readouterr().out
    assert "read from" in out and "value head: epoch" not in out and "resumed from" in out
    resumed = read_metrics(tmp_path)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for key in ("loss", "alol/weights", "grad_norm", "learning_rate"):
        assert [r[key] for r in resumed] == [r[key] for r in full], key


def test_rewards_from_a_judge_scoring_the_responses(files, tmp_path, capsys):
    """No reward column: --reward_funcs scores each response; the cached rewards are the function's values of the
    decoded completions."""
    flags = dict(VALUE_FLAGS, reward_funcs=f"{files['rewards_py']}:vowels")
    assert main(train_argv(files, tmp_path, "wbc", data="unscored", **flags)) == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    table = read_cache(tmp_path)
    from prefuse.engine.data import load_preference_data

    tokenizer = files["tokenizer"]
    data = load_preference_data(files["unscored"], tokenizer, needs="unpaired", max_length=48,
                                max_prompt_length=24)
    texts = tokenizer.batch_decode([e["completion_ids"] for e in data.examples], skip_special_tokens=True)
    expected = sorted(sum(ch in "aeiou" for ch in t) / max(len(t), 1) for t in texts)
    got = sorted(torch.cat([table["train_rewards"], table["value_rewards"]]).tolist())
    assert got == pytest.approx(expected) and len(set(got)) > 5


@pytest.mark.parametrize("data, flags, expected", [
    ("pairs", dict(VALUE_FLAGS, value_fraction=0.01), "value_fraction: 0.01 of the 16 training prompts leaves the "
                                                      "value head no validation rows"),
    ("pairs", dict(VALUE_FLAGS, value_fraction=0.99), "value_fraction: 0.99 of the 16 training prompts leaves no "
                                                      "training rows"),
    ("unscored", VALUE_FLAGS, "column 'reward' is missing; needed by loss_type alol"),
    ("pairs", dict(advantages="bogus"), "advantages: 'bogus' is not one of auto, column, mean, value_head"),
    ("pairs", dict(VALUE_FLAGS, value_head_epochs=0), "value_head_epochs: must be at least 1"),
    ("pairs", dict(advantages="column"), "--advantages column reads the `advantage` column of unpaired data"),
    ("pairs", dict(sampling_strategy="everything"), "sampling_strategy: 'everything' is not one of"),
])
def test_bad_alol_input_is_one_line(files, tmp_path, capsys, data, flags, expected):
    assert main(train_argv(files, tmp_path, "alol", data=data, **flags)) == 2
    err = errors(capsys)
    assert len(err) == 1 and expected in err[0], err
    if data == "unscored":
        assert "--reward_funcs" in err[0]  # the other reward source is named


def test_alol_flags_on_objectives_that_read_no_rewards_are_refused(files, tmp_path, capsys):
    for flags, expected in ((dict(advantages="value_head"), "advantages: --advantages value_head weighs examples"),
                            (dict(sampling_strategy="good_priority"), "sampling_strategy: --sampling_strategy "
                                                                      "good_priority weighs examples"),
                            (dict(reward_funcs=f"{files['rewards_py']}:vowels"), "reward_funcs: a judge scores")):
        assert main(train_argv(files, tmp_path, "sigmoid", **flags)) == 2
        err = errors(capsys)
        assert len(err) == 1 and expected in err[0], err


def test_good_priority_without_a_positive_advantage_is_refused(files, tmp_path, capsys):
    rows = [json.loads(line) for line in files["unscored"].read_text().splitlines()]
    path = jsonl(tmp_path / "negative.jsonl", [{**r, "advantage": -0.1 * (i % 3)} for i, r in enumerate(rows)])
    files = {**files, "negative": path}
    argv = train_argv(files, tmp_path / "out", "alol", data="negative", advantages="column",
                      sampling_strategy="good_priority")
    assert main(argv) == 2
    err = errors(capsys)
    assert len(err) == 1 and "sampling_strategy: good_priority draws examples of positive advantage" in err[0], err


# -- V fitted on the reference's own samples (--value_targets reference_samples) ----------------------------------

SAMPLE_FLAGS = dict(VALUE_FLAGS, value_targets="reference_samples", value_samples=3, max_new_tokens=6,
                    temperature=1.0, per_device_eval_batch_size=2)


def length_reward(prompt: str, completion: str) -> float:
    return len(completion) / 20 + (len(prompt) % 7) / 10


def recording_length_judge(tmp_path):
    """A reward function of the prompt's and the sampled text's lengths that appends every (prompt, completion) it
    scores to a log file: (file.py:name, the log)."""
    log = tmp_path / "judged.jsonl"
    path = tmp_path / "length_reward.py"
    path.write_text("import json\n"
                    f"LOG = {str(log)!r}\n"
                    "def length(prompts, completions, **kwargs):\n"
                    "    with open(LOG, 'a') as f:\n"
                    "        for p, c in zip(prompts, completions):\n"
                    "            f.write(json.dumps([p, c]) + '\\n')\n"
                    "    return [len(c) / 20 + (len(p) % 7) / 10 for p, c in zip(prompts, completions)]\n")
    return f"{path}:length", log


def judged(log) -> list[tuple[str, str]]:
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()] if log.exists() else []


def test_value_head_fits_the_judged_samples_of_the_reference(files, tmp_path, capsys, monkeypatch):
    """--value_targets reference_samples: V's (prompt, target) rows are the length reward of 3 samples per value
    prompt that the reference draws, regenerated here independently (a fresh load of the base model, rollout's
    sample_reference, chunks of 2 prompts under seeds 42 and 43); the judge saw exactly those texts; the cache
    holds their texts and rewards and a second build reads it without sampling or judging again. The policy's
    adapters are randomized first, so samples of the policy (not its reference) would differ. The sampling leaves
    the run's RNG state, the policy's weights and its training mode as they were."""
    from safetensors import safe_open

    import prefuse.engine.methods.alol_advantages as alol_advantages
    import prefuse.engine.methods.alol_value_head as value_head
    import prefuse.engine.train.build as setup
    from prefuse.cli import _train_config, build_parser
    from prefuse.engine.data import load_preference_data
    from prefuse.engine.methods.alol_advantages import value_split
    from prefuse.engine.online.rollout import RolloutConfig, sample_reference

    spec, log = recording_length_judge(tmp_path)
    fits, states = [], {}
    real_fit, real_prepare = value_head.fit_value_head, setup.prepare_advantages

    def spy_fit(encoder, prompts, rows, **kwargs):
        fits.append([(prompts[p], r) for p, r in rows])
        return real_fit(encoder, prompts, rows, **kwargs)

    def spy_prepare(cfg, models, *args, **kwargs):
        policy = models.policy
        with torch.no_grad():  # adapters that move the policy away from pi_ref: the samples must not be its
            gen = torch.Generator().manual_seed(1)
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen))
        before = (torch.get_rng_state(), random.getstate(), policy.training,
                  {k: v.clone() for k, v in policy.state_dict().items()})
        result = real_prepare(cfg, models, *args, **kwargs)
        states["before"], states["after"] = before, (torch.get_rng_state(), random.getstate(), policy.training,
                                                     policy.state_dict())
        return result

    monkeypatch.setattr(alol_advantages, "fit_value_head", spy_fit)  # the name the run calls
    monkeypatch.setattr(setup, "prepare_advantages", spy_prepare)
    out = tmp_path / "out"
    argv = train_argv(files, out, "alol", data="unscored", reward_funcs=spec, **SAMPLE_FLAGS)
    run = setup.build_run(_train_config(build_parser().parse_args(argv)))
    assert "value head: 12 samples of the reference (3 per value prompt" in capsys.readouterr().out

    # the same samples, drawn independently
    tokenizer = files["tokenizer"]
    data = load_preference_data(files["unscored"], tokenizer, needs="unpaired", max_length=48, max_prompt_length=24)
    value = value_split(data, 0.25, 42)[1]
    prompts = [list(p) for p in dict.fromkeys(tuple(e["prompt_ids"]) for e in value.examples)]
    assert len(prompts) == 4
    base = transformers.AutoModelForCausalLM.from_pretrained(files["model"])
    rollout = RolloutConfig(max_new_tokens=6, temperature=1.0, top_p=1.0, num_generations=3)
    texts, pairs = [], []
    for chunk in range(2):
        part = prompts[2 * chunk:2 * chunk + 2]
        samples = sample_reference(Models(base, base, tokenizer), part, rollout, seed=42 + chunk, eos_id=2, pad_id=0)
        completions = tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
        texts += completions
        pairs += zip(tokenizer.batch_decode(samples.prompt_ids, skip_special_tokens=True), completions)
    assert len(texts) == 12 and len(set(texts)) > 6  # sampled, not greedy: a prompt's 3 samples differ
    expected = [length_reward(p, c) for p, c in pairs]
    assert len(set(expected)) > 6

    (rows,) = fits  # V was fitted once, on the reference's samples (not the 8 data responses of the value split)
    assert [p for p, _ in rows] == [p for p in prompts for _ in range(3)]
    assert [r for _, r in rows] == pytest.approx(expected)
    assert judged(log)[-12:] == pairs  # what the judge saw last: the reference's samples after their prompts
    (path,) = out.glob("advantages-*.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["value_sample_texts"]) == texts
        assert f.get_tensor("value_sample_rewards").tolist() == pytest.approx(expected)
        assert f.get_tensor("value_sample_prompts").tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    report = json.loads((out / "value_head.json").read_text())
    assert report["value_targets"] == "reference_samples" and report["value_rows"] == 12
    assert report["range"] == [0.0, pytest.approx(max(expected + [e["reward"] for e in run.source.data.examples]))]

    before, after = states["before"], states["after"]
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and before[2] == after[2]
    assert before[3].keys() == after[3].keys()
    assert all(torch.equal(before[3][k], after[3][k]) for k in before[3])

    # a resumed run reads the cache: no sampling, no judging, the same advantages
    advantages = [e["advantage"] for e in run.source.data.examples]
    seen = len(judged(log))
    again = setup.build_run(_train_config(build_parser().parse_args(argv)))
    printed = capsys.readouterr().out
    assert "read from" in printed and "samples of the reference" not in printed
    assert len(judged(log)) == seen and len(fits) == 1
    assert [e["advantage"] for e in again.source.data.examples] == advantages


def test_value_targets_data_is_the_default_and_reads_the_data_rewards(files, tmp_path, monkeypatch, capsys):
    """Without --value_targets V's rows are the value split's data rewards (8 responses of 4 prompts) and no sample is
    drawn, so the cache file keeps its name from before the flag."""
    import prefuse.engine.methods.alol_advantages as alol_advantages
    import prefuse.engine.methods.alol_value_head as value_head
    from prefuse.cli import _train_config, build_parser
    from prefuse.engine.methods.alol_advantages import cache_path

    rows_seen = []
    real_fit = value_head.fit_value_head
    monkeypatch.setattr(alol_advantages, "fit_value_head",
                        lambda encoder, prompts, rows, **kw: rows_seen.append(rows) or real_fit(encoder, prompts,
                                                                                                 rows, **kw))
    monkeypatch.setattr(alol_advantages, "reference_samples", lambda *a, **k: pytest.fail("sampled with value_targets data"))
    argv = train_argv(files, tmp_path, "alol", **VALUE_FLAGS)
    cfg = _train_config(build_parser().parse_args(argv))
    assert cfg.value_targets == "data" and cfg.value_samples == 1
    from prefuse.engine.train.build import build_run

    build_run(cfg)
    table = read_cache(tmp_path)
    (rows,) = rows_seen
    assert [r for _, r in rows] == pytest.approx(table["value_rewards"].tolist()) and len(rows) == 8
    assert "value_sample_rewards" not in table
    sampled = dict(vars(cfg), value_targets="reference_samples")
    assert cache_path(cfg, {}, False) != cache_path(type(cfg)(**sampled), {}, False)
    assert cache_path(cfg, {}, False) == cache_path(type(cfg)(**dict(vars(cfg), value_samples=5)), {}, False)


@pytest.mark.parametrize("flags, expected", [
    (dict(VALUE_FLAGS, value_targets="reference_samples"),
     "value_targets: reference_samples needs a judge to score the reference's samples: add --reward_funcs"),
    (dict(VALUE_FLAGS, value_targets="bogus"), "value_targets: 'bogus' is not one of data, reference_samples"),
    (dict(VALUE_FLAGS, value_samples=0), "value_samples: must be at least 1, got 0"),
    (dict(value_targets="reference_samples"), "value_targets: reference_samples are the value head's targets: add "
                                              "--advantages value_head"),
    (dict(SAMPLE_FLAGS, max_new_tokens=0, judge=True), "max_new_tokens: must be at least 1, got 0"),
    (dict(SAMPLE_FLAGS, top_p=0, judge=True), "top_p: must be in (0, 1], got 0"),
])
def test_bad_value_targets_input_is_one_line(files, tmp_path, capsys, flags, expected):
    if flags.pop("judge", False):
        flags["reward_funcs"] = f"{files['rewards_py']}:vowels"
    assert main(train_argv(files, tmp_path, "alol", **flags)) == 2
    err = errors(capsys)
    assert len(err) == 1 and expected in err[0], err
