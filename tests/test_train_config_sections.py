"""TrainConfig's sections: every field has its --help text in its metadata (the only source of `prefuse train
--help`), the sections' fields are TrainConfig's in order, and each section (and a cross-section rule) refuses a bad
value through `prefuse train` in one line, before any model is loaded."""
import dataclasses

import pytest

from prefuse.cli import main
from prefuse.engine.train.config import SECTIONS, TrainConfig


def test_every_field_has_a_help_text_that_train_help_shows(capsys):
    missing = [f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("help", "").strip()]
    assert not missing, f"fields without metadata help: {missing}"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert " ".join(f.metadata["help"].split()) in shown, f.name


def test_the_sections_fields_are_trainconfigs_in_order():
    names = [f.name for section in SECTIONS for f in dataclasses.fields(section)]
    assert names == [f.name for f in dataclasses.fields(TrainConfig)]
    assert len(names) == len(set(names))
    cfg = TrainConfig(max_length=64, use_peft=True, online=True)  # flat: every section's field by its name
    assert (cfg.max_length, cfg.use_peft, cfg.online, cfg.monitor_extra_top_k) == (64, True, True, [5, 20, 50])


# (the section whose check refuses it, flags, the one-line message)
CASES = [
    ("ModelSettings", ["--torch_dtype", "float8"], "torch_dtype: 'float8' is not one of"),
    ("DataSettings", ["--max_length", "1"], "max_length: must be >= 2, got 1"),
    ("ObjectiveSettings", ["--beta", "-1"], "beta: must be non-negative, got -1.0"),
    ("RevisionSettings", ["--revision_template", "no fields"], "revision_template: 'no fields' is neither a file nor"),
    ("OFSSettings", ["--ofs_swap_mode", "swap"], "ofs_swap_mode: 'swap' is not roles or params"),
    ("ALoLSettings", ["--value_fraction", "1.5"], "value_fraction: must be in (0, 1), got 1.5"),
    ("OptimisationSettings", ["--lr_scheduler_type", "zigzag"], "lr_scheduler_type: 'zigzag' is not one of"),
    ("OnlineSettings", ["--reward_weights", "1"], "reward_weights: needs --reward_funcs"),
    ("BDHSSettings", ["--rho_th", "2"], "rho_th: must be in [0, 1], got 2.0"),
    ("VLLMSettings", ["--vllm_gpu_memory_utilization", "1.5"], "vllm_gpu_memory_utilization: must be in (0, 1)"),
    ("RunSettings", ["--save_steps", "-1"], "save_steps: must be >= 0 (0: never), got -1"),
    ("MonitorSettings", ["--monitor_ema", "1"], "monitor_ema: must be in [0, 1)"),
    ("TrainConfig", ["--init_adapters", "{checkpoint}"], "init_adapters: starts LoRA adapters: add --use_peft"),
]


def test_the_cases_cover_every_section():
    assert {case[0] for case in CASES} == {s.__name__ for s in SECTIONS} | {"TrainConfig"}


@pytest.mark.parametrize("section, flags, expected", CASES, ids=[case[0] for case in CASES])
def test_each_section_refuses_a_bad_value_in_one_line(tmp_path, capsys, section, flags, expected):
    (tmp_path / "model").mkdir()
    (tmp_path / "pairs.jsonl").write_text("")
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "checkpoint.json").write_text("{}")
    flags = [flag.format(checkpoint=tmp_path / "checkpoint-1") for flag in flags]
    argv = ["train", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "pairs.jsonl"),
            "--output_dir", str(tmp_path / "out"), "--report_to", "none", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("prefuse train: error:"), err
    assert expected in errors[0], errors[0]
    assert not (tmp_path / "out").exists()  # refused before the run starts
