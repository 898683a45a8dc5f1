"""Rollouts: responses sampled from the policy, from the reference, or from their token-level geometric mixture.

    cfg = RolloutConfig(max_new_tokens=16, temperature=1.0, top_p=1.0, num_generations=2)
    samples = sample_policy(models, prompts, cfg, seed=step_seed)        # transformers' generate, KV cache
    samples = sample_reference(models, prompts, cfg, seed=step_seed)     # LoRA: the adapters disabled
    samples = sample_mixture(models, prompts, cfg, seed=step_seed)       # softmax((1 - m) log pi + m log pi_ref)

Every rollout runs without gradient, in eval mode (no dropout), batched over prompts (left-padded), and under its
own seeded generator state (`torch.random.fork_rng`), so a step's samples depend only on the step's seed and the
weights, never on what ran before: a resumed run draws the same samples. Completions end at the first EOS (kept)
or after max_new_tokens. HF `generate` serves the policy and the reference; the mixture, which needs both models'
next-token log-probs at every step, has its own loop with one KV cache per model.

A vision-language model's prompts come with their images: `sample_policy(..., images=[e["images"] for e in
examples])` (one `data.ExampleImages` per prompt, from tokenize_prompts / tokenize_preferences with the processor);
each sample's row then gets its prompt's pixel values (the mixture's too).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from prefuse.engine.models import vision
from prefuse.engine.data import vision_inputs
from prefuse.engine.models.loading import Models, eval_mode
from prefuse.heads import causal_lm_of


@dataclass(frozen=True, kw_only=True)
class RolloutConfig:
    """max_new_tokens; temperature (0: greedy); top_p; num_generations per prompt; mixture_coef m of the
    geometric mixture (IPO-MD, Nash-MD: 0 is the policy, 1 the reference); synced_gpus: every rank of the
    process group decodes until all are done (a model sharded by FSDP2 all-gathers its layers in every forward,
    so the ranks must run the same number of them; transformers' own `synced_gpus`)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    num_generations: int = 2
    mixture_coef: float = 0.5
    synced_gpus: bool = False

    def validate(self) -> "RolloutConfig":
        for name, ok in (("max_new_tokens", self.max_new_tokens >= 1), ("temperature", self.temperature >= 0),
                         ("top_p", 0 < self.top_p <= 1), ("num_generations", self.num_generations >= 1),
                         ("mixture_coef", 0 <= self.mixture_coef <= 1)):
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range")
        return self


@dataclass
class Samples:
    """Sampled responses, num_generations per prompt, grouped by prompt (prompt p's samples are rows
    [p * k, (p + 1) * k)). completion_ids: token lists without padding, the EOS kept when one was generated."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    contains_eos: list[bool]
    num_generations: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


def left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask [P, T] with the prompts right-aligned (generation appends on the right)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return input_ids.to(device), mask.to(device)


def cut_at_eos(tokens: list[int], eos_id: int | None) -> tuple[list[int], bool]:
    """The tokens up to and including the first EOS, and whether there was one."""
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1], True
    return tokens, False


@contextlib.contextmanager
def _seeded(seed: int, device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _samples(prompts, generated: torch.Tensor, cfg: RolloutConfig, eos_id, started: float) -> Samples:
    """generated [P * k, new] (rows grouped by prompt) -> Samples, cut at the first EOS."""
    completions, eos = [], []
    for row in generated.tolist():
        tokens, has_eos = cut_at_eos(row, eos_id)
        completions.append(tokens)
        eos.append(has_eos)
    repeated = [p for p in prompts for _ in range(cfg.num_generations)]
    return Samples(repeated, completions, eos, cfg.num_generations, time.perf_counter() - started)


def _check_images(model, prompts: list[list[int]], images) -> None:
    """A vision-language model's prompts with image tokens need their images (else the tokens embed as text)."""
    causal_lm = causal_lm_of(model)
    if images is None and vision.is_vision_language(causal_lm.config):
        token = vision.image_token_id(causal_lm)
        if any(token in prompt for prompt in prompts):
            raise ValueError("prompts hold image tokens but no images came with them: pass images=[example's "
                             "images per prompt] (data.ExampleImages)")


def _sample_image_inputs(images, prompts: list, k: int, device) -> dict[str, torch.Tensor]:
    """The vision inputs of k sample rows per prompt, each row with its prompt's images (one entry per prompt)."""
    if len(images) != len(prompts):
        raise ValueError(f"images: {len(images)} entries for {len(prompts)} prompts")
    return {n: v.to(device) for n, v in vision_inputs([im for im in images for _ in range(k)]).items()}


def _generate(model, prompts, cfg: RolloutConfig, *, seed: int, eos_id, pad_id, images=None) -> Samples:
    device = next(model.parameters()).device
    _check_images(model, prompts, images)
    k = cfg.num_generations
    model_inputs, returns = {}, k
    if images is not None:  # a row per sample, each with its prompt's pixel values (generate's own expansion of
        # pixel_values repeats image rows, which is right only for one image per prompt)
        input_ids, mask = left_padded([p for p in prompts for _ in range(k)], pad_id, device)
        model_inputs = _sample_image_inputs(images, prompts, k, device)
        returns = 1
    else:
        input_ids, mask = left_padded(prompts, pad_id, device)
    greedy = cfg.temperature == 0
    options = dict(do_sample=not greedy, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id,
                   eos_token_id=eos_id, num_return_sequences=returns, use_cache=True, synced_gpus=cfg.synced_gpus)
    if not greedy:
        options.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    started = time.perf_counter()
    with torch.no_grad(), eval_mode(model), _seeded(seed, device):
        out = model.generate(input_ids=input_ids, attention_mask=mask, **model_inputs, **options)
    return _samples(prompts, out[:, input_ids.shape[1]:], cfg, eos_id, started)


def sample_policy(models: Models, prompts: list[list[int]], cfg: RolloutConfig, *, seed: int, eos_id: int | None,
                  pad_id: int, images=None) -> Samples:
    """num_generations responses per prompt from the policy (LoRA adapters active). images: a vision-language
    model's, one `ExampleImages` (or None) per prompt."""
    return _generate(models.policy, prompts, cfg, seed=seed, eos_id=eos_id, pad_id=pad_id, images=images)


def reference_context(models: Models):
    """(model, context factory) that runs the reference: the separate model, or the policy with its adapters
    disabled (a fresh `disable_adapter()` context per call)."""
    if models.reference is not None:
        return models.reference, contextlib.nullcontext
    if not hasattr(models.policy, "disable_adapter"):
        raise ValueError("no reference: load_models(need_reference=True) without LoRA loads one")
    return models.policy, models.policy.disable_adapter


def sample_reference(models: Models, prompts: list[list[int]], cfg: RolloutConfig, *, seed: int,
                     eos_id: int | None, pad_id: int, images=None) -> Samples:
    """num_generations responses per prompt from the reference: with LoRA, the policy with its adapters disabled
    (the base model exactly), not the policy. images: as sample_policy's."""
    model, context = reference_context(models)
    with context():
        return _generate(model, prompts, cfg, seed=seed, eos_id=eos_id, pad_id=pad_id, images=images)


def mixture_logprobs(policy_logits: torch.Tensor, reference_logits: torch.Tensor, mixture_coef: float):
    """log softmax((1 - m) log pi + m log pi_ref) over the last dimension: the geometric mixture's next token."""
    mixed = ((1 - mixture_coef) * torch.log_softmax(policy_logits.float(), -1)
             + mixture_coef * torch.log_softmax(reference_logits.float(), -1))
    return torch.log_softmax(mixed, -1)


def _top_p_filter(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (the most likely always stays)."""
    if top_p >= 1:
        return logprobs
    sorted_logp, order = logprobs.sort(-1, descending=True)
    before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
    drop = before >= top_p
    filtered = sorted_logp.masked_fill(drop, float("-inf"))
    return torch.full_like(logprobs, float("-inf")).scatter(-1, order, filtered)


def _all_finished(finished: torch.Tensor, synced: bool) -> bool:
    """Every row of this rank finished, and with synced, every row of every rank (a finished rank keeps
    decoding: its sharded models' forwards are collective)."""
    done = finished.all()
    if synced:
        import torch.distributed as dist

        done = done.to(torch.int32)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
    return bool(done)


def sample_mixture(models: Models, prompts: list[list[int]], cfg: RolloutConfig, *, seed: int, eos_id: int | None,
                   pad_id: int, record: bool = False, images=None) -> Samples:
    """num_generations responses per prompt from the token-level geometric mixture of policy and reference,
    softmax((1 - m) log pi + m log pi_ref) with m = cfg.mixture_coef, then temperature and top_p. record: keep
    each step's mixture log-probs [N, V] in `extra["step_logprobs"]` (tests). images: as sample_policy's; both
    models read each sample's pixel values in the first step (the prompt), the KV caches hold them after."""
    policy = models.policy
    reference, ref_context = reference_context(models)
    _check_images(policy, prompts, images)
    device = next(policy.parameters()).device
    repeated = [p for p in prompts for _ in range(cfg.num_generations)]
    input_ids, mask = left_padded(repeated, pad_id, device)
    first_inputs = {} if images is None else _sample_image_inputs(images, prompts, cfg.num_generations, device)
    started = time.perf_counter()
    caches = [None, None]
    generated, finished, recorded = [], torch.zeros(len(repeated), dtype=torch.bool, device=device), []
    step_ids = input_ids
    with torch.no_grad(), eval_mode(policy), eval_mode(reference), _seeded(seed, device):
        for _ in range(cfg.max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -step_ids.shape[1]:]
            logits = []
            for i, (model, context) in enumerate(((policy, contextlib.nullcontext), (reference, ref_context))):
                with context():
                    out = model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                                past_key_values=caches[i], use_cache=True,
                                **(first_inputs if caches[i] is None else {}))
                caches[i] = out.past_key_values
                logits.append(out.logits[:, -1])
            logprobs = mixture_logprobs(logits[0], logits[1], cfg.mixture_coef)
            if record:
                recorded.append(logprobs)
            if cfg.temperature == 0:
                token = logprobs.argmax(-1)
            else:
                scaled = _top_p_filter(torch.log_softmax(logprobs / cfg.temperature, -1), cfg.top_p)
                token = torch.multinomial(scaled.exp(), 1).squeeze(-1)
            token = torch.where(finished, torch.full_like(token, pad_id), token)
            generated.append(token)
            if eos_id is not None:
                finished |= token == eos_id
            if _all_finished(finished, cfg.synced_gpus):
                break
            step_ids = token[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    samples = _samples(prompts, torch.stack(generated, 1), cfg, eos_id, started)
    if record:
        samples.extra["step_logprobs"] = recorded
    return samples
