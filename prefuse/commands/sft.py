"""`prefuse sft`: supervised fine-tuning of a local causal LM on a local SFT file (engine/sft/)."""
from __future__ import annotations

import argparse

from prefuse.commands.flags import add_config_file, config_flags, config_values
from prefuse.commands.models import settings

NAME = "sft"
HELP = "supervised fine-tuning on the fused cross-entropy (text, prompt-completion or messages)"
DESCRIPTION = ("Supervised fine-tuning as TRL's SFTTrainer (its data formats, completion_only_loss, "
               "assistant_only_loss, loss normalised over the optimizer step's trained tokens), the cross-entropy "
               "computed by the fused head without [tokens x vocab] logits; LoRA or full, --packing, in one process "
               "or on torchrun's ranks. Flags take TRL's names; --config run.yaml takes the same keys. Writes "
               "metrics.jsonl (loss, mean_token_accuracy, entropy, num_tokens) and checkpoint-<step>/ to "
               "--output_dir.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefuse.engine.sft import SFTConfig

    add_config_file(parser)
    config_flags(parser, SFTConfig, special={"fsdp": {"nargs": "?", "const": "full_shard"}})


def run(args: argparse.Namespace) -> int:
    from prefuse.engine.sft import SFTConfig, train_sft

    train_sft(SFTConfig(**config_values(SFTConfig, settings(args))))
    return 0
