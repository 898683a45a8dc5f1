"""prefuse.engine.checkpoint: exact resumption, crash safety, no pickle, pruning and errors."""
import io
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from prefuse.engine.checkpoint import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, tie_word_embeddings=True, attention_dropout=0.1)  # dropout: the torch RNG matters


pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


def build(kind: str, init_seed: int):
    """A tiny Llama with tied embeddings, plain or with LoRA adapters (with dropout), its AdamW and scheduler. The
    LoRA variant's base always comes from seed 0: it stands for pretrained weights, which are not checkpointed."""
    torch.manual_seed(0 if kind == "lora" else init_seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    if kind == "lora":
        torch.manual_seed(init_seed)
        lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                               init_lora_weights=False)  # random B as well: a fresh model differs from the saved one
        model = peft.get_peft_model(model, lora)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, data_generator) -> float:
    """One step whose batch draws on every RNG a checkpoint restores: the data generator (token ids), python's
    `random` (the length), numpy (which positions are ignored), and the torch RNG (dropout)."""
    length = random.randint(5, 9)
    input_ids = torch.randint(0, CONFIG["vocab_size"], (2, length), generator=data_generator)
    labels = input_ids.clone()
    labels[:, np.random.randint(0, length)] = -100
    loss = model(input_ids=input_ids, labels=labels).loss
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return loss.item()


def seed_all(seed: int):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def trainable_parameters(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_tensors(expected: dict, actual: dict):
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def save_after_training(kind, output_dir, steps=2, **save_kwargs):
    seed_all(0)
    model, optimizer, scheduler = build(kind, init_seed=1)
    data_generator = torch.Generator().manual_seed(1234)
    for _ in range(steps):
        last_loss = train_step(model, optimizer, scheduler, data_generator)
    trainer_state = {"step": steps, "epoch": 0, "data_generator": data_generator.get_state(),
                     "metrics": {"loss": last_loss}}
    path = save_checkpoint(output_dir, steps, model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state=trainer_state, **save_kwargs)
    return path, (model, optimizer, scheduler, data_generator)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_resumed_training_is_bit_identical(kind, tmp_path):
    path, (model, optimizer, scheduler, data_generator) = save_after_training(kind, tmp_path)
    saved_state = {name: t.clone() for name, t in model.state_dict().items()}
    uninterrupted_losses = [train_step(model, optimizer, scheduler, data_generator) for _ in range(3)]
    uninterrupted_params = trainable_parameters(model)

    files = sorted(p.name for p in path.iterdir())
    if kind == "lora":
        assert "model.safetensors" not in files and {"adapter_model.safetensors", "adapter_config.json"} <= set(files)
        with safe_open(str(path / "adapter_model.safetensors"), "pt") as handle:
            stored = list(handle.keys())
        assert stored and all("lora_" in key for key in stored), stored  # the base weights are not in it
        assert len(stored) == 2 * 2 * 2  # A and B of q_proj and v_proj in 2 layers
    else:
        with safe_open(str(path / "model.safetensors"), "pt") as handle:
            stored = set(handle.keys())
        assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored  # tied: stored once
    with safe_open(str(path / "optimizer.safetensors"), "pt") as handle:
        assert {"state.0.exp_avg", "state.0.exp_avg_sq", "state.0.step"} <= set(handle.keys())

    def resume(restore_rng):
        seed_all(99)  # the RNGs of a new process, not those of the saved run
        fresh = build(kind, init_seed=2)
        before = trainable_parameters(fresh[0])
        assert any(not torch.equal(before[n], saved_state[n]) for n in before)  # loading has work to do
        state = load_checkpoint("latest", output_dir=tmp_path, model=fresh[0], optimizer=fresh[1],
                                scheduler=fresh[2], restore_rng=restore_rng)
        assert_same_tensors({n: saved_state[n] for n in before}, trainable_parameters(fresh[0]))
        generator = torch.Generator()
        generator.set_state(state["data_generator"])
        losses = [train_step(*fresh, generator) for _ in range(3)]
        return state, fresh, losses

    state, (model2, optimizer2, scheduler2), resumed_losses = resume(restore_rng=True)
    assert state["step"] == 2 and state["epoch"] == 0 and isinstance(state["metrics"]["loss"], float)
    assert resumed_losses == uninterrupted_losses
    assert_same_tensors(uninterrupted_params, trainable_parameters(model2))
    assert scheduler2.state_dict() == scheduler.state_dict()
    for index, param_state in optimizer.state_dict()["state"].items():
        assert_same_tensors(param_state, optimizer2.state_dict()["state"][index])
    if kind == "full":
        assert model2.lm_head.weight is model2.model.embed_tokens.weight

    # Control: without the saved RNG states the same resumption diverges, so the comparison above has teeth.
    _, _, losses_without_rng = resume(restore_rng=False)
    assert losses_without_rng != uninterrupted_losses


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_load_never_unpickles(kind, tmp_path, monkeypatch):
    path, (model, _, _, _) = save_after_training(kind, tmp_path, steps=1)
    fresh_model, fresh_optimizer, fresh_scheduler = build(kind, init_seed=2)

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")
    for owner, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(owner, name, forbidden)
    with pytest.raises(AssertionError):
        torch.load(io.BytesIO(b""))  # the guard is live
    state = load_checkpoint(path, model=fresh_model, optimizer=fresh_optimizer, scheduler=fresh_scheduler)
    assert state["step"] == 1
    assert_same_tensors(trainable_parameters(model), trainable_parameters(fresh_model))


CRASHING_WRITER = textwrap.dedent("""
    import sys, time
    import torch
    from prefuse.engine import checkpoint

    output_dir, pause_at = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 8)).sum().backward()
    optimizer.step()
    checkpoint.save_checkpoint(output_dir, 1, model=model, optimizer=optimizer, trainer_state={"step": 1})

    def pause():
        print("PAUSED", flush=True)
        time.sleep(120)

    def pause_after(write, count=[0]):
        def paused_write(*args, **kwargs):
            write(*args, **kwargs)
            count[0] += 1
            if pause_at == "after_first_file" and count[0] == 2:  # model.safetensors and one more
                pause()
        return paused_write

    files = checkpoint.files
    files.write_json = pause_after(files.write_json)
    files.write_safetensors = pause_after(files.write_safetensors)
    move_into_place = files.move_into_place
    def paused_move(*args):
        if pause_at == "before_rename":  # every file written and fsynced
            pause()
        move_into_place(*args)
    files.move_into_place = paused_move
    checkpoint.save_checkpoint(output_dir, 2, model=model, optimizer=optimizer, trainer_state={"step": 2})
    print("NOT KILLED", flush=True)
""")


@pytest.mark.parametrize("pause_at", ["after_first_file", "before_rename"])
def test_writer_killed_mid_save_leaves_previous_checkpoint_latest(pause_at, tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(CRASHING_WRITER)
    output_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    writer = subprocess.Popen([sys.executable, str(script), str(output_dir), pause_at], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = writer.stdout.readline()
        assert line.strip() == "PAUSED", writer.stderr.read()
        temp_dirs = [p for p in output_dir.iterdir() if p.name.startswith(".")]
        assert len(temp_dirs) == 1 and any(temp_dirs[0].iterdir())  # killed with files half way written
        assert not (output_dir / "checkpoint-2").exists()
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    assert writer.returncode == -signal.SIGKILL

    assert not (output_dir / "checkpoint-2").exists()
    assert list_checkpoints(output_dir) == [output_dir / "checkpoint-1"]
    assert resolve_checkpoint(output_dir, "latest") == output_dir / "checkpoint-1"
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    assert load_checkpoint("latest", output_dir=output_dir, model=model, optimizer=optimizer) == {"step": 1}
    assert optimizer.state_dict()["state"][0]["step"].item() == 1.0

    # The next save (a new process) clears the dead writer's leftovers.
    save_checkpoint(output_dir, 3, model=model, optimizer=optimizer, trainer_state={"step": 3})
    assert sorted(p.name for p in output_dir.iterdir()) == ["checkpoint-1", "checkpoint-3"]
    assert resolve_checkpoint(output_dir, "latest") == output_dir / "checkpoint-3"


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))


def test_save_total_limit_keeps_the_latest(tmp_path):
    model = small_model()
    for step in [5, 10, 15, 20]:
        save_checkpoint(tmp_path, step, model=model, trainer_state={"step": step}, save_total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-15", "checkpoint-20"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-15", "checkpoint-20"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-20"
    assert load_checkpoint("latest", output_dir=tmp_path, model=model) == {"step": 20}
    with pytest.raises(ValueError, match="save_total_limit"):
        save_checkpoint(tmp_path, 25, model=model, trainer_state={}, save_total_limit=0)


def test_saving_a_step_again_replaces_it(tmp_path):
    model = small_model()
    save_checkpoint(tmp_path, 7, model=model, trainer_state={"run": "first"})
    with torch.no_grad():
        model[1].weight.add_(1.0)
    expected = model[1].weight.clone()
    save_checkpoint(tmp_path, 7, model=model, trainer_state={"run": "second"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7"]
    fresh = small_model()
    assert load_checkpoint(tmp_path / "checkpoint-7", model=fresh) == {"run": "second"}
    assert torch.equal(fresh[1].weight, expected)


def test_missing_checkpoint_errors_name_the_path(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match="no checkpoint-<step> directory"):
        resolve_checkpoint(tmp_path, "latest")
    with pytest.raises(ValueError, match="needs an output_dir"):
        load_checkpoint("latest", model=model)
    missing = tmp_path / "checkpoint-3"
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        load_checkpoint(missing, model=model)
    with pytest.raises(ValueError, match=f"{missing}.*does not exist"):
        load_checkpoint("checkpoint-3", output_dir=tmp_path, model=model)


@pytest.mark.parametrize("removed, message", [
    ("checkpoint.json", "incomplete or not a prefuse checkpoint: checkpoint.json is missing"),
    ("optimizer.safetensors", "incomplete: missing optimizer.safetensors"),
    ("model.safetensors", "incomplete: missing model.safetensors"),
    ("rng.json", "incomplete: missing rng.json"),
])
def test_checkpoint_missing_a_file_is_refused_before_anything_changes(removed, message, tmp_path):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, trainer_state={"step": 1})
    (path / removed).unlink()
    torch.manual_seed(3)
    fresh = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    before = trainable_parameters(fresh)
    with pytest.raises(ValueError, match=f"{path}.*{message}"):
        load_checkpoint(path, model=fresh, optimizer=torch.optim.AdamW(fresh.parameters()))
    assert_same_tensors(before, trainable_parameters(fresh))


def test_checkpoint_without_a_requested_state_or_for_another_model_is_refused(tmp_path):
    model = small_model()
    path = save_checkpoint(tmp_path, 1, model=model, trainer_state={}, rng=False)
    with pytest.raises(ValueError, match=f"{path} has no optimizer, rng state"):
        load_checkpoint(path, model=model, optimizer=torch.optim.AdamW(model.parameters()))
    assert load_checkpoint(path, model=model, restore_rng=False) == {}
    other = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10), torch.nn.Linear(10, 2))
    with pytest.raises(ValueError, match=r"model.safetensors does not match the model: missing \['2.bias', '2.weight'"):
        load_checkpoint(path, model=other, restore_rng=False)


def test_state_that_cannot_be_stored_fails_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"trainer_state.callback: cannot store a function"):
        save_checkpoint(tmp_path, 1, model=small_model(), trainer_state={"callback": lambda: None})
    assert list(tmp_path.iterdir()) == []


def test_trainer_state_comes_back_as_it_was(tmp_path):
    trainer_state = {"step": 3, "epoch": 0.25, "order": (4, 1, 3), "seen_by_rank": {0: 12, 1: 11}, "best": None,
                     "sample_ids": np.arange(4, dtype=np.int64),
                     "generator": torch.Generator().manual_seed(5).get_state(),
                     "metrics": [{"loss": 0.1 + 0.2, "lr": float("inf")}]}
    model = small_model()
    save_checkpoint(tmp_path, 3, model=model, trainer_state=trainer_state, rng=False)
    state = load_checkpoint("latest", output_dir=tmp_path, model=model, restore_rng=False)
    assert state.keys() == trainer_state.keys()
    assert state["order"] == (4, 1, 3) and state["seen_by_rank"] == {0: 12, 1: 11} and state["best"] is None
    assert state["sample_ids"].dtype == np.int64 and state["sample_ids"].tolist() == [0, 1, 2, 3]
    assert torch.equal(state["generator"], trainer_state["generator"])
    assert state["metrics"] == trainer_state["metrics"] and state["step"] == 3 and state["epoch"] == 0.25


def test_peft_model_with_two_adapters_saves_both_in_peft_layout(tmp_path):
    def two_adapter_model(seed):
        torch.manual_seed(0)
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
        torch.manual_seed(seed)
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
        return model

    saved = two_adapter_model(1)
    path = save_checkpoint(tmp_path, 1, model=saved, trainer_state={})
    assert (path / "second" / "adapter_model.safetensors").is_file()
    loaded = two_adapter_model(2)
    load_checkpoint(path, model=loaded)
    assert_same_tensors(saved.state_dict(), loaded.state_dict())

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    by_peft = peft.PeftModel.from_pretrained(base, str(path))  # the adapter files are peft's own
    by_peft.load_adapter(str(path / "second"), adapter_name="second")
    assert_same_tensors(saved.state_dict(), by_peft.state_dict())
