"""The `prefuse` command. Thin: the parser is built from the commands' registry (prefuse/commands/registry.py), and
the command named runs through the one error wrapper (prefuse/commands/errors.py: a bad input is one line on stderr
and exit status 2)."""
from __future__ import annotations

import argparse
import sys

from prefuse.commands.errors import reported
from prefuse.commands.flags import CommandParser


def build_parser() -> argparse.ArgumentParser:
    from prefuse.commands.registry import COMMANDS

    parser = argparse.ArgumentParser(prog="prefuse", description="Fused-kernel preference alignment.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION,
                           formatter_class=getattr(command, "FORMATTER", argparse.HelpFormatter))
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _train_config(args: argparse.Namespace):
    """The TrainConfig of `prefuse train`'s parsed flags (prefuse/commands/train.py)."""
    from prefuse.commands.train import train_config

    return train_config(args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return reported(args.command, lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
