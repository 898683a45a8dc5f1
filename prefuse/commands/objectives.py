"""`prefuse objectives`: every objective with the roles and inputs it reads, the data that gives them offline, how
it runs online and with which judges, its defaults and hyper-parameters."""
from __future__ import annotations

import textwrap

from prefuse.algorithms import get_objective, list_objectives
from prefuse.algorithms.roles import role_inputs
from prefuse.engine.core.method_defaults import describe_defaults
from prefuse.engine.core.objectives import objective_needs
from prefuse.engine.online.methods import ONLINE_DESCRIPTIONS, judge_kinds, online_method


def describe(name: str) -> dict:
    """One objective for `prefuse objectives`: its inputs, where they come from offline, its hyper-parameters."""
    spec = get_objective(name)
    stats = role_inputs([spec])
    try:
        needs = objective_needs([name])
        if needs.data == "pairs":
            source = "pairs (prompt, chosen, rejected" + "".join(", " + c for c in needs.columns("pairs")) + ")"
            if needs.revision:
                source += "; the four answer-given-context rows through --revision_template"
            if needs.slow_adapter:
                source += "; slow_*: the same rows under a second LoRA adapter (--use_peft)"
        else:
            source = ("completions (prompt, completion, label" + "".join(", " + c for c in needs.columns(
                "completions")) + ") or pairs (prompt, chosen, rejected" + "".join(
                ", " + c for c in needs.columns("pairs")) + "), each side one example")
    except ValueError as error:
        source = "not offline: " + str(error).split(": ", 2)[-1]
    try:
        method = online_method([name])
        online, judges = ONLINE_DESCRIPTIONS[method], judge_kinds(method)
    except ValueError:
        method, online, judges = None, "-", "-"
    return {
        "name": spec.name,
        "online": online,
        "judges": judges,
        "defaults": describe_defaults([name], method),
        "roles": sorted({s.role for s in stats if s.required}),
        "inputs": sorted(spec.requires),
        "optional": sorted(spec.optional),
        "data": source,
        "hparams": dict(spec.hparams),
        "separable": spec.separable,
    }


def format_objectives(names: list[str] | None = None) -> str:
    """Every objective (or `names`) as a block: roles, inputs, where offline data gives them, hyper-parameters."""
    def wrapped(label: str, text: str) -> list[str]:
        return textwrap.wrap(text, 110, initial_indent=f"  {label:<9} ", subsequent_indent=" " * 12) or [f"  {label}"]

    blocks = []
    for name in names or list_objectives():
        d = describe(name)
        lines = [f"{d['name']}{'' if d['separable'] else '  (batch-level: recompute path)'}"]
        lines += wrapped("roles", ", ".join(d["roles"]) or "-")
        lines += wrapped("inputs", ", ".join(d["inputs"]))
        if d["optional"]:
            lines += wrapped("optional", ", ".join(d["optional"]))
        lines += wrapped("data", d["data"])
        lines += wrapped("online", d["online"])
        if d["judges"] != "-":
            lines += wrapped("judges", d["judges"])
        lines += wrapped("defaults", d["defaults"])
        lines += wrapped("hparams", ", ".join(["beta"] + [f"{k}={v!r}" for k, v in sorted(d["hparams"].items())]))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


NAME = "objectives"
HELP = "every objective: its roles and inputs, the data columns that feed it offline, its hyper-parameters"
DESCRIPTION = ("Lists the registered objectives. Roles are the sequences an objective scores (chosen, rejected, "
               "sample, completion, kl, ...); `data` says which dataset columns give them to `prefuse train`, or "
               "which flag will run an objective that offline data cannot feed.")


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="*", help="only these objectives")
    parser.add_argument("--json", action="store_true", help="one JSON object per objective")


def run(args) -> int:
    """`prefuse objectives [NAMES] [--json]` (and `prefuse train --list_objectives`); an unknown name is a
    ValueError."""
    import json

    names = [describe(n)["name"] for n in args.names] or None
    if args.json:
        for name in names or list_objectives():
            print(json.dumps(describe(name)))
    else:
        print(format_objectives(names))
    return 0
