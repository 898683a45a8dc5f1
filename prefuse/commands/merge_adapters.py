"""`prefuse merge-adapters`: one LoRA adapter whose weight update is the weighted sum of others', exactly
(engine/models/adapters.py)."""
from __future__ import annotations

import argparse

from prefuse.commands.models import plain_models

NAME = "merge-adapters"
HELP = "the exact linear combination of LoRA adapters (sum_k w_k B_k A_k)"
DESCRIPTION = ("Writes one LoRA adapter whose weight update is the weighted sum of the given adapters' updates, "
               "exactly (peft's 'cat' combination; 'linear' is not exact).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", nargs="+", required=True, help="LoRA adapter directories (peft's layout)")
    parser.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    parser.add_argument("--output", required=True, help="where the combined adapter goes")
    parser.add_argument("--base", default=None, help="the base model directory (default: the first adapter's)")


def run(args: argparse.Namespace) -> int:
    from prefuse.engine.models.adapters import merge_adapters

    plain_models(args)
    path = merge_adapters(args.adapters, args.weights, args.output, base=args.base)
    print(f"combined adapter written to {path}")
    return 0
