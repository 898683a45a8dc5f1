"""`prefuse demo --real --pipeline`'s chain (sft -> export --merge_lora -> DPO -> eval) on a tiny model: the JSON with
`win_rate` is written, the merged SFT model is the start plus the SFT adapters' low-rank update (float64, computed
here from the adapter files), DPO trains on that merged model, and the model eval answers with is DPO's checkpoint
(its answers equal those of the merged model + DPO adapters loaded here through peft); the start against itself is
exactly 1/2."""
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefuse.commands.demo_pipeline import Stages, chain, format_table
from prefuse.engine.eval import EvalConfig, evaluate
from prefuse.engine.eval.run import answer_prompts
from tests.data_helpers import write_jsonl
from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")

REWARDS = '''
def count_e(prompts, completions, **kwargs):
    return [float(c.count("e")) for c in completions]
'''
QUESTIONS = ["Why is the sky blue?", "Name three colors.", "Where do cats sleep?", "Describe a tree."]
HELD_OUT = ["Tell me about the sea.", "What is seven plus two?", "Write one word.", "Say hi."]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    save_tiny_llama(root / "start", build_tokenizer())
    write_jsonl(root / "sft.jsonl", [{"messages": user(q) + assistant("the eee here")} for q in QUESTIONS])
    write_jsonl(root / "pairs.jsonl", [{"prompt": user(q), "chosen": assistant("eee e"), "rejected": assistant("no")}
                                       for q in QUESTIONS])
    write_jsonl(root / "prompts.jsonl", [{"prompt": user(q)} for q in HELD_OUT])
    (root / "rewards.py").write_text(REWARDS)
    stages = Stages(sft_steps=2, dpo_steps=2, batch_size=2, max_length=64, sft_learning_rate=5e-2,
                    dpo_learning_rate=5e-2, lora_r=4, max_new_tokens=8)
    result = chain(str(root / "start"), str(root / "sft.jsonl"), str(root / "pairs.jsonl"),
                   str(root / "prompts.jsonl"), f"{root / 'rewards.py'}:count_e", str(root / "out"), stages)
    return root, result


def test_the_chain_writes_the_eval_json_with_a_win_rate(piped):
    root, result = piped
    written = json.loads((root / "out" / "eval.json").read_text())
    assert written["n"] == len(HELD_OUT) and 0.0 <= written["win_rate"] <= 1.0
    assert written["win_rate"] == result["eval"]["win_rate"] and written["model"] == result["dpo_checkpoint"]
    assert [len(result["sft"]), len(result["dpo"])] == [2, 2]
    table = format_table(result)
    assert "| sft loss (2 steps) | DPO loss (2 steps) |" in table and f"| {len(HELD_OUT)} |" in table


def test_the_merged_sft_model_is_the_start_plus_the_sft_adapters(piped):
    from safetensors.torch import load_file

    root, _ = piped
    start = load_file(str(root / "start" / "model.safetensors"))
    merged = load_file(str(next((root / "out" / "sft_model").glob("*.safetensors"))))
    adapter_dir = root / "out" / "sft" / "checkpoint-2"
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    lora = load_file(str(adapter_dir / "adapter_model.safetensors"))
    scale = config["lora_alpha"] / config["r"]
    updated = 0
    for key in start:
        a_key = "base_model.model." + key.replace(".weight", ".lora_A.weight")
        want = start[key].double()
        if a_key in lora:
            delta = lora[a_key.replace("lora_A", "lora_B")].double() @ lora[a_key].double()
            assert float(delta.abs().max()) > 0  # the SFT steps moved the adapters
            want = want + scale * delta
            updated += 1
        # float32 storage of the merged sum: one rounding of values of this size
        bound = 2.0 ** -23 * float(want.abs().max()) * 2
        assert float((merged[key].double() - want).abs().max()) <= bound, key
    assert updated > 0


def test_dpo_trains_the_merged_model_and_eval_answers_with_dpos_checkpoint(piped):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, result = piped
    record = json.loads((root / "out" / "dpo" / "checkpoint-2" / "run_config.json").read_text())
    assert record["settings"]["model_name_or_path"] == result["sft_model"]
    # the trained model built here, independently of eval's loading: the merged SFT model + DPO's adapters
    base = AutoModelForCausalLM.from_pretrained(result["sft_model"], local_files_only=True)
    trained = PeftModel.from_pretrained(base, result["dpo_checkpoint"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(result["sft_model"])
    cfg = EvalConfig(max_new_tokens=8)
    records = result["eval"]["records"]
    answers = answer_prompts(trained, tokenizer, [user(q) for q in HELD_OUT], cfg)
    assert [r["answer"] for r in records] == answers
    assert [r["baseline_answer"] for r in records] != answers  # the start answers otherwise: the check can fail


def test_the_start_against_itself_wins_exactly_half(piped):
    root, _ = piped
    result = evaluate(EvalConfig(model_name_or_path=str(root / "start"), baseline_model=str(root / "start"),
                                 prompts=str(root / "prompts.jsonl"), reward_funcs=[f"{root / 'rewards.py'}:count_e"],
                                 max_new_tokens=8, device="cpu"))
    assert result["win_rate"] == 0.5 and result["lc_win_rate"] == 0.5


def test_pipeline_flags_refused_in_one_line(tmp_path, capsys):
    from prefuse.cli import main

    assert main(["demo", "--pipeline", "--output_dir", str(tmp_path / "a")]) == 2
    assert "pipeline: the pipeline runs on the real model; add --real" in capsys.readouterr().err
    assert main(["demo", "--real", "--pipeline", "--output_dir", str(tmp_path / "c")]) == 2
    assert "data_dir: --pipeline trains on UltraFeedback rows; pass --data_dir DIR" in capsys.readouterr().err
    assert main(["demo", "--real", "--pipeline", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "b")]) == 2
    assert f"data_dir: {tmp_path} has no ultrafeedback_binarized_sample_train" in capsys.readouterr().err
