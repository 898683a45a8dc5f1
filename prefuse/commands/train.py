"""`prefuse train`: preference training of a local causal LM on a local preference file (engine/train/loop.py), or
COFS-DPO's domain after domain with --domains (commands/cofs.py)."""
from __future__ import annotations

import argparse

from prefuse.commands.flags import add_config_file, config_flags, flag_value
from prefuse.commands.models import settings

NAME = "train"
HELP = "preference training of a local causal LM on a local preference file"
DESCRIPTION = ("Preference training (DPO family, KTO, ...) with the fused head, in one process or on torchrun's ranks "
               "(DDP, or FSDP2 with --fsdp). Flags take TRL's names; --config run.yaml takes the same keys (flags "
               "given here override it). Writes metrics.jsonl and checkpoint-<step>/ to --output_dir.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from prefuse.engine.train.config import TrainConfig, objective_hparam_names

    add_config_file(parser)
    parser.add_argument("--list_objectives", action="store_true", default=argparse.SUPPRESS,
                        help="print every objective with its inputs, data columns and hyper-parameters, and exit")
    # --monitor_extra_top_k 5 20 50, or none (or nothing): the values as given, checked by the config
    config_flags(parser, TrainConfig,
                 special={"objective_args": {"nargs": "+", "metavar": "KEY=VALUE"},
                          "monitor_extra_top_k": {"nargs": "*", "metavar": "K"},
                          "fsdp": {"nargs": "?", "const": "full_shard"}})
    group = parser.add_argument_group("objective hyper-parameters", "passed to the objective(s) of --loss_type; "
                                      "each objective accepts only its own (an error lists them)")
    for name in objective_hparam_names():
        group.add_argument(f"--{name}", type=flag_value, default=argparse.SUPPRESS, dest=f"hparam:{name}",
                           metavar=name.upper(), help=hparam_help(name))


def hparam_help(name: str) -> str:
    """--help's line of an objective hyper-parameter: the objectives that take it and their default(s)."""
    from prefuse.algorithms.registry import OBJECTIVES

    takers = {objective: spec.hparams[name] for objective, spec in sorted(OBJECTIVES.items()) if name in spec.hparams}
    defaults = {repr(v) for v in takers.values()}
    default = defaults.pop() if len(defaults) == 1 else "each objective's own, `prefuse objectives NAME`"
    shown = ", ".join(list(takers)[:6]) + (f" and {len(takers) - 6} more" if len(takers) > 6 else "")
    return f"a hyper-parameter of {shown} (default: {default})"


def train_config(args: argparse.Namespace):
    """The TrainConfig of the parsed flags: --config's YAML, overridden by the flags given, each typed by its field
    (engine/core/typed_settings.py, as the flags are); --objective_args key=value items and the objective
    hyper-parameter flags merged into objective_args."""
    from prefuse.engine.train.config import TrainConfig

    given = settings(args)
    values = {}
    if "config" in given:
        values = TrainConfig.from_yaml(given.pop("config")).to_dict()  # typed, unknown keys refused
    objective_args = dict(values.pop("objective_args", {}) or {})
    for item in given.pop("objective_args", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"objective_args: expected key=value, got {item!r}")
        objective_args[key] = flag_value(value)
    for key in [k for k in given if k.startswith("hparam:")]:
        objective_args[key.split(":", 1)[1]] = given.pop(key)
    values.update(given)
    values["objective_args"] = objective_args
    return TrainConfig.from_dict(values, where="")  # the flags' errors name the flag


def run(args: argparse.Namespace) -> int:
    if getattr(args, "list_objectives", False):
        from prefuse.commands import objectives

        return objectives.run(argparse.Namespace(names=[], json=False))
    cfg = train_config(args)  # a bad value is a ValueError (DataError too): one line, exit status 2 (cli.main)
    if cfg.domains:  # COFS-DPO: domain after domain, then the combination and the forgetting report
        from prefuse.commands.cofs import train_domains as train
    else:
        from prefuse.engine.train.loop import train
    train(cfg)
    return 0
