"""`prefuse rlhs`: preference pairs from two rollouts per scenario of the toy consultancy environment, labelled with
immediate feedback or with hindsight (engine/methods/rlhs/command.py)."""
from __future__ import annotations

import argparse

from prefuse.commands.flags import add_config_file, config_flags, config_values
from prefuse.commands.models import add_gguf_file, plain_models, settings

NAME = "rlhs"
HELP = ("RLHS: preference pairs from two rollouts per scenario of the toy consultancy environment, labelled with "
        "immediate feedback or with hindsight")
DESCRIPTION = ("Two responses of the policy per scenario, each played out by the simulated customer and rated by the "
               "evaluator after the dialogue (immediate), with the world model's outcome (partial) or with the true "
               "feature table (oracle). Writes the pairs of --feedback to --output (TRL pairs with the ratings and "
               "true utilities), for prefuse train, and a JSON report (docs/methods/rlhs.md).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefuse.engine.methods.rlhs.command import RLHSConfig

    add_config_file(parser)
    config_flags(parser, RLHSConfig)
    add_gguf_file(parser)


def run(args: argparse.Namespace) -> int:
    from prefuse.engine.methods.rlhs.command import RLHSConfig, format_report, run_rlhs

    plain_models(args)
    cfg = RLHSConfig(**config_values(RLHSConfig, settings(args)))
    print(format_report(run_rlhs(cfg)))
    print(f"report: {cfg.report_path}")
    return 0
