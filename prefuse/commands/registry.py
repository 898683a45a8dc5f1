"""Every command of `prefuse`, in the order `prefuse --help` lists them; cli.py builds its parser from COMMANDS.

A command is a module of prefuse/commands/ with
    NAME                  the subcommand (`prefuse NAME ...`)
    HELP, DESCRIPTION     its line in `prefuse --help` and the text of `prefuse NAME --help`
    FORMATTER             (optional) argparse's formatter class for that text
    add_arguments(parser) its flags
    run(args) -> int      its work; the exit status. A bad input raises ValueError (or OSError, ImportError): cli.main
                          runs every command through errors.reported, which makes it one line and exit status 2.
A new command is a module and one entry here."""
from __future__ import annotations

from prefuse.commands import (
    bdhs,
    bench,
    convert,
    demo,
    eval,
    export,
    generate,
    kernels,
    merge_adapters,
    objectives,
    rlhs,
    selm_data,
    sft,
    train,
    train_rm,
)

COMMANDS = (demo, bench, sft, train, train_rm, objectives, generate, eval, selm_data, bdhs, rlhs, merge_adapters, export,
            convert, kernels)
