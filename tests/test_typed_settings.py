"""Settings typed the same way from flags and from YAML --config files (engine/core/typed_settings.py), for every
command with a config dataclass: `learning_rate: 1e-3` (a string to PyYAML) is the float, `use_peft: "false"` is
False, a value that does not convert or a key that is no setting is one line naming the file, the key and what was
expected, a YAML syntax error names the file and line; negative numbers parse as flag values; an unknown flag gets
the command's own usage and a near match; train-rm checks its data before it loads the model; every option of every
command has a description in --help."""
import argparse
import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prefuse.cli import build_parser, main
from prefuse.commands.generate import GenerateConfig
from prefuse.commands.train import train_config
from prefuse.engine.core.typed_settings import convert, typed_settings
from prefuse.engine.methods.bdhs.offline import BDHSRunConfig
from prefuse.engine.reward.train import RewardModelConfig
from prefuse.engine.train.config import TrainConfig
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama with the fixture tokenizer, 8 short preference pairs, and 4 unpaired rows."""
    root = tmp_path_factory.mktemp("typed")
    torch.manual_seed(0)
    save_tiny_llama(root / "model", build_tokenizer(), max_position_embeddings=256)
    with open(DATA_DIR / "pandalm_testset_v1_human.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(8)]
    rows = [{k: r[k][:60] for k in ("prompt", "chosen", "rejected")} for r in rows]
    pairs, unpaired = root / "pairs.jsonl", root / "unpaired.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    unpaired.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"], "label": True}) + "\n"
                                for r in rows[:4]))
    return {"model": root / "model", "pairs": pairs, "unpaired": unpaired}


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower()]  # beside the libraries' progress bars


def write_config(path: Path, files, out: Path, text: str, max_length: int = 64) -> Path:
    path.write_text(f"model_name_or_path: {files['model']}\ndataset_name: {files['pairs']}\noutput_dir: {out}\n"
                    f"report_to: none\nmax_length: {max_length}\nsave_steps: 0\n" + text)
    return path


# -- the converter: one per annotation, for flags and files ---------------------------------------------------------

@pytest.mark.parametrize("value, hint, expected", [
    ("1e-3", float, 1e-3), ("-1e-3", float, -1e-3), (3, float, 3.0), ("8", int, 8), ("1e3", int, 1000),
    (4.0, int, 4), ("false", bool, False), ("Yes", bool, True), ("0", bool, False), (1, bool, True),
    (True, bool, True), ("none", int | None, None), (None, float | None, None), ("none", str | None, "none"),
    ("sigmoid", list[str], ["sigmoid"]), (["a", "b"], list[str] | None, ["a", "b"]),
    (["0.5", 1], list[float] | None, [0.5, 1.0]), (7, str, "7"),
])
def test_a_value_converts_to_its_fields_type(value, hint, expected):
    got = convert(value, hint)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, hint, message", [
    ("fast", float, "expected a number, got 'fast'"),
    (True, float, "expected a number, got True"),
    (2.5, int, "expected a whole number, got 2.5"),
    ("maybe", bool, "expected true or false, got 'maybe'"),
    (False, str, "expected a string, got False (YAML reads yes/no/on/off as true/false: quote it)"),
    (None, int, "expected a whole number, got none"),
])
def test_a_value_that_does_not_convert_names_what_was_expected(value, hint, message):
    with pytest.raises(ValueError) as error:
        convert(value, hint)
    assert str(error.value) == message


@pytest.mark.parametrize("config_class", [TrainConfig, RewardModelConfig, BDHSRunConfig, GenerateConfig])
def test_the_one_checker_serves_every_config_dataclass(config_class):
    name = next(f for f in ("learning_rate", "max_new_tokens", "seed") if f in config_class.__dataclass_fields__)
    assert typed_settings(config_class, {name: "7"}, "run.yaml") == {name: 7 if name != "learning_rate" else 7.0}
    with pytest.raises(ValueError, match=rf"^run.yaml: unknown setting '{name}x' \(did you mean {name}\?\)"):
        typed_settings(config_class, {f"{name}x": 1}, "run.yaml")


def test_flags_and_yaml_give_the_same_settings(tmp_path):
    flags = ["--learning_rate", "1e-3", "--use_peft", "no", "--max_steps", "2", "--beta", "0.2",
             "--loss_type", "simpo", "--simpo_gamma", "0.3", "--lora_target_modules", "q_proj"]
    from_flags = train_config(build_parser().parse_args(["train", *flags]))
    config = tmp_path / "run.yaml"
    config.write_text('learning_rate: 1e-3\nuse_peft: "no"\nmax_steps: "2"\nbeta: "0.2"\nloss_type: simpo\n'
                      'simpo_gamma: "0.3"\nlora_target_modules: q_proj\n')
    from_yaml = train_config(build_parser().parse_args(["train", "--config", str(config)]))
    assert from_flags == from_yaml
    assert (from_yaml.learning_rate, from_yaml.use_peft, from_yaml.max_steps, from_yaml.beta) == (1e-3, False, 2, 0.2)
    assert from_yaml.objective_args == {"simpo_gamma": 0.3} and from_yaml.lora_target_modules == ["q_proj"]


# -- through the CLI ------------------------------------------------------------------------------------------------

def test_yaml_strings_train_as_the_numbers_and_bools_they_spell(files, tmp_path):
    """The issue's case: `learning_rate: 1e-3` (a string to PyYAML) ended in a TypeError traceback, and
    `use_peft: "false"` trained LoRA."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", files, out,
                          'learning_rate: 1e-3\nuse_peft: "false"\nmax_steps: "2"\nper_device_train_batch_size: "4"\n'
                          'loss_type: simpo\nsimpo_gamma: "0.3"\nbeta: "2"\n')
    assert main(["train", "--config", str(config)]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["learning_rate"] == 1e-3 and saved["use_peft"] is False and saved["max_steps"] == 2
    assert saved["beta"] == 2.0 and saved["objective_args"] == {"simpo_gamma": 0.3}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][-1] == 2
    final = out / "checkpoint-2"
    assert (final / "model.safetensors").is_file() and not (final / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("text, expected", [
    ("learning_rate: fast\n", "learning_rate: expected a number, got 'fast'"),
    ("use_peft: maybe\n", "use_peft: expected true or false, got 'maybe'"),
    ("max_steps: 2.5\n", "max_steps: expected a whole number, got 2.5"),
    ("report_to: no\n", "report_to: expected a string, got False (YAML reads yes/no/on/off as true/false: quote it)"),
    ("learning_rat: 1e-3\n", "unknown setting 'learning_rat' (did you mean learning_rate?)"),
    ("loss_type: [sigmoid\nbeta: 0.1\n", "{config}:8: not valid YAML: expected ',' or ']'"),
])
def test_a_bad_yaml_value_or_key_is_one_line_naming_the_file_and_key(files, tmp_path, capsys, text, expected):
    out = tmp_path / "out"
    config = write_config(tmp_path / "run.yaml", files, out, text)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = error_lines(err)
    assert line.startswith(f"prefuse train: error: config {config}"), line
    assert expected.format(config=config) in line, line
    assert not out.exists()  # nothing written


def test_train_rm_takes_a_config_file_typed_as_its_flags(files, tmp_path, capsys):
    out = tmp_path / "rm"
    text = 'learning_rate: 1e-3\nmax_steps: "1"\nuse_peft: "no"\nper_device_train_batch_size: 4\nlogging_steps: 1\n'
    config = write_config(tmp_path / "rm.yaml", files, out, text, max_length=250)
    assert main(["train-rm", "--config", str(config), "--seed", "3"]) == 0
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["learning_rate"], saved["max_steps"], saved["use_peft"], saved["seed"]) == (1e-3, 1, False, 3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: fast\n")
    assert main(["train-rm", "--config", str(bad)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == f"prefuse train-rm: error: config {bad}: learning_rate: expected a number, got 'fast'"


def test_a_negative_number_parses_as_a_value_and_the_section_refuses_it(files, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files["pairs"]),
            "--output_dir", str(tmp_path / "out"), "--learning_rate", "-1e-3"]
    assert main(argv) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == "prefuse train: error: learning_rate: must be positive, got -0.001"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, usage, message", [
    (["train", "--learnng_rate", "1e-3"], "usage: prefuse train ",
     "prefuse train: error: unrecognized arguments: --learnng_rate 1e-3 (did you mean --learning_rate?)"),
    (["train-rm", "--lerning_rate=1e-3"], "usage: prefuse train-rm ",
     "prefuse train-rm: error: unrecognized arguments: --lerning_rate=1e-3 (did you mean --learning_rate?)"),
    (["objectives", "--jsn"], "usage: prefuse objectives [-h] [--json] [names ...]",
     "prefuse objectives: error: unrecognized arguments: --jsn (did you mean --json?)"),
    (["train", "--learning_rate", "fast"], "usage: prefuse train ",
     "prefuse train: error: argument --learning_rate: expected a number, got 'fast'"),
])
def test_an_unknown_flag_gets_the_commands_usage_and_a_near_match(capsys, argv, usage, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0].startswith(usage) and lines[1] == message, lines


def test_train_rm_checks_its_data_before_it_loads_the_model(files, tmp_path, capsys, monkeypatch):
    loaded = []

    def load(*args, **kwargs):
        loaded.append(args)
        raise AssertionError("the model loaded before the data were checked")

    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained", load)
    argv = ["train-rm", "--model_name_or_path", str(files["model"]), "--dataset_name", str(files["unpaired"]),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none"]
    assert main(argv) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line.startswith("prefuse train-rm: error:") and "a reward model learns from pairs" in line, line
    assert loaded == []


def test_every_option_of_every_command_has_a_description():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {action.option_strings[0]}" for name, command in commands.items()
               for action in command._actions
               if action.option_strings and "--help" not in action.option_strings
               and not re.sub(r"\(default: .*\)$", "", action.help or "").strip()]
    assert not missing, missing
