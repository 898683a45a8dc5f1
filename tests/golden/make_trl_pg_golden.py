"""Build tests/golden/trl_pg_golden.json: TRL 1.16 GRPO and RLOO loss values, metrics and gradients on fixed tensors.

Run once, in a separate environment that has TRL (the prefuse tests only read the JSON):

    python3 -m venv /tmp/trlvenv
    /tmp/trlvenv/bin/pip install torch==2.13.0 && /tmp/trlvenv/bin/pip install trl==1.16.0
    /tmp/trlvenv/bin/python tests/golden/make_trl_pg_golden.py

How TRL is driven, without a model: GRPOTrainer and RLOOTrainer are created with `__new__` and given only the
attributes their code reads. Each case runs two of the trainer's own methods, in the order of a training step:
- `_generate_and_score_completions`, with `_generate` replaced by a stand-in that returns fixed prompt and
  completion token ids (unequal completion lengths; one sample of each case has the full width T) and a reward
  function that returns fixed float32 rewards. Everything after generation is TRL's: padding and masks, the
  reference's per-token log-probs (through `_get_per_token_logps_and_entropies`), `_calculate_rewards`, the
  advantages (GRPO: the group mean, the group or batch std with `nanstd`'s Bessel correction plus 1e-4, or none;
  RLOO: the KL penalty beta * sum(old - ref) in the reward, the leave-one-out baseline, `normalize_advantages`),
  and the reward metrics.
- `compute_loss` on that output: the clipped surrogate with old = current detached (num_iterations = 1, one
  optimizer step per generation, so GRPO's old_per_token_logps is None), the k3 KL with `use_bias_correction_kl`,
  each GRPO `loss_type`'s normalisation (dapo: `num_items_in_batch` over one process, one accumulation step), and
  the loss metrics.
`_prepare_inputs`, which buffers the generation batch and shuffles its rows, is skipped: with one step per
generation it only permutes the rows, which changes neither the loss nor the metrics.
The policy and the reference are stand-ins for a model patched with TRL's fused LM head (`add_fused_lm_head`): they
return fixed per-token `log_probs` (zero outside the completion, as the fused head returns) and zero `entropy`. The
policy's completion log-probs are a leaf tensor [P * k, T] with requires_grad, so the gradient of TRL's loss with
respect to each per-token log-prob is read off directly (GRPO). RLOO's loss depends on a sample's log-probs only
through their sum, so every token of a sample carries the same gradient (checked) and that one value is the gradient
with respect to the sample's summed log-prob.
Rows are prompt-major (sample j of prompt i is row i * k + j, TRL's RepeatSampler order), so prefuse's [P, k] and
[P, k, T] inputs are the same numbers reshaped. Everything is float32, as TRL computes rewards in float32.
TRL 1.16's normalize_advantages (RLOO) is in the table; prefuse does not offer it (see the test).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
import trl
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.rloo_trainer import RLOOTrainer

OUT = Path(__file__).with_name("trl_pg_golden.json")
VOCAB = 32  # token ids of the stand-in prompts and completions (0 is the pad id)
# the metrics prefuse reports under the same names (TRL also logs entropy, per-function rewards, min/max clip ratios)
METRICS = (
    "kl",
    "reward",
    "reward_std",
    "frac_reward_zero_std",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
)


class FakeAccelerator:
    device = torch.device("cpu")
    is_main_process = True
    process_index = 0
    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def autocast():
        return nullcontext()

    @staticmethod
    def unwrap_model(model):
        return model


class FusedHeadModel(torch.nn.Module):
    """Stands in for a model with TRL's fused LM head: returns fixed completion log-probs [N, T] placed at the last T
    of the W - 1 predicted positions of an [N, W] input, zero elsewhere, as `add_fused_lm_head`'s forward does."""

    def __init__(self, completion_logps, completion_mask):
        super().__init__()
        self.completion_logps = completion_logps
        self.completion_mask = completion_mask
        self.is_gradient_checkpointing = False

    def forward(self, input_ids=None, attention_mask=None, labels=None, fused_lm_head=False, **kwargs):
        assert fused_lm_head
        n, width = input_ids.shape
        t = self.completion_logps.shape[1]
        # the trainer labels exactly the completion tokens: the stand-in's values sit where the head would put them
        assert torch.equal((labels[:, -t:] != -100).long(), self.completion_mask.long())
        log_probs = torch.cat([self.completion_logps.new_zeros(n, width - 1 - t), self.completion_logps], dim=1)
        return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(n, width - 1), aux_loss=None)


def floats(t):
    return [float(x) for x in t.detach().double().reshape(-1)]


def make_data(gen, prompts, k, width, equal_group):
    """Fixed token ids, masks, per-token log-probs and rewards of `prompts` x k samples (rows prompt-major)."""
    n = prompts * k
    prompt_lengths = torch.randint(2, 5, (prompts,), generator=gen).repeat_interleave(k)
    completion_lengths = torch.randint(1, width + 1, (n,), generator=gen)
    completion_lengths[torch.randint(0, n, (1,), generator=gen)] = width  # the padded width is T
    mask = (torch.arange(width) < completion_lengths[:, None]).long()

    def token_values(low, high):
        return -(low + (high - low) * torch.rand(n, width, generator=gen)) * mask

    rewards = torch.rand(prompts, k, generator=gen)
    if equal_group:
        rewards[-1] = 0.25  # a group with all-equal rewards: std 0, advantages 0
    return {
        "prompt_ids": [torch.randint(1, VOCAB, (int(m),), generator=gen).tolist() for m in prompt_lengths],
        "completion_ids": [torch.randint(1, VOCAB, (int(m),), generator=gen).tolist() for m in completion_lengths],
        "mask": mask,
        "policy": token_values(0.05, 2.5),
        "ref": token_values(0.05, 2.5),
        "rewards": rewards.reshape(-1),
    }


def attach_stand_ins(trainer, data, k, beta, policy_leaf):
    """The attributes `_generate_and_score_completions` and `compute_loss` read, with a fixed generation and judge."""
    n = data["mask"].shape[0]
    completions = [str(i) for i in range(n)]
    rewards = data["rewards"].tolist()

    def judge(prompts, completions, completion_ids, **kwargs):
        return [rewards[int(c)] for c in completions]

    trainer.accelerator = FakeAccelerator()
    trainer.model = FusedHeadModel(policy_leaf, data["mask"])
    trainer.model.train()
    trainer.ref_model = FusedHeadModel(data["ref"], data["mask"]) if beta != 0.0 else None
    trainer.beta = beta
    trainer.num_generations = k
    trainer._tokenizer = SimpleNamespace(pad_token_id=0)
    trainer.pad_to_multiple_of = None
    trainer.mask_truncated_completions = False
    trainer.reward_funcs = [judge]
    trainer.reward_processing_classes = [None]
    trainer.reward_func_names = ["judge"]
    trainer.reward_weights = torch.ones(1)
    trainer.state = SimpleNamespace(global_step=0)
    trainer.environments = None
    trainer.aux_loss_enabled = False
    trainer.log_multimodal = False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._logs = {
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
        "images": [],
    }
    trainer._pending_extra_logs = defaultdict(list)
    trainer._pending_metrics = defaultdict(list)
    trainer.args = SimpleNamespace(
        per_device_train_batch_size=n,
        per_device_eval_batch_size=n,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        gradient_checkpointing_kwargs=None,
        report_to=[],
        delta=None,
        use_bias_correction_kl=True,
    )
    inputs = [{"prompt": f"prompt {i // k}"} for i in range(n)]
    return inputs, completions


def trl_metrics(trainer):
    return {key: trainer._metrics["train"][key][-1] for key in METRICS if key in trainer._metrics["train"]}


GRPO_DEFAULTS = {"beta": 0.0, "epsilon": 0.2, "epsilon_high": None, "use_bias_correction_kl": True}
GRPO_CASES = [
    *[
        {"loss_type": loss_type, "scale_rewards": scale}
        for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
        for scale in ("group", "batch", "none")
    ],
    *[{"loss_type": t, "scale_rewards": "group", "beta": 0.04} for t in ("grpo", "bnpo", "dr_grpo", "dapo")],
    {"loss_type": "dapo", "scale_rewards": "batch", "beta": 0.3},
    {"loss_type": "dapo", "scale_rewards": "group", "beta": 0.04, "use_bias_correction_kl": False},
    {"loss_type": "grpo", "scale_rewards": "none", "beta": 0.3, "use_bias_correction_kl": False},
    {"loss_type": "dapo", "scale_rewards": "group", "epsilon": 0.1, "epsilon_high": 0.28},
]


def run_grpo(index, case, gen):
    options = {**GRPO_DEFAULTS, **case}
    prompts, k, width = (2, 4, 6) if index % 2 else (3, 3, 7)
    data = make_data(gen, prompts, k, width, equal_group=index % 3 != 2)
    policy_leaf = data["policy"].clone().requires_grad_(True)

    trainer = GRPOTrainer.__new__(GRPOTrainer)
    inputs, completions = attach_stand_ins(trainer, data, k, options["beta"], policy_leaf)
    trainer.args.use_bias_correction_kl = options["use_bias_correction_kl"]
    trainer._generate = lambda prompts: (
        data["prompt_ids"], data["completion_ids"], None, completions, None, {}, None, None
    )
    trainer.environment_factories = None
    trainer.tools = None
    trainer.num_iterations = 1
    trainer.use_vllm = False
    trainer.vllm_importance_sampling_correction = False
    trainer.multi_objective_aggregation = "sum_then_normalize"
    trainer.scale_rewards = options["scale_rewards"]
    trainer.loss_type = options["loss_type"]
    trainer.epsilon_low = options["epsilon"]
    trainer.epsilon_high = options["epsilon_high"] if options["epsilon_high"] is not None else options["epsilon"]
    trainer.max_completion_length = 8  # dr_grpo's constant: above T, so it differs from the padded width
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.importance_sampling_level = "token"
    trainer.current_gradient_accumulation_steps = 1
    trainer._entropy_bonus_enabled = False

    batch = trainer._generate_and_score_completions(inputs)
    assert batch["completion_ids"].shape[1] == width and "old_per_token_logps" not in batch
    loss = trainer.compute_loss(trainer.model, batch)
    (token_grads,) = torch.autograd.grad(loss, policy_leaf)
    inputs = {
        "policy_online_token_logps": floats(data["policy"]),
        "online_token_mask": [int(x) for x in data["mask"].reshape(-1)],
        "rewards": floats(data["rewards"]),
    }
    if options["beta"] != 0.0:
        inputs["ref_online_token_logps"] = floats(data["ref"])
    return {
        "trainer": "GRPOTrainer",
        "options": {**case, "max_completion_length": trainer.max_completion_length},
        "shape": [prompts, k, width],
        "inputs": inputs,
        "expected": {
            "loss": float(loss.detach()),
            "metrics": trl_metrics(trainer),
            "advantages": floats(batch["advantages"]),
            "grad_policy_online_token_logps": floats(token_grads),
        },
    }


def sequence_grads(token_grads, mask, rtol=1e-5, atol=1e-8):
    """The gradient of each sample's summed log-prob: the one value every completion token of the sample shares."""
    grads = []
    for row in range(token_grads.shape[0]):
        values = token_grads[row][mask[row].bool()]
        torch.testing.assert_close(values, values.mean().expand_as(values), rtol=rtol, atol=atol)
        assert torch.all(token_grads[row][~mask[row].bool()] == 0)
        grads.append(float(values.mean()))
    return grads


RLOO_DEFAULTS = {"beta": 0.05, "epsilon": 0.2, "epsilon_high": None, "normalize_advantages": False}
RLOO_CASES = [
    {"beta": 0.0},
    {},
    {"beta": 0.5},
    {"beta": 0.05, "epsilon": 0.1, "epsilon_high": 0.28},
    {"beta": 0.0, "normalize_advantages": True},
    {"beta": 0.05, "normalize_advantages": True},
]


def run_rloo(index, case, gen):
    options = {**RLOO_DEFAULTS, **case}
    prompts, k, width = (2, 4, 5) if index % 2 else (3, 3, 7)
    data = make_data(gen, prompts, k, width, equal_group=index % 2 == 0)
    policy_leaf = data["policy"].clone().requires_grad_(True)

    trainer = RLOOTrainer.__new__(RLOOTrainer)
    inputs, completions = attach_stand_ins(trainer, data, k, options["beta"], policy_leaf)
    trainer._generate = lambda prompts: (data["prompt_ids"], data["completion_ids"], completions)
    trainer.reward_clip_range = None
    trainer.normalize_advantages = options["normalize_advantages"]
    trainer.epsilon_low = options["epsilon"]
    trainer.epsilon_high = options["epsilon_high"] if options["epsilon_high"] is not None else options["epsilon"]

    batch = trainer._generate_and_score_completions(inputs)
    assert batch["completion_ids"].shape[1] == width
    loss = trainer.compute_loss(trainer.model, batch)
    (token_grads,) = torch.autograd.grad(loss, policy_leaf)
    mask = data["mask"]
    inputs = {
        "policy_online_logps": floats(data["policy"].double().sum(1)),
        "online_lengths": [int(x) for x in mask.sum(1)],
        "rewards": floats(data["rewards"]),
    }
    if options["beta"] != 0.0:
        inputs["ref_online_logps"] = floats(data["ref"].double().sum(1))
    return {
        "trainer": "RLOOTrainer",
        "options": case,
        "shape": [prompts, k],
        "inputs": inputs,
        "expected": {
            "loss": float(loss.detach()),
            "metrics": trl_metrics(trainer),
            "advantages": floats(batch["advantages"]),
            "grad_policy_online_logps": sequence_grads(token_grads.double(), mask),
        },
    }


def main():
    gen = torch.Generator().manual_seed(20250611)
    cases = [run_grpo(i, case, gen) for i, case in enumerate(GRPO_CASES)]
    cases += [run_rloo(i, case, gen) for i, case in enumerate(RLOO_CASES)]
    for case in cases:
        expected = case["expected"]
        values = [expected["loss"], *expected["metrics"].values(), *expected["advantages"]]
        values += [x for key, v in expected.items() if key.startswith("grad_") for x in v]
        assert all(math.isfinite(x) for x in values)
    table = {
        "about": "TRL 1.16 GRPO/RLOO values on fixed tensors; made by tests/golden/make_trl_pg_golden.py (float32).",
        "trl_version": trl.__version__,
        "torch_version": torch.__version__,
        "cases": cases,
    }
    OUT.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
