"""The TRL drop-ins (PrefuseDPOTrainer, PrefuseKTOTrainer, PrefuseGRPOTrainer) and the Liger import swap under
`accelerate launch` with FSDP2 on 2 CPU processes (gloo), against the same job in one process.

tests/trl_fsdp_job.py runs every case (trainer x tied or untied embeddings, two SGD steps on one global batch of 4
per step, padded to one width) once in one process and once under `accelerate launch --config_file
tests/accelerate/fsdp2_cpu.yaml` (each decoder layer a FSDP2 unit, the root holding the embeddings and the lm_head,
sharded in two: after a forward without gradient the lm_head weight is a DTensor shard; with the lm_head a unit of
its own ("headunit") it is one throughout, and its gradient reaches the shard only through the gather's backward:
prefuse.compat.sharding.full_head). Per step: the logged loss to 1e-6 and gradient norm to 1e-5 relative; the first
step's gradients and the weights after both steps to 1e-5 of the largest entry. The two runs differ only in float32
summation order (sums over half the batch, then an all-reduce; measured differences: ~1e-7).
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")

from tests.tokenizer_fixture import build_tokenizer, save_tiny_llama

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "tests" / "trl_fsdp_job.py"
CONFIG = REPO / "tests" / "accelerate" / "fsdp2_cpu.yaml"
# headunit: the untied model with its lm_head a FSDP2 unit of its own (see tests/trl_fsdp_job.py)
# lora: LoRA on q_proj and v_proj of the untied model, the reference its adapters disabled
CASES = [f"{kind}_{model}" for kind in ("dpo", "kto", "grpo") for model in ("untied", "tied", "headunit")] + \
    ["dpo_lora", "liger_tied", "liger_headunit"]

# the two launches take ~2 minutes on 2 busy cores
pytestmark = [pytest.mark.usefixtures("offline_hf_home"), pytest.mark.heavy]


def free_port() -> int:
    """A port free now, for accelerate launch's rendezvous (its command line takes a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(command, out_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return {case: torch.load(out_dir / f"{case}.pt", weights_only=False) for case in CASES}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"one": results of one process, "two": of 2 FSDP2 processes}, each {case: the job's record}."""
    root = tmp_path_factory.mktemp("trl_fsdp")
    tokenizer = build_tokenizer()
    for name, tied in (("untied", False), ("tied", True)):
        torch.manual_seed(0)
        save_tiny_llama(root / "models" / name, tokenizer, tie_word_embeddings=tied)
    (root / "one").mkdir()
    (root / "two").mkdir()
    one = run([sys.executable, str(JOB), str(root / "models"), str(root / "one"), *CASES], root / "one")
    two = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
               str(JOB), str(root / "models"), str(root / "two"), *CASES], root / "two")
    return {"one": one, "two": two}


def close_tensors(got: dict, want: dict):
    assert set(got) == set(want)
    largest = max(w.abs().max().item() for w in want.values())
    assert largest > 0
    for name, w in want.items():
        assert (got[name] - w).abs().max().item() <= 1e-5 * largest, name


@pytest.mark.parametrize("case", CASES)
def test_two_fsdp2_processes_equal_one(runs, case):
    one, two = runs["one"][case], runs["two"][case]
    assert two["fsdp"].startswith("FSDP") and not one["fsdp"].startswith("FSDP")  # FSDP2 did shard it
    assert len(one["loss"]) == len(two["loss"]) == 2
    for got, want in zip(two["loss"], one["loss"]):
        assert abs(got - want) <= 1e-6, (two["loss"], one["loss"])
    for got, want in zip(two.get("grad_norm", []), one.get("grad_norm", [])):
        assert abs(got - want) <= 1e-5 * want, (two["grad_norm"], one["grad_norm"])
    close_tensors(two["grads"], one["grads"])
    close_tensors(two["weights"], one["weights"])
    names = set(one["grads"])
    if case.endswith("_lora"):
        assert names and all("lora_" in name for name in names)
        return
    tied = case.endswith("_tied")
    assert ("lm_head.weight" in names) != tied  # tied: the embedding is the head
    head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    assert one["grads"][head].abs().max() > 0  # the fused head's gradient reached the (sharded) head weight


@pytest.mark.parametrize("kind", ["dpo", "kto", "grpo"])
def test_the_trainers_hold_a_sharded_lm_head_and_log_trl_metrics(runs, kind):
    """The lm_head weight is a DTensor shard outside the forward (what the fused head must gather), and every metric
    TRL logs at step 1 is logged by both runs with equal values (1e-5 relative)."""
    for model in ("untied", "tied", "headunit"):
        one, two = runs["one"][f"{kind}_{model}"], runs["two"][f"{kind}_{model}"]
        assert two["lm_head_is_dtensor"] and not one["lm_head_is_dtensor"]
        for got, want in zip(two["metrics"], one["metrics"]):
            assert set(got) == set(want)
            for name, value in want.items():
                if name not in ("step_time", "train_runtime") and isinstance(value, float):
                    assert abs(got[name] - value) <= 1e-5 * max(1.0, abs(value)), (kind, model, name)
    if kind == "grpo":  # each completion sampled under its own seed: the same completions in both runs
        assert runs["two"]["grpo_untied"]["completions"] == runs["one"]["grpo_untied"]["completions"]
