"""`prefuse eval`: the win-rate statistics against independent computations (scipy's Wilson interval, scikit-learn's
unpenalised logistic regression fit as AlpacaEval fits soft preferences), closed-form cases of the LC win rate, an
end-to-end evaluation of a tiny model whose wins are counted here from its answers, same seed -> same numbers, the
implicit-reward accuracy against float64 log-probs of materialized logits, and one-line errors."""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.cli import main
from prefuse.engine.data import load_preference_data
from prefuse.engine.eval import (
    EvalConfig,
    evaluate,
    implicit_reward_accuracy,
    length_controlled,
    score_wins,
    wilson_interval,
    win_rate,
)
from prefuse.engine.eval.stats import length_features
from prefuse.engine.models.loading import load_generator
from tests.data_helpers import write_jsonl
from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")

# a fixed table: per prompt the model's win (ties 1/2) and the two answers' lengths
WINS = [1.0, 0.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0]
MODEL_LENGTHS = [40, 12, 55, 30, 18, 25, 60, 33, 20, 30, 45, 50]
BASELINE_LENGTHS = [30, 20, 35, 30, 25, 22, 31, 30, 28, 30, 20, 35]


def sklearn_lc(wins, model_lengths, baseline_lengths):
    """AlpacaEval's fit of soft preferences, independently: every row twice (y = 1 weighted p, y = 0 weighted 1 - p),
    scikit-learn's LogisticRegression without penalty or intercept on [1, tanh(d / sd(d))] (numpy's sd, ddof=1)."""
    np = pytest.importorskip("numpy")
    linear_model = pytest.importorskip("sklearn.linear_model")
    d = np.array(model_lengths, dtype=np.float64) - np.array(baseline_lengths, dtype=np.float64)
    x = np.stack([np.ones_like(d), np.tanh(d / d.std(ddof=1))], axis=1)
    p = np.array(wins, dtype=np.float64)
    fit = linear_model.LogisticRegression(C=np.inf, fit_intercept=False, tol=1e-12, max_iter=10_000)
    fit.fit(np.concatenate([x, x]), np.concatenate([np.ones_like(p), np.zeros_like(p)]),
            sample_weight=np.concatenate([p, 1 - p]))
    theta, phi = fit.coef_[0]
    return 1 / (1 + math.exp(-theta)), theta, phi


def test_win_rate_and_wilson_interval_on_the_fixed_table():
    assert win_rate(WINS) == pytest.approx(7 / 12, abs=1e-15)  # six wins and two ties of twelve
    assert score_wins([3.0, 1.0, 2.0], [1.0, 1.0, 5.0]) == [1.0, 0.5, 0.0]
    stats = pytest.importorskip("scipy.stats")
    for successes, n in ((7, 10), (0, 8), (12, 12), (5, 12)):
        reference = stats.binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
        low, high = wilson_interval(successes / n, n)
        assert (low, high) == pytest.approx((reference.low, reference.high), abs=1e-12)
    # 7 of 10 at z = 1.96, by hand: centre (0.7 + 0.19208) / 1.38416 = 0.644491, half 1.96 sqrt(0.030604) / 1.38416
    assert wilson_interval(0.7, 10, z=1.96) == pytest.approx((0.396773, 0.892211), abs=1e-6)


def test_length_controlled_win_rate_against_an_independent_logistic_regression():
    lc = length_controlled(WINS, MODEL_LENGTHS, BASELINE_LENGTHS)
    rate, theta, phi = sklearn_lc(WINS, MODEL_LENGTHS, BASELINE_LENGTHS)
    # both are maxima of the same strictly concave log-likelihood; Newton converges to 1e-12, lbfgs to its tol
    assert (lc.rate, lc.theta, lc.phi) == pytest.approx((rate, theta, phi), abs=1e-5)
    assert phi > 0 and lc.rate < win_rate(WINS)  # the model wins more when longer: its LC rate is lower
    # the fitted rate with the length term zeroed, by hand from the coefficients
    assert lc.rate == pytest.approx(1 / (1 + math.exp(-lc.theta)), abs=1e-15)
    # the score equations hold at the fit: sum (y - p) = 0 and sum (y - p) x = 0
    x = length_features(MODEL_LENGTHS, BASELINE_LENGTHS)
    p = torch.sigmoid(lc.theta + lc.phi * x)
    y = torch.tensor(WINS, dtype=torch.float64)
    assert float((y - p).sum()) == pytest.approx(0, abs=1e-10)
    assert float(((y - p) * x).sum()) == pytest.approx(0, abs=1e-10)


def test_length_controlled_closed_forms():
    # no length difference: LC is the raw win rate
    same = length_controlled(WINS, [10] * 12, [10] * 12)
    assert same.rate == pytest.approx(7 / 12, abs=1e-15)
    # the same length difference everywhere: tanh(d / sd) is undefined (sd = 0), the term is zero
    assert length_controlled(WINS, [12] * 12, [10] * 12).rate == pytest.approx(7 / 12, abs=1e-15)
    # symmetric data (d -> -d swaps a win for a loss): theta = 0, LC = 1/2 though the raw rate is not 1/2
    wins = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0]
    model = [30, 10, 40, 0, 25, 15, 30, 10]  # d = 10, -10, 20, -20, 5, -5, 10, -10
    base = [20] * 8
    extra = length_controlled(wins + [1.0], model + [14], base + [14])  # one more win at d = -6: raw 5/9
    assert extra.rate == pytest.approx(sklearn_lc(wins + [1.0], model + [14], base + [14])[0], abs=1e-5)
    assert extra.rate != pytest.approx(5 / 9, abs=1e-3)
    symmetric = length_controlled(wins, model, base)
    assert symmetric.rate == pytest.approx(0.5, abs=1e-12) and symmetric.theta == pytest.approx(0, abs=1e-12)
    # every prompt won: the limit; separated by length: no finite fit, said so
    assert length_controlled([1.0] * 4, [1, 2, 3, 4], [4, 3, 2, 1]).rate == 1.0
    separated = length_controlled([1.0, 1.0, 0.0, 0.0], [5, 6, 1, 2], [3, 3, 3, 3])
    assert separated.rate is None and "separated" in separated.note


# -- end to end on a tiny model -------------------------------------------------------------------------------------

REWARDS = '''
def count_e(prompts, completions, **kwargs):
    return [float(c.count("e")) for c in completions]
'''

PROMPTS = ["The weather today is", "Tell me about the sea.", "repeat: a b c =", "Where do cats sleep?",
           "Name three colors.", "Write one word.", "What is seven plus two?", "Describe a tree."]
BASELINES = ["eee", "", "e", "no", "the tree", "e e e e e e", "x", "here"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    save_tiny_llama(root / "model", tokenizer)
    torch.manual_seed(1)
    save_tiny_llama(root / "baseline", tokenizer)
    write_jsonl(root / "prompts.jsonl", [{"prompt": p, "reference": b} for p, b in zip(PROMPTS, BASELINES)])
    (root / "rewards.py").write_text(REWARDS)
    pairs = [{"prompt": p, "chosen": " a good answer here", "rejected": " no"} for p in PROMPTS[:3]]
    pairs += [{"prompt": "Say hi.", "chosen": " hi", "rejected": " hello there friend"},
              {"prompt": "Count.", "chosen": " one two three", "rejected": " three two one"}]
    write_jsonl(root / "pairs.jsonl", pairs)
    return {"root": root, "model": root / "model", "baseline": root / "baseline", "prompts": root / "prompts.jsonl",
            "rewards": f"{root / 'rewards.py'}:count_e", "pairs": root / "pairs.jsonl"}


def eval_argv(files, out, *extra):
    return ["eval", "--model_name_or_path", str(files["model"]), "--prompts", str(files["prompts"]),
            "--reward_funcs", files["rewards"], "--max_new_tokens", "12", "--output", str(out), *extra]


def test_prefuse_eval_against_a_column_counts_the_wins_of_its_answers(files, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(eval_argv(files, out, "--baseline_column", "reference", "--markdown", str(tmp_path / "t.md"))) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    records = result["records"]
    answers = [r["answer"] for r in records]
    # the answers are the model's greedy ones (transformers' generate on the same prompt ids)
    model, tokenizer = load_generator(str(files["model"]))
    for prompt, answer in zip(PROMPTS, answers):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
                                     pad_token_id=0, eos_token_id=2)
        assert answer == tokenizer.decode(out_ids[0, ids.shape[1]:], skip_special_tokens=True)
    # the wins, by hand: the count of "e" in each answer against the baseline's
    wins = [1.0 if a.count("e") > b.count("e") else 0.5 if a.count("e") == b.count("e") else 0.0
            for a, b in zip(answers, BASELINES)]
    assert [r["win"] for r in records] == wins
    assert result["win_rate"] == pytest.approx(sum(wins) / 8, abs=1e-15)
    assert result["n"] == 8 and result["baseline"] == "column 'reference'" and result["model"] == str(files["model"])
    lengths = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    base_lengths = [len(tokenizer(b, add_special_tokens=False)["input_ids"]) for b in BASELINES]
    assert result["mean_length"] == pytest.approx(sum(lengths) / 8)
    assert result["baseline_mean_length"] == pytest.approx(sum(base_lengths) / 8)
    assert result["win_rate_ci95"] == pytest.approx(list(wilson_interval(sum(wins) / 8, 8)), abs=1e-15)
    lc = length_controlled(wins, lengths, base_lengths)
    assert result["lc_win_rate"] == lc.rate
    assert 0 < result["win_rate"] < 1  # the table is not trivial
    table = (tmp_path / "t.md").read_text()
    assert table in printed and f"{100 * result['win_rate']:.1f}%" in table


def test_prefuse_eval_against_a_baseline_model_same_seed_same_numbers(files, tmp_path, capsys):
    runs = []
    for n, seed in enumerate((3, 3, 4)):
        out = tmp_path / f"eval{n}.json"
        assert main(eval_argv(files, out, "--baseline_model", str(files["baseline"]), "--temperature", "1.0",
                              "--seed", str(seed))) == 0, capsys.readouterr().err
        runs.append(json.loads(out.read_text()))
    assert runs[0] == runs[1]
    assert [r["answer"] for r in runs[0]["records"]] != [r["answer"] for r in runs[2]["records"]]
    first = runs[0]
    wins = [1.0 if r["answer"].count("e") > r["baseline_answer"].count("e") else
            0.5 if r["answer"].count("e") == r["baseline_answer"].count("e") else 0.0 for r in first["records"]]
    assert first["win_rate"] == pytest.approx(sum(wins) / 8, abs=1e-15)
    assert first["baseline"] == str(files["baseline"])
    assert any(r["baseline_answer"] for r in first["records"])


# -- implicit-reward accuracy -----------------------------------------------------------------------------------------

def float64_margins(policy, reference, tokenizer, pairs_file, beta):
    """beta * (log-ratio chosen - log-ratio rejected) per pair from materialized float64 log-softmax over each
    sequence alone (no padding), on the token ids the data layer gives the pairs (prompt_ids + response ids)."""
    def logp(model, prompt_ids, response_ids):
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].double()
        logps = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        return float(logps[len(prompt_ids) - 1:].sum())

    margins = []
    for e in load_preference_data(pairs_file, tokenizer, needs="pairs").examples:
        ratio = {side: logp(policy, e["prompt_ids"], e[f"{side}_ids"]) - logp(reference, e["prompt_ids"],
                                                                              e[f"{side}_ids"])
                 for side in ("chosen", "rejected")}
        margins.append(beta * (ratio["chosen"] - ratio["rejected"]))
    return margins


@pytest.fixture(scope="module")
def adapter(files):
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(files["model"])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(files["root"] / "adapter")
    return files["root"] / "adapter"


def test_implicit_reward_accuracy_against_float64_logits(files, adapter):
    rows = [json.loads(line) for line in files["pairs"].read_text().splitlines()]
    assert all(r["prompt"] in PROMPTS + ["Say hi.", "Count."] for r in rows)
    model, tokenizer = load_generator(str(adapter))
    result = implicit_reward_accuracy(model, tokenizer, str(files["pairs"]), beta=0.1, batch_size=2)
    with model.disable_adapter():
        reference = float64_margins(model, model, tokenizer, str(files["pairs"]), 0.1)  # adapters off on both sides: zero
    assert reference == [0.0] * len(rows)
    ref_model, _ = load_generator(str(files["model"]))
    expected = float64_margins(model, ref_model, tokenizer, str(files["pairs"]), 0.1)
    # float32 head: each log-prob is off by a few ulps of its magnitude (|log p| <~ log V = 6.2, <= 9 tokens per
    # response, four sums per margin): 4 * 9 * 8 * eps32 * 6.2 * beta ~ 2e-6
    tol = 4 * 9 * 8 * torch.finfo(torch.float32).eps * math.log(len(tokenizer)) * 0.1
    assert result["margins"] == pytest.approx(expected, abs=tol)
    assert min(abs(m) for m in expected) > 10 * tol  # no sign is in doubt
    assert result["accuracy"] == sum(m > 0 for m in expected) / len(rows)
    assert 0 < result["accuracy"] < 1
    assert result["margin_mean"] == pytest.approx(sum(expected) / len(rows), abs=tol)
    # a separate reference model gives the same numbers as the adapters disabled
    separate = implicit_reward_accuracy(model, tokenizer, str(files["pairs"]), beta=0.1, reference=ref_model)
    assert separate["margins"] == pytest.approx(result["margins"], abs=tol)


def test_prefuse_eval_pairs_only(files, adapter, tmp_path, capsys):
    out = tmp_path / "pairs.json"
    assert main(["eval", "--model_name_or_path", str(adapter), "--pairs", str(files["pairs"]), "--output",
                 str(out)]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["win_rate"] is None and result["pairs"]["n"] == 5
    assert "implicit-reward accuracy" in capsys.readouterr().out
    cfg = EvalConfig(model_name_or_path=str(files["model"]), pairs=str(files["pairs"]))
    with pytest.raises(ValueError, match="reference_model: the model has no LoRA adapters"):
        evaluate(cfg)


# -- one-line errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, expected", [
    ("neither", "baseline_model: pass exactly one baseline"),
    ("both", "baseline_model: pass exactly one baseline, --baseline_model DIR or --baseline_column COLUMN (both"),
    ("no_judge", "judge: no judge given"),
    ("two_judges", "judge: --reward_funcs and --judge given together"),
    ("missing_column", "column 'answer' (--baseline_column) is missing"),
    ("bad_row", "bad.jsonl:2: field 'prompt'"),
    ("no_prompts", "prompts: required"),
    ("missing_model", "model_name_or_path: no such model directory"),
    ("missing_gguf", "model_name_or_path: no such GGUF file"),
    ("missing_baseline_gguf", "baseline_model: no such GGUF file"),
])
def test_bad_eval_input_is_one_line(files, tmp_path, capsys, case, expected):
    write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "fine", "reference": "x"}, {"question": "no prompt",
                                                                                 "reference": "y"}])
    base = ["eval", "--model_name_or_path", str(files["model"]), "--prompts", str(files["prompts"])]
    judge = ["--reward_funcs", files["rewards"]]
    argv = {
        "neither": base + judge,
        "both": base + judge + ["--baseline_model", str(files["baseline"]), "--baseline_column", "reference"],
        "no_judge": base + ["--baseline_column", "reference"],
        "two_judges": base + judge + ["--judge", "copy", "--baseline_column", "reference"],
        "missing_column": base + judge + ["--baseline_column", "answer"],
        "bad_row": ["eval", "--model_name_or_path", str(files["model"]), "--prompts", str(tmp_path / "bad.jsonl"),
                    "--baseline_column", "reference", *judge],
        "no_prompts": ["eval", "--model_name_or_path", str(files["model"]), "--baseline_column", "reference", *judge],
        "missing_model": ["eval", "--model_name_or_path", str(tmp_path / "nope"), "--prompts", str(files["prompts"]),
                          "--baseline_column", "reference", *judge],
        "missing_gguf": ["eval", "--model_name_or_path", str(tmp_path / "m.gguf"), "--prompts", str(files["prompts"]),
                         "--baseline_column", "reference", *judge],
        "missing_baseline_gguf": base + judge + ["--baseline_model", str(tmp_path / "b.gguf")],
    }[case]
    assert main(argv) == 2
    # datasets' progress bars (reading the file) are the only other lines on stderr
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "examples/s]" not in line]
    assert len(err) == 1 and err[0].startswith("prefuse eval: error: ") and expected in err[0], err


# -- the other judge kinds, and a checkpoint of prefuse train ---------------------------------------------------------

def test_a_pairwise_judge_gives_the_win_in_both_orders(files, tmp_path, capsys):
    from tests.tokenizer_fixture import save_tiny_classifier

    judge_dir = save_tiny_classifier(tmp_path / "pairwise", build_tokenizer())
    out = tmp_path / "self.json"
    argv = ["eval", "--model_name_or_path", str(files["model"]), "--prompts", str(files["prompts"]), "--judge",
            str(judge_dir), "--max_new_tokens", "8", "--output", str(out)]
    assert main([*argv, "--baseline_model", str(files["model"])]) == 0, capsys.readouterr().err
    self_play = json.loads(out.read_text())  # the model against itself, greedy: the same answers, each exactly 1/2
    assert [r["win"] for r in self_play["records"]] == [0.5] * 8 and self_play["lc_win_rate"] == 0.5
    assert "both orders averaged" in self_play["judge"]
    assert main([*argv, "--baseline_column", "reference"]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    # by hand: the classifier's logit of the template in each order, sigmoid, averaged
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(judge_dir).eval()
    tokenizer = build_tokenizer()

    def p(prompt, first, second):
        text = f"{prompt} [A] {first} [B] {second}</s>"
        with torch.no_grad():
            return torch.sigmoid(classifier(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, 0]).item()

    wins = [(p(r["prompt"], r["answer"], r["baseline_answer"]) + 1 - p(r["prompt"], r["baseline_answer"], r["answer"]))
            / 2 for r in result["records"]]
    assert [r["win"] for r in result["records"]] == pytest.approx(wins, abs=1e-6)
    assert result["win_rate"] == pytest.approx(sum(wins) / 8, abs=1e-6)
    assert len({round(w, 6) for w in wins}) > 1  # the judge tells the answers apart


def test_a_reward_model_judge_and_a_prefuse_checkpoint(files, tmp_path, capsys):
    from tests.tokenizer_fixture import save_tiny_classifier

    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": " yes " + b, "rejected": " no"}
                                           for p, b in zip(PROMPTS, BASELINES)])
    assert main(["train", "--model_name_or_path", str(files["model"]), "--dataset_name", str(tmp_path / "pairs.jsonl"),
                 "--output_dir", str(tmp_path / "run"), "--loss_type", "sigmoid", "--max_steps", "1",
                 "--save_steps", "1", "--per_device_train_batch_size", "4", "--learning_rate", "0.5",
                 "--report_to", "none", "--use_peft", "--lora_r", "4", "--lora_dropout", "0"]) == 0, \
        capsys.readouterr().err
    checkpoint = tmp_path / "run" / "checkpoint-1"
    rm = save_tiny_classifier(tmp_path / "rm", build_tokenizer())
    out = tmp_path / "rm.json"
    assert main(["eval", "--model_name_or_path", str(checkpoint), "--baseline_model", str(files["model"]),
                 "--prompts", str(files["prompts"]), "--reward_model_path", str(rm), "--max_new_tokens", "8",
                 "--pairs", str(tmp_path / "pairs.jsonl"), "--output", str(out)]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(rm).eval()
    tokenizer = build_tokenizer()

    def score(prompt, answer):
        with torch.no_grad():
            return classifier(torch.tensor([tokenizer(prompt + answer + "</s>")["input_ids"]])).logits[0, 0].item()

    for r in result["records"]:
        assert r["score"] == pytest.approx(score(r["prompt"], r["answer"]), abs=1e-5)
        assert r["baseline_score"] == pytest.approx(score(r["prompt"], r["baseline_answer"]), abs=1e-5)
        assert r["win"] == (1.0 if r["score"] > r["baseline_score"] else 0.5 if r["score"] == r["baseline_score"]
                            else 0.0)
    # the checkpoint's LoRA step changed the policy: its answers differ from the base's somewhere, and its pairs
    # margins against the adapters disabled are not zero
    assert any(r["answer"] != r["baseline_answer"] for r in result["records"])
    assert result["pairs"]["n"] == 8 and any(m != 0 for m in result["pairs"]["margins"])


def test_a_prompt_the_reward_functions_leave_unscored_is_left_out_and_counted(files, tmp_path):
    (tmp_path / "abstain.py").write_text(
        'def count_e_or_none(prompts, completions, **kwargs):\n'
        '    return [None if p.startswith("repeat") else float(c.count("e")) for p, c in zip(prompts, completions)]\n')
    result = evaluate(EvalConfig(model_name_or_path=str(files["model"]), prompts=str(files["prompts"]),
                                 baseline_column="reference", reward_funcs=[f"{tmp_path / 'abstain.py'}:count_e_or_none"],
                                 max_new_tokens=12))
    records = result["records"]
    assert [r["win"] is None for r in records] == [p.startswith("repeat") for p in PROMPTS]
    wins = [1.0 if r["answer"].count("e") > b.count("e") else 0.5 if r["answer"].count("e") == b.count("e") else 0.0
            for r, b, p in zip(records, BASELINES, PROMPTS) if not p.startswith("repeat")]
    assert result["n"] == 7 and result["n_abstained"] == 1
    assert result["win_rate"] == pytest.approx(sum(wins) / 7, abs=1e-15)


def test_a_full_checkpoint_against_a_reference_model(files, tmp_path, capsys):
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": " yes " + b, "rejected": " no"}
                                           for p, b in zip(PROMPTS, BASELINES)])
    assert main(["train", "--model_name_or_path", str(files["model"]), "--dataset_name", str(tmp_path / "pairs.jsonl"),
                 "--output_dir", str(tmp_path / "run"), "--loss_type", "sigmoid", "--max_steps", "1",
                 "--save_steps", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-2",
                 "--report_to", "none"]) == 0, capsys.readouterr().err
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert not (checkpoint / "adapter_config.json").exists() and not (checkpoint / "config.json").exists()
    out = tmp_path / "full.json"
    assert main(["eval", "--model_name_or_path", str(checkpoint), "--pairs", str(tmp_path / "pairs.jsonl"),
                 "--reference_model", str(files["model"]), "--output", str(out)]) == 0, capsys.readouterr().err
    pairs = json.loads(out.read_text())["pairs"]
    # one DPO step on these very pairs: the trained policy prefers their chosen answers more than the start does
    assert pairs["n"] == 8 and pairs["margin_mean"] > 0 and pairs["accuracy"] > 0.5
