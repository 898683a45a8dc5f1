"""Build tests/golden/seed_golden.json: the seed methods' losses, gradients and metrics from the AUTHORS' code.

The prefuse tests (tests/test_algorithms_seed_golden.py) only read the JSON; this script runs once per source, each in
a separate environment that has what the authors' code imports, and merges its part into the JSON:

    # SELM (shenao-zhang/SELM pins trl 0.8.6 and transformers 4.40.2; its trainer module imports from them)
    python3 -m venv /tmp/selmvenv
    /tmp/selmvenv/bin/pip install torch==2.13.0 numpy rich trl==0.8.6 transformers==4.40.2
    /tmp/selmvenv/bin/python tests/golden/make_seed_golden.py selm --repo SELM_GIT_DIR

    # TRL's XPO and Nash-MD (trl.trainer.xpo_trainer / nash_md_trainer of TRL 0.23.1, a release from before their
    # move to trl.experimental; transformers 5 breaks its import), LoL-RL's A-LoL family (its utils/utils.py
    # imports matplotlib) and the community SRPO loss (torch only)
    python3 -m venv /tmp/seedvenv
    /tmp/seedvenv/bin/pip install torch==2.13.0 numpy matplotlib trl==0.23.1 transformers==4.56.2 "datasets<4.1"
    /tmp/seedvenv/bin/python tests/golden/make_seed_golden.py trl
    /tmp/seedvenv/bin/python tests/golden/make_seed_golden.py lolrl --repo LOLRL_GIT_DIR
    /tmp/seedvenv/bin/python tests/golden/make_seed_golden.py srpo --repo FRASERMINCE_TRL_GIT_DIR

REPO is a clone (or a bare mirror) of the public repository; the script reads the pinned commit with `git show`, so the
working tree's checkout does not matter. Sources, pinned commits and how each is driven:

- selm: shenao-zhang/SELM @ 0ba546a9831d89874f70522c6f6b1277ac31ad92, scripts/selm_trainer.py, IMPORTED (the module is
  written to a temporary folder from the commit). `SELMTrainer` is made with `__new__`; `optimistic_dpo_loss` gives
  the losses and their gradients; `get_batch_loss_metrics`, with a stand-in `concatenated_forward`, gives the metrics
  and runs the reference forward under its own `torch.no_grad()` (so the reference inputs get no gradient there).
  The DPO part of the loss is the same function with alpha = 0.
- trl: TRL 0.23.1 from PyPI, `XPOTrainer` and `NashMDTrainer` made with `__new__`; their `_compute_logprobs`,
  `_compute_losses` and `_log_statistics` run as `training_step` calls them. Stand-in models return logits over a
  two-token vocabulary, [l, log(1 - e^l)], so TRL's own log_softmax/gather gives back the per-token log-prob l exactly
  (its derivative with respect to l is 1); the reference model's forward runs under TRL's own `torch.no_grad()`.
  The preference probability (Nash-MD) and the chosen mask (XPO) are inputs: in TRL they come from a judge or a reward
  model under no_grad, never with a gradient.
- lolrl: abaheti95/LoL-RL @ 9f8d81660bfa0bad17ae5d7835185987f028812e, lolrl_qlora_llama_hh.py. The losses live inline
  in the `__main__` training loop (not importable), so the script EXECUTES the exact source lines 731-962 of that file
  (from the concatenation of prompt and response inputs to the end of the per-algorithm loss chain), read from the
  commit, dedented, with stand-ins for the model (policy logits), the baseline (reference) model, the value head and
  the batch. `reduce_sum` is imported from the repository's utils/utils.py at the same commit. The line range and its
  first and last lines are checked before running.
- srpo: frasermince/trl @ 295b8e835db464828fd27093dac6d4f328b4c2d5 (branch frasermince/srpo-take-2),
  trl/trainer/srpo_trainer.py. The module does not import at that commit (it imports `SyncRefModelCallback` from
  `trl.trainer.utils`, which defines none), so the script EXECUTES the exact source of the methods
  `SRPOTrainer.srpo_loss` and `SRPOTrainer.get_batch_loss_metrics` (found with `ast` in the file at the commit) on a
  stand-in `self` (beta, alpha = 0.8 as its __init__ sets, a stand-in `concatenated_forward`).

What the JSON holds per case: the inputs (named as the authors' code names them), the batch loss, per-example losses
where the code returns them, the gradient of the batch loss with respect to every input (zeros for the inputs the
authors' pipeline computes under no_grad, listed in `no_grad_inputs`), the authors' logged metrics, and for LoL-RL the
intermediate tensors its loop forms (importance ratios, clipped advantages). float64 cases are compared tightly,
float32 cases loosely. Versions of python, torch, trl, transformers, and each source file's sha256 are recorded.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import math
import platform
import subprocess
import sys
import tempfile
import textwrap
from collections import defaultdict
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

OUT = Path(__file__).with_name("seed_golden.json")
CPU = torch.device("cpu")
B, T, Q = 6, 7, 3  # examples, response positions, prompt positions

SELM = {
    "repo": "shenao-zhang/SELM",
    "commit": "0ba546a9831d89874f70522c6f6b1277ac31ad92",
    "path": "scripts/selm_trainer.py",
}
LOLRL = {
    "repo": "abaheti95/LoL-RL",
    "commit": "9f8d81660bfa0bad17ae5d7835185987f028812e",
    "path": "lolrl_qlora_llama_hh.py",
    "utils_path": "utils/utils.py",
    "lines": [731, 962],
}
SRPO = {
    "repo": "frasermince/trl",
    "branch": "frasermince/srpo-take-2",
    "commit": "295b8e835db464828fd27093dac6d4f328b4c2d5",
    "path": "trl/trainer/srpo_trainer.py",
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ----------------------------------------------------------------------------------------------------------- helpers
def git_show(repo: str, commit: str, path: str) -> str:
    return subprocess.run(
        ["git", "-C", repo, "show", f"{commit}:{path}"], check=True, capture_output=True, text=True
    ).stdout


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def values(t):
    """A tensor as (nested) lists of Python floats, through float64."""
    return t.detach().double().tolist() if isinstance(t, torch.Tensor) else t


def scalar(x) -> float:
    return float(x.detach().double()) if isinstance(x, torch.Tensor) else float(x)


def versions(**extra) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__, **extra}


def uniform(gen, shape, low, high, dtype=torch.float64):
    return (low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)


def grads_or_zeros(loss, leaves: dict) -> dict:
    names = list(leaves)
    got = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True, retain_graph=True)
    return {n: values(torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, got)}


def two_token_logits(token_logps: torch.Tensor) -> torch.Tensor:
    """[..., 2] logits whose log_softmax at index 0 is token_logps (< 0) again: [l, log(1 - e^l)]."""
    return torch.stack([token_logps, torch.log(-torch.expm1(token_logps))], dim=-1)


def response_mask(gen, lengths=None) -> torch.Tensor:
    """[B, T] right-padded response mask (long), each row with at least one token."""
    lengths = torch.randint(2, T + 1, (B,), generator=gen) if lengths is None else lengths
    return (torch.arange(T)[None, :] < lengths[:, None]).long()


# -------------------------------------------------------------------------------------------------------------- SELM
SELM_CASES = [
    {"beta": 0.01, "alpha": 0.001, "dtype": "float64"},  # the paper's Zephyr values (ALGORITHMS.md section 3)
    {"beta": 0.5, "alpha": 0.3, "dtype": "float64"},
    {"beta": 0.1, "alpha": 0.05, "dtype": "float32"},
]
SELM_POLICY = ("policy_chosen_logps", "policy_rejected_logps", "policy_response_logps")
SELM_REF = ("reference_chosen_logps", "reference_rejected_logps", "reference_response_logps")


def part_selm(repo: str) -> dict:
    source = git_show(repo, SELM["commit"], SELM["path"])
    folder = Path(tempfile.mkdtemp(prefix="selm_"))
    (folder / "selm_trainer.py").write_text(source)
    sys.path.insert(0, str(folder))
    import selm_trainer  # the authors' module at the pinned commit
    import transformers
    import trl

    gen = torch.Generator().manual_seed(3)
    cases = []
    for case in SELM_CASES:
        dtype = DTYPES[case["dtype"]]
        policy = {n: uniform(gen, (B,), -60, -8, dtype) for n in SELM_POLICY}
        spread = 1.0 / case["beta"] if case["beta"] >= 0.1 else 60.0
        ref = {r: policy[p] + uniform(gen, (B,), -spread, spread, dtype) for p, r in zip(SELM_POLICY, SELM_REF)}
        leaves = {n: v.clone().requires_grad_(True) for n, v in {**policy, **ref}.items()}

        trainer = selm_trainer.SELMTrainer.__new__(selm_trainer.SELMTrainer)
        trainer.beta, trainer.alpha, trainer.loss_type = case["beta"], case["alpha"], "sigmoid"
        trainer.accelerator = SimpleNamespace(device=CPU)
        losses, chosen_rewards, rejected_rewards = trainer.optimistic_dpo_loss(
            *[leaves[n] for n in SELM_POLICY[:2]], leaves[SELM_POLICY[2]], *[leaves[n] for n in SELM_REF]
        )
        direct_grads = grads_or_zeros(losses.mean(), {n: leaves[n] for n in SELM_POLICY})

        # The authors' batch path: the reference forward under their torch.no_grad(), the metrics as they log them.
        policy_model, ref_model = object(), object()

        def forward(model, batch, policy_model=policy_model):
            names = SELM_POLICY if model is policy_model else SELM_REF
            a, b, c = (leaves[n] * 1 for n in names)  # under no_grad for the reference: no graph to the leaves
            zero = torch.zeros(B, 1, 1, dtype=dtype)
            return a, b, c, zero, zero, zero

        trainer.concatenated_forward = forward
        trainer.ref_model = ref_model
        loss, metrics = trainer.get_batch_loss_metrics(policy_model, {}, train_eval="train")
        grads = grads_or_zeros(loss, leaves)
        assert all(np.allclose(grads[n], direct_grads[n], rtol=1e-6, atol=1e-12) for n in SELM_POLICY)
        assert all(not any(grads[n]) for n in SELM_REF)

        trainer.alpha = 0.0
        dpo_losses, _, _ = trainer.optimistic_dpo_loss(
            *[leaves[n].detach() for n in SELM_POLICY], *[leaves[n].detach() for n in SELM_REF]
        )
        cases.append(
            {
                "options": case,
                "inputs": {n: values(v) for n, v in {**policy, **ref}.items()},
                "no_grad_inputs": list(SELM_REF),
                "expected": {
                    "loss": scalar(loss),
                    "losses": values(losses),
                    "losses_alpha0": values(dpo_losses),
                    "chosen_rewards": values(chosen_rewards),
                    "rejected_rewards": values(rejected_rewards),
                    "metrics": {k: scalar(v) for k, v in metrics.items() if not k.startswith("logits/")},
                    "grads": grads,
                },
            }
        )
    return {
        "source": {**SELM, "sha256": sha256(source), "driven": "imported SELMTrainer (trl 0.8.6)"},
        "versions": versions(trl=trl.__version__, transformers=transformers.__version__),
        "cases": cases,
    }


# --------------------------------------------------------------------------------------------------- TRL XPO/Nash-MD
class FakeAccelerator:
    device = CPU

    @staticmethod
    def gather_for_metrics(x):
        return x


class LogitsModel:
    """Returns [N, Q + T, 2] logits for a data dict, chosen by the identity of its input_ids tensor."""

    def __init__(self, token_logps_by_ids):
        self.table = token_logps_by_ids

    def __call__(self, input_ids, attention_mask=None):
        token_logps = self.table[id(input_ids)]
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], 2, dtype=token_logps.dtype)
        logits = torch.cat([logits[:, : Q - 1], two_token_logits(token_logps), logits[:, -1:]], dim=1)
        return SimpleNamespace(logits=logits)


def completion_data(gen, mask):
    """A TRL data dict: prompt of Q tokens then T completion tokens (id 0), padding where mask = 0."""
    ids = torch.zeros(B, Q + T, dtype=torch.long)
    attention = torch.cat([torch.ones(B, Q, dtype=torch.long), mask], dim=1)
    return {"input_ids": ids, "attention_mask": attention}


def trl_trainer(cls, beta, **attrs):
    trainer = cls.__new__(cls)
    trainer._beta = beta
    trainer.accelerator = FakeAccelerator()
    trainer.stats = defaultdict(list)
    trainer.reward_funcs = None
    trainer.processing_class = SimpleNamespace(eos_token_id=1, pad_token_id=0)
    for key, value in attrs.items():
        setattr(trainer, key, value)
    return trainer


def token_logps(gen, mask, dtype, low=-2.5, high=-0.05):
    return torch.where(mask.bool(), uniform(gen, (B, T), low, high), torch.full((B, T), -0.7, dtype=torch.float64)).to(
        dtype
    )


XPO_CASES = [
    {"loss_type": "sigmoid", "beta": 0.1, "alpha": 1e-5, "dtype": "float64"},  # TRL's defaults
    {"loss_type": "sigmoid", "beta": 0.5, "alpha": 0.2, "dtype": "float64"},
    {"loss_type": "ipo", "beta": 0.1, "alpha": 0.05, "dtype": "float64"},
    {"loss_type": "sigmoid", "beta": 0.1, "alpha": 0.1, "dtype": "float32"},
]
NASH_CASES = [
    {"beta": 0.1, "dtype": "float64"},  # TRL's default beta
    {"beta": 0.5, "dtype": "float64"},
    {"beta": 0.1, "dtype": "float32"},
]


def part_trl() -> dict:
    import transformers
    import trl
    from trl.trainer.nash_md_trainer import NashMDTrainer
    from trl.trainer.xpo_trainer import XPOTrainer

    gen = torch.Generator().manual_seed(5)
    xpo_cases = []
    for case in XPO_CASES:
        dtype = DTYPES[case["dtype"]]
        model_mask, ref_mask = response_mask(gen), response_mask(gen)
        model_data, ref_data = completion_data(gen, model_mask), completion_data(gen, ref_mask)
        tokens = {
            "model_logprobs_model_data": token_logps(gen, model_mask, dtype),
            "model_logprobs_ref_data": token_logps(gen, ref_mask, dtype),
            "ref_logprobs_model_data": token_logps(gen, model_mask, dtype),
            "ref_logprobs_ref_data": token_logps(gen, ref_mask, dtype),
        }
        chosen_mask = torch.rand(B, generator=gen) < 0.5
        chosen_mask[0], chosen_mask[1] = True, False
        leaves = {n: v.clone().requires_grad_(True) for n, v in tokens.items()}
        policy = LogitsModel({id(model_data["input_ids"]): leaves["model_logprobs_model_data"],
                              id(ref_data["input_ids"]): leaves["model_logprobs_ref_data"]})
        reference = LogitsModel({id(model_data["input_ids"]): leaves["ref_logprobs_model_data"],
                                 id(ref_data["input_ids"]): leaves["ref_logprobs_ref_data"]})
        trainer = trl_trainer(
            XPOTrainer, case["beta"], _alpha=case["alpha"], ref_model=reference,
            args=SimpleNamespace(loss_type=case["loss_type"]),
        )
        mm, mr, rr, rm = trainer._compute_logprobs(policy, model_data, ref_data, Q)
        loss, dpo_losses, xpo_losses = trainer._compute_losses(mm, mr, rr, rm, chosen_mask)
        trainer._log_statistics(
            model_data, ref_data, mm.detach(), mr.detach(), rr, rm, chosen_mask,
            dpo_losses.detach(), xpo_losses.detach(), Q,
        )
        metrics = {k: float(v[-1]) for k, v in trainer.stats.items() if not k.startswith(("val/", "alpha", "beta"))}
        xpo_cases.append(
            {
                "options": case,
                "inputs": {**{n: values(v) for n, v in tokens.items()}, "model_mask": values(model_mask),
                           "ref_mask": values(ref_mask), "chosen_mask": [bool(x) for x in chosen_mask]},
                "no_grad_inputs": ["ref_logprobs_model_data", "ref_logprobs_ref_data"],
                "expected": {
                    "loss": scalar(loss),
                    "dpo_losses": values(dpo_losses),
                    "xpo_losses": values(xpo_losses),
                    "metrics": metrics,
                    "grads": grads_or_zeros(loss, leaves),
                },
            }
        )

    nash_cases = []
    for case in NASH_CASES:
        dtype = DTYPES[case["dtype"]]
        mask = response_mask(gen)
        model_data, mixture_data = completion_data(gen, mask), completion_data(gen, response_mask(gen))
        tokens = {
            "model_logprobs_model_data": token_logps(gen, mask, dtype),
            "ref_logprobs_model_data": token_logps(gen, mask, dtype),
        }
        probability = uniform(gen, (B,), 0.05, 0.95, dtype)
        leaves = {n: v.clone().requires_grad_(True) for n, v in tokens.items()}
        policy = LogitsModel({id(model_data["input_ids"]): leaves["model_logprobs_model_data"]})
        reference = LogitsModel({id(model_data["input_ids"]): leaves["ref_logprobs_model_data"]})
        trainer = trl_trainer(NashMDTrainer, case["beta"], _mixture_coef=0.5, ref_model=reference)
        model_lp, ref_lp = trainer._compute_logprobs(policy, model_data, Q)
        loss, score, kl_div = trainer._compute_losses(model_lp, ref_lp, probability)
        trainer._log_statistics(
            model_data, mixture_data, model_lp.detach(), ref_lp, probability, score.detach(), kl_div.detach(), Q
        )
        metrics = {k: float(v[-1]) for k, v in trainer.stats.items() if not k.startswith(("val/", "beta", "mixture"))}
        nash_cases.append(
            {
                "options": case,
                "inputs": {**{n: values(v) for n, v in tokens.items()}, "mask": values(mask),
                           "probability": values(probability)},
                "no_grad_inputs": ["ref_logprobs_model_data", "probability"],
                "expected": {
                    "loss": scalar(loss),
                    "score": values(score),
                    "kl_div": values(kl_div),
                    "metrics": metrics,
                    "grads": {**grads_or_zeros(loss, leaves), "probability": [0.0] * B},
                },
            }
        )
    trl_versions = versions(trl=trl.__version__, transformers=transformers.__version__)
    about = "trl.trainer.{xpo,nash_md}_trainer: _compute_logprobs, _compute_losses, _log_statistics on stand-ins"
    return {
        "xpo": {"source": {"package": "trl", "version": trl.__version__, "driven": about}, "versions": trl_versions,
                "cases": xpo_cases},
        "nash_md": {"source": {"package": "trl", "version": trl.__version__, "driven": about},
                    "versions": trl_versions, "cases": nash_cases},
    }


# ------------------------------------------------------------------------------------------------------------ LoL-RL
LOLRL_CASES = [
    {"algorithm": "a_lol", "ppo_clip": 0.9, "kl_beta": 0.0, "dtype": "float64"},  # the script's defaults
    {"algorithm": "a_lol", "ppo_clip": 0.2, "kl_beta": 0.0, "dtype": "float64"},
    {"algorithm": "a_lol", "ppo_clip": 0.9, "kl_beta": 0.0, "dtype": "float32"},
    {"algorithm": "a_lol_seq", "ppo_clip": 0.9, "kl_beta": 0.0, "dtype": "float64"},
    {"algorithm": "a_lol_seq", "ppo_clip": 0.2, "kl_beta": 0.0, "dtype": "float64"},
    {"algorithm": "a_lol_ref_free", "ppo_clip": 0.9, "kl_beta": 0.0, "dtype": "float64"},
    {"algorithm": "a_lol", "ppo_clip": 0.0, "kl_beta": 0.3, "dtype": "float64"},  # A-LoL KL
    {"algorithm": "wbc", "ppo_clip": 0.9, "kl_beta": 0.0, "dtype": "float64"},
    {"algorithm": "r_lol", "ppo_clip": 0.9, "kl_beta": 0.0, "dtype": "float64"},
    {"algorithm": "r_lol", "ppo_clip": 0.2, "kl_beta": 0.0, "dtype": "float64"},
    {"algorithm": "r_gold", "ppo_clip": 0.9, "kl_beta": 0.0, "dtype": "float64"},
]
INTERNAL = (
    "importance_sampling_ratio",
    "importance_sampling_ratio_per_token",
    "advantage",
    "lower_bound_per_token_probs",
    "kl_penalty",
    "baseline_full_seq_log_probs",
    "copy_full_seq_log_probs",
)


def lolrl_block(source: str) -> str:
    first, last = LOLRL["lines"]
    lines = source.splitlines()[first - 1 : last]
    assert lines[0].strip().startswith("input_ids = torch.cat([current_batch_prefixes_inputs"), lines[0]
    assert lines[-1].strip().startswith("loss = torch.mean(per_response_loss * torch.FloatTensor(batch_advantages)")
    assert source.splitlines()[last].strip().startswith("# 4. Backpropagate the loss")
    return textwrap.dedent("\n".join(lines))


def part_lolrl(repo: str) -> dict:
    source = git_show(repo, LOLRL["commit"], LOLRL["path"])
    utils_source = git_show(repo, LOLRL["commit"], LOLRL["utils_path"])
    folder = Path(tempfile.mkdtemp(prefix="lolrl_"))
    (folder / "lolrl_utils.py").write_text(utils_source)
    spec = importlib.util.spec_from_file_location("lolrl_utils", folder / "lolrl_utils.py")
    lolrl_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lolrl_utils)
    block = compile(lolrl_block(source), f"{LOLRL['repo']}@{LOLRL['commit'][:7]}:{LOLRL['path']}", "exec")

    gen = torch.Generator().manual_seed(7)
    cases = []
    for case in LOLRL_CASES:
        dtype = DTYPES[case["dtype"]]
        mask = response_mask(gen)
        policy = token_logps(gen, mask, dtype)
        # Reference token log-probs near the policy's, so some importance ratios fall inside the clip and some outside.
        ref = torch.where(mask.bool(), (policy.double() + uniform(gen, (B, T), -0.6, 0.6)).clamp(max=-0.01), -0.7)
        ref = ref.to(dtype)
        rewards = torch.randint(0, 65, (B,), generator=gen).double() / 64  # exact in float32, as the loop casts
        advantages = torch.randint(1, 25, (B,), generator=gen).double() / 64  # both signs, set row by row below
        advantages = advantages * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
        state_values = rewards - advantages  # V(x), so that R - V is these advantages exactly
        leaf = policy.clone().requires_grad_(True)

        def policy_model(input_ids, attention_mask=None, leaf=leaf):
            pad = torch.zeros(B, Q - 1, 2, dtype=leaf.dtype)
            return SimpleNamespace(logits=torch.cat([pad, two_token_logits(leaf), pad[:, :1]], dim=1))

        def baseline_model(input_ids, attention_mask=None, output_hidden_states=False, ref=ref):
            pad = torch.zeros(B, Q - 1, 2, dtype=ref.dtype)
            logits = torch.cat([pad, two_token_logits(ref), pad[:, :1]], dim=1)
            return SimpleNamespace(logits=logits, hidden_states=[torch.zeros(B, Q + T, 1, dtype=ref.dtype)])

        policy_model.device = baseline_model.device = CPU
        namespace = {
            "torch": torch, "F": F, "np": np, "deepcopy": deepcopy, "reduce_sum": lolrl_utils.reduce_sum,
            "script_args": SimpleNamespace(**{k: case[k] for k in ("algorithm", "ppo_clip", "kl_beta")}),
            "current_batch_prefixes_inputs": {"input_ids": torch.zeros(B, Q, dtype=torch.long),
                                              "attention_mask": torch.ones(B, Q, dtype=torch.long)},
            "current_batch_suffixes_inputs": {"input_ids": torch.zeros(B, T, dtype=torch.long),
                                              "attention_mask": mask.clone()},
            "model": policy_model, "baseline_model": baseline_model,
            "best_value_function_model": lambda hidden: state_values.clone(),
            "batch_rewards": rewards.numpy().copy(), "batch_advantages": advantages.numpy().copy(),
            "batch_suffix_indices": [0] * B, "total_suffix_distribution": {0: 0, 1: 0}, "step": 0,
            **{name: 0.0 for name in (
                "total_per_resp_loss_with_IS", "total_per_resp_loss_without_IS", "total_per_resp_loss_before_reward",
                "total_kl_penalty", "total_alol_loss", "total_rlol_loss", "total_advantage", "total_reward")},
        }
        exec(block, namespace)
        loss = namespace["loss"]
        (grad,) = torch.autograd.grad(loss, leaf)
        postfix = {k: float(v) for k, v in namespace["postfix_dict"].items() if k != "suffix_dist"}
        internal = {k: values(namespace[k]) for k in INTERNAL if isinstance(namespace.get(k), torch.Tensor)}
        cases.append(
            {
                "options": case,
                "inputs": {"policy_token_logps": values(policy), "ref_token_logps": values(ref),
                           "response_mask": values(mask), "rewards": values(rewards),
                           "values": values(state_values), "advantages": values(advantages)},
                "no_grad_inputs": ["ref_token_logps", "rewards", "values", "advantages"],
                "expected": {
                    "loss": scalar(loss),
                    "loss_dtype": str(loss.dtype).replace("torch.", ""),
                    "postfix": postfix,
                    "internal": internal,
                    "grads": {"policy_token_logps": values(grad), "ref_token_logps": [[0.0] * T] * B,
                              "rewards": [0.0] * B, "advantages": [0.0] * B},
                },
            }
        )
    return {
        "source": {**LOLRL, "sha256": sha256(source), "utils_sha256": sha256(utils_source),
                   "driven": f"exec of lines {LOLRL['lines'][0]}-{LOLRL['lines'][1]} of the training loop"},
        "versions": versions(),
        "cases": cases,
    }


# -------------------------------------------------------------------------------------------------------------- SRPO
SRPO_KEYS = (
    "chosen_improved_to_given_rejected",
    "chosen_improved_to_given_chosen",
    "rejected_improved_to_given_rejected",
    "rejected_improved_to_given_chosen",
    "chosen",
    "rejected",
)
SRPO_CASES = [
    {"beta": 0.1, "alpha": 0.8, "dtype": "float64"},  # the config's beta, the hard-coded alpha
    {"beta": 0.01, "alpha": 0.8, "dtype": "float64"},  # the trainer's default beta
    {"beta": 0.05, "alpha": 0.3, "dtype": "float64"},
    {"beta": 0.1, "alpha": 0.8, "dtype": "float32"},
]


def srpo_methods(source: str) -> dict:
    """The exact source of SRPOTrainer's methods srpo_loss and get_batch_loss_metrics, compiled as functions."""
    tree = ast.parse(source)
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SRPOTrainer"]
    namespace = {"torch": torch, "np": np}
    exec("from typing import Any, Dict, List, Literal, Optional, Tuple, Union", namespace)
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name in ("srpo_loss", "get_batch_loss_metrics"):
            segment = textwrap.dedent(ast.get_source_segment(source, node))
            exec(compile(segment, f"{SRPO['repo']}@{SRPO['commit'][:7]}:{SRPO['path']}", "exec"), namespace)
    return {name: namespace[name] for name in ("srpo_loss", "get_batch_loss_metrics")}


def part_srpo(repo: str) -> dict:
    source = git_show(repo, SRPO["commit"], SRPO["path"])
    methods = srpo_methods(source)

    class Trainer:  # the stand-in `self`: only what the two methods read
        srpo_loss = methods["srpo_loss"]
        get_batch_loss_metrics = methods["get_batch_loss_metrics"]

    gen = torch.Generator().manual_seed(11)
    cases = []
    for case in SRPO_CASES:
        dtype = DTYPES[case["dtype"]]
        spread = min(0.5 / case["beta"], 20.0)
        policy = {k: uniform(gen, (B,), -50, -10, dtype) for k in SRPO_KEYS}
        ref = {k: policy[k] + uniform(gen, (B,), -spread, spread, dtype) for k in SRPO_KEYS}
        leaves = {f"policy_{k}": v.clone().requires_grad_(True) for k, v in policy.items()}
        leaves.update({f"reference_{k}": v.clone().requires_grad_(True) for k, v in ref.items()})
        trainer = Trainer()
        trainer.beta, trainer.alpha = case["beta"], case["alpha"]
        trainer.accelerator = SimpleNamespace(device=CPU)
        trainer.srpo_keys = list(SRPO_KEYS)
        policy_model, ref_model = object(), object()

        def forward(model, batch, policy_model=policy_model, leaves=leaves):
            prefix = "policy" if model is policy_model else "reference"
            return {"logps": {k: leaves[f"{prefix}_{k}"] * 1 for k in SRPO_KEYS},
                    "logits": {k: torch.zeros(B, 1, 1, dtype=dtype) for k in SRPO_KEYS}}

        trainer.concatenated_forward = forward
        trainer.ref_model = ref_model
        direct_losses, ratios = trainer.srpo_loss(
            {k: leaves[f"policy_{k}"] for k in SRPO_KEYS}, {k: leaves[f"reference_{k}"].detach() for k in SRPO_KEYS}
        )
        loss, metrics = trainer.get_batch_loss_metrics(policy_model, {}, train_eval="train")
        assert math.isclose(scalar(loss), scalar(direct_losses.mean()), rel_tol=1e-6)
        cases.append(
            {
                "options": case,
                "inputs": {n: values(v) for n, v in leaves.items()},
                "no_grad_inputs": [f"reference_{k}" for k in SRPO_KEYS],
                "expected": {
                    "loss": scalar(loss),
                    "losses": values(direct_losses),
                    "ratios": {k: values(v) for k, v in ratios.items()},
                    "metrics": {k: scalar(v) for k, v in metrics.items() if not k.startswith("logits/")},
                    "grads": grads_or_zeros(loss, leaves),
                },
            }
        )
    return {
        "source": {**SRPO, "sha256": sha256(source),
                   "driven": "exec of the methods srpo_loss and get_batch_loss_metrics (the module does not import)"},
        "versions": versions(),
        "cases": cases,
    }


# -------------------------------------------------------------------------------------------------------------- main
def check_finite(part):
    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, float):
            assert math.isfinite(x), part

    walk(part)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["selm", "trl", "lolrl", "srpo"])
    parser.add_argument("--repo", help="git clone or mirror of the part's repository (selm, lolrl, srpo)")
    args = parser.parse_args()
    if args.part != "trl" and not args.repo:
        parser.error(f"{args.part} needs --repo")
    torch.set_num_threads(1)
    if args.part == "selm":
        parts = {"selm": part_selm(args.repo)}
    elif args.part == "trl":
        parts = part_trl()
    elif args.part == "lolrl":
        parts = {"alol": part_lolrl(args.repo)}
    else:
        parts = {"srpo": part_srpo(args.repo)}
    for part in parts.values():
        check_finite(part)
    table = json.loads(OUT.read_text()) if OUT.exists() else {}
    table["about"] = (
        "Seed objectives' losses, gradients and metrics from the authors' code; produced by "
        "tests/golden/make_seed_golden.py (see its docstring for sources, commits and how each is driven)."
    )
    table.setdefault("parts", {}).update(parts)
    table["parts"] = dict(sorted(table["parts"].items()))
    OUT.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {', '.join(parts)} to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
