"""Build tests/golden/trl_wpo_golden.json: TRL 1.16's WPO weighting (`use_weighting=True`) on a tiny head, from
hidden states to the loss and its gradients, for `tests/test_preference_wpo.py`.

    .venv/bin/python tests/golden/make_wpo_golden.py

TRL's own `DPOTrainer._compute_loss` is driven as in make_trl_golden.py (a trainer made with `__new__`, a stand-in
model returning its fused head's per-token outputs). Here those outputs are computed from fixed hidden states and an
lm_head weight in float64: `log_probs` = log_softmax(h W^T)[label] (differentiable in h and W) and
`log_sum_sq_probs` = log sum_v p(v)^2 at each position (TRL reads it under no_grad). TRL's code then picks the
response tokens, averages, exponentiates, multiplies the pair weights into the loss and logs its metrics; autograd
gives the gradients of hidden and weight. prefuse's PreferenceLoss takes the same hidden, weight and labels.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl.trainer.dpo_trainer import DPOTrainer

sys.path.insert(0, str(Path(__file__).parent))
from make_trl_golden import FakeAccelerator, TokenModel, fused_outputs, masks

OUT = Path(__file__).with_name("trl_wpo_golden.json")
B, T, H, V = 3, 9, 6, 13
CASES = [
    {"loss_type": ["sigmoid"], "beta": 0.1},
    {"loss_type": ["ipo"], "beta": 0.5},
    {"loss_type": ["sigmoid", "nca_pair"], "beta": 0.1, "loss_weights": [1.0, 0.5]},
]


def head_outputs(hidden, weight, labels):
    """Per-token (log_probs, log_sum_sq_probs) [N, T-1] at TRL's shifted positions, zero where the label is -100."""
    logp_all = torch.log_softmax(hidden @ weight.T, dim=-1)
    keep = labels != -100
    log_probs = logp_all.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    log_sum_sq = torch.log((logp_all.exp() ** 2).sum(-1)).detach() * keep
    return log_probs, log_sum_sq


def run(case, gen):
    prompt_lengths = torch.randint(2, 4, (B,), generator=gen).repeat(2)
    response_lengths = torch.randint(1, T - 3, (2 * B,), generator=gen)
    completion_mask, attention_mask = masks(prompt_lengths, response_lengths, T)
    shift_mask = completion_mask[:, 1:].bool()
    labels = torch.randint(0, V, (2 * B, T - 1), generator=gen).masked_fill(~shift_mask, -100)
    hidden = (torch.randn(2 * B, T - 1, H, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ref_hidden = torch.randn(2 * B, T - 1, H, generator=gen, dtype=torch.float64) * 2
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64).requires_grad_(True)

    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.beta = case["beta"]
    trainer.loss_types = case["loss_type"]
    trainer.loss_weights = case.get("loss_weights") or [1.0] * len(case["loss_type"])
    trainer.ld_alpha, trainer.f_divergence_type, trainer.f_alpha_divergence_coef = None, "reverse_kl", 0.5
    trainer.label_smoothing, trainer.use_weighting = 0.0, True
    trainer.args = SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None)
    trainer.accelerator = FakeAccelerator()
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.precompute_ref_logps = False
    policy_logps, log_sum_sq = head_outputs(hidden, weight, labels)
    with torch.no_grad():
        ref_logps, _ = head_outputs(ref_hidden, weight, labels)
    trainer.model = TokenModel({T: fused_outputs(policy_logps, log_sum_sq)})
    trainer.model.train()
    trainer.ref_model = TokenModel({T: fused_outputs(ref_logps)})
    inputs = {"input_ids": torch.ones(2 * B, T, dtype=torch.long), "attention_mask": attention_mask,
              "completion_mask": completion_mask}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    grad_hidden, grad_weight = torch.autograd.grad(loss, [hidden, weight])
    metrics = {k: float(v[-1]) for k, v in trainer._metrics["train"].items()}
    return {
        "options": case,
        "hidden": hidden.detach().tolist(),
        "ref_hidden": ref_hidden.tolist(),
        "weight": weight.detach().tolist(),
        "labels": labels.tolist(),
        "expected": {"loss": float(loss.detach()), "grad_hidden": grad_hidden.tolist(),
                     "grad_weight": grad_weight.tolist(), "metrics": metrics},
    }


def main():
    gen = torch.Generator().manual_seed(23)
    cases = [run(case, gen) for case in CASES]
    OUT.write_text(json.dumps({"trl_version": trl.__version__, "torch_version": torch.__version__.split("+")[0],
                               "dtype": "float64", "cases": cases}, indent=1) + "\n")
    print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
