"""examples/hf_dpo_loop.py: DPO on a Hugging Face Llama with LoRA, trained from hidden states, never from logits."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("peft")
pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_dpo_loop.py"


def load_example():
    spec = importlib.util.spec_from_file_location("hf_dpo_loop", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_thread")


def test_training_improves_preference_without_calling_lm_head(monkeypatch):
    example = load_example()
    head_calls = []
    build_model = example.build_model

    def build_model_with_guarded_head(cfg):
        model = build_model(cfg)

        def fail(module, args):  # a forward pre-hook: the logits are never computed
            head_calls.append(args[0].shape)
            raise AssertionError("lm_head was called: the loop must not materialize logits")
        model.get_base_model().lm_head.register_forward_pre_hook(fail)
        return model

    monkeypatch.setattr(example, "build_model", build_model_with_guarded_head)
    history = example.main(["--steps", "8"])
    assert not head_calls
    assert len(history) == 8
    first, last = history[0], history[-1]
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3)  # LoRA starts as a no-op: policy == reference
    assert last["loss"] < first["loss"] - 0.05
    assert last["rewards/margins"] > first["rewards/margins"] + 0.1
    assert last["rewards/accuracies"] == 1.0
    losses = [h["loss"] for h in history]
    assert all(b < a for a, b in zip(losses, losses[1:])), f"loss did not fall step by step: {losses}"


def dpo_from_logits(model, batch, beta):
    """The same DPO loss from the model's own logits (the unfused reference), policy and reference."""
    def sequence_logps(logits):
        labels = batch["labels"]
        token = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (token * (labels != -100)).sum(-1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    policy = sequence_logps(model(**inputs).logits)
    with torch.no_grad(), model.disable_adapter():
        ref = sequence_logps(model(**inputs).logits)
    pairs = batch["labels"].shape[0] // 2
    logratios = policy - ref
    return -F.logsigmoid(beta * (logratios[:pairs] - logratios[pairs:])).mean()


def test_hidden_state_loss_equals_loss_from_logits():
    """The decoder's last_hidden_state through PreferenceLoss gives the loss and LoRA gradients of the logits path
    (the hidden states are taken after the final norm, the labels aligned with the next token)."""
    example = load_example()
    cfg = example.Config(pairs=4)
    model = example.build_model(cfg)
    with torch.no_grad():  # move the adapters off zero so policy and reference differ
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    batch = example.synthetic_pairs(cfg)
    lora = [p for p in model.parameters() if p.requires_grad]

    with torch.no_grad(), model.disable_adapter():
        ref_hidden = example.last_hidden_states(model, batch)
    lm_head = model.get_base_model().lm_head
    fused_loss, _ = example.PreferenceLoss("sigmoid", beta=cfg.beta)(
        example.last_hidden_states(model, batch), lm_head.weight, batch["labels"], ref_hidden=ref_hidden)
    fused_grads = torch.autograd.grad(fused_loss, lora)

    want_loss = dpo_from_logits(model, batch, cfg.beta)
    want_grads = torch.autograd.grad(want_loss, lora)
    assert abs(fused_loss.item() - want_loss.item()) < 1e-5
    assert abs(want_loss.item() - 0.6931) > 1e-3  # the adapters did change the policy
    for got, want in zip(fused_grads, want_grads):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max() + 1e-7
