"""A tiny consultant policy for the toy environment, built here from nothing (no download): a word-level tokenizer
over the environment's words, a small Llama, and a supervised warm-up on templated consultant responses that mix
truthful and deceptive claims, so that its samples hold both kinds.

    path = build_toy_policy("out/toy_policy", steps=300, seed=0)     # the model and its tokenizer, save_pretrained

The warm-up's responses (`template_response`), per scenario one of three styles drawn with STYLE_WEIGHTS:
    truthful   an affordable option that has the required feature, "X has F"; when there is none, an affordable
               option and "X lacks F"
    deceptive  any affordable option, "X has F" whether or not it has it (the claim that sells)
    candid     any affordable option, and the truth about it ("has" or "lacks")
The loss is the fused head's cross-entropy on the response tokens (`prefuse.linear_cross_entropy` on the decoder's
last hidden states), as `prefuse demo`'s warm-up.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

from prefuse.engine.rlhs.environment import Scenario, generate_scenarios, policy_prompt, vocabulary

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
STYLES = ("truthful", "deceptive", "candid")
STYLE_WEIGHTS = (0.4, 0.4, 0.2)


def template_response(s: Scenario, style: str, rng: random.Random) -> str:
    """A consultant response of `style` (module docstring) for scenario `s`."""
    affordable = [o for o in s.options if o.price <= s.budget] or list(s.options)
    if style == "truthful":
        good = [o for o in affordable if o.features[s.required]]
        option = rng.choice(good or affordable)
        has = option.features[s.required]
    elif style == "deceptive":
        option, has = rng.choice(affordable), True
    elif style == "candid":
        option = rng.choice(affordable)
        has = option.features[s.required]
    else:
        raise ValueError(f"style: {style!r} is not one of {STYLES}")
    return f"recommend {option.name} . {option.name} {'has' if has else 'lacks'} {s.required} ."


def sample_style(rng: random.Random) -> str:
    return rng.choices(STYLES, weights=STYLE_WEIGHTS)[0]


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


def build_model(tokenizer, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def warm_up_batch(tokenizer, scenarios: list[Scenario], rng: random.Random):
    """input_ids, attention_mask, labels [B, T] of prompt + template response + EOS (labels on the response)."""
    prompts = tokenizer([policy_prompt(s) for s in scenarios])["input_ids"]
    responses = tokenizer([template_response(s, sample_style(rng), rng) for s in scenarios],
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


def warm_up(model, tokenizer, steps: int, *, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> list[float]:
    """`steps` AdamW steps of the fused cross-entropy on fresh templated scenarios; returns the losses."""
    from prefuse.engine.model import decoder_hidden_states, head_of
    from prefuse.kernels import linear_cross_entropy

    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        scenarios = generate_scenarios(batch_size, seed=rng.randrange(2**31))
        input_ids, mask, labels = warm_up_batch(tokenizer, scenarios, rng)
        head = head_of(model)
        loss = linear_cross_entropy(decoder_hidden_states(model, input_ids, mask), head.weight, labels,
                                    bias=head.bias)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def build_toy_policy(path, *, steps: int = 300, hidden_size: int = 64, layers: int = 2, batch_size: int = 64,
                     lr: float = 3e-3, seed: int = 0) -> Path:
    """The warmed-up toy consultant, saved with its tokenizer (save_pretrained) under `path`; returns the path."""
    if steps < 0:
        raise ValueError(f"steps: must be >= 0, got {steps}")
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size, layers, seed)
    losses = warm_up(model, tokenizer, steps, batch_size=batch_size, lr=lr, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "warm_up_losses.txt").write_text("".join(f"{x:.5f}\n" for x in losses))
    return path
