"""prefuse.compat.trl_kto.PrefuseKTOTrainer against TRL 1.16's own KTOTrainer.

Same tiny Llama (saved, so TRL can load its reference from the path), same unpaired data and batch, float32: the
loss, the gradients and every logged metric equal TRL's. The log-prob sums span a few hundred nats here, so their
float32 rounding (~3e-5) reaches the loss as ~3e-6 (beta 0.1): loss and metrics within 1e-5 * max(1, |value|),
rewards/* and kl (beta times, or a difference of, such sums) within 1e-5 * max(1, |value|, |logps/chosen|),
gradients within 1e-4 of the largest |gradient|.
"""
import json

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from datasets import Dataset

from prefuse.compat import trl_kto
from prefuse.compat.trl_kto import PrefuseKTOTrainer
from tests.tokenizer_fixture import DATA_DIR, build_tokenizer, save_tiny_llama

TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("kto") / "model"
    torch.manual_seed(0)
    save_tiny_llama(path, build_tokenizer())
    return path


def unpaired_rows(n=8):
    """n pairs as 2n unpaired completions, desirable and undesirable interleaved (each batch holds both)."""
    with open(DATA_DIR / "pandalm_testset_v1_human.jsonl", encoding="utf-8") as f:
        pairs = [json.loads(next(f)) for _ in range(n)]
    rows = []
    for i, pair in enumerate(pairs):
        prompt = pair["prompt"][-120:]
        first, second = (("chosen", True), ("rejected", False)) if i % 2 == 0 else (("rejected", False),
                                                                                     ("chosen", True))
        rows += [{"prompt": prompt, "completion": pair[key][:80], "label": label} for key, label in (first, second)]
    return rows


def make_trainer(cls, model_dir, tmp_path, peft_config=None, **overrides):
    settings = {"output_dir": str(tmp_path / cls.__name__), "per_device_train_batch_size": 4, "max_steps": 2,
                "learning_rate": 1e-3, "beta": 0.1, "bf16": False, "logging_steps": 1, "report_to": "none",
                "save_strategy": "no", "max_length": 96}
    args = trl.KTOConfig(**{**settings, **overrides})
    model = transformers.LlamaForCausalLM.from_pretrained(model_dir)
    return cls(model=model, args=args, train_dataset=Dataset.from_list(unpaired_rows()),
               processing_class=build_tokenizer(), peft_config=peft_config)


def twin_trainers(model_dir, tmp_path, use_peft=False, **overrides):
    """PrefuseKTOTrainer and trl.KTOTrainer on identical policies moved off the reference, and one batch."""
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if use_peft else None
    ours, theirs = (make_trainer(cls, model_dir, tmp_path, peft_config, **overrides)
                    for cls in (PrefuseKTOTrainer, trl.KTOTrainer))
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in ours.model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op; A's gradient needs B != 0
                param.normal_(std=0.05, generator=generator)
    # a few likelihood steps on the batch's mismatched completions: the policy gives them more mass than the
    # reference, so KTO's reference point (clamped at 0) binds
    optimizer = torch.optim.Adam([p for p in ours.model.parameters() if p.requires_grad], lr=1e-2)
    kl = "KL_" if "KL_input_ids" in batch else ""  # apo_zero_unpaired has none: its completions
    labels = batch[f"{kl}input_ids"].masked_fill(batch[f"{kl}completion_mask"] == 0, -100)
    for _ in range(3):
        optimizer.zero_grad()
        ours.model(input_ids=batch[f"{kl}input_ids"], attention_mask=batch[f"{kl}attention_mask"],
                   labels=labels).loss.backward()
        optimizer.step()
    ours.model.zero_grad()
    theirs.model.load_state_dict(ours.model.state_dict())
    ours.model.train()  # the metrics go to "train" (dropout is off: TRL's disable_dropout)
    theirs.model.train()
    return ours, theirs, batch


def close(got, want, scale=1.0):
    return abs(got - want) <= TOLERANCE * max(1.0, abs(want), scale)


@pytest.mark.parametrize("overrides", [
    {},
    {"use_peft": True},
    {"loss_type": "apo_zero_unpaired"},
    {"precompute_ref_log_probs": True},
    {"desirable_weight": 1.3, "undesirable_weight": 0.7, "beta": 0.5},
], ids=["kto", "kto_lora", "apo_zero_unpaired", "precomputed_reference", "weights"])
def test_step0_loss_gradients_and_metrics_equal_trl(model_dir, tmp_path, monkeypatch, overrides):
    head_calls = []
    head = trl_kto.linear_logprobs
    monkeypatch.setattr(trl_kto, "linear_logprobs", lambda *a, **k: head_calls.append(1) or head(*a, **k))
    ours, theirs, batch = twin_trainers(model_dir, tmp_path, **overrides)
    assert batch["label"].any() and not batch["label"].all()
    head_calls.clear()
    ours_loss = ours.compute_loss(ours.model, batch)
    theirs_loss = theirs.compute_loss(theirs.model, batch)
    assert head_calls  # prefuse's head computed it
    assert close(ours_loss.item(), theirs_loss.item()), (ours_loss.item(), theirs_loss.item())

    ours_loss.backward()
    theirs_loss.backward()
    theirs_params = dict(theirs.model.named_parameters())
    trained = [(name, p) for name, p in ours.model.named_parameters() if p.requires_grad]
    largest = max(theirs_params[name].grad.abs().max() for name, _ in trained)
    assert largest > 0
    for name, param in trained:
        assert (param.grad - theirs_params[name].grad).abs().max() <= GRAD_TOLERANCE * largest, name

    ours_metrics, theirs_metrics = ours._metrics["train"], theirs._metrics["train"]
    assert set(ours_metrics) == set(theirs_metrics), sorted(set(theirs_metrics) ^ set(ours_metrics))
    scale = abs(theirs_metrics["logps/chosen"][-1])
    for name, values in theirs_metrics.items():
        assert close(ours_metrics[name][-1], values[-1], scale), (name, ours_metrics[name][-1], values[-1])
    if ours.loss_type == "kto":
        assert theirs_metrics["kl"][-1] > 0  # the reference point binds (the policy moved off the reference)


def test_two_training_steps_log_what_trl_logs(model_dir, tmp_path):
    ours, theirs = (make_trainer(cls, model_dir, tmp_path) for cls in (PrefuseKTOTrainer, trl.KTOTrainer))
    ours.train()
    theirs.train()
    ours_steps, theirs_steps = ([entry for entry in t.state.log_history if "loss" in entry] for t in (ours, theirs))
    assert len(ours_steps) == len(theirs_steps) == 2
    for got, want in zip(ours_steps, theirs_steps):
        assert set(got) == set(want)
        for name in ("loss", "grad_norm", "kl", "rewards/margins", "logps/chosen", "entropy", "logits/rejected",
                     "num_tokens"):
            assert close(got[name], want[name], abs(want["logps/chosen"])), (name, got[name], want[name])
    assert ours_steps[1]["rewards/margins"] != 0.0  # the first step moved the policy


@pytest.mark.parametrize("stage, refused", [(3, True), (2, False), (None, False)])
def test_deepspeed_zero3_is_refused_in_one_line(stage, refused):
    """The three drop-ins call check_not_zero3 after TRL's __init__: ZeRO-3 holds the lm_head partitioned to numel 0
    outside its module's forward, which the fused head never calls."""
    from types import SimpleNamespace

    from prefuse.compat.sharding import check_not_zero3

    plugin = None if stage is None else SimpleNamespace(zero_stage=stage)
    trainer = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))
    if refused:
        with pytest.raises(ValueError, match="ZeRO-3.*PrefuseKTOTrainer.*FSDP2"):
            check_not_zero3(trainer, "PrefuseKTOTrainer")
    else:
        check_not_zero3(trainer, "PrefuseKTOTrainer")


def test_a_model_with_scaled_logits_is_refused(model_dir, tmp_path, monkeypatch):
    """A config field that scales the logits (Cohere's logit_scale and the like), which the fused head would not
    apply, is refused in one line naming it."""
    load = transformers.LlamaForCausalLM.from_pretrained

    def scaled(path, *args, **kwargs):
        model = load(path, *args, **kwargs)
        model.config.logit_scale = 0.5
        return model

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", scaled)
    with pytest.raises(ValueError, match="logit_scale=0.5"):
        make_trainer(PrefuseKTOTrainer, model_dir, tmp_path)
