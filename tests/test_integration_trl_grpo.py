"""prefuse.compat.trl_grpo.PrefuseGRPOTrainer against TRL 1.16's own GRPOTrainer.

Same tiny Llama (saved, so TRL can load its reference from the path), same prompts, a deterministic reward, the same
seed, float32. TRL's sampling under that seed gives the same completions to both trainers (recorded by the reward
function at every step), and two real training steps log the same values. The per-token log-probs differ from TRL's
only by float32 rounding (|log p| <= log V ~ 6.2, the vocabulary's logsumexp summed in another order: ~1e-6), so
losses and metrics agree within 1e-5 * max(1, |value|) and gradients within 1e-4 of the largest |gradient|.
"""
import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from datasets import Dataset

from prefuse.compat import trl_grpo
from prefuse.compat.trl_grpo import PrefuseGRPOTrainer
from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama

TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4
PROMPTS = ["Hello there", "What is the sky", "Tell me a story", "Name a fruit"]

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo") / "model"
    torch.manual_seed(0)
    save_tiny_llama(path, build_tokenizer())
    return path


def reward_recording(seen):
    def reward(completions, **kwargs):  # deterministic, and varied within each prompt's group
        seen.append(list(completions))
        return [float(len(c) % 7) + c.count("e") for c in completions]
    return reward


def make_trainer(cls, model_dir, tmp_path, seen, peft_config=None, **overrides):
    settings = {"output_dir": str(tmp_path / cls.__name__), "per_device_train_batch_size": 4, "num_generations": 4,
                "max_completion_length": 8, "max_steps": 2, "learning_rate": 1e-2, "beta": 0.04, "bf16": False,
                "logging_steps": 1, "report_to": "none", "seed": 3, "save_strategy": "no"}
    args = trl.GRPOConfig(**{**settings, **overrides})
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir)
    return cls(model=model, reward_funcs=reward_recording(seen), args=args, peft_config=peft_config,
               train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=build_tokenizer())


def close(got, want):
    return abs(got - want) <= TOLERANCE * max(1.0, abs(want))


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_two_training_steps_equal_trl_with_the_same_completions(model_dir, tmp_path, monkeypatch, use_peft):
    """Full fine-tuning (the reference a model TRL loads from the path) and LoRA (the reference: the adapters
    disabled; lr 0.1 so that LoRA's B = 0 moves enough for the second step's KL to show)."""
    peft = pytest.importorskip("peft") if use_peft else None
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if use_peft else None
    extra = {"learning_rate": 0.1} if use_peft else {}
    head_calls = []
    head = trl_grpo.linear_logprobs
    monkeypatch.setattr(trl_grpo, "linear_logprobs", lambda *a, **k: head_calls.append(1) or head(*a, **k))
    ours_seen, theirs_seen = [], []
    # each trainer seeds the RNG when it is built: build and train one, then the other
    ours = make_trainer(PrefuseGRPOTrainer, model_dir, tmp_path, ours_seen, lora, temperature=0.7, **extra)
    ours.train()
    theirs = make_trainer(trl.GRPOTrainer, model_dir, tmp_path, theirs_seen, lora, temperature=0.7, **extra)
    theirs.train()

    assert len(ours_seen) == len(theirs_seen) == 2 and ours_seen == theirs_seen
    assert len(head_calls) == 4  # per step: the policy, and the reference without gradient (no old policy pass)
    assert ours_seen[0] != ours_seen[1]
    ours_steps, theirs_steps = ([entry for entry in t.state.log_history if "loss" in entry] for t in (ours, theirs))
    assert len(ours_steps) == len(theirs_steps) == 2
    for got, want in zip(ours_steps, theirs_steps):
        assert set(got) == set(want)
        for name, value in want.items():
            if name not in ("step_time", "epoch", "step"):
                assert close(got[name], value), (name, got[name], value)
    assert theirs_steps[1]["kl"] > 0  # the first step moved the policy off the reference


BASE_CASE = {"loss_type": "dapo", "importance_sampling_level": "token", "top_entropy_quantile": 1.0, "delta": None,
             "beta": 0.04, "epsilon_high": 0.2}
LOSS_CASES = [
    {"loss_type": "grpo"}, {"loss_type": "dr_grpo"}, {"loss_type": "dapo"}, {"loss_type": "bnpo"},
    {"loss_type": "luspo", "importance_sampling_level": "sequence"}, {"loss_type": "cispo", "epsilon_high": 1.05},
    {"loss_type": "sapo"}, {"loss_type": "vespo"},
    {"loss_type": "grpo", "importance_sampling_level": "sequence"},
    {"loss_type": "dapo", "top_entropy_quantile": 0.5, "delta": 1.2},
    {"loss_type": "bnpo", "beta": 0.0},
]


def test_every_loss_type_equals_trl_on_one_batch(model_dir, tmp_path):
    """One generated batch (the old policy's log-probs moved off the current ones, so that the clip, the ratio and
    the importance weights matter), every loss_type: loss, gradients and TRL's metrics equal TRL's."""
    ours = make_trainer(PrefuseGRPOTrainer, model_dir, tmp_path, [], num_iterations=2)
    theirs = make_trainer(trl.GRPOTrainer, model_dir, tmp_path, [], num_iterations=2)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    keep = batch["completion_ids"].shape[1]
    for model in ("model", "ref_model"):  # the reference's and the old policy's log-probs, without gradient
        entropy = model == "model"  # TRL's reference head gives log-probs only
        with torch.no_grad():
            got = ours._get_per_token_logps_and_entropies(getattr(ours, model), ids, mask, keep, batch_size=3,
                                                          compute_entropy=entropy)
            want = theirs._get_per_token_logps_and_entropies(getattr(theirs, model), ids, mask, keep,
                                                             compute_entropy=entropy)
        for g, w in zip(got[:1 + entropy], want[:1 + entropy]):
            assert (g - w).abs().max() <= TOLERANCE * w.abs().max(), model
    noise = torch.randn(batch["old_per_token_logps"].shape, generator=torch.Generator().manual_seed(0))
    batch["old_per_token_logps"] = batch["old_per_token_logps"] + 0.3 * noise * batch["completion_mask"]
    for case in LOSS_CASES:
        for trainer in (ours, theirs):
            trainer.model.zero_grad()
            for name, value in {**BASE_CASE, **case}.items():
                setattr(trainer.args, name, value)
                setattr(trainer, name, value)
            trainer._metrics["train"].clear()
        ours_loss, theirs_loss = ours.compute_loss(ours.model, batch), theirs.compute_loss(theirs.model, batch)
        assert close(ours_loss.item(), theirs_loss.item()), (case, ours_loss.item(), theirs_loss.item())
        ours_loss.backward()
        theirs_loss.backward()
        largest = max(p.grad.abs().max() for p in theirs.model.parameters())
        assert largest > 0, case
        for (name, got), want in zip(ours.model.named_parameters(), theirs.model.parameters()):
            assert (got.grad - want.grad).abs().max() <= GRAD_TOLERANCE * largest, (case, name)
        ours_metrics, theirs_metrics = ours._metrics["train"], theirs._metrics["train"]
        assert set(ours_metrics) == set(theirs_metrics), case
        for name, values in theirs_metrics.items():
            assert close(ours_metrics[name][-1], values[-1]), (case, name, ours_metrics[name][-1], values[-1])


@pytest.mark.parametrize("overrides, field", [
    ({"entropy_coef": 0.01}, "entropy_coef"),
    ({"cast_lm_head_to_fp32": True}, "cast_lm_head_to_fp32"),
])
def test_unsupported_options_are_refused(model_dir, tmp_path, overrides, field):
    with pytest.raises(ValueError, match=field):
        make_trainer(PrefuseGRPOTrainer, model_dir, tmp_path, [], **overrides)
