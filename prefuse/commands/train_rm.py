"""`prefuse train-rm`: a reward model (Bradley-Terry) or a pairwise judge trained on local pairs
(engine/reward/train.py)."""
from __future__ import annotations

import argparse

from prefuse.commands.flags import add_config_file, config_flags, config_values
from prefuse.commands.models import add_gguf_file, plain_models, settings

NAME = "train-rm"
HELP = "train a reward model (Bradley-Terry) or a pairwise judge on local pairs"
DESCRIPTION = ("Trains a one-logit sequence classifier from a local causal LM on preference pairs, as TRL's "
               "RewardTrainer (--kind bradley_terry) or PairRM-style (--kind pairwise). Flags take TRL's names. "
               "Writes the model and its tokenizer to --output_dir (for --reward_model_path / --judge), with "
               "metrics.jsonl and checkpoint-<step>/.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefuse.engine.reward.train import RewardModelConfig

    add_config_file(parser)
    config_flags(parser, RewardModelConfig)
    add_gguf_file(parser)


def run(args: argparse.Namespace) -> int:
    from prefuse.engine.reward.train import RewardModelConfig, train_reward_model

    plain_models(args)
    train_reward_model(RewardModelConfig(**config_values(RewardModelConfig, settings(args))))
    return 0
