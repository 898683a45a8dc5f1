"""OFS-DPO's two LoRA adapters on one base model: the step that scores a batch with both, and the role swap.

    step = FastSlowStep(models, loss_fn, needs, interval=50, swap_mode="roles")
    loss, metrics = step(batch)                    # F-role adapter -> PreferenceLoss, S-role adapter -> slow_*_logps
    events = step.after_update(k, metrics, opt)    # every `interval` steps: the swap (docs/methods/ofs-dpo.md)

The adapters: peft's "default" adapter trains at the learning rate (the fast module), "slow" at
learning_rate * ofs_slow_lr_ratio; both start identical (one LoRA initialisation copied). Each is a parameter group
of its own in the run's AdamW (AdamW's update is per parameter, so two groups are two optimizers) and each group's
gradient is clipped on its own. The *roles* of the objective (`ofs_dpo`: the F role's plain DPO loss, the S role's
loss with the chasing term) start with F = the fast adapter. Every `interval` steps the two roles' mean DPO losses
over those steps are compared; when the S role's is lower the roles swap:
    swap_mode "roles":  the F role moves to the other adapter; each adapter keeps its weights, optimizer state and
                        learning rate (the reading of the third-party port, docs/methods/ofs-dpo.md);
    swap_mode "params": the two adapters exchange their weights and optimizer states, so the F role stays on the
                        fast (high learning rate) adapter.
[UNVERIFIED] a reconstruction, as the objective itself (prefuse/algorithms/ofs.py).
The reference is the base model (both adapters disabled).
"""
from __future__ import annotations

import contextlib

import torch

from prefuse.engine.models.loading import Models, decoder_hidden_states
from prefuse.engine.core.step import Step
from prefuse.heads import sequence_logps

FAST, SLOW = "default", "slow"
SWAP_MODES = ("roles", "params")
SLOW_INPUTS = {"chosen": "slow_chosen_logps", "rejected": "slow_rejected_logps"}


def adapter_parameters(policy: torch.nn.Module, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of one LoRA adapter, in the model's order (peft names them `...lora_A.<adapter>.weight`)."""
    return [(name, p) for name, p in policy.named_parameters()
            if ".lora_" in name and name.split(".")[-2] == adapter]


def add_slow_adapter(policy: torch.nn.Module) -> None:
    """Give a peft model with one LoRA adapter ("default") its twin "slow": the same config and the same weights."""
    if not hasattr(policy, "peft_config") or set(policy.peft_config) != {FAST}:
        raise ValueError("use_peft: ofs_dpo trains two LoRA adapters on one base model; add --use_peft")
    policy.add_adapter(SLOW, policy.peft_config[FAST])
    fast, slow = adapter_parameters(policy, FAST), adapter_parameters(policy, SLOW)
    with torch.no_grad():
        for (_, f), (_, s) in zip(fast, slow, strict=True):
            s.copy_(f)
    _trainable(policy)
    policy.set_adapter(FAST)
    _trainable(policy)


def _trainable(policy) -> None:
    # peft's set_adapter freezes the inactive adapter; both always train (each pass uses only its own)
    for adapter in (FAST, SLOW):
        for _, p in adapter_parameters(policy, adapter):
            p.requires_grad_(True)


def param_groups(policy: torch.nn.Module, learning_rate: float, slow_lr_ratio: float) -> list[dict]:
    """The AdamW parameter groups: the fast adapter at learning_rate, the slow one at learning_rate * ratio."""
    return [{"params": [p for _, p in adapter_parameters(policy, FAST)], "lr": learning_rate, "name": "fast"},
            {"params": [p for _, p in adapter_parameters(policy, SLOW)], "lr": learning_rate * slow_lr_ratio,
             "name": "slow"}]


class FastSlowStep(Step):
    """The OFS-DPO step: the batch through the S-role adapter (its chosen/rejected sums become slow_*_logps, with
    gradient), then through the F-role adapter and the reference as any Step does."""

    def __init__(self, models: Models, loss_fn, needs, *, bf16: bool = False, interval: int = 50,
                 swap_mode: str = "roles"):
        super().__init__(models, loss_fn, needs, bf16=bf16)
        if swap_mode not in SWAP_MODES:
            raise ValueError(f"ofs_swap_mode: {swap_mode!r} is not one of {SWAP_MODES}")
        if interval < 1:
            raise ValueError(f"ofs_chasing_interval: must be at least 1, got {interval}")
        self.interval, self.swap_mode = interval, swap_mode
        self.fast_role = FAST      # the adapter in the F role
        self.swaps = 0
        self.window = {"fast": 0.0, "slow": 0.0, "steps": 0}

    @property
    def slow_role(self) -> str:
        return SLOW if self.fast_role == FAST else FAST

    @contextlib.contextmanager
    def active(self, adapter: str):
        policy = self.models.policy
        policy.set_adapter(adapter)
        _trainable(policy)
        try:
            yield
        finally:
            policy.set_adapter(self.fast_role)
            _trainable(policy)

    def __call__(self, batch, reference=None, **inputs):
        with self.active(self.slow_role), self.autocast(batch.input_ids.device):
            slow_hidden = decoder_hidden_states(self.models.policy, batch.input_ids, batch.attention_mask,
                                                **batch.vision)
            slow_head = self.head  # with the slow adapter's LoRA on the lm_head, when it has one
        sums, _ = sequence_logps(slow_hidden, slow_head, batch.labels)
        slow = {name: sums[batch.roles[role]] for role, name in SLOW_INPUTS.items()}
        with self.active(self.fast_role):
            loss, metrics = super().__call__(batch, reference, **slow, **inputs)
        metrics["ofs/fast_role_is_slow_adapter"] = torch.tensor(float(self.fast_role == SLOW))
        return loss, metrics

    def after_update(self, step: int, metrics: dict, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """After optimizer step `step`: the window's losses, and every `interval` steps the swap criterion.
        Returns the numbers to log: ofs/swapped (1.0 at a swap) and the running count ofs/swaps."""
        self.window["fast"] += metrics["ofs/fast_dpo_loss"]
        self.window["slow"] += metrics["ofs/slow_dpo_loss"]
        self.window["steps"] += 1
        swapped = 0.0
        if step % self.interval == 0:
            if self.window["slow"] < self.window["fast"]:
                self.swap(optimizer)
                swapped = 1.0
            self.window = {"fast": 0.0, "slow": 0.0, "steps": 0}
        return {"ofs/swapped": swapped, "ofs/swaps": float(self.swaps)}

    def swap(self, optimizer: torch.optim.Optimizer) -> None:
        self.swaps += 1
        if self.swap_mode == "roles":
            self.fast_role = self.slow_role
            self.models.policy.set_adapter(self.fast_role)
            _trainable(self.models.policy)
            return
        policy = self.models.policy
        with torch.no_grad():
            for (_, f), (_, s) in zip(adapter_parameters(policy, FAST), adapter_parameters(policy, SLOW),
                                      strict=True):
                kept = f.detach().clone()
                f.copy_(s)
                s.copy_(kept)
                fs, ss = optimizer.state.pop(f, None), optimizer.state.pop(s, None)
                if ss is not None:
                    optimizer.state[f] = ss
                if fs is not None:
                    optimizer.state[s] = fs

    def state_dict(self) -> dict:
        return {"fast_role": self.fast_role, "swaps": self.swaps, "window": dict(self.window)}

    def load_state_dict(self, state: dict) -> None:
        self.fast_role, self.swaps, self.window = state["fast_role"], int(state["swaps"]), dict(state["window"])
        self.models.policy.set_adapter(self.fast_role)
        _trainable(self.models.policy)
