"""`prefuse bdhs`: Bias-Driven Hallucination Sampling, an SFT file in, a pairs file out
(engine/methods/bdhs/offline.py)."""
from __future__ import annotations

import argparse

from prefuse.commands.flags import add_config_file, config_flags, config_values
from prefuse.commands.models import add_gguf_file, plain_models, settings

NAME = "bdhs"
HELP = ("BDHS: rejected responses the policy writes with the image (or a part of the prompt) masked, an SFT file "
        "in, a pairs file out")
DESCRIPTION = ("Bias-Driven Hallucination Sampling (Algorithm 1 of the Apple multimodal alignment study): per SFT "
               "row, y~- generated from the masked prompt, guided by the ground truth's sentence prefixes, filtered "
               "by the sentence embedder's cosine similarity to y+. Writes prompt, chosen = y+, rejected = y~- and "
               "a `bdhs` column to --output, for prefuse train.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefuse.engine.methods.bdhs.offline import BDHSRunConfig

    add_config_file(parser)
    config_flags(parser, BDHSRunConfig)
    add_gguf_file(parser)


def run(args: argparse.Namespace) -> int:
    from prefuse.engine.methods.bdhs.offline import BDHSRunConfig, run_bdhs

    plain_models(args)
    run_bdhs(BDHSRunConfig(**config_values(BDHSRunConfig, settings(args))))
    return 0
