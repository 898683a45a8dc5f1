"""A-LoL's value function V_ref(x): an attention-pooling head on the frozen reference's hidden states of the prompt.

    encoder = PromptEncoder(models, pad_id=0)               # the reference's last hidden states of prompts
    fit = fit_value_head(encoder, prompts, rows, epochs=10, lr=1e-5, batch_size=8, seed=0)
    fit.losses                                              # the value split's MSE after each epoch
    values = predict_values(fit.head, encoder, prompts)     # V(x) [P], one per prompt

The authors' ValueHeadAttention (docs/methods/alol.md): a learnable query vector attends over the prompt's
last-layer states (MultiheadAttention, 8 heads), a linear layer gives one number, and sigmoid * max_value bounds it.
Here the bound is the rewards' range, V = low + (high - low) * sigmoid(.), which is the authors' sigmoid * max_value
when low = 0 (rewards in [0, 1]); a run whose rewards go below 0 gets a low below 0 instead of a V that cannot fit
them. The head is trained with MSE on (prompt, reward) rows of a split of the data that training does not see,
AdamW, and the epoch of the lowest MSE on that split is kept. The reference is the separate reference model, the
policy with its LoRA adapters disabled, or, before the first update, the policy itself (it still is pi_ref then).

    texts, rewards = reference_samples(cfg, models, tokenizer, judge, prompts, pad_id)  # the authors' targets

--value_targets reference_samples fits V, as the authors, on the judge's rewards of the reference's own samples for
the value split's prompts (engine/online/rollout.py) instead of the rewards of the data's responses.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from prefuse.engine.models.loading import Models, decoder_hidden_states, eval_mode, reference_hidden_states
from prefuse.engine.online.rollout import RolloutConfig, sample_policy, sample_reference

STATE_BUDGET_BYTES = 2 ** 31  # the value split's prompt states are kept in memory up to this size, else recomputed


def attention_heads(hidden_size: int, wanted: int = 8) -> int:
    """8 heads as the authors, or the largest count below it that divides hidden_size."""
    return next(n for n in range(min(wanted, hidden_size), 0, -1) if hidden_size % n == 0)


class ValueHead(torch.nn.Module):
    """hidden [B, T, H], mask [B, T] (True on the prompt's tokens) -> V [B] in [low, high], float32."""

    def __init__(self, hidden_size: int, *, low: float = 0.0, high: float = 1.0, num_heads: int = 8,
                 dropout: float = 0.1):
        super().__init__()
        if not high > low:
            raise ValueError(f"value head: the value range needs high > low, got [{low}, {high}]")
        self.low, self.high = float(low), float(high)
        self.query = torch.nn.Parameter(torch.randn(hidden_size))
        self.attention = torch.nn.MultiheadAttention(hidden_size, attention_heads(hidden_size, num_heads),
                                                     dropout=0.0, batch_first=True)
        self.dropout = torch.nn.Dropout(dropout)
        self.summary = torch.nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.dropout(hidden.float())
        query = self.query.expand(hidden.shape[0], 1, -1)
        pooled, _ = self.attention(query, hidden, hidden, key_padding_mask=~mask.bool(), need_weights=False)
        score = self.summary(self.dropout(pooled)).reshape(-1)
        return self.low + (self.high - self.low) * torch.sigmoid(score)


class PromptEncoder:
    """The reference's last hidden states of prompts, without gradient: `encoder(prompts) -> (hidden [P, T, H]
    float32, mask [P, T] bool)` for prompts as lists of token ids (right-padded)."""

    def __init__(self, models: Models, *, pad_id: int, device=None):
        self.models, self.pad_id = models, pad_id
        self.device = device if device is not None else next(models.policy.parameters()).device

    def __call__(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            mask[row, :len(prompt)] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        models = self.models
        if models.reference is not None or hasattr(models.policy, "disable_adapter"):
            hidden = reference_hidden_states(models, ids, mask.long())
        else:  # no separate reference and no adapters: the untrained policy is pi_ref
            with torch.no_grad(), eval_mode(models.policy):
                hidden = decoder_hidden_states(models.policy, ids, mask.long())
        return hidden.float(), mask


def prompt_batches(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices of `prompts` in batches of similar length (less padding), the same every call."""
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@dataclass
class ValueFit:
    """The best head, the value split's MSE before training and after each epoch, and the epoch kept (1-based)."""

    head: ValueHead
    initial_loss: float
    losses: list[float] = field(default_factory=list)
    best_epoch: int = 0

    @property
    def best_loss(self) -> float:
        return self.losses[self.best_epoch - 1] if self.best_epoch else self.initial_loss


def fit_value_head(encoder, prompts: list[list[int]], rows: list[tuple[int, float]], *, epochs: int = 10,
                   lr: float = 1e-5, batch_size: int = 8, seed: int = 0, low: float = 0.0, high: float = 1.0,
                   log=print) -> ValueFit:
    """Train a ValueHead on `rows` = (index into prompts, reward) with MSE; each epoch visits every prompt once (its
    rows' rewards are its targets), batches in a seeded order. The MSE over all rows is measured in eval mode
    before training and after each epoch; the head of the lowest one is returned (the initial head when no
    epoch improves on it)."""
    if not rows:
        raise ValueError("value head: no (prompt, reward) rows to fit")
    targets: dict[int, list[float]] = {}
    for prompt, reward in rows:
        targets.setdefault(prompt, []).append(float(reward))
    used = sorted(targets)
    batches = [[used[i] for i in batch] for batch in prompt_batches([prompts[i] for i in used], batch_size)]
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(getattr(encoder, "device", "cpu"))
    forked = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):  # the head's initialization and dropout leave the run's RNG as it was
        torch.manual_seed(seed)
        sample = encoder([prompts[batches[0][0]]])[0]
        head = ValueHead(sample.shape[-1], low=low, high=high).to(sample.device)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
        states = _StateCache(encoder, prompts, batches)

        def batch_loss(number: int) -> tuple[torch.Tensor, int]:
            hidden, mask = states(number)
            values = head(hidden, mask)
            owner = torch.tensor([k for k, p in enumerate(batches[number]) for _ in targets[p]], device=values.device)
            wanted = torch.tensor([r for p in batches[number] for r in targets[p]], device=values.device)
            return ((values[owner] - wanted) ** 2).mean(), len(wanted)

        def split_mse() -> float:
            head.eval()
            with torch.no_grad():
                total = sum(loss.item() * n for loss, n in (batch_loss(b) for b in range(len(batches))))
            head.train()
            return total / len(rows)

        fit = ValueFit(head=copy.deepcopy(head), initial_loss=split_mse())
        log(f"value head: {len(rows)} (prompt, reward) rows of {len(used)} prompts, MSE before training "
            f"{fit.initial_loss:.6g}")
        best = fit.initial_loss
        for epoch in range(1, epochs + 1):
            for number in torch.randperm(len(batches), generator=generator).tolist():
                loss, _ = batch_loss(number)
                if not torch.isfinite(loss):
                    raise ValueError(f"value head: the MSE of epoch {epoch} is {loss.item()}; lower --value_head_lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            fit.losses.append(split_mse())
            improved = fit.losses[-1] < best
            if improved:
                best, fit.best_epoch, fit.head = fit.losses[-1], epoch, copy.deepcopy(head)
            log(f"value head: epoch {epoch}/{epochs} validation MSE {fit.losses[-1]:.6g}"
                + ("  (best)" if improved else ""))
    fit.head.eval()
    return fit


class _StateCache:
    """The encoder's states of each fixed batch, computed once and kept while they fit in STATE_BUDGET_BYTES
    (float32), else recomputed every time."""

    def __init__(self, encoder, prompts, batches):
        self.encoder, self.prompts, self.batches, self.kept, self.bytes = encoder, prompts, batches, {}, 0

    def __call__(self, number: int):
        if number in self.kept:
            return self.kept[number]
        states = self.encoder([self.prompts[i] for i in self.batches[number]])
        size = states[0].numel() * 4
        if self.bytes + size <= STATE_BUDGET_BYTES:
            self.kept[number], self.bytes = states, self.bytes + size
        return states


def reference_samples(cfg, models, tokenizer, judge, prompts: list[list[int]], pad_id: int
                      ) -> tuple[list[str], torch.Tensor]:
    """--value_targets reference_samples: cfg.value_samples responses of the reference to each prompt (the separate
    reference model, the policy with its adapters disabled, or the untrained policy when it has neither) and the
    judge's reward of each: (texts, rewards [P * k] float64), grouped by prompt. The prompts are sampled in chunks
    of per_device_eval_batch_size, chunk c by `rollout.sample_reference(..., seed=cfg.seed + c)` (`sample_policy`
    without a reference), which forks the RNG: the run's generator state and the weights are left as they were."""

    rollout = RolloutConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            num_generations=cfg.value_samples).validate()
    has_reference = models.reference is not None or hasattr(models.policy, "disable_adapter")
    sampler = sample_reference if has_reference else sample_policy  # before the first update the policy is pi_ref
    texts, rewards, size = [], [], cfg.per_device_eval_batch_size
    for chunk, start in enumerate(range(0, len(prompts), size)):
        samples = sampler(models, prompts[start:start + size], rollout, seed=cfg.seed + chunk,
                          eos_id=tokenizer.eos_token_id, pad_id=pad_id)
        completions = tokenizer.batch_decode(samples.completion_ids, skip_special_tokens=True)
        decoded = tokenizer.batch_decode(samples.prompt_ids, skip_special_tokens=True)
        rewards.append(judge.score(decoded, completions).double().reshape(-1))
        texts += completions
    rewards = torch.cat(rewards)
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"value_targets: the judge left the reference's sample {bad[0]} ({texts[bad[0]][:40]!r}) "
                         f"unscored ({rewards[bad[0]].item()}); V needs a finite reward for every sample")
    return texts, rewards


@torch.no_grad()
def predict_values(head: ValueHead, encoder, prompts: list[list[int]], batch_size: int = 8) -> torch.Tensor:
    """V(x) [P] float32 (CPU) for every prompt, in eval mode."""
    head.eval()
    values = torch.empty(len(prompts), dtype=torch.float32)
    for batch in prompt_batches(prompts, batch_size):
        hidden, mask = encoder([prompts[i] for i in batch])
        values[batch] = head(hidden, mask).float().cpu()
    if not torch.isfinite(values).all():
        raise ValueError("value head: a predicted value is not finite")
    return values


def value_range(rewards: list[float]) -> tuple[float, float]:
    """(low, high) of the head: [0, max R] as the authors' sigmoid * max_value, widened to min R when a reward is
    negative; a degenerate range gets a width of 1."""
    low, high = min(0.0, min(rewards)), max(rewards)
    if not high > low or not math.isfinite(high - low):
        high = low + 1.0
    return low, high
