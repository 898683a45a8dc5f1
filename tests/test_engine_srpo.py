"""SRPO as a method: the revision template (plain and through the chat template), the six sequences per pair as
roles of one fused call (equal to the community-form loss on float64 sums from the model's own logits, values and
LoRA gradients), `prefuse train --loss_type srpo` through the CLI, and self-revision at inference
(`prefuse generate --revisions N`, `revise`, the judges' win rates by revision)."""
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.cli import main  # noqa: E402
from prefuse.engine.data import IGNORE_INDEX, load_records, tokenize_preferences  # noqa: E402
from prefuse.engine.methods.self_revision import evaluate_revisions, revise  # noqa: E402
from prefuse.engine.models.loading import load_generator
from prefuse.engine.judges import RuleJudge, copy_reward  # noqa: E402
from prefuse.engine.models.loading import ModelConfig, load_models  # noqa: E402
from prefuse.engine.core.objectives import objective_needs  # noqa: E402
from prefuse.engine.methods.srpo import (DEFAULT_TEMPLATE, add_revision_rows, load_template,  # noqa: E402
                                     revision_prompt_ids, revision_prompt_text)
from prefuse.engine.core.sources import build_batch  # noqa: E402
from prefuse.engine.core.step import Step  # noqa: E402
from prefuse.preference import PreferenceLoss  # noqa: E402
from tests.data_helpers import read_rows, write_jsonl  # noqa: E402
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")
ROLES = ("chosen", "rejected", "chosen_given_chosen", "chosen_given_rejected", "rejected_given_chosen",
         "rejected_given_rejected")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama; 5 standard pairs (4 UltraFeedback, prompts cut to their last 200 characters, and a PandaLM
    pair whose answers share their first words), 3 conversational UltraFeedback pairs and copy prompts."""
    root = tmp_path_factory.mktemp("srpo")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    save_tiny_llama(root / "model", tokenizer)
    rows = [{"prompt": r["prompt"][-200:], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in read_rows(DATA_DIR / "ultrafeedback_binarized_sample_train.jsonl", 4)]
    panda = read_rows(DATA_DIR / "pandalm_testset_v1_human.jsonl", 2)[1]
    rows.append({"prompt": panda["prompt"][-60:], "chosen": panda["chosen"], "rejected": panda["rejected"]})
    chat = read_rows(DATA_DIR / "ultrafeedback_binarized_sample_train.conversational.jsonl", 3)
    for row in chat:  # short prompts: the test's sequences stay small
        row["prompt"] = [{"role": "user", "content": row["prompt"][-1]["content"][-120:]}]
    copies = [{"prompt": p, "opponent": " ".join(p.split()[1:-1][:2])}
              for p in ("repeat: a b c =", "repeat: d e f g =", "repeat: h a =")]
    return {"root": root, "model": root / "model", "tokenizer": tokenizer,
            "standard": write_jsonl(root / "standard.jsonl", rows), "chat": write_jsonl(root / "chat.jsonl", chat),
            "copy": write_jsonl(root / "copy.jsonl", copies)}


# -- the template ------------------------------------------------------------------------------------------------

def test_the_template_renders_what_it_documents(tmp_path):
    tokenizer = build_tokenizer()
    text, special = revision_prompt_text(tokenizer, "What is 2+2?", "5")
    assert (text, special) == ("What is 2+2?\n\nPrevious answer:\n5\n\nImproved answer:\n", True)
    ids = revision_prompt_ids(tokenizer, "What is 2+2?", "5")
    assert ids[0] == tokenizer.bos_token_id and ids == tokenizer(text)["input_ids"]
    # conversational: earlier turns kept, the last message filled in, the chat template around it
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "What is 2+2?"}]
    text, special = revision_prompt_text(tokenizer, messages, "5")
    assert special is False and text == ("<s><|user|>\nHi\n<|assistant|>\nHello</s>\n<|user|>\nWhat is 2+2?\n\n"
                                         "Previous answer:\n5\n\nImproved answer:\n\n<|assistant|>\n")
    ids = revision_prompt_ids(tokenizer, messages, "5")
    assert ids.count(tokenizer.bos_token_id) == 1 and ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    # a template from a file, literal braces doubled
    path = tmp_path / "revise.txt"
    path.write_text("Q: {prompt}\nDraft {{v1}}: {previous}\nBetter:")
    template = load_template(str(path))
    assert revision_prompt_text(tokenizer, "x?", "y", template)[0] == "Q: x?\nDraft {v1}: y\nBetter:"
    assert load_template(None) == DEFAULT_TEMPLATE


@pytest.mark.parametrize("template, expected", [
    ("{prompt} improve it:", "revision_template: no {previous} field"),
    ("{previous} improve it:", "revision_template: no {prompt} field"),
    ("{prompt} {previous} {answer}", "revision_template: unknown field(s) {answer}"),
    ("{prompt} {previous", "revision_template: expected '}' before end of string"),
    ("no_such_file.txt", "revision_template: 'no_such_file.txt' is neither a file nor a template"),
])
def test_a_bad_template_is_one_line(template, expected):
    with pytest.raises(ValueError) as error:
        load_template(template)
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)


# -- the six sequences -------------------------------------------------------------------------------------------

def tokenized(files, data, max_length, max_prompt_length):
    records = load_records(files[data])
    options = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    plain = tokenize_preferences(records, files["tokenizer"], source=str(files[data]), **options)
    return add_revision_rows(plain, records, files["tokenizer"], source=str(files[data]), **options)


def row_tokens(batch, row):
    """(the row's prompt ids, its labeled response ids), from the padded batch."""
    labels = batch.labels[row]
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    return batch.input_ids[row, :first + 1].tolist(), labels[labels != IGNORE_INDEX].tolist()


def test_each_role_row_is_the_revision_prompt_then_the_answer(tmp_path):
    """Exact tokens of the six rows of a pair, the revision prompts written out here by hand."""
    tokenizer = build_tokenizer()
    path = write_jsonl(tmp_path / "one.jsonl", [{
        "prompt": [{"role": "user", "content": "What is 2+2?"}],
        "chosen": [{"role": "assistant", "content": "It is 4."}],
        "rejected": [{"role": "assistant", "content": "It is 5."}]}])
    records = load_records(path)
    data = add_revision_rows(tokenize_preferences(records, tokenizer), records, tokenizer, source=str(path))
    batch = build_batch(data.examples, [0], objective_needs(["srpo"]), pad_id=0)
    assert sorted(batch.roles) == sorted(ROLES) and batch.input_ids.shape[0] == 6

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    prompt = "<s><|user|>\nWhat is 2+2?\n<|assistant|>\n"
    # what the chat template writes after the prompt, as TRL tokenizes it: the answer, the EOS and the turn's newline
    answer = {name: ids(f"It is {n}.") + [tokenizer.eos_token_id] + ids("\n")
              for name, n in (("chosen", 4), ("rejected", 5))}
    for role in ROLES:
        answer_of, _, context = role.partition("_given_")
        expected_prompt = prompt if not context else (
            f"<s><|user|>\nWhat is 2+2?\n\nPrevious answer:\nIt is {4 if context == 'chosen' else 5}.\n\n"
            f"Improved answer:\n\n<|assistant|>\n")
        got_prompt, got_answer = row_tokens(batch, int(batch.roles[role][0]))
        assert got_prompt == ids(expected_prompt), role
        assert got_answer == answer[answer_of], role


def test_revision_rows_are_cut_by_the_truncation_policy_and_counted(files):
    data = tokenized(files, "standard", max_length=64, max_prompt_length=56)
    for e in data.examples:
        for context in ("chosen", "rejected"):
            prompt = e[f"{context}_context_ids"]
            assert len(prompt) <= 56  # cut from the left: the template's end survives
            assert files["tokenizer"].decode(prompt).endswith("\n\nImproved answer:\n")
            for answer in ("chosen", "rejected"):
                given = e[f"{answer}_given_{context}_ids"]
                assert len(prompt) + len(given) <= 64 and given == e[f"{answer}_ids"][:len(given)]
    from prefuse.engine.methods.srpo import revision_report

    assert revision_report(data) == (
        "revision rows: 2 of 5 pairs have no response tokens to compare under a revision prompt after truncation "
        "(max_length 64, max_prompt_length 56): 2 with chosen and rejected token-identical, 0 with an empty response")


def logits_logps(model, ids, labels):
    """float64 sum of the labeled tokens' log-probs of one unpadded row, from the model's own logits."""
    logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
    keep = labels != IGNORE_INDEX
    return logp[keep].gather(-1, labels[keep, None]).sum()


def community_srpo(p, r, beta, alpha):
    """ALGORITHMS.md section 7 (a), written out: h(y | c) = log pi - log pi_ref, per pair."""
    def h(role):
        return p[role] - r[role]

    improve = ((0.5 - beta * (h("chosen_given_rejected") - h("rejected_given_rejected"))) ** 2
               + (0.5 - beta * (h("chosen_given_chosen") - h("rejected_given_chosen"))) ** 2)
    generate = (beta * (h("chosen_given_rejected") + h("chosen") - h("rejected_given_chosen") - h("rejected")) - 1) ** 2
    return (1 - alpha) * generate + alpha * improve, generate, improve


@pytest.mark.parametrize("mode", ["in_forward", "recompute"])
def test_the_six_sequence_fused_loss_equals_the_unfused_one(files, mode):
    data = tokenized(files, "chat", max_length=72, max_prompt_length=48)
    models = load_models(ModelConfig(str(files["model"]), use_peft=True, lora_r=4, lora_dropout=0.0))
    with torch.no_grad():  # policy != reference
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    models.policy.eval()
    needs = objective_needs(["srpo"])
    assert needs.roles == tuple(sorted(ROLES)) and needs.reference
    beta, alpha = 0.5, 0.7
    loss_fn = PreferenceLoss("srpo", beta=beta, srpo_alpha=alpha, mode=mode)
    calls = []
    forward = loss_fn.forward

    def spy(hidden, *args, **kwargs):
        calls.append((hidden.shape[0], sorted(kwargs["roles"])))
        return forward(hidden, *args, **kwargs)

    loss_fn.forward = spy
    batch = build_batch(data.examples, list(range(len(data))), needs, pad_id=0)
    loss, metrics = Step(models, loss_fn, needs)(batch)
    assert calls == [(6 * len(data), sorted(ROLES))] and loss_fn.last_mode == mode  # one fused call, six roles

    expected, generate, improve = [], [], []
    for i in range(len(data)):
        policy, ref = {}, {}
        for role in ROLES:
            row = int(batch.roles[role][i])
            n = int(batch.attention_mask[row].sum())
            ids, labels = batch.input_ids[row, :n], batch.labels[row, :n]
            policy[role] = logits_logps(models.policy, ids, labels)
            with torch.no_grad(), models.policy.disable_adapter():
                ref[role] = logits_logps(models.policy, ids, labels)
        value, gen, imp = community_srpo(policy, ref, beta, alpha)
        expected.append(value), generate.append(gen.detach()), improve.append(imp.detach())
    expected = torch.stack(expected).mean()
    assert abs(float(loss) - float(expected)) <= 1e-5 * (1 + abs(float(expected))), (float(loss), float(expected))
    assert float(metrics["loss/generate"]) == pytest.approx(float(torch.stack(generate).mean()), rel=1e-4)
    assert float(metrics["loss/improve"]) == pytest.approx(float(torch.stack(improve).mean()), rel=1e-4)
    lora = [p for n, p in models.policy.named_parameters() if p.requires_grad]
    got, want = torch.autograd.grad(loss, lora), torch.autograd.grad(expected, lora)
    for g, w in zip(got, want):
        assert w.abs().max() > 0 and (g.double() - w).abs().max() <= 1e-3 * w.abs().max()


# -- prefuse train --loss_type srpo ------------------------------------------------------------------------------

def train_argv(files, out, **flags):
    argv = ["train", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files["standard"]),
            "--output_dir", str(out), "--loss_type", "srpo", "--max_steps", "3", "--logging_steps", "1",
            "--save_steps", "0", "--per_device_train_batch_size", "5", "--max_length", "64",
            "--max_prompt_length", "56", "--learning_rate", "1e-2", "--report_to", "none", "--use_peft",
            "--lora_r", "4", "--lora_dropout", "0"]
    for key, value in flags.items():
        argv += [f"--{key}", str(value)]
    return argv


def test_prefuse_train_srpo_runs_through_the_cli(files, tmp_path, capsys):
    template = tmp_path / "revise.txt"
    template.write_text("{prompt}\n\nDraft:\n{previous}\n\nRevised:\n")
    assert main(train_argv(files, tmp_path / "run", revision_template=template, beta=0.5)) == 0, \
        capsys.readouterr().err
    out = capsys.readouterr().out
    assert ("data: revision rows: 2 of 5 pairs have no response tokens to compare under a revision prompt after "
            "truncation (max_length 64, max_prompt_length 56)") in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert math.isfinite(record["loss"]) and record["grad_norm"] > 0
        # the loss is the alpha = 0.8 mix of its two terms
        assert record["loss"] == pytest.approx(0.2 * record["loss/generate"] + 0.8 * record["loss/improve"],
                                               rel=1e-5)
    # policy == reference at step 1: every h is 0, so L_gen = 1 and L_imp = 2 * 1/4
    assert records[0]["loss/generate"] == pytest.approx(1.0) and records[0]["loss/improve"] == pytest.approx(0.5)
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.parametrize("flags, expected", [
    ({"revision_template": "{prompt} improve it:"}, "revision_template: no {previous} field"),
    ({"revision_template": "{prompt} {previous}", "loss_type": "sigmoid"},
     "revision_template: ['sigmoid'] read no revision rows (srpo does)"),
])
def test_bad_train_input_is_one_line(files, tmp_path, capsys, flags, expected):
    assert main(train_argv(files, tmp_path, **flags)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"prefuse train: error: {expected}"), err


# -- self-revision at inference ----------------------------------------------------------------------------------

def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_prefuse_generate_writes_every_stage_and_the_win_rates(files, tmp_path, capsys):
    out = tmp_path / "revised.jsonl"
    argv = ["generate", "--model", str(files["model"]), "--prompts", str(files["copy"]), "--revisions", "2",
            "--output", str(out), "--max_new_tokens", "6", "--judge", "copy", "--opponent_column", "opponent"]
    assert main(argv) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [r["prompt"] for r in read_rows(files["copy"])]
    assert [r["prompt"] for r in records] == prompts
    answers = []
    for record, prompt in zip(records, prompts):
        stages = record["stages"]
        assert [s["revision"] for s in stages] == [0, 1, 2]
        assert stages[0]["prompt"] == prompt
        for before, after in zip(stages, stages[1:]):  # stage n + 1 revises stage n's answer
            assert after["prompt"] == DEFAULT_TEMPLATE.format(prompt=prompt, previous=before["completion"])
            assert before["completion"] in after["prompt"]
        answers += [s["completion"] for s in stages]
        for stage, judged in zip(stages, record["judged"]):  # the copy judge: sigmoid of the score difference
            assert judged == pytest.approx(sigmoid(copy_reward(prompt, stage["completion"])
                                                   - copy_reward(prompt, record["opponent"])), abs=1e-6)
    assert any(a.strip() for a in answers)  # the tiny model writes something to revise
    rates = json.loads(out.with_suffix(".win_rates.json").read_text())["win_rates"]
    assert rates == pytest.approx([sum(r["judged"][n] for r in records) / 3 for n in range(3)])
    assert "win rate against 'opponent' by revision: 0:" in capsys.readouterr().out


def test_revise_on_a_lora_adapter_sampled_seeded_and_in_the_win_rate_evaluation(files, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(files["model"])
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    model, tokenizer = load_generator(str(tmp_path / "adapter"))
    plain, _ = load_generator(str(files["model"]))
    ids = torch.tensor([tokenizer("repeat: a b =")["input_ids"]])
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits)  # the adapter is on

    chat = [{"role": "user", "content": "Say hi."}]
    prompts = ["repeat: a b c =", chat]
    options = dict(max_new_tokens=5, temperature=1.0, seed=3)
    first = revise(model, tokenizer, prompts, 1, **options)
    assert [[s.to_dict() for s in p] for p in first] == [[s.to_dict() for s in p] for p in
                                                       revise(model, tokenizer, prompts, 1, **options)]
    other = revise(model, tokenizer, prompts, 1, **{**options, "seed": 4})
    assert [s.completion for p in first for s in p] != [s.completion for p in other for s in p]
    assert first[1][1].prompt == ("<s><|user|>\nSay hi.\n\nPrevious answer:\n" + first[1][0].completion
                                  + "\n\nImproved answer:\n\n<|assistant|>\n")

    judge = RuleJudge(lambda prompt, completion: float(len(completion)), "length")
    result = evaluate_revisions(model, tokenizer, prompts[:1] * 2, judge, ["ab", ""], revisions=2, **options)
    assert len(result["win_rates"]) == 3
    for n, rate in enumerate(result["win_rates"]):
        lengths = [len(stages[n].completion) for stages in result["stages"]]
        assert rate == pytest.approx((sigmoid(lengths[0] - 2) + sigmoid(lengths[1])) / 2)


@pytest.mark.parametrize("flags, expected", [
    (["--revisions", "-1"], "revisions: must be an integer >= 0"),
    (["--revision_template", "{prompt} again:"], "revision_template: no {previous} field"),
    (["--judge", "copy"], "opponent_column: win rates need a judge"),
])
def test_bad_generate_input_is_one_line(files, tmp_path, capsys, flags, expected):
    argv = ["generate", "--model", str(files["model"]), "--prompts", str(files["copy"]), "--output",
            str(tmp_path / "out.jsonl"), *flags]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(f"prefuse generate: error: {expected}"), err
