"""prefuse.engine.judges: reward functions (TRL's call convention), reward models, pairwise models, rule judges."""
import json
import math
import types

import pytest
import torch
import transformers

from prefuse.engine.judges import (
    PAIRWISE_TEMPLATE,
    Judge,
    JudgeError,
    PairwiseJudge,
    RewardFunctions,
    RewardModelJudge,
    RuleJudge,
    copy_prompts,
    copy_reward,
    make_judge,
    pairwise_ids,
    reward_model_ids,
)
from tests.tokenizer_fixture import build_tokenizer, save_tiny_classifier, save_tiny_llama

REWARDS = '''
import os

with open(os.environ["PREFUSE_TEST_IMPORT_LOG"], "a") as log:
    log.write("imported\\n")

def length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]

def matches(prompts, completions, answer, **kwargs):
    return [1.0 if c == a else 0.0 for c, a in zip(completions, answer)]

def trl_keywords(*, prompts, completions, completion_ids, trainer_state, **columns):
    trl_keywords.seen = dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                             trainer_state=trainer_state, **columns)
    return [0.0] * len(prompts)

def some(prompts, completions, **kwargs):
    return [None if c.startswith("n") else 1.0 for c in completions]

def divide(prompts, completions, **kwargs):
    return [1 / 0 for c in completions]

def three(prompts, completions, **kwargs):
    return [1.0, 2.0, 3.0]

def not_a_number(prompts, completions, **kwargs):
    return [0.0, 1.0, float("nan"), 0.0]

def infinite(prompts, completions, **kwargs):
    return [float("inf"), 1.0, 0.0, 0.0]

def words(prompts, completions, **kwargs):
    return ["high"] * len(completions)

def one_number(prompts, completions, **kwargs):
    return 1.0

def tensor_out(prompts, completions, **kwargs):
    import torch
    return torch.arange(len(completions), dtype=torch.float64)

NOT_CALLABLE = 3

def _private(prompts, completions, **kwargs):
    return [0.0] * len(completions)
'''


@pytest.fixture
def rewards_file(tmp_path, monkeypatch):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS)
    monkeypatch.setenv("PREFUSE_TEST_IMPORT_LOG", str(tmp_path / "imports.log"))
    monkeypatch.chdir(tmp_path)  # specs relative to the working directory, as on the command line
    return path


PROMPTS = ["p1", "p2", "p3"]


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(JudgeError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- reward functions -------------------------------------------------------------------------------------------------
def test_reward_functions_weighted_sum_columns_and_per_function(rewards_file):
    judge = RewardFunctions.from_specs(["rewards.py:length", "rewards.py:matches"], weights=[0.5, 2.0])
    completions, answer = ["ab", "xyz", "q"], ["ab", "no", "q"]
    parts = judge.per_function(PROMPTS, completions, answer=answer)
    assert list(parts) == ["length", "matches"]
    assert torch.equal(parts["length"], torch.tensor([2.0, 3.0, 1.0]))
    assert torch.equal(parts["matches"], torch.tensor([1.0, 0.0, 1.0]))
    scores = judge.score(PROMPTS, completions, answer=answer)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert torch.equal(scores, torch.tensor([3.0, 1.5, 2.5]))  # 0.5 * length + 2 * matches
    assert torch.equal(judge.weighted_sum(parts), scores)
    assert isinstance(judge, Judge)


def test_reward_functions_compare_is_bradley_terry(rewards_file):
    judge = RewardFunctions.from_specs(["rewards.py:length", "rewards.py:matches"])  # weights 1, 1
    probs = judge.compare(PROMPTS, ["ab", "xyz", "q"], ["abcd", "x", "q"], answer=["ab", "no", "q"])
    # scores of first: 2 + 1, 3 + 0, 1 + 1; of second: 4 + 0, 1 + 0, 1 + 1
    expected = torch.sigmoid(torch.tensor([3.0 - 4.0, 3.0 - 1.0, 0.0]))
    torch.testing.assert_close(probs, expected, rtol=0, atol=0)
    assert probs[2].item() == 0.5


def test_reward_functions_call_convention_is_trls(rewards_file):
    """Keyword-only prompts / completions / completion_ids / trainer_state plus the columns, as trl calls them;
    conversational prompts get their completions as assistant messages."""
    judge = RewardFunctions.from_specs(["rewards.py:trl_keywords"])
    fn = judge.functions[0]
    judge.score(PROMPTS, ["a", "b", "c"], answer=[1, 2, 3], level="hard")
    assert fn.seen == dict(prompts=PROMPTS, completions=["a", "b", "c"], completion_ids=None, trainer_state=None,
                           answer=[1, 2, 3], level="hard")
    judge.score(PROMPTS, ["a", "b", "c"], completion_ids=[[5], [6], [7]], trainer_state="state")
    assert fn.seen["completion_ids"] == [[5], [6], [7]] and fn.seen["trainer_state"] == "state"
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    judge.score(chats, ["a", "b", "c"])
    assert fn.seen["prompts"] == chats
    assert fn.seen["completions"] == [[{"role": "assistant", "content": t}] for t in "abc"]


def test_reward_functions_match_trl_online_dpo_trainer(rewards_file, monkeypatch):
    """trl 1.16's own OnlineDPOTrainer._calculate_rewards_from_functions, run on the same functions and inputs,
    gives the same weighted sums (None rewards included); a completion that every function leaves unscored is NaN
    here (GRPOTrainer's rule) where OnlineDPOTrainer's nansum gives 0."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    online_dpo = pytest.importorskip("trl.experimental.online_dpo.online_dpo_trainer")
    judge = RewardFunctions.from_specs(["rewards.py:length", "rewards.py:some", "rewards.py:trl_keywords"],
                                       weights=[0.25, 3.0, 1.0])
    prompts, completions, answer = ["p1", "p2", "p3", "p4"], ["yes", "no", "", "nn"], [1, 2, 3, 4]
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(device=torch.device("cpu")),
                                    reward_funcs=judge.functions, reward_processing_classes=[None] * 3,
                                    reward_weights=judge.weights, state=None)
    trl_total = online_dpo.OnlineDPOTrainer._calculate_rewards_from_functions(
        trainer, prompts=prompts, completions=completions, completion_ids_list=None, answer=answer)
    ours = judge.score(prompts, completions, answer=answer)
    assert torch.equal(ours, trl_total)
    assert torch.equal(ours, torch.tensor([0.75 + 3.0, 0.5, 3.0, 0.5]))
    abstaining = RewardFunctions.from_specs(["rewards.py:some"])
    trl_total = online_dpo.OnlineDPOTrainer._calculate_rewards_from_functions(
        types.SimpleNamespace(**{**vars(trainer), "reward_funcs": abstaining.functions,
                                 "reward_processing_classes": [None], "reward_weights": abstaining.weights}),
        prompts=prompts, completions=completions, completion_ids_list=None)
    assert trl_total.tolist() == [1.0, 0.0, 1.0, 0.0]
    scores = abstaining.score(prompts, completions)
    assert scores[0].item() == 1.0 and scores[2].item() == 1.0 and scores[1].isnan() and scores[3].isnan()
    assert abstaining.per_function(prompts, completions)["some"].isnan().tolist() == [False, True, False, True]


def test_reward_functions_accept_tensors_and_callables(rewards_file):
    judge = RewardFunctions.from_specs(["rewards.py:tensor_out", lambda prompts, completions, **kw: [1] * 3])
    assert judge.names == ["tensor_out", "<lambda>"]
    assert torch.equal(judge.score(PROMPTS, ["a", "b", "c"]), torch.tensor([1.0, 2.0, 3.0]))
    same = RewardFunctions.from_specs(["rewards.py:length", "rewards.py:length"])
    assert same.names == ["length", "length_2"]


def test_reward_function_file_is_imported_once(rewards_file, tmp_path):
    judge = RewardFunctions.from_specs(["rewards.py:length", "rewards.py:matches"])
    again = RewardFunctions.from_specs([str(rewards_file) + ":length"])
    for _ in range(3):
        judge.score(PROMPTS, ["a", "b", "c"], answer=["a", "b", "c"])
        again.score(PROMPTS, ["a", "b", "c"])
    assert (tmp_path / "imports.log").read_text() == "imported\n"
    assert judge.functions[0] is again.functions[0]
    assert judge.functions[0].__module__.startswith("prefuse_reward_funcs_rewards_")


def test_reward_function_spec_errors(rewards_file):
    assert _error(RewardFunctions.from_specs, ["missing.py:length"]).startswith(
        "reward_funcs: missing.py does not exist (give the path of the Python file that defines length, relative to ")
    assert _error(RewardFunctions.from_specs, ["rewards.py:lenght"]) == (
        "reward_funcs: rewards.py has no function 'lenght' (functions defined there: divide, infinite, length, "
        "matches, not_a_number, one_number, some, tensor_out, three, trl_keywords, words)")
    assert _error(RewardFunctions.from_specs, ["rewards.py:NOT_CALLABLE"]).startswith(
        "reward_funcs: rewards.py has a int, not a function, named 'NOT_CALLABLE' (functions defined there: ")
    for spec in ("rewards.py", "rewards:length", "rewards.py:", "rewards.py:len gth"):
        assert _error(RewardFunctions.from_specs, [spec]) == (
            f"reward_funcs: {spec!r} is not file.py:name (write the Python file and the function's name separated "
            f"by a colon, e.g. rewards.py:accuracy)")
    assert _error(RewardFunctions.from_specs, ["rewards.py:length", "rewards.py:matches"], [1.0]) == (
        "reward_funcs: 1 reward_weights for 2 reward functions (give one weight per function, in the order of "
        "reward_funcs)")
    assert _error(RewardFunctions.from_specs, ["rewards.py:length"], [math.nan]) == (
        "reward_funcs: reward_weights [nan] must be finite numbers")


def test_reward_function_import_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.py").write_text("import nonexistent_module_xyz\n")
    assert _error(RewardFunctions.from_specs, ["broken.py:f"]) == (
        "reward_funcs: importing broken.py raised ModuleNotFoundError: No module named 'nonexistent_module_xyz' "
        "(fix the file; it is imported once as a module)")


def test_reward_function_call_errors(rewards_file):
    four = ["a", "b", "c", "d"]
    prompts = ["p"] * 4
    cases = {
        "divide": "reward_funcs: rewards.py:divide raised ZeroDivisionError: division by zero (fix the function; it "
                  "is called as fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns))",
        "three": "reward_funcs: rewards.py:three returned 3 scores for 4 completions (return one float per "
                 "completion)",
        "not_a_number": "reward_funcs: rewards.py:not_a_number returned nan for completion 2 (return a finite float, "
                        "or None to abstain)",
        "infinite": "reward_funcs: rewards.py:infinite returned inf for completion 0 (return a finite float, or None "
                    "to abstain)",
        "words": "reward_funcs: rewards.py:words returned 'high' (str) for completion 0 (return a float, or None to "
                 "abstain)",
        "one_number": "reward_funcs: rewards.py:one_number returned float, not a list of 4 scores (return one float "
                      "per completion)",
    }
    for name, message in cases.items():
        judge = RewardFunctions.from_specs([f"rewards.py:{name}"])
        assert _error(judge.score, prompts, four) == message
    judge = RewardFunctions.from_specs(["rewards.py:matches"])
    assert _error(judge.score, prompts, ["a", "b", "c"], answer=four) == (
        "judge: 3 completions for 4 prompts (pass one completion per prompt)")
    assert _error(judge.score, prompts, four, answer=["a"]) == (
        "judge: column 'answer' has 1 entries for 4 completions (pass one value per completion, or a non-list to "
        "share one)")
    assert _error(judge.compare, prompts, four, four, completion_ids=four).startswith(
        "judge: compare takes no completion_ids column")
    with pytest.raises(JudgeError) as info:  # the function's own exception stays attached
        RewardFunctions.from_specs(["rewards.py:divide"]).score(prompts, four)
    assert isinstance(info.value.__cause__, ZeroDivisionError) and isinstance(info.value, ValueError)


# -- model judges -----------------------------------------------------------------------------------------------------
_save_classifier = save_tiny_classifier


def _reference_logit(path, ids: list[int], pad_token_id=None) -> float:
    """The model's own forward on one unpadded sequence, loaded afresh from disk."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).eval()
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, 0].item()


CHAT = [{"role": "user", "content": "Tell me a story about a dragon."}]
MODEL_PROMPTS = ["Hi", "What is the capital of France?", CHAT, "Q", CHAT]
MODEL_COMPLETIONS = ["Hello there, how are you doing today my friend?", "Paris.", "Once upon a time there was one.",
                     "A", "No."]


def test_reward_model_judge_scores_are_the_models_logits(tmp_path, one_thread, offline_hf_home):
    tokenizer = build_tokenizer()
    path = _save_classifier(tmp_path / "rm", tokenizer)
    judge = RewardModelJudge(path, batch_size=2)
    assert isinstance(judge, Judge)
    assert not judge.model.training and not any(p.requires_grad for p in judge.model.parameters())
    rows = [tokenizer(p + c + "</s>")["input_ids"] if isinstance(p, str)
            else tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=True,
                                               return_dict=True)["input_ids"]
            for p, c in zip(MODEL_PROMPTS, MODEL_COMPLETIONS)]
    assert [reward_model_ids(tokenizer, p, c) for p, c in zip(MODEL_PROMPTS, MODEL_COMPLETIONS)] == rows
    assert rows[0][0] == 1 and rows[0][-1] == 2  # BOS ... EOS on plain text
    assert len({len(r) for r in rows}) == len(rows)  # every batch is padded
    expected = torch.tensor([_reference_logit(path, r) for r in rows])
    scores = judge.score(MODEL_PROMPTS, MODEL_COMPLETIONS)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert scores.std() > 0.1  # the scores tell the texts apart
    others = MODEL_COMPLETIONS[::-1]
    expected_others = torch.tensor([_reference_logit(path, reward_model_ids(tokenizer, p, c))
                                    for p, c in zip(MODEL_PROMPTS, others)])
    probs = judge.compare(MODEL_PROMPTS, MODEL_COMPLETIONS, others)
    torch.testing.assert_close(probs, torch.sigmoid(expected - expected_others), rtol=1e-5, atol=1e-5)
    assert probs[2].item() == 0.5  # the same text on both sides


def test_reward_model_judge_without_pad_token_pads_with_eos(tmp_path, one_thread, offline_hf_home):
    tokenizer = build_tokenizer()
    path = _save_classifier(tmp_path / "rm", tokenizer, pad_token_id=None)
    settings = json.loads((path / "tokenizer_config.json").read_text())
    del settings["pad_token"]
    (path / "tokenizer_config.json").write_text(json.dumps(settings))
    assert transformers.AutoTokenizer.from_pretrained(path, local_files_only=True).pad_token is None
    judge = RewardModelJudge(path, batch_size=8)
    assert judge.tokenizer.pad_token == "</s>" and judge.pad_id == 2 and judge.model.config.pad_token_id == 2
    rows = [reward_model_ids(judge.tokenizer, p, c) for p, c in zip(MODEL_PROMPTS, MODEL_COMPLETIONS)]
    # TRL's RewardTrainer trains such a model with pad = EOS: its head pools the last token that is not EOS
    expected = torch.tensor([_reference_logit(path, r, pad_token_id=2) for r in rows])
    torch.testing.assert_close(judge.score(MODEL_PROMPTS, MODEL_COMPLETIONS), expected, rtol=1e-5, atol=1e-5)


def test_model_judge_load_errors(tmp_path, offline_hf_home):
    assert _error(RewardModelJudge, tmp_path / "nowhere") == (
        f"reward_model_path: {tmp_path / 'nowhere'} is not a directory (give the local directory of a model saved "
        f"with save_pretrained, e.g. by `prefuse train-rm`)")
    (tmp_path / "empty").mkdir()
    assert _error(RewardModelJudge, tmp_path / "empty") == (
        f"reward_model_path: {tmp_path / 'empty'} has no config.json (give the directory that save_pretrained "
        f"wrote, e.g. the output_dir of `prefuse train-rm`)")
    assert _error(PairwiseJudge, tmp_path / "empty").startswith(f"judge: {tmp_path / 'empty'} has no config.json")
    tokenizer = build_tokenizer()
    save_tiny_llama(tmp_path / "lm", tokenizer)
    assert _error(RewardModelJudge, tmp_path / "lm") == (
        f"reward_model_path: {tmp_path / 'lm'} is not a trained one-logit classifier: its checkpoint lacks "
        f"score.weight (architectures ['LlamaForCausalLM']); train one with `prefuse train-rm`")
    _save_classifier(tmp_path / "two", tokenizer, num_labels=2)
    assert _error(RewardModelJudge, tmp_path / "two") == (
        f"reward_model_path: {tmp_path / 'two'} is a classifier with num_labels=2; a judge reads one logit (train "
        f"it with num_labels=1)")


def test_pairwise_judge(tmp_path, one_thread, offline_hf_home):
    tokenizer = build_tokenizer()
    path = _save_classifier(tmp_path / "pair", tokenizer)
    judge = PairwiseJudge(path, batch_size=3)
    assert PAIRWISE_TEMPLATE == "{prompt} [A] {first} [B] {second}"
    first, second = MODEL_COMPLETIONS, ["Good day.", "Lyon, surely.", "The end.", "B", "Yes, absolutely yes."]
    chat_text = "user: Tell me a story about a dragon.\n"
    assert pairwise_ids(tokenizer, CHAT, "x", "y") == tokenizer(chat_text + " [A] x [B] y</s>")["input_ids"]
    text = lambda p, a, b: f"{p if isinstance(p, str) else chat_text} [A] {a} [B] {b}</s>"  # noqa: E731
    forward = torch.sigmoid(torch.tensor([_reference_logit(path, tokenizer(text(p, a, b))["input_ids"])
                                          for p, a, b in zip(MODEL_PROMPTS, first, second)]))
    backward = torch.sigmoid(torch.tensor([_reference_logit(path, tokenizer(text(p, b, a))["input_ids"])
                                           for p, a, b in zip(MODEL_PROMPTS, first, second)]))
    probs = judge.compare(MODEL_PROMPTS, first, second)
    torch.testing.assert_close(probs, (forward + 1 - backward) / 2, rtol=1e-5, atol=1e-5)
    assert ((probs > 0) & (probs < 1)).all() and (probs - 0.5).abs().max() > 0.05
    torch.testing.assert_close(judge.compare(MODEL_PROMPTS, second, first), 1 - probs, rtol=0, atol=1e-6)
    assert judge.compare(MODEL_PROMPTS, first, first).tolist() == [0.5] * 5
    assert _error(judge.score, MODEL_PROMPTS, first) == (
        "judge: pairwise judges compare; they do not score (use --reward_model_path or --reward_funcs for an "
        "objective that needs scores)")


# -- rule judges ------------------------------------------------------------------------------------------------------
def test_copy_reward():
    assert copy_reward("repeat: a b c =", "a b c") == 1.0
    assert copy_reward("repeat: a b c =", "a b d") == 2 / 3
    assert copy_reward("repeat: a b c =", "a b c d") == 0.75  # an extra word costs a position
    assert copy_reward("repeat: a b c =", "a b") == 2 / 3
    assert copy_reward("repeat: a b c =", "") == 0.0
    assert copy_reward("repeat: a b c =", "b c a") == 0.0
    assert copy_reward([{"role": "user", "content": "repeat: x y ="}], " x  y ") == 1.0
    assert _error(copy_reward, "copy: a b =", "a b") == "judge: copy: prompt 'copy: a b =' is not 'repeat: <words> ='"
    prompts = copy_prompts(4, length=3, seed=7)
    assert prompts == copy_prompts(4, length=3, seed=7) and prompts != copy_prompts(4, length=3, seed=8)
    assert all(p.startswith("repeat: ") and p.endswith(" =") and len(p.split()) == 5 for p in prompts)
    assert [copy_reward(p, p[len("repeat: "):-2]) for p in prompts] == [1.0] * 4


def test_rule_judge():
    judge = RuleJudge(copy_reward)
    assert isinstance(judge, Judge)
    prompts = ["repeat: a b c =", "repeat: a b =", "repeat: z ="]
    scores = judge.score(prompts, ["a b d", "a b", "y"], level=["x", "y", "z"])
    assert torch.equal(scores, torch.tensor([2 / 3, 1.0, 0.0], dtype=torch.float32))
    probs = judge.compare(prompts, ["a b c", "a b", "y"], ["a b d", "b a", "y"])
    torch.testing.assert_close(probs, torch.sigmoid(torch.tensor([1 / 3, 1.0, 0.0])), rtol=0, atol=1e-7)
    assert probs[2].item() == 0.5
    bad = RuleJudge(lambda p, c: math.nan if c == "?" else 1.0, name="odd")
    assert _error(bad.score, ["p", "p"], ["a", "?"]) == (
        "judge: odd returned nan for completion 1 (return a finite float)")
    assert _error(RuleJudge(lambda p, c: None, name="none").score, ["p"], ["a"]) == (
        "judge: none returned None (NoneType) for completion 0 (return a float)")


# -- make_judge -------------------------------------------------------------------------------------------------------
def test_make_judge(rewards_file, tmp_path, offline_hf_home):
    judge = make_judge(reward_funcs=["rewards.py:length"], reward_weights=[2.0])
    assert isinstance(judge, RewardFunctions) and judge.weights.tolist() == [2.0]
    assert isinstance(make_judge(reward_funcs="rewards.py:length"), RewardFunctions)
    assert isinstance(make_judge(judge="copy"), RuleJudge)
    _save_classifier(tmp_path / "rm", build_tokenizer())
    assert isinstance(make_judge(reward_model_path=str(tmp_path / "rm")), RewardModelJudge)
    assert isinstance(make_judge(judge=str(tmp_path / "rm")), PairwiseJudge)
    assert _error(make_judge) == (
        "judge: no judge given (pass --reward_funcs file.py:name, --reward_model_path DIR, or --judge DIR|copy)")
    assert _error(make_judge, reward_funcs=["rewards.py:length"], reward_model_path="rm") == (
        "judge: --reward_funcs and --reward_model_path given together (pass exactly one judge)")
    assert _error(make_judge, reward_model_path="rm", judge="copy") == (
        "judge: --reward_model_path and --judge given together (pass exactly one judge)")
    assert _error(make_judge, judge="copy", reward_weights=[1.0]) == (
        "reward_funcs: reward_weights given without reward_funcs (weights weigh reward functions)")
    assert _error(make_judge, judge="cpoy") == (
        "judge: 'cpoy' is neither a rule judge (copy) nor a directory (give a pairwise model's directory)")
    assert _error(make_judge, reward_funcs=["rewards.py:length"], reward_weights=[1.0, 2.0]).startswith(
        "reward_funcs: 2 reward_weights for 1 reward functions")
