"""DPO on a Hugging Face causal LM with LoRA, in a plain PyTorch loop, without the [tokens x vocab] logits.

    python examples/hf_dpo_loop.py --steps 30

The model's decoder gives the last hidden states; prefuse's `PreferenceLoss` runs them through the lm_head chunk by
chunk. The reference model is the same network with its LoRA adapters disabled, so no second copy is held. The
model is a tiny Llama built from a config and the pairs are synthetic token ids (nothing is downloaded): a chosen
response continues its prompt with a fixed rule, a rejected one is random, so the reward margin visibly grows.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from prefuse.preference import PreferenceLoss

IGNORE_INDEX = -100


@dataclass
class Config:
    vocab_size: int = 256
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    lora_rank: int = 8
    pairs: int = 8
    prompt_len: int = 6
    max_response_len: int = 10
    steps: int = 30
    lr: float = 5e-3
    beta: float = 0.1
    seed: int = 0


def build_model(cfg: Config) -> torch.nn.Module:
    """A tiny Llama with LoRA adapters on the attention projections (the lm_head stays frozen)."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=2 * cfg.hidden_size,
                         num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=["q_proj", "v_proj"],
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(LlamaForCausalLM(config), lora)


def synthetic_pairs(cfg: Config) -> dict[str, torch.Tensor]:
    """Preference pairs as one right-padded batch, chosen rows first, then rejected.

    Returns input_ids and attention_mask [2B, T], and labels [2B, T]: labels[:, t] is the token at t + 1 when that
    token belongs to the response (the hidden state at t predicts it), IGNORE_INDEX on prompt and padding.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    low = 3  # ids 0-2 are pad, bos, eos
    prompts = torch.randint(low, cfg.vocab_size, (cfg.pairs, cfg.prompt_len), generator=gen)
    lengths = torch.randint(cfg.max_response_len // 2, cfg.max_response_len + 1, (2, cfg.pairs), generator=gen)
    total = cfg.prompt_len + cfg.max_response_len
    input_ids = torch.zeros(2 * cfg.pairs, total, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for side in range(2):
        for i in range(cfg.pairs):
            n = int(lengths[side, i])
            if side == 0:  # chosen: the prompt read again, one token up (a rule the model can learn)
                response = (prompts[i].repeat(n // cfg.prompt_len + 1)[:n] - low + 1) % (cfg.vocab_size - low) + low
            else:
                response = torch.randint(low, cfg.vocab_size, (n,), generator=gen)
            row = side * cfg.pairs + i
            sequence = torch.cat([prompts[i], response])
            input_ids[row, :len(sequence)] = sequence
            labels[row, cfg.prompt_len - 1:len(sequence) - 1] = response
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "labels": labels}


def last_hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's output [2B, T, H] (after its final norm): the causal-LM wrapper and its lm_head are skipped."""
    decoder = model.get_base_model().model
    return decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def train(model: torch.nn.Module, cfg: Config) -> list[dict[str, float]]:
    """DPO steps on the synthetic pairs; returns each step's loss and metrics (TRL names)."""
    batch = synthetic_pairs(cfg)
    lm_head = model.get_base_model().lm_head
    dpo = PreferenceLoss("sigmoid", beta=cfg.beta)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    history = []
    for step in range(cfg.steps):
        with torch.no_grad(), model.disable_adapter():  # the reference: the base model, exactly
            ref_hidden = last_hidden_states(model, batch)
        hidden = last_hidden_states(model, batch)
        loss, metrics = dpo(hidden, lm_head.weight, batch["labels"], ref_hidden=ref_hidden)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"loss": loss.item(), **{k: v.item() for k, v in metrics.items()}})
        print(f"step {step:3d}  loss {loss.item():.4f}  margin {metrics['rewards/margins'].item():+.4f}  "
              f"accuracy {metrics['rewards/accuracies'].item():.2f}")
    return history


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in fields(Config):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    return Config(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    cfg = parse_args(argv)
    return train(build_model(cfg), cfg)


if __name__ == "__main__":
    main()
