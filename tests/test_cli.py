"""The `prefuse` command: its parser is built from the commands' registry, every command is one module with one
contract, and every command runs through the one error wrapper (one line on stderr, exit status 2)."""
import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from prefuse.cli import build_parser, main
from prefuse.commands import errors
from prefuse.commands.registry import COMMANDS

ROOT = Path(__file__).resolve().parents[1] / "prefuse"


def subcommands(parser: argparse.ArgumentParser) -> dict:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_command_is_a_module_of_commands_with_the_contract():
    names = [c.NAME for c in COMMANDS]
    assert len(set(names)) == len(names)
    for command in COMMANDS:
        assert command.__name__ == "prefuse.commands." + command.NAME.replace("-", "_"), command.__name__
        assert command.HELP and command.DESCRIPTION, command.NAME
        assert callable(command.add_arguments) and callable(command.run), command.NAME


def test_the_parser_lists_the_registry_in_its_order_and_runs_each_commands_run():
    parser = build_parser()
    assert list(subcommands(parser)) == [c.NAME for c in COMMANDS]
    assert parser.parse_args(["objectives"]).run is next(c for c in COMMANDS if c.NAME == "objectives").run
    assert parser.parse_args(["kernels", "--json"]).json is True


def test_the_cli_stays_thin_and_only_cli_names_the_registry():
    assert len((ROOT / "cli.py").read_text().splitlines()) < 100
    for path in (ROOT / "commands").glob("*.py"):
        assert "prefuse.cli" not in path.read_text(), path  # commands sit below the cli


@pytest.mark.parametrize("error", [ValueError("bad  value\nin two lines"), OSError("no such file"),
                                   ImportError("No module named 'vllm'")])
def test_the_error_wrapper_makes_one_line_and_status_2(error, capsys):
    def action():
        raise error

    assert errors.reported("demo", action) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prefuse demo: error: "), err
    assert " ".join(str(error).split()) in err


def test_the_error_wrapper_passes_the_commands_status_through():
    assert errors.reported("kernels", lambda: None) == 0
    assert errors.reported("kernels", lambda: 1) == 1
    with pytest.raises(RuntimeError):  # a bug is not a bad input: its traceback shows
        errors.reported("kernels", lambda: (_ for _ in ()).throw(RuntimeError("bug")))


def test_main_reports_a_commands_error_in_one_line(capsys):
    assert main(["objectives", "no_such_objective"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prefuse objectives: error: unknown objective 'no_such_objective'")
    assert main(["convert", "model.bin", "--output", "out"]) == 2
    assert "is neither a .gguf file nor a bundled model" in capsys.readouterr().err


def test_the_command_line_exits_with_the_commands_status():
    proc = subprocess.run([sys.executable, "-m", "prefuse", "objectives", "sigmoid"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "sigmoid" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, "-m", "prefuse", "objectives", "nope"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and proc.stderr.startswith("prefuse objectives: error: "), proc.stderr[-2000:]
