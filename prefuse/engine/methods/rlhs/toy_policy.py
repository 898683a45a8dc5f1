"""A tiny consultant policy for the toy environment, built here from nothing (no download): a word-level tokenizer
over the environment's words, a small GPT-2 (or Llama), and a supervised warm-up on templated consultant responses
that mix truthful and deceptive claims, so that its samples hold both kinds.

    path = build_toy_policy("out/toy_policy", steps=300, seed=0)     # the model and its tokenizer, save_pretrained

The warm-up's responses (`template_response`): the required feature of every option, then a recommendation, in one
of three styles drawn per scenario with STYLE_WEIGHTS:
    truthful   the brief as it is, and an affordable option that has the feature (any affordable one if none has)
    deceptive  every option "has" the feature (the claim that sells), and any affordable option
    candid     the brief as it is, and any affordable option
The first `honest_steps` steps leave the deceptive style out (HONEST_WEIGHTS: candid answers only, whose every claim
depends on the brief: the signal that teaches reading it), the rest draw the three styles. The loss is the fused
head's cross-entropy on the response tokens (`prefuse.linear_cross_entropy` on the decoder's last hidden states),
as `prefuse demo`'s warm-up.

The model is a GPT-2 (learned absolute positions) by default: with every prompt of the same layout, an honest claim
is a copy from a fixed position, which it learned in each of the 4 seeds tried at 300 steps (87% of its sampled
responses, in two seeds checked, either state the brief right or claim "has" throughout: the two styles); a Llama of
the same size (rotary positions, `architecture="llama"`) learned it in 2 of the 4 (35% of the failed ones'
responses were of either style, the others claimed at random).
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from prefuse.engine.methods.rlhs.environment import (
    OPTION_NAMES,
    Scenario,
    feature_claims,
    generate_scenarios,
    policy_prompt,
    vocabulary,
)
from prefuse.engine.models.loading import decoder_hidden_states, head_of
from prefuse.kernels import linear_cross_entropy

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
STYLES = ("truthful", "deceptive", "candid")
STYLE_WEIGHTS = (0.4, 0.4, 0.2)
HONEST_WEIGHTS = (0.0, 0.0, 1.0)


def template_response(s: Scenario, style: str, rng: random.Random) -> str:
    """A consultant response of `style` (module docstring) for scenario `s`: the required feature of every option,
    then the recommendation."""
    affordable = [o for o in s.options if o.price <= s.budget] or list(s.options)
    if style == "truthful":
        option = rng.choice([o for o in affordable if o.features[s.required]] or affordable)
        claims = feature_claims(s)
    elif style == "deceptive":
        option, claims = rng.choice(affordable), feature_claims(s, {name: True for name in OPTION_NAMES})
    elif style == "candid":
        option, claims = rng.choice(affordable), feature_claims(s)
    else:
        raise ValueError(f"style: {style!r} is not one of {STYLES}")
    return f"{claims} recommend {option.name} ."


def sample_style(rng: random.Random, weights=STYLE_WEIGHTS) -> str:
    return rng.choices(STYLES, weights=weights)[0]


def build_tokenizer():
    """A word-level tokenizer over `environment.vocabulary()`: <pad>=0, <s>=1 (prepended to text), </s>=2, <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(list(SPECIALS) + vocabulary())}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


ARCHITECTURES = ("llama", "gpt2")


def build_model(tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0, architecture: str = "llama"):
    """A randomly initialized causal LM for the toy tokenizer: a Llama (rotary positions) or a GPT-2 (learned
    absolute positions), 4 heads, tied embeddings."""
    import transformers

    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    if architecture == "llama":
        config = transformers.LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                          max_position_embeddings=64, **ids)
        return transformers.LlamaForCausalLM(config)
    if architecture == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden_size, n_layer=layers, n_head=4, n_positions=64, **ids)
        return transformers.GPT2LMHeadModel(config)
    raise ValueError(f"architecture: {architecture!r} is not one of {ARCHITECTURES}")


def warm_up_batch(tokenizer, scenarios: list[Scenario], rng: random.Random, weights=STYLE_WEIGHTS):
    """input_ids, attention_mask, labels [B, T] of prompt + template response + EOS (labels on the response)."""
    prompts = tokenizer([policy_prompt(s) for s in scenarios])["input_ids"]
    responses = tokenizer([template_response(s, sample_style(rng, weights), rng) for s in scenarios],
                          add_special_tokens=False)["input_ids"]
    rows = [p + r + [tokenizer.eos_token_id] for p, r in zip(prompts, responses)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, len(prompt) - 1:len(row) - 1] = torch.tensor(row[len(prompt):])  # next-token layout
    return input_ids, mask, labels


def warm_up(model, tokenizer, steps: int, *, honest_steps: int = 0, batch_size: int = 64, lr: float = 3e-3,
            seed: int = 0) -> list[float]:
    """`steps` AdamW steps of the fused cross-entropy on fresh templated scenarios, the first `honest_steps` of them
    with HONEST_WEIGHTS, the others with STYLE_WEIGHTS; returns the losses."""

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        scenarios = generate_scenarios(batch_size, seed=rng.randrange(2**31))
        weights = HONEST_WEIGHTS if step < honest_steps else STYLE_WEIGHTS
        input_ids, mask, labels = warm_up_batch(tokenizer, scenarios, rng, weights)
        head = head_of(model)
        loss = linear_cross_entropy(decoder_hidden_states(model, input_ids, mask), head.weight, labels,
                                    bias=head.bias)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_toy_policy(path, *, steps: int = 300, honest_steps: int = 200, hidden_size: int = 64, layers: int = 2,
                     batch_size: int = 64, lr: float = 3e-3, seed: int = 0, architecture: str = "gpt2") -> Path:
    """The warmed-up toy consultant, saved with its tokenizer (save_pretrained) under `path`; returns the path."""
    if not 0 <= honest_steps <= steps:
        raise ValueError(f"honest_steps: must be in [0, steps={steps}], got {honest_steps}")
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size, layers, seed, architecture)
    losses = warm_up(model, tokenizer, steps, honest_steps=honest_steps, batch_size=batch_size, lr=lr, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "warm_up_losses.txt").write_text("".join(f"{x:.5f}\n" for x in losses))
    return path
