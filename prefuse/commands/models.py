"""Flags that name a causal LM to load: a GGUF file there is read through its plain copy, converted once
(engine/models/gguf.py). The commands that load a model add --gguf_file and call `plain_models` first; `prefuse
train` does this in TrainConfig.validate (its YAML config too), `prefuse bench` in RealModel."""
from __future__ import annotations

import argparse

MODEL_FLAGS = ("model_name_or_path", "ref_model_name_or_path", "model", "base")


def add_gguf_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gguf_file", default=None,
                        help="a GGUF file in --model_name_or_path's directory (a .gguf path works "
                             "wherever a model directory does: dequantized, converted once)")


def plain_models(args: argparse.Namespace) -> None:
    """Every model flag that names a GGUF file (or a directory with --gguf_file) now names its plain safetensors
    copy, converted once."""
    from prefuse.engine.models.gguf import is_gguf, plain_directory

    gguf_file = getattr(args, "gguf_file", None)
    for name in MODEL_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and (is_gguf(value) or (gguf_file and name == "model_name_or_path")):
            setattr(args, name, plain_directory(value, gguf_file if name == "model_name_or_path" else None,
                                                field=name))
    if hasattr(args, "gguf_file"):
        del args.gguf_file  # spent: the configs take the directory


def settings(args: argparse.Namespace) -> dict:
    """The parsed flags as a config's keyword arguments (without the parser's own `command` and `run`)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "run")}
