"""`prefuse selm-data`: SELM's offline data, each pair's y_w, y_l and the reference's greedy y_ref ranked by a judge
(engine/methods/selm.py)."""
from __future__ import annotations

import argparse

from prefuse.commands.flags import add_config_file, config_flags, config_values
from prefuse.commands.models import add_gguf_file, plain_models, settings

NAME = "selm-data"
HELP = ("SELM's offline data: each pair's y_w, y_l and the reference's greedy y_ref ranked by a judge, best against "
        "worst")
DESCRIPTION = ("For every pair of --dataset_name, y_ref is --model_name_or_path's greedy response; y_w, y_l and "
               "y_ref are ranked by the judge (--reward_funcs, --reward_model_path or a pairwise --judge); writes "
               "prompt, chosen (the best), rejected (the worst) and reference_response (y_ref) to --output, for "
               "prefuse train --loss_type selm. Pairs whose three candidates tie are left out.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefuse.engine.methods.selm import SELMDataConfig

    add_config_file(parser)
    config_flags(parser, SELMDataConfig)
    add_gguf_file(parser)


def run(args: argparse.Namespace) -> int:
    from prefuse.engine.methods.selm import SELMDataConfig, build_selm_data

    plain_models(args)
    build_selm_data(SELMDataConfig(**config_values(SELMDataConfig, settings(args))))
    return 0
