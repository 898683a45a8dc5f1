"""`prefuse kernels`: every Triton kernel compiled for GPU targets, no GPU needed (kernels/compile_report.py)."""
from __future__ import annotations

import argparse

NAME = "kernels"
HELP = "compile every Triton kernel for sm_80/sm_90/gfx942 and report registers"
DESCRIPTION = ("Compiles each Triton kernel in every launch config for GPU targets (no GPU needed) and prints "
               "registers, spills and errors.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from prefuse.kernels.compile_report import main

    return main(["--json"] if args.json else [])
