"""Rollouts: the reference with LoRA present samples from the base model exactly, the geometric mixture's
next-token distribution is softmax((1 - m) log pi + m log pi_ref), generation is seeded per call and leaves the
global RNG alone."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.engine.models.loading import ModelConfig, load_models  # noqa: E402
from prefuse.engine.online.rollout import (RolloutConfig, sample_mixture, sample_policy,  # noqa: E402
                                    sample_reference)
from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")
PROMPTS = [[1, 40, 41, 42, 43], [1, 50, 51]]  # different lengths: left padding and positions matter
EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    torch.manual_seed(0)
    save_tiny_llama(root / "model", build_tokenizer())
    return root / "model"


def lora_models(model_dir):
    models = load_models(ModelConfig(str(model_dir), use_peft=True, lora_r=4, lora_dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():  # adapters away from zero: the policy differs from its base
        for name, p in models.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)
    return models


def test_reference_samples_are_the_base_models_samples(model_dir):
    models = lora_models(model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = RolloutConfig(max_new_tokens=12, temperature=1.0, num_generations=3)
    reference = sample_reference(models, PROMPTS, cfg, seed=7, eos_id=EOS, pad_id=PAD)
    from prefuse.engine.models.loading import Models

    plain = sample_policy(Models(base, None, None), PROMPTS, cfg, seed=7, eos_id=EOS, pad_id=PAD)
    assert reference.completion_ids == plain.completion_ids
    policy = sample_policy(models, PROMPTS, cfg, seed=7, eos_id=EOS, pad_id=PAD)
    assert policy.completion_ids != reference.completion_ids  # the adapters are not active in the reference
    assert reference.prompt_ids == [p for p in PROMPTS for _ in range(3)]
    assert all(len(c) <= 12 for c in reference.completion_ids) and reference.tokens_per_second > 0


def test_sampling_is_seeded_and_leaves_the_global_generator_alone(model_dir):
    models = lora_models(model_dir)
    cfg = RolloutConfig(max_new_tokens=8, num_generations=2)
    state = torch.get_rng_state()
    first = sample_policy(models, PROMPTS, cfg, seed=3, eos_id=EOS, pad_id=PAD)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample_policy(models, PROMPTS, cfg, seed=3, eos_id=EOS, pad_id=PAD).completion_ids == first.completion_ids
    assert sample_policy(models, PROMPTS, cfg, seed=4, eos_id=EOS, pad_id=PAD).completion_ids != first.completion_ids
    mixture = sample_mixture(models, PROMPTS, cfg, seed=3, eos_id=EOS, pad_id=PAD)
    assert torch.equal(torch.get_rng_state(), state)
    assert sample_mixture(models, PROMPTS, cfg, seed=3, eos_id=EOS, pad_id=PAD).completion_ids == mixture.completion_ids


def full_logprobs(model, prompt, completion):
    """Next-token log-probs [len(completion), V] at each generated position, from one forward of the whole
    unpadded sequence (no cache)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(completion)].double(), -1)


@pytest.mark.parametrize("coef", [0.0, 0.3, 1.0])
def test_mixture_next_token_distribution(model_dir, coef):
    models = lora_models(model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    cfg = RolloutConfig(max_new_tokens=6, temperature=1.0, num_generations=1, mixture_coef=coef)
    samples = sample_mixture(models, PROMPTS, cfg, seed=5, eos_id=None, pad_id=PAD, record=True)
    steps = torch.stack(samples.extra["step_logprobs"], 1)  # [N, steps, V]
    for row, (prompt, completion) in enumerate(zip(samples.prompt_ids, samples.completion_ids)):
        policy = full_logprobs(models.policy, prompt, completion)
        reference = full_logprobs(base, prompt, completion)
        expected = torch.log_softmax((1 - coef) * policy + coef * reference, -1)
        assert torch.allclose(steps[row, :len(completion)].double().exp(), expected.exp(), atol=1e-5)


@pytest.mark.parametrize("coef, which", [(0.0, "policy"), (1.0, "reference")])
def test_greedy_mixture_at_the_ends_is_greedy_generate(model_dir, coef, which):
    """m = 0 is the policy and m = 1 the reference: greedy mixture samples equal transformers' greedy generate."""
    models = lora_models(model_dir)
    cfg = RolloutConfig(max_new_tokens=8, temperature=0, num_generations=1, mixture_coef=coef)
    mixture = sample_mixture(models, PROMPTS, cfg, seed=0, eos_id=EOS, pad_id=PAD)
    sample = sample_policy if which == "policy" else sample_reference
    assert mixture.completion_ids == sample(models, PROMPTS, cfg, seed=0, eos_id=EOS, pad_id=PAD).completion_ids


def test_rollout_config_is_checked():
    with pytest.raises(ValueError, match="top_p"):
        RolloutConfig(top_p=0).validate()
    with pytest.raises(ValueError, match="mixture_coef"):
        RolloutConfig(mixture_coef=1.5).validate()
