"""The TRL drop-ins and the Liger swap, two steps each, in one process or under `accelerate launch` with FSDP2.

    python tests/trl_fsdp_job.py MODELS_DIR OUT_DIR CASE...                        # one process, the reference
    accelerate launch --config_file tests/accelerate/fsdp2_cpu.yaml tests/trl_fsdp_job.py MODELS_DIR OUT_DIR CASE...

A CASE is <trainer>_<model>: trainer dpo, kto, grpo or liger, model tied, untied (MODELS_DIR/<model>, saved by the
test) or headunit: the untied model with its lm_head a FSDP2 unit of its own, whose forward never runs (the fused head
reads the weight), so that the weight stays a DTensor shard throughout and its gradient reaches the shard only through
the gather's backward; or lora (dpo only): the untied model with LoRA on q_proj and v_proj. The global batch is the
same at any world size (per device: 4 / world), padded to one width, and SGD updates the weights (an update is lr x
gradient, so the weights after a step compare as the gradients do).
Rank 0 writes OUT_DIR/<case>.pt: the logged losses and gradient norms of both steps, the first step's gradients and
the weights after both steps, all gathered whole (DTensor.full_tensor), by parameter name.

accelerate drops the FSDP plugin on the CPU (use_cpu: plain data-parallel processes); `fsdp2_on_the_cpu` applies it
again, as accelerate does on GPUs, so that `Accelerator.prepare` shards the model with `fully_shard` (FSDP2: each
decoder layer, then the root, which holds the embeddings and the lm_head).
"""
import json
import os
import sys
import zlib
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from datasets import Dataset
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.tokenizer_fixture import DATA_DIR, build_tokenizer

GLOBAL_BATCH = 4
STEPS = 2
PAD_TO = 128  # every batch padded to one width: the matmuls' shapes do not depend on the world size


def fsdp2_on_the_cpu():
    """Make accelerate keep, on the CPU, the FSDP2 plugin that `accelerate launch` asks for in the environment:
    accelerate 1.16 sets up plain MULTI_CPU processes there and drops it. Every (re-)initialization of the shared
    AcceleratorState (each Trainer's Accelerator, TRL's own calls) gets it back."""
    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if os.environ.get("ACCELERATE_USE_FSDP", "false") == "true" and self.distributed_type == \
                DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            plugin = kwargs.get("fsdp_plugin") or getattr(self, "fsdp_plugin", None)
            self.fsdp_plugin = plugin or FullyShardedDataParallelPlugin()
            assert self.fsdp_plugin.fsdp_version == 2

    AcceleratorState.__init__ = init


def whole(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered(model, attribute):
    """{name: the whole tensor} of every trainable parameter's `attribute` ("data" or "grad"), on every rank."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            value = param.grad if attribute == "grad" else param.detach()
            out[name] = None if value is None else whole(value).detach().clone()
    return out


def world():
    return int(os.environ.get("WORLD_SIZE", "1"))


def common_args(trainer_kind, out_dir, **extra):
    return {"output_dir": str(out_dir / f"run_{trainer_kind}"), "per_device_train_batch_size": GLOBAL_BATCH // world(),
            "max_steps": STEPS, "optim": "sgd", "learning_rate": 0.5, "max_grad_norm": 1e9, "bf16": False,
            "logging_steps": 1, "report_to": "none", "save_strategy": "no", "seed": 0, "dataloader_num_workers": 0,
            "gradient_checkpointing": False, "use_cpu": True, **extra}


def pairs(n=8):
    with open(DATA_DIR / "pandalm_testset_v1_human.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    return [{"prompt": r["prompt"][-120:], "chosen": r["chosen"][:80], "rejected": r["rejected"][:80]} for r in rows]


def unpaired(n=8):
    rows = []
    for i, pair in enumerate(pairs(n)):
        sides = (("chosen", True), ("rejected", False)) if i % 2 == 0 else (("rejected", False), ("chosen", True))
        rows += [{"prompt": pair["prompt"], "completion": pair[key], "label": label} for key, label in sides]
    return rows


class Recorder:
    """A TrainerCallback (duck-typed) that keeps the first step's gradients, gathered whole, before the update."""

    def __init__(self):
        self.grads = None

    def __getattr__(self, name):  # every other callback event: nothing to do
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = gathered(model, "grad")


def run_trainer(kind, model_dir, out_dir):
    from trl import DPOConfig, GRPOConfig, KTOConfig

    from prefuse.compat.trl import PrefuseDPOTrainer
    from prefuse.compat.trl_grpo import PrefuseGRPOTrainer
    from prefuse.compat.trl_kto import PrefuseKTOTrainer

    tokenizer = build_tokenizer()
    model = load(model_dir)
    recorder = Recorder()
    if kind == "dpo":
        args = DPOConfig(**common_args(kind, out_dir, max_length=96, pad_to_multiple_of=PAD_TO))
        trainer = PrefuseDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs()),
                                    processing_class=tokenizer, callbacks=[recorder], peft_config=lora(model_dir))
    elif kind == "kto":
        args = KTOConfig(**common_args(kind, out_dir, max_length=96, pad_to_multiple_of=PAD_TO))
        trainer = PrefuseKTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(unpaired()),
                                    processing_class=tokenizer, callbacks=[recorder])
        # KTO's mismatched completions rotate within each per-device batch: the one process rotates within blocks
        # of 2 as the two processes do (a no-op there)
        trainer.train_dataset = trainer.train_dataset.map(rotate_kl, batched=True, batch_size=GLOBAL_BATCH // 2)
    else:
        args = GRPOConfig(**common_args(
            kind, out_dir, per_device_train_batch_size=2 * GLOBAL_BATCH // world(), num_generations=4,
            max_completion_length=8, beta=0.04, generation_kwargs={"min_new_tokens": 8}))
        trainer = PrefuseGRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                                     train_dataset=Dataset.from_dict({"prompt": [p["prompt"][-40:] for p in pairs(4)]}),
                                     callbacks=[recorder])
        seed_each_completion(trainer)
    trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    completions = [COMPLETIONS]
    if torch.distributed.is_initialized():
        completions = [None] * world()
        torch.distributed.all_gather_object(completions, COMPLETIONS)
    return {"completions": sorted(c for rank in completions for c in rank), "loss": [s["loss"] for s in steps],
            "grad_norm": [s["grad_norm"] for s in steps],
            "metrics": steps, "grads": recorder.grads, "weights": gathered(trainer.model, "data"),
            "fsdp": type(trainer.model).__name__, "lm_head_is_dtensor": isinstance(
                trainer.model.get_output_embeddings().weight, DTensor)}


def lora(model_dir):
    """LoRA on the attention's q and v projections for model "lora" (the untied model; the reference: the adapters
    disabled), else None."""
    if model_dir.name != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")


def load(model_dir):
    """The saved model; "headunit": the untied one with fully_shard applied to its lm_head alone (under FSDP2)."""
    from transformers import LlamaForCausalLM

    untied = model_dir.name in ("headunit", "lora")
    model = LlamaForCausalLM.from_pretrained(model_dir.parent / "untied" if untied else model_dir)
    if model_dir.name == "headunit" and os.environ.get("ACCELERATE_USE_FSDP", "false") == "true":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.lm_head)
    return model


def rotate_kl(examples):
    examples["KL_completion_ids"] = [examples["completion_ids"][-1]] + examples["completion_ids"][:-1]
    return examples


COMPLETIONS = []  # what the reward saw, in this process


def reward(completions, **kwargs):
    COMPLETIONS.extend(completions)
    return [float(len(c) % 7) + c.count("e") for c in completions]


def seed_each_completion(trainer):
    """Sample each completion under its own seed (its place in the step's whole generation batch, which the processes
    hold in rank order, and the step), so that the completions do not depend on how the batch is split between
    processes; min_new_tokens keeps every process running the same number of forwards."""
    generate = trainer._generate_single_turn

    def per_completion(prompt_ids, images, multimodal_fields, num_generations, **kwargs):
        offset = 0
        if torch.distributed.is_initialized():
            sizes = [None] * world()
            torch.distributed.all_gather_object(sizes, len(prompt_ids))
            offset = sum(sizes[:torch.distributed.get_rank()])
        completions = []
        for position, ids in enumerate(prompt_ids, start=offset):
            torch.manual_seed(zlib.crc32(repr((position, trainer.state.global_step)).encode()))
            completions += generate([ids], images, multimodal_fields, num_generations, **kwargs)[0]
        return completions, None

    trainer._generate_single_turn = per_completion


def run_liger(model_dir, out_dir):
    """A user's own loop with the Liger import swapped: the model prepared by accelerate (FSDP2 under the launch),
    hidden states from the decoder, the whole lm_head weight handed to LigerFusedLinearDPOLoss, two SGD steps."""
    from prefuse.compat.liger import LigerFusedLinearDPOLoss
    from prefuse.compat.sharding import full_head
    from prefuse.compat.trl import HIDDEN_FLAG, add_hidden_states_forward
    from prefuse.heads import causal_lm_of, head_of

    accelerator = Accelerator(cpu=True)
    tokenizer = build_tokenizer()
    model = load(model_dir)
    reference = load(model_dir.parent / "untied" if model_dir.name == "headunit" else model_dir).eval()
    add_hidden_states_forward(model)
    model = accelerator.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    rows = pairs(GLOBAL_BATCH * STEPS)
    loss_fn = LigerFusedLinearDPOLoss(beta=0.1)
    record = {"loss": [], "grads": None}
    per_device = GLOBAL_BATCH // world()
    rank = accelerator.process_index
    for step in range(STEPS):
        batch = rows[step * GLOBAL_BATCH:][rank * per_device:(rank + 1) * per_device]
        texts = [r["prompt"] + r["chosen"] for r in batch] + [r["prompt"] + r["rejected"] for r in batch]
        encoded = tokenizer(texts, padding="max_length", max_length=PAD_TO, truncation=True, return_tensors="pt")
        labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
        labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)
        hidden = model(**encoded, **{HIDDEN_FLAG: True})
        head = full_head(head_of(causal_lm_of(accelerator.unwrap_model(model))))
        with torch.no_grad():
            ref_hidden = reference.model(**encoded).last_hidden_state
        loss, *_ = loss_fn(head.weight, hidden, labels, ref_input=ref_hidden, ref_weight=reference.lm_head.weight)
        accelerator.backward(loss)
        # the loss is each process's mean over its pairs: the global mean's gradient is the processes' average
        record["loss"].append(accelerator.reduce(loss.detach(), "mean").item())
        if record["grads"] is None:
            record["grads"] = gathered(model, "grad")
        optimizer.step()
        optimizer.zero_grad()
    record["weights"] = gathered(model, "data")
    record["fsdp"] = type(model).__name__
    return record


def main():
    models_dir, out_dir, cases = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    torch.set_num_threads(1)
    fsdp2_on_the_cpu()
    for case in cases:
        kind, model = case.split("_")
        result = run_liger(models_dir / model, out_dir) if kind == "liger" else \
            run_trainer(kind, models_dir / model, out_dir)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(result, out_dir / f"{case}.pt")


if __name__ == "__main__":
    main()
