"""`prefuse bench --task sft` on a tiny model: prefuse sft and TRL's SFTTrainer take the same steps (losses equal,
else the record holds an error), each in its own process, the table beside them; Liger is reported as not available
on the CPU; bad flags are one line."""
import json

import pytest

from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama


@pytest.mark.heavy
@pytest.mark.usefixtures("one_thread")
def test_prefuse_and_trl_take_the_same_sft_steps(tmp_path):
    from prefuse.bench import sft

    save_tiny_llama(tmp_path / "model", build_tokenizer())
    rows = [{"prompt": f"Count to {i}:", "completion": " " + " ".join(str(k) for k in range(i + 2))} for i in range(4)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = sft.run(str(tmp_path / "model"), str(data), modes=["lora"], steps=3, warmup=1, sequences=4,
                      max_length=64)
    by_path = {r["path"]: r for r in records}
    assert not by_path["prefuse"]["errors"] and not by_path["trl"]["errors"]
    assert len(by_path["trl"]["losses"]) == len(by_path["prefuse"]["losses"]) == 3
    assert by_path["trl_liger"]["errors"][0].startswith("not available on cpu")
    table = sft.format_table(records)
    assert "| lora | trl |" in table and "| yes |" in table


def test_losses_that_differ_are_an_error_in_the_record():
    from prefuse.bench.sft import check_losses

    records = [{"mode": "full", "path": "prefuse", "losses": [2.0, 1.5], "errors": []},
               {"mode": "full", "path": "trl", "losses": [2.0, 1.6], "errors": []}]
    check_losses(records)
    assert records[0]["errors"] == [] and "differ from prefuse's" in records[1]["errors"][0]


def test_bench_sft_needs_a_model_and_a_dataset(capsys):
    from prefuse.cli import main

    assert main(["bench", "--task", "sft"]) == 2
    assert "--task sft: give --model_name_or_path" in capsys.readouterr().err
