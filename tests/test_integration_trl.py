"""examples/trl_dpo.py and prefuse.compat.trl.PrefuseDPOTrainer against TRL's own DPOTrainer.

Same model, same data, same batch, in float32 (bf16=False): the loss, the LoRA gradients and every logged metric
equal TRL's within float32 tolerance. The log-prob sums span ~-480 here, so their float32 rounding (~3e-5) reaches
the loss as ~3e-6: loss and metrics within 1e-5 * max(1, |value|), rewards/* (beta times a difference of two such
sums) within 1e-5 * max(1, |value|, beta * |logps/chosen|), gradients within 1e-4 of the largest |gradient|
(measured: 4e-6, 2e-5 * beta, 6e-6). Under TRL's default bf16 mixed precision, see the training-step test.
"""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl")
pytest.importorskip("peft")

from prefuse.compat.trl import PrefuseDPOTrainer  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_dpo.py"
TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4


def load_example():
    spec = importlib.util.spec_from_file_location("trl_dpo", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def example():
    if not load_example().DATA.exists():
        pytest.skip("the shared preference data is not next to the repository")
    return load_example()


@pytest.fixture(scope="module")
def data(example):
    cfg = example.Config()
    pairs = example.load_pairs(cfg)
    return pairs, example.train_tokenizer(pairs, cfg.vocab_size)


def close(got, want, scale=1.0):
    return abs(got - want) <= TOLERANCE * max(1.0, abs(want), scale)


def twin_trainers(example, data, tmp_path, separate_reference=False, **overrides):
    """PrefuseDPOTrainer and trl.DPOTrainer (float32 unless overridden) on identical models whose adapters are moved
    off zero (so the policy differs from the reference), and one batch from the shared data. The reference: the
    adapters disabled, or with `separate_reference` another model (another initialization)."""
    pairs, tokenizer = data
    cfg = example.Config(output_dir=str(tmp_path))
    reference_cfg = example.Config(seed=cfg.seed + 1)
    overrides = {"bf16": False, **overrides}
    ours, theirs = (
        example.make_trainer(cfg, cls, model=example.build_model(tokenizer, cfg), tokenizer=tokenizer, pairs=pairs,
                             ref_model=example.build_model(tokenizer, reference_cfg) if separate_reference else None,
                             **overrides)
        for cls in (PrefuseDPOTrainer, trl.DPOTrainer))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in ours.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05, generator=generator)
    theirs.model.load_state_dict(ours.model.state_dict())
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    return ours, theirs, batch


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(separate_reference=True),
    dict(loss_type="ipo", beta=0.5),
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[0.7, 0.3]),
    dict(loss_type="aot"),
    dict(precompute_ref_log_probs=True),
    dict(ld_alpha=0.5),
    dict(loss_type="ipo", ld_alpha=0.3),
    dict(use_weighting=True),
    dict(loss_type="ipo", use_weighting=True, precompute_ref_log_probs=True),
    dict(use_weighting=True, ld_alpha=0.5),
], ids=["sigmoid", "separate_reference_model", "ipo", "robust", "sigmoid+sft", "aot", "precomputed_reference",
        "ld_dpo", "ld_ipo", "wpo", "wpo_ipo_precomputed", "wpo_ld_dpo"])
def test_step0_loss_gradients_and_metrics_equal_trl(example, data, tmp_path, overrides):
    ours, theirs, batch = twin_trainers(example, data, tmp_path, **overrides)
    ours_loss = ours.compute_loss(ours.model, batch)
    theirs_loss = theirs.compute_loss(theirs.model, batch)
    assert close(ours_loss.item(), theirs_loss.item()), (ours_loss.item(), theirs_loss.item())
    if not overrides:
        assert abs(theirs_loss.item() - 0.6931) > 1e-3  # the policy does differ from the reference

    ours_loss.backward()
    theirs_loss.backward()
    theirs_params = dict(theirs.model.named_parameters())
    trained = [(name, p) for name, p in ours.model.named_parameters() if p.requires_grad]
    assert trained
    for name, param in trained:
        want = theirs_params[name].grad
        assert (param.grad - want).abs().max() <= GRAD_TOLERANCE * want.abs().max(), name

    ours_metrics, theirs_metrics = ours._metrics["train"], theirs._metrics["train"]
    assert set(theirs_metrics) <= set(ours_metrics), sorted(set(theirs_metrics) - set(ours_metrics))
    reward_scale = theirs.beta * abs(theirs_metrics["logps/chosen"][-1])
    for name, values in theirs_metrics.items():
        scale = reward_scale if name.startswith("rewards/") else 1.0
        assert close(ours_metrics[name][-1], values[-1], scale), (name, ours_metrics[name][-1], values[-1])


def test_reference_log_probs_equal_trl(example, data, tmp_path):
    """compute_ref_log_probs (precompute_ref_log_probs's batch function) through prefuse's head."""
    ours, theirs, batch = twin_trainers(example, data, tmp_path)
    for got, want in zip(ours.compute_ref_log_probs(ours.model, batch),
                         theirs.compute_ref_log_probs(theirs.model, batch)):
        assert got.shape == want.shape
        assert (got - want).abs().max() <= TOLERANCE * want.abs().max()


@pytest.mark.parametrize("separate_reference", [False, True], ids=["adapters_disabled", "separate_reference_model"])
def test_training_steps_match_trl_under_default_mixed_precision(example, data, tmp_path, separate_reference):
    """TRL's default bf16=True: the decoders (policy and reference) run under accelerate's autocast as TRL's do
    (TRL's head then computes in bf16, prefuse's in the float32 of the lm_head weight), and two real training steps
    log the same values within bf16 tolerance (measured: loss 2e-4, margins 3e-4, relative logps 5e-6, grad_norm
    6e-4)."""
    ours, theirs, _ = twin_trainers(example, data, tmp_path, separate_reference, bf16=True, max_steps=2)
    autocast_seen = {"policy decoder": [], "reference model": []}

    def record(key):
        return lambda module, args: autocast_seen[key].append(torch.is_autocast_enabled("cpu"))
    ours.model.get_base_model().model.layers[0].mlp.register_forward_pre_hook(record("policy decoder"))
    if separate_reference:
        ours.ref_model.model.layers[0].mlp.register_forward_pre_hook(record("reference model"))
    ours.train()
    theirs.train()
    calls = autocast_seen["policy decoder"] + autocast_seen["reference model"]
    assert all(calls), autocast_seen
    # policy and reference passes of both steps (gradient checkpointing adds recomputations of the policy)
    assert len(calls) >= 4 and len(autocast_seen["reference model"]) == (2 if separate_reference else 0)
    ours_steps, theirs_steps = ([entry for entry in t.state.log_history if "loss" in entry] for t in (ours, theirs))
    assert len(ours_steps) == len(theirs_steps) == 2
    for got, want in zip(ours_steps, theirs_steps):
        assert abs(got["loss"] - want["loss"]) < 2e-3, (got["loss"], want["loss"])
        assert abs(got["rewards/margins"] - want["rewards/margins"]) < 2e-3
        assert abs(got["logps/chosen"] - want["logps/chosen"]) < 1e-4 * abs(want["logps/chosen"])
        assert abs(got["grad_norm"] - want["grad_norm"]) < 2e-3 * want["grad_norm"]


TRL_METRICS = {"loss", "grad_norm", "learning_rate", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
               "rewards/margins", "logps/chosen", "logps/rejected", "entropy", "logits/chosen", "logits/rejected",
               "mean_token_accuracy", "num_tokens"}


def test_example_trains_and_logs_trl_metrics_without_lm_head(example, tmp_path, monkeypatch):
    head_calls = []
    build_model = example.build_model

    def build_model_with_guarded_head(tokenizer, cfg):
        model = build_model(tokenizer, cfg)

        def fail(module, args):  # a forward pre-hook: prefuse never runs the lm_head module (no logits)
            head_calls.append(args[0].shape)
            raise AssertionError("lm_head was called")
        model.lm_head.register_forward_pre_hook(fail)
        return model

    monkeypatch.setattr(example, "build_model", build_model_with_guarded_head)
    history = example.main(["--steps", "3", "--output-dir", str(tmp_path)])
    assert not head_calls
    steps = [entry for entry in history if "loss" in entry]
    assert len(steps) == 3
    for entry in steps:
        assert TRL_METRICS <= set(entry), sorted(TRL_METRICS - set(entry))
        assert all(torch.isfinite(torch.tensor(float(entry[name]))) for name in TRL_METRICS)
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # LoRA starts as a no-op: policy == reference
    assert steps[-1]["rewards/margins"] != steps[0]["rewards/margins"]  # the adapters were trained
    assert steps[-1]["num_tokens"] > steps[0]["num_tokens"]


def test_unsupported_options_are_refused(example, data, tmp_path):
    pairs, tokenizer = data
    cfg = example.Config(output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="ld_alpha"):
        example.make_trainer(cfg, model=example.build_model(tokenizer, cfg), tokenizer=tokenizer, pairs=pairs,
                             ld_alpha=0.5, precompute_ref_log_probs=True)


def test_gemma2_final_logit_softcap_equals_trl(example, data, tmp_path, monkeypatch):
    """The head comes from prefuse.heads.head_of, softcap included: on a tiny Gemma-2 whose final-logit cap bites
    (cap 2, logits of a few units), loss and gradients still equal TRL's (whose logits apply the cap)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def build_gemma2(tokenizer, cfg):
        torch.manual_seed(cfg.seed)
        config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                              intermediate_size=2 * cfg.hidden_size, num_hidden_layers=cfg.layers,
                              num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, head_dim=16,
                              max_position_embeddings=256, final_logit_softcapping=2.0,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, attn_implementation="eager")
        return Gemma2ForCausalLM(config)

    monkeypatch.setattr(example, "build_model", build_gemma2)
    ours, theirs, batch = twin_trainers(example, data, tmp_path)
    assert ours.preference_loss.softcap == 2.0
    ours_loss, theirs_loss = ours.compute_loss(ours.model, batch), theirs.compute_loss(theirs.model, batch)
    assert close(ours_loss.item(), theirs_loss.item()), (ours_loss.item(), theirs_loss.item())
    ours_loss.backward()
    theirs_loss.backward()
    theirs_params = dict(theirs.model.named_parameters())
    for name, param in ours.model.named_parameters():
        if param.requires_grad:
            want = theirs_params[name].grad
            assert (param.grad - want).abs().max() <= GRAD_TOLERANCE * want.abs().max(), name
    for name in ("logps/chosen", "rewards/margins", "entropy", "mean_token_accuracy"):
        assert close(ours._metrics["train"][name][-1], theirs._metrics["train"][name][-1],
                     theirs.beta * abs(theirs._metrics["train"]["logps/chosen"][-1])), name
