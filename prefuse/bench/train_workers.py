"""The workers of `prefuse bench --task train` (prefuse/bench/train.py): each runs one (mode, path) in its own
process and takes one training step each time its parent writes "step" on its stdin, answering a JSON line on its
stdout (what the libraries print goes to stderr):

    {"ready": true}                                   built: model, data, trainer
    {"step": k, "seconds": s, "loss": x, "tokens": n, "digest": h}     after each step
    {"finished": true, "peak_mib": p, "base_mib": b}  after the last one

prefuse: `prefuse train`'s run and the body of `engine/train/loop.py:train` for one micro-batch (prefuse_padding_free:
with --padding_free; prefuse_padding_free_one_row: all of a batch in one row); trl and trl_liger:
`trl.DPOTrainer(...).train()`, a callback waiting for "step" at each step's start.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import zlib

from prefuse.bench.measure import _reset_peak as reset_rss_peak
from prefuse.bench.measure import _rss_kib

LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
SEED = 0
# Logged by both paths under the same names, compared step by step (train.check_losses).
SHARED_METRICS = ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins")


def init_adapters(model, seed: int = SEED) -> int:
    """Every LoRA weight drawn from a generator seeded by its name from the first layer index on (the same values
    under prefuse's and TRL's wrappers); B non-zero so that the policy differs from its reference. Returns how many."""
    import torch

    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" not in name:
                continue
            key = name.split("layers.", 1)[-1]
            gen = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
            std = 0.02 if "lora_B" in name else param.shape[1] ** -0.5
            param.copy_(torch.randn(param.shape, generator=gen) * std)
            count += 1
    return count


def batch_digest(input_ids, attention_mask) -> str:
    """A hash of the batch's sequences without padding, in sorted order (the row order may differ between paths)."""
    rows = sorted(ids[: int(m.sum())].tolist() for ids, m in zip(input_ids.cpu(), attention_mask.cpu()))
    return hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:16]


class _Protocol:
    """The worker's side: waits for "step" on stdin, answers JSON lines on the original stdout (library prints go
    to stderr). Peak memory restarts after the warm-up steps."""

    metric_names = SHARED_METRICS  # the logged numbers sent with each step

    def __init__(self, device: str, warmup: int):
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
        self.device, self.warmup, self.done = device, warmup, 0
        self.base = None

    def send(self, **message) -> None:
        self.out.write(json.dumps(message) + "\n")

    def wait(self) -> float:
        if sys.stdin.readline().strip() != "step":
            raise SystemExit(0)
        self.sync()
        return time.perf_counter()

    def sync(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()

    def stepped(self, started: float, loss: float, tokens: int, digest: str, metrics: dict) -> None:
        """metrics: the step's logged numbers under TRL's names (those of SHARED_METRICS the path has)."""
        self.sync()
        seconds = time.perf_counter() - started
        self.done += 1
        if self.done == self.warmup:
            self.base = _reset_peak(self.device)
        self.send(step=self.done, seconds=seconds, loss=loss, tokens=tokens, digest=digest,
                  metrics={k: float(metrics[k]) for k in self.metric_names if k in metrics})

    def finish(self) -> None:
        peak, base = _peak(self.device), self.base
        self.send(finished=True, peak_mib=peak, base_mib=base)


def _reset_peak(device: str) -> float:
    """Restart the high-water mark; returns the resident (CUDA: allocated) MiB now."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    reset_rss_peak()
    return _rss_kib("VmRSS") / 1024


def _peak(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_kib("VmHWM") / 1024


def prefuse_run(spec: dict):
    """prefuse's side, built: `prefuse train`'s run (engine/train/build.build_run) with the bench's settings; LoRA
    adapters from `init_adapters`. Returns (run, cfg)."""
    from prefuse.engine.train.build import build_run
    from prefuse.engine.train.config import TrainConfig

    lora = spec["mode"] == "lora"
    packed = spec["path"].startswith("prefuse_padding_free")
    # one row: a width past any batch's tokens (2 * pairs sequences of at most max_length)
    row_tokens = 2 * spec["pairs"] * spec["max_length"] if spec["path"] == "prefuse_padding_free_one_row" else None
    cfg = TrainConfig(model_name_or_path=spec["model_dir"], dataset_name=spec["pairs_file"],
                      output_dir=spec["output_dir"], loss_type=["sigmoid"], beta=0.1,
                      learning_rate=spec["learning_rate"], per_device_train_batch_size=spec["pairs"],
                      max_steps=spec["steps"], max_length=spec["max_length"], max_prompt_length=None,
                      use_peft=lora, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0,
                      lora_target_modules=LORA["target_modules"], max_grad_norm=1.0, weight_decay=0.0,
                      lr_scheduler_type="linear", warmup_steps=0, logging_steps=10**6, save_steps=0,
                      report_to="none", device=spec["device"], seed=SEED,
                      padding_free=packed, padding_free_row_tokens=row_tokens,
                      overwrite_output_dir=True)  # a measurement's scratch directory, built anew each time
    run = build_run(cfg)
    if lora:
        init_adapters(run.policy)
    run.policy.train()
    return run, cfg


def prefuse_steps(run, cfg, steps: int, wait=lambda: None):
    """The body of engine/train/loop.py:train for one micro-batch, `steps` times; `wait()` before each. Yields
    (loss, metrics, batch)."""
    from prefuse.engine.train.loop import clip_grad_norms

    for _ in range(steps):
        wait()
        batch = run.source.next_batch().to(run.device)
        loss, metrics = run.step(batch, run.references.get("train"))
        loss.backward()
        clip_grad_norms(run.optimizer, cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        yield float(loss.detach()), metrics, batch


def prefuse_worker(spec: dict, proto: _Protocol) -> None:
    run, cfg = prefuse_run(spec)
    proto.send(ready=True)
    clock = {}
    for loss, metrics, batch in prefuse_steps(run, cfg, spec["steps"],
                                              wait=lambda: clock.__setitem__("started", proto.wait())):
        proto.stepped(clock["started"], loss, batch.n_tokens, batch_digest(batch.input_ids, batch.attention_mask),
                      metrics)
    proto.finish()


def trl_step_args(spec: dict) -> dict:
    """The TrainingArguments every TRL path of the train benches shares with prefuse's step: the spec's steps,
    learning rate and device, a linear schedule without warmup or decay, clipping at 1, float32, no
    checkpointing, a log line each step, nothing saved."""
    return dict(output_dir=spec["output_dir"], max_steps=spec["steps"], learning_rate=spec["learning_rate"],
                bf16=False, gradient_checkpointing=False, lr_scheduler_type="linear", warmup_steps=0,
                weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to="none", save_strategy="no",
                disable_tqdm=True, use_cpu=spec["device"] == "cpu", seed=SEED, dataloader_num_workers=0)


def trl_trainer(spec: dict, wait=lambda: None, stepped=lambda loss, metrics, inputs: None):
    """TRL's side, built: a `DPOTrainer` with the same settings, whose `.train()` calls `wait()` at each step's start
    and `stepped(loss, metrics, inputs)` at its end (metrics: SHARED_METRICS as TRL logged them)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    lora = spec["mode"] == "lora"
    seen = {}

    class BenchDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            logged = {k: v[-1] for k, v in self._metrics["train"].items() if k in SHARED_METRICS and v}
            seen.update(loss=loss.detach(), inputs=inputs, metrics=logged)
            return loss

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            wait()

        def on_step_end(self, args, state, control, **kwargs):
            stepped(float(seen["loss"]), seen["metrics"], seen["inputs"])

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32, local_files_only=True)
    pairs = [json.loads(line) for line in open(spec["pairs_file"], encoding="utf-8")]
    args = DPOConfig(per_device_train_batch_size=spec["pairs"], beta=0.1, loss_type="sigmoid",
                     max_length=spec["max_length"], use_liger_kernel=spec["path"] == "trl_liger",
                     **trl_step_args(spec))
    trainer = BenchDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                              processing_class=tokenizer,
                              peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA) if lora else None)
    if lora:
        init_adapters(trainer.model)
    trainer.add_callback(Clock())
    return trainer


def trl_worker(spec: dict, proto: _Protocol) -> None:
    clock = {}

    def stepped(loss, metrics, inputs):
        proto.stepped(clock["started"], loss, int(inputs["attention_mask"].sum()),
                      batch_digest(inputs["input_ids"], inputs["attention_mask"]), metrics)

    trainer = trl_trainer(spec, wait=lambda: clock.__setitem__("started", proto.wait()), stepped=stepped)
    proto.send(ready=True)
    trainer.train()
    proto.finish()


WORKERS = {"prefuse": prefuse_worker, "trl": trl_worker, "trl_liger": trl_worker,
           "prefuse_padding_free": prefuse_worker, "prefuse_padding_free_one_row": prefuse_worker}


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    proto = _Protocol(spec["device"], spec["warmup"])
    WORKERS[spec["path"]](spec, proto)
