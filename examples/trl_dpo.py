"""TRL's DPOTrainer with prefuse as its loss, on real preference pairs, on the CPU, with nothing downloaded.

    python examples/trl_dpo.py --steps 10 --loss-type sigmoid

A byte-level BPE tokenizer is trained on the pairs themselves (the `tokenizers` library), a tiny Llama is built
from a config, and `PrefuseDPOTrainer` (a `trl.DPOTrainer` whose loss is prefuse's `PreferenceLoss` on the last
hidden states) trains LoRA adapters on a few UltraFeedback pairs read from ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig  # noqa: E402

from prefuse.compat.trl import PrefuseDPOTrainer  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ultrafeedback_binarized_sample_train.jsonl"
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass
class Config:
    pairs: int = 16
    prompt_chars: int = 120  # the texts are cut so a CPU step takes well under a second
    response_chars: int = 160
    vocab_size: int = 512
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    lora_rank: int = 8
    batch_size: int = 4
    steps: int = 10
    lr: float = 5e-3
    beta: float = 0.1
    loss_type: str = "sigmoid"
    seed: int = 0
    output_dir: str = "trl_dpo_output"


def load_pairs(cfg: Config, path: Path = DATA) -> list[dict[str, str]]:
    """The first `cfg.pairs` rows of a TRL standard-format file, {"prompt", "chosen", "rejected"}, texts cut."""
    pairs = []
    with open(path) as lines:
        for line in lines:
            row = json.loads(line)
            pairs.append({"prompt": row["prompt"][:cfg.prompt_chars] + "\n",
                          "chosen": row["chosen"][:cfg.response_chars],
                          "rejected": row["rejected"][:cfg.response_chars]})
            if len(pairs) == cfg.pairs:
                break
    return pairs


def train_tokenizer(pairs: list[dict[str, str]], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the pairs' texts (no download)."""
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((text for pair in pairs for text in pair.values()), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def build_model(tokenizer: PreTrainedTokenizerFast, cfg: Config) -> LlamaForCausalLM:
    """A tiny Llama from a config, sized to the tokenizer."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size,
                         intermediate_size=2 * cfg.hidden_size, num_hidden_layers=cfg.layers,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads, max_position_embeddings=256,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def dpo_config(cfg: Config, **overrides) -> DPOConfig:
    options = dict(output_dir=cfg.output_dir, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.steps,
                   learning_rate=cfg.lr, beta=cfg.beta, loss_type=cfg.loss_type, logging_steps=1, report_to="none",
                   save_strategy="no", use_cpu=True, seed=cfg.seed, max_length=256, dataloader_num_workers=0)
    return DPOConfig(**{**options, **overrides})


def make_trainer(cfg: Config, trainer_class=PrefuseDPOTrainer, model=None, tokenizer=None, pairs=None, ref_model=None,
                 **overrides):
    """A DPO trainer on LoRA adapters of a tiny model; the reference: `ref_model`, or the adapters disabled."""
    pairs = load_pairs(cfg) if pairs is None else pairs
    tokenizer = train_tokenizer(pairs, cfg.vocab_size) if tokenizer is None else tokenizer
    model = build_model(tokenizer, cfg) if model is None else model
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=2 * cfg.lora_rank, target_modules=["q_proj", "v_proj"],
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    return trainer_class(model=model, ref_model=ref_model, args=dpo_config(cfg, **overrides),
                         train_dataset=Dataset.from_list(pairs), processing_class=tokenizer, peft_config=lora)


def parse_args(argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in fields(Config):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    return Config(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    """Trains and returns TRL's log history (one dict of metrics per logged step)."""
    cfg = parse_args(argv)
    trainer = make_trainer(cfg)
    trainer.train()
    return trainer.state.log_history


if __name__ == "__main__":
    main()
