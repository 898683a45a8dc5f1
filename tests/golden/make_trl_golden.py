"""Build tests/golden/trl_dpo_golden.json: TRL 1.16 loss values, metrics and gradients on fixed log-prob tensors.

Run once, in a separate environment that has TRL (the prefuse tests only read the JSON):

    python3 -m venv /tmp/trlvenv
    /tmp/trlvenv/bin/pip install torch==2.13.0 && /tmp/trlvenv/bin/pip install trl==1.16.0
    /tmp/trlvenv/bin/python tests/golden/make_trl_golden.py

How TRL is driven, without a model: each trainer is created with `__new__` and given only the attributes its loss
code reads. A stand-in model returns fixed per-token tensors:
- DPOTrainer._compute_loss and KTOTrainer._compute_loss: the stand-in returns `log_probs` (per-token log-probs,
  zero outside the response) as the fused LM head would; the gradient with respect to a response's summed log-prob
  is read off the gradient at a response token of the shared part (every such token shares it, which is checked);
  with ld_alpha, a verbose token's gradient minus that one is the gradient with respect to the verbose part.
- CPOTrainer.get_batch_loss_metrics and ORPOTrainer.get_batch_loss_metrics: the stand-in returns fixed logits, so
  TRL computes its own log-probs and NLL from them; the gradient with respect to a token's log-prob l_t is
  dL/dlogit[label] / (1 - p[label]).
The JSON keeps the per-sequence statistics prefuse takes (sums, verbose parts, counts, ...), TRL's loss, its logged
metrics and those gradients, all computed in float32.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.kto_trainer import KTOTrainer

OUT = Path(__file__).with_name("trl_dpo_golden.json")
B, T, V = 5, 14, 16  # pairs, positions per sequence, vocabulary of the logits-driven trainers


class FakeAccelerator:
    device = torch.device("cpu")
    is_main_process = True

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics

    @staticmethod
    def unwrap_model(model):
        return model


class TokenModel(torch.nn.Module):
    """Stands in for a model with TRL's fused LM head: returns fixed per-token outputs, chosen by sequence width."""

    def __init__(self, outputs_by_width):
        super().__init__()
        self.outputs_by_width = outputs_by_width
        self.is_gradient_checkpointing = False

    def forward(self, input_ids=None, **kwargs):
        return self.outputs_by_width[input_ids.shape[1]]


class LogitsModel(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, *args, **kwargs):
        return SimpleNamespace(logits=self.logits)


def fused_outputs(log_probs, log_sum_sq_probs=None):
    n, width = log_probs.shape
    return SimpleNamespace(
        log_probs=log_probs,
        entropy=torch.zeros(n, width),
        mean_logits=torch.zeros(n, width),
        is_top1=torch.zeros(n, width, dtype=torch.bool),
        log_sum_sq_probs=log_sum_sq_probs,
        aux_loss=None,
    )


def floats(t):
    return [float(x) for x in t.detach().double().reshape(-1)]


def masks(prompt_lengths, response_lengths, width):
    """completion_mask and attention_mask [N, width] for right-padded prompt+response rows."""
    positions = torch.arange(width)
    ends = prompt_lengths + response_lengths
    completion = (positions >= prompt_lengths[:, None]) & (positions < ends[:, None])
    attention = positions < ends[:, None]
    return completion.long(), attention.long()


def make_token_pairs(gen):
    """Per-token policy/ref log-probs of B chosen and B rejected responses, laid out as TRL's batch [2B, T]."""
    prompt_lengths = torch.randint(2, 5, (B,), generator=gen).repeat(2)
    response_lengths = torch.randint(1, T - 5, (2 * B,), generator=gen)
    completion_mask, attention_mask = masks(prompt_lengths, response_lengths, T)
    shift_mask = completion_mask[:, 1:].float()

    def token_values(low, high):
        return -(low + (high - low) * torch.rand(2 * B, T - 1, generator=gen)) * shift_mask

    return {
        "prompt_lengths": prompt_lengths,
        "response_lengths": response_lengths,
        "completion_mask": completion_mask,
        "attention_mask": attention_mask,
        "policy_tokens": token_values(0.01, 2.5),
        "ref_tokens": token_values(0.01, 2.5),
        "log_sum_sq_tokens": token_values(0.05, 1.5),
    }


def sequence_stats(data):
    """The per-sequence statistics prefuse takes, from the per-token tensors (float64 sums)."""
    shift_mask = data["completion_mask"][:, 1:]
    lengths = data["response_lengths"]
    chosen_lengths, rejected_lengths = lengths[:B], lengths[B:]
    shared = torch.minimum(chosen_lengths, rejected_lengths).repeat(2)
    position = shift_mask.cumsum(dim=1)
    verbose = (position > shared[:, None]) & shift_mask.bool()

    def split(tokens):
        total = tokens.double().sum(1)
        tail = (tokens.double() * verbose).sum(1)
        return total[:B], total[B:], tail[:B], tail[B:]

    pc, pr, pcv, prv = split(data["policy_tokens"])
    rc, rr, rcv, rrv = split(data["ref_tokens"])
    lc, lr, _, _ = split(data["log_sum_sq_tokens"])
    return {
        "policy_chosen_logps": floats(pc),
        "policy_rejected_logps": floats(pr),
        "ref_chosen_logps": floats(rc),
        "ref_rejected_logps": floats(rr),
        "chosen_lengths": [int(x) for x in chosen_lengths],
        "rejected_lengths": [int(x) for x in rejected_lengths],
        "policy_chosen_verbose_logps": floats(pcv),
        "policy_rejected_verbose_logps": floats(prv),
        "ref_chosen_verbose_logps": floats(rcv),
        "ref_rejected_verbose_logps": floats(rrv),
        "policy_chosen_log_sum_sq_probs": floats(lc),
        "policy_rejected_log_sum_sq_probs": floats(lr),
    }, verbose


def first_token_grads(token_grads, completion_mask):
    first = completion_mask[:, 1:].float().argmax(dim=1)
    return token_grads[torch.arange(token_grads.shape[0]), first]


def uniform_grads(token_grads, completion_mask, verbose, rtol=1e-5, atol=1e-8):
    """Per-sequence gradients of the response sum and of its verbose part, checking every token agrees.

    A token of the shared part enters only the sum; a verbose token enters the sum and the verbose part, so its
    gradient is the sum of both. Rows without verbose tokens give None for the verbose gradient.
    """
    response = completion_mask[:, 1:].bool()
    shared = response & ~verbose
    full, verbose_grads = [], []
    for row in range(token_grads.shape[0]):
        shared_values = token_grads[row][shared[row]]
        torch.testing.assert_close(shared_values, shared_values.mean().expand_as(shared_values), rtol=rtol, atol=atol)
        full.append(float(shared_values.mean()))
        tail_values = token_grads[row][verbose[row]]
        if tail_values.numel():
            torch.testing.assert_close(tail_values, tail_values.mean().expand_as(tail_values), rtol=rtol, atol=atol)
            verbose_grads.append(float(tail_values.mean()) - full[-1])
        else:
            verbose_grads.append(None)
    return full, verbose_grads


DPO_CASES = [
    *[
        {"loss_type": [t]}
        for t in [
            "sigmoid",
            "hinge",
            "ipo",
            "nca_pair",
            "robust",
            "bco_pair",
            "sppo_hard",
            "aot",
            "aot_unpaired",
            "apo_zero",
            "apo_down",
            "discopop",
            "sft",
            "sigmoid_norm",
        ]
    ],
    {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    {"loss_type": ["exo_pair"], "label_smoothing": 0.05},
    {"loss_type": ["robust"], "label_smoothing": 0.1},
    {"loss_type": ["aot"], "label_smoothing": 0.1},
    {"loss_type": ["aot_unpaired"], "label_smoothing": 0.2},
    {"loss_type": ["discopop"], "discopop_tau": 0.2},
    {"loss_type": ["sigmoid"], "beta": 0.5},
    {"loss_type": ["ipo"], "beta": 0.5},
    {"loss_type": ["sppo_hard"], "beta": 0.5},
    {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence"},
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": ["sigmoid"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
    {"loss_type": ["hinge"], "f_divergence_type": "forward_kl"},
    {"loss_type": ["ipo"], "f_divergence_type": "js_divergence"},
    {"loss_type": ["exo_pair"], "f_divergence_type": "forward_kl", "label_smoothing": 1e-3},
    {"loss_type": ["robust"], "f_divergence_type": "js_divergence", "label_smoothing": 0.1},
    {"loss_type": ["discopop"], "f_divergence_type": "alpha_divergence"},
    {"loss_type": ["sigmoid_norm"], "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.7},
    {"loss_type": ["sigmoid"], "ld_alpha": 0.5},
    {"loss_type": ["sigmoid"], "ld_alpha": 0.0},
    {"loss_type": ["ipo"], "ld_alpha": 0.3},
    {"loss_type": ["apo_down"], "ld_alpha": 0.5},
    {"loss_type": ["aot"], "ld_alpha": 0.5},
    {"loss_type": ["sft"], "ld_alpha": 0.5},
    {"loss_type": ["sigmoid"], "use_weighting": True},
    {"loss_type": ["ipo"], "use_weighting": True},
    {"loss_type": ["nca_pair"], "use_weighting": True},
    # sft with use_weighting is left out: TRL 1.16 fails on it (in-place multiply of an expanded tensor).
    {"loss_type": ["sigmoid"], "use_weighting": True, "ld_alpha": 0.5},
    {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
    {"loss_type": ["hinge", "apo_zero"]},
    {"loss_type": ["sigmoid", "sft"], "f_divergence_type": "js_divergence", "loss_weights": [1.0, 0.5]},
]
DPO_OPTION_DEFAULTS = {
    "beta": 0.1,
    "loss_weights": None,
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5,
    "label_smoothing": 0.0,
    "use_weighting": False,
    "discopop_tau": 0.05,
}


def run_dpo(case, gen):
    data = make_token_pairs(gen)
    options = {**DPO_OPTION_DEFAULTS, **case}
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.beta = options["beta"]
    trainer.loss_types = options["loss_type"]
    trainer.loss_weights = options["loss_weights"] or [1.0] * len(options["loss_type"])
    for key in ("ld_alpha", "f_divergence_type", "f_alpha_divergence_coef", "label_smoothing", "use_weighting"):
        setattr(trainer, key, options[key])
    trainer.args = SimpleNamespace(discopop_tau=options["discopop_tau"], gradient_checkpointing_kwargs=None)
    trainer.accelerator = FakeAccelerator()
    trainer.aux_loss_enabled = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1

    policy_tokens = data["policy_tokens"].clone().requires_grad_(True)
    log_sum_sq = data["log_sum_sq_tokens"] if options["use_weighting"] else None
    trainer.model = TokenModel({T: fused_outputs(policy_tokens, log_sum_sq)})
    trainer.model.train()
    stats, verbose = sequence_stats(data)
    inputs = {
        "input_ids": torch.ones(2 * B, T, dtype=torch.long),
        "attention_mask": data["attention_mask"],
        "completion_mask": data["completion_mask"],
    }
    # Reference log-probs go through TRL's own reference forward (with its LD split) via a second stand-in model.
    trainer.precompute_ref_logps = False
    trainer.ref_model = TokenModel({T: fused_outputs(data["ref_tokens"])})

    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    (token_grads,) = torch.autograd.grad(loss, policy_tokens)
    grads, verbose_grads = uniform_grads(token_grads.double(), data["completion_mask"], verbose)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/"))}
    return {
        "trainer": "DPOTrainer",
        "options": {k: v for k, v in case.items()},
        "inputs": stats,
        "expected": {
            "loss": float(loss.detach()),
            "metrics": metrics,
            "grad_policy_chosen_logps": grads[:B],
            "grad_policy_rejected_logps": grads[B:],
            **(
                {
                    "grad_policy_chosen_verbose_logps": verbose_grads[:B],
                    "grad_policy_rejected_verbose_logps": verbose_grads[B:],
                }
                if options["ld_alpha"] is not None
                else {}
            ),
        },
    }


def logits_batch(gen, prompt_lengths, chosen_lengths, rejected_lengths):
    """Token ids, labels and masks for CPO/ORPO's concatenated forward, chosen and rejected of equal width T."""
    batch = {}
    for side, lengths in (("chosen", chosen_lengths), ("rejected", rejected_lengths)):
        completion, attention = masks(prompt_lengths, lengths, T)
        ids = torch.randint(1, V, (B, T), generator=gen) * attention
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = attention
        batch[f"{side}_labels"] = ids.masked_fill(completion == 0, -100)
    return batch


def token_logp_grads(logits, logits_grad, labels):
    """dL/dl_t for every predicted position, from dL/dlogits (see the module docstring)."""
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    probs = shifted_logits.softmax(-1)
    index = shifted_labels.clamp(min=0).unsqueeze(-1)
    g_label = logits_grad[:, :-1].gather(-1, index).squeeze(-1)
    p_label = probs.gather(-1, index).squeeze(-1)
    return g_label / (1 - p_label)


def token_logps(logits, labels):
    return logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1)


def run_logits_trainer(trainer_cls, options, gen):
    prompt_lengths = torch.randint(2, 5, (B,), generator=gen)
    chosen_lengths = torch.randint(1, T - 5, (B,), generator=gen)
    rejected_lengths = torch.randint(1, T - 5, (B,), generator=gen)
    batch = logits_batch(gen, prompt_lengths, chosen_lengths, rejected_lengths)
    logits = (1.5 * torch.randn(2 * B, T, V, generator=gen)).requires_grad_(True)

    trainer = trainer_cls.__new__(trainer_cls)
    trainer.accelerator = FakeAccelerator()
    trainer.aux_loss_enabled = False
    trainer.is_encoder_decoder = False
    trainer.pad_token_id = trainer.padding_value = 0
    for key, value in options.items():
        setattr(trainer, key, value)
    loss, metrics = trainer.get_batch_loss_metrics(LogitsModel(logits), batch)
    (logits_grad,) = torch.autograd.grad(loss, logits)

    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    targets = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])  # equal to labels on responses
    attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    response = labels[:, 1:] != -100
    prompt = (attention[:, 1:] == 1) & ~response  # predicted prompt tokens (ORPO's NLL covers them)
    per_token = token_logps(logits.detach(), targets).double()
    grads = token_logp_grads(logits.detach(), logits_grad, targets).double()
    response_grad, _ = uniform_grads(
        grads, torch.nn.functional.pad(response.long(), (1, 0)), torch.zeros_like(response), 1e-3, 1e-6
    )
    prompt_grad, _ = uniform_grads(
        grads, torch.nn.functional.pad(prompt.long(), (1, 0)), torch.zeros_like(prompt), 1e-3, 1e-6
    )

    sums = (per_token * response).sum(1)
    prompt_sums = (per_token * prompt).sum(1)
    inputs = {
        "policy_chosen_logps": floats(sums[:B]),
        "policy_rejected_logps": floats(sums[B:]),
        "chosen_lengths": [int(x) for x in chosen_lengths],
        "rejected_lengths": [int(x) for x in rejected_lengths],
        "policy_chosen_prompt_logps": floats(prompt_sums[:B]),
        "chosen_prompt_lengths": [int(x) for x in prompt[:B].sum(1)],
    }
    expected = {
        "loss": float(loss.detach()),
        "metrics": {k: float(v) for k, v in metrics.items() if not k.startswith("logits/")},
        "grad_policy_chosen_logps": response_grad[:B],
        "grad_policy_rejected_logps": response_grad[B:],
    }
    if trainer_cls is ORPOTrainer:
        expected["grad_policy_chosen_prompt_logps"] = prompt_grad[:B]
    return {"trainer": trainer_cls.__name__, "options": options, "inputs": inputs, "expected": expected}


CPO_DEFAULTS = {
    "beta": 0.1,
    "label_smoothing": 0.0,
    "loss_type": "sigmoid",
    "cpo_alpha": 1.0,
    "simpo_gamma": 0.5,
    "alpha": 0.0,
}
CPO_CASES = [
    {},
    {"loss_type": "hinge"},
    {"loss_type": "ipo"},
    {"loss_type": "simpo"},
    {"loss_type": "simpo", "cpo_alpha": 0.0},
    {"loss_type": "simpo", "cpo_alpha": 0.0, "beta": 2.0, "simpo_gamma": 1.0},
    {"loss_type": "simpo", "cpo_alpha": 0.0, "alpha": 0.25},  # AlphaPO
    {"loss_type": "sigmoid", "label_smoothing": 0.1},
    {"loss_type": "sigmoid", "cpo_alpha": 0.5, "beta": 0.5},
    {"loss_type": "hinge", "alpha": 0.1, "cpo_alpha": 0.0},
]
ORPO_CASES = [{"beta": 0.1}, {"beta": 0.5}]


def run_kto(case, gen):
    options = {"beta": 0.1, "loss_type": "kto", "desirable_weight": 1.0, "undesirable_weight": 1.0, **case}
    labels = torch.rand(B + 2, generator=gen) < 0.5
    labels[0], labels[1] = True, False
    if options.pop("all_desirable", False):
        labels[:] = True
    n = labels.shape[0]
    prompt_lengths = torch.randint(2, 5, (n,), generator=gen)
    completion_mask, attention_mask = masks(prompt_lengths, torch.randint(1, T - 5, (n,), generator=gen), T)
    kl_width = T + 1
    kl_completion, kl_attention = masks(prompt_lengths, torch.randint(1, T - 4, (n,), generator=gen), kl_width)
    policy_tokens = (-2.5 * torch.rand(n, T - 1, generator=gen) * completion_mask[:, 1:]).requires_grad_(True)
    policy_kl_tokens = -2.5 * torch.rand(n, kl_width - 1, generator=gen) * kl_completion[:, 1:]
    ref_logps = -2.5 * torch.rand(n, T - 1, generator=gen).mul(completion_mask[:, 1:]).sum(1)
    # Make the KL reference point positive: the KL responses are likelier under the policy than the reference.
    ref_kl_logps = policy_kl_tokens.sum(1) - 0.5 * torch.rand(n, generator=gen) * 4

    trainer = KTOTrainer.__new__(KTOTrainer)
    trainer.beta = options["beta"]
    trainer.loss_type = options["loss_type"]
    trainer.desirable_weight = options["desirable_weight"]
    trainer.undesirable_weight = options["undesirable_weight"]
    trainer.calculate_KL = options["loss_type"] != "apo_zero_unpaired"
    trainer.precompute_ref_logps = True
    trainer.aux_loss_enabled = False
    trainer.accelerator = FakeAccelerator()
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.args = SimpleNamespace(gradient_checkpointing_kwargs=None)
    trainer.model = TokenModel({T: fused_outputs(policy_tokens), kl_width: fused_outputs(policy_kl_tokens)})
    trainer.model.train()
    batch = {
        "input_ids": torch.ones(n, T, dtype=torch.long),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "label": labels,
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    if trainer.calculate_KL:
        batch.update(
            {
                "KL_input_ids": torch.ones(n, kl_width, dtype=torch.long),
                "KL_attention_mask": kl_attention,
                "KL_completion_mask": kl_completion,
            }
        )
    loss = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    (token_grads,) = torch.autograd.grad(loss, policy_tokens)
    inputs = {
        "policy_logps": floats(policy_tokens.detach().double().sum(1)),
        "ref_logps": floats(ref_logps),
        "labels": [bool(x) for x in labels],
    }
    if trainer.calculate_KL:
        inputs.update(
            {"policy_kl_logps": floats(policy_kl_tokens.double().sum(1)), "ref_kl_logps": floats(ref_kl_logps)}
        )
    return {
        "trainer": "KTOTrainer",
        "options": case,
        "inputs": inputs,
        "expected": {
            "loss": float(loss.detach()),
            "metrics": {
                k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith(("rewards/", "logps/", "kl"))
            },
            "grad_policy_logps": floats(first_token_grads(token_grads, completion_mask)),
        },
    }


KTO_CASES = [
    {},
    {"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7},
    {"all_desirable": True},
    {"loss_type": "apo_zero_unpaired"},
    {"loss_type": "apo_zero_unpaired", "desirable_weight": 2.0},
]


def main():
    gen = torch.Generator().manual_seed(20240516)
    cases = [run_dpo(case, gen) for case in DPO_CASES]
    cases += [run_logits_trainer(CPOTrainer, {**CPO_DEFAULTS, **case}, gen) for case in CPO_CASES]
    cases += [run_logits_trainer(ORPOTrainer, case, gen) for case in ORPO_CASES]
    cases += [run_kto(dict(case), gen) for case in KTO_CASES]
    for case in cases:
        for value in case["expected"].values():
            values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            assert all(x is None or math.isfinite(x) for x in values)
    table = {
        "about": "TRL 1.16 loss values on fixed statistics; produced by tests/golden/make_trl_golden.py (float32).",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "cases": cases,
    }
    OUT.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
