"""`prefuse bench --task sft`: the same SFT training steps through `prefuse sft` and through TRL 1.16's SFTTrainer.

    records = run(model_dir, data_file, modes=["lora", "full"], paths=["prefuse", "trl", "trl_liger"], steps=4)

The rows are the first `sequences` of a prompt-completion or messages file, as both sides read them (completion
only loss where the format has one), cut to max_length, served in the file's order, the same batch every step
(batch = all of them). Paths:

- prefuse: `prefuse sft`'s run (engine/sft/train.build_sft_run) and the loop's body for one micro-batch: decoder ->
  fused head (per-token log-probs, entropy and accuracy from the same chunks) -> backward -> clip -> AdamW;
- trl: `SFTTrainer(...).train()` with its default loss (its chunked NLL head, `fused_lm_head`);
- trl_liger: the same with `use_liger_kernel=True` (Liger's layer kernels; TRL 1.16 refuses Liger's fused linear
  cross-entropy beside its own head): CUDA only, reported as not available on the CPU.

Both sides: float32 (TRL's bf16 default turned off), no dropout, AdamW at the same learning rate with a linear decay
over the same steps, no warmup, no weight decay, clipping at 1.0, no gradient checkpointing. LoRA: r 8, alpha 16,
q_proj and v_proj, no dropout, every adapter weight drawn from its name on both sides (bench/train_workers.py's
init_adapters, B non-zero).

Measurement: each (mode, path) runs in its own fresh process (its peak memory its own); a mode's workers are built
at once, then take one step at a time in turn, the order rotating each round, so a drift of the shared machine falls
on all of them alike. The first `warmup` steps are not timed; then the high-water mark is reset and the remaining
steps are timed one by one. Time: the median step; peak: the resident high-water mark over the timed steps (CPU)
or torch.cuda.max_memory_allocated (CUDA), in MiB. Every step's loss is kept; TRL's losses must equal prefuse's to
LOSS_TOLERANCE (the same tokens, the same float32 math) or the record holds an error.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("lora", "full")
PATHS = ("prefuse", "trl", "trl_liger")
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
LEARNING_RATE = {"lora": 1e-3, "full": 1e-5}
LOSS_TOLERANCE = 1e-4  # relative, every step: float32 on both sides, a few steps of updates apart
SEED = 0


def available(path: str, device: str) -> bool:
    return path != "trl_liger" or device.startswith("cuda")


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to VmRSS
            f.write("5")


def _peak(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _rss_mib("VmHWM")


def _turn() -> None:
    """Wait for the driver's go (a line on stdin) before a step: the workers of a mode take steps in turn."""
    if not sys.stdin.readline():
        raise SystemExit("the driver went away")


def _say(**message) -> None:
    print(json.dumps(message), flush=True)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def prefuse_worker(spec: dict) -> dict:

    from prefuse.bench.train_workers import init_adapters
    from prefuse.engine.sft.train import SFTConfig, build_sft_run
    from prefuse.engine.train.loop import accumulate, update

    lora = spec["mode"] == "lora"
    cfg = SFTConfig(model_name_or_path=spec["model_dir"], dataset_name=spec["data"], output_dir=spec["output_dir"],
                    learning_rate=LEARNING_RATE[spec["mode"]], per_device_train_batch_size=spec["sequences"],
                    max_steps=spec["steps"], max_length=spec["max_length"], use_peft=lora, lora_r=LORA["r"],
                    lora_alpha=LORA["lora_alpha"], lora_dropout=0.0, lora_target_modules=LORA["target_modules"],
                    train_sampling_strategy="sequential", weight_decay=0.0, warmup_steps=0, save_steps=0,
                    logging_steps=10**6, report_to="none", device=spec["device"], seed=SEED,
                    overwrite_output_dir=True)
    run = build_sft_run(cfg)
    if lora:
        init_adapters(run.policy)
    losses, times = [], []
    _say(ready=True)
    for number in range(spec["steps"]):
        _turn()
        if number == spec["warmup"]:
            _reset_peak(spec["device"])
        _sync(spec["device"])
        started = time.perf_counter()
        batch = run.source.next_batch().to(run.device)
        metrics, _ = accumulate(run, [batch])
        update(run)
        _sync(spec["device"])
        times.append(time.perf_counter() - started)
        losses.append(metrics["loss"])
        _say(stepped=times[-1])
    return {"losses": losses, "times": times[spec["warmup"]:], "peak_mib": _peak(spec["device"])}


def trl_worker(spec: dict) -> dict:
    import datasets
    import torch
    import transformers
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(SEED)
    lora = spec["mode"] == "lora"
    model = transformers.AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model_dir"])
    rows = [json.loads(line) for line in Path(spec["data"]).read_text(encoding="utf-8").splitlines()]
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0,
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    args = SFTConfig(output_dir=spec["output_dir"], per_device_train_batch_size=spec["sequences"],
                     max_steps=spec["steps"], learning_rate=LEARNING_RATE[spec["mode"]], lr_scheduler_type="linear",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, report_to="none",
                     seed=SEED, use_cpu=not spec["device"].startswith("cuda"), save_strategy="no", bf16=False,
                     train_sampling_strategy="sequential", max_length=spec["max_length"],
                     dataloader_num_workers=0, gradient_checkpointing=False,
                     use_liger_kernel=spec["path"] == "trl_liger")
    clock = {"times": [], "number": 0}

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            _turn()
            if clock["number"] == spec["warmup"]:
                _reset_peak(spec["device"])
            _sync(spec["device"])
            clock["started"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync(spec["device"])
            clock["times"].append(time.perf_counter() - clock["started"])
            clock["number"] += 1
            _say(stepped=clock["times"][-1])

    # every row once per epoch, in order; the batch is all of them: the same batch at every step
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    if lora:
        from prefuse.bench.train_workers import init_adapters

        init_adapters(trainer.model)
    _say(ready=True)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"losses": losses, "times": clock["times"][spec["warmup"]:], "peak_mib": _peak(spec["device"])}


class _Worker:
    """One (mode, path) in a fresh process, driven a step at a time over its stdin/stdout (JSON lines; the rest of
    its output is the libraries' and is skipped)."""

    def __init__(self, spec: dict):
        self.spec, self.error = spec, None
        self.process = subprocess.Popen([sys.executable, "-m", "prefuse.bench.sft", json.dumps(spec)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)

    def expect(self, key: str):
        """The next message holding `key` (its value), or None once the worker has stopped (self.error set)."""
        while self.error is None:
            line = self.process.stdout.readline()
            if not line:
                self.error = f"exit {self.process.wait()}: the worker stopped (rerun it alone to see why)"
                break
            if line.startswith("{"):
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if key in message:
                    return message[key]
        return None

    def step(self) -> None:
        if self.error is None:
            self.process.stdin.write("go\n")
            self.process.stdin.flush()
            self.expect("stepped")

    def result(self) -> dict:
        result = self.expect("result")
        self.process.wait()
        return {"error": self.error} if result is None else result


def _drive(specs: list[dict], steps: int) -> list[dict]:
    """Every spec's worker built at once, then a step each in turn, the order rotating each round (a drift of the
    machine falls on all alike); their results."""
    workers = [_Worker(spec) for spec in specs]
    for worker in workers:
        worker.expect("ready")
    for number in range(steps):
        turn = number % len(workers)
        for worker in workers[turn:] + workers[:turn]:
            worker.step()
    return [worker.result() for worker in workers]


def run(model_dir: str, data: str, *, modes=MODES, paths=PATHS, steps: int = 4, warmup: int = 1,
        sequences: int = 4, max_length: int = 256, device: str = "cpu", log=print) -> list[dict]:
    """The records of every (mode, path): time per step (median of the timed ones), peak memory, losses."""
    records = []
    with tempfile.TemporaryDirectory(prefix="prefuse-bench-sft-") as work:
        for mode in modes:
            specs = []
            for path in paths:
                record = {"mode": mode, "path": path, "device": device, "sequences": sequences,
                          "max_length": max_length, "steps": steps, "warmup": warmup, "errors": []}
                if not available(path, device):
                    record["errors"].append(f"not available on {device} (Liger's kernels are Triton on CUDA)")
                    records.append(record)
                    continue
                spec = {"worker": path, "path": path, "mode": mode, "model_dir": str(model_dir), "data": str(data),
                        "output_dir": str(Path(work) / f"{mode}-{path}"), "steps": steps, "warmup": warmup,
                        "sequences": sequences, "max_length": max_length, "device": device}
                specs.append((record, spec))
                records.append(record)
            for (record, spec), result in zip(specs, _drive([spec for _, spec in specs], steps)):
                if "error" in result:
                    record["errors"].append(result["error"])
                else:
                    record.update(losses=result["losses"], peak_mib=result["peak_mib"],
                                  step_seconds=statistics.median(result["times"]))
                log(f"{mode} {record['path']}: " + (record["errors"][0] if record["errors"] else
                                                    f"{record['step_seconds']:.3f} s/step, peak "
                                                    f"{record['peak_mib']:.0f} MiB"))
    check_losses(records)
    return records


def check_losses(records: list[dict], tolerance: float = LOSS_TOLERANCE) -> None:
    """Each record's losses against prefuse's of its mode (an error in the record when they differ)."""
    base = {r["mode"]: r["losses"] for r in records if r["path"] == "prefuse" and "losses" in r}
    for record in records:
        want = base.get(record["mode"])
        if "losses" not in record or want is None or record["path"] == "prefuse":
            continue
        if len(record["losses"]) != len(want) or any(abs(a - b) > tolerance * max(abs(b), 1.0)
                                                     for a, b in zip(record["losses"], want)):
            record["errors"].append(f"losses {record['losses']} differ from prefuse's {want}")


def format_table(records: list[dict]) -> str:
    """Markdown: per mode and path, the median step time and peak memory, and their ratio to prefuse's."""
    base = {r["mode"]: r for r in records if r["path"] == "prefuse" and "step_seconds" in r}
    lines = ["| mode | path | s/step | x prefuse | peak MiB | x prefuse | losses equal |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        if "step_seconds" not in r:
            lines.append(f"| {r['mode']} | {r['path']} | - | - | - | - | {'; '.join(r['errors'])} |")
            continue
        b = base.get(r["mode"])
        time_ratio = f"{r['step_seconds'] / b['step_seconds']:.2f}" if b else "-"
        memory_ratio = f"{r['peak_mib'] / b['peak_mib']:.2f}" if b else "-"
        equal = "yes" if not r["errors"] else "; ".join(r["errors"])
        lines.append(f"| {r['mode']} | {r['path']} | {r['step_seconds']:.3f} | {time_ratio} | {r['peak_mib']:.0f} | "
                     f"{memory_ratio} | {equal} |")
    return "\n".join(lines)


def sft_rows(dataset: str, out: Path, count: int) -> Path:
    """The first `count` rows of a JSON-lines file as SFT rows in `out`: SFT rows as they are; preference pairs as
    their prompt and chosen response (prompt-completion)."""
    rows = []
    with open(dataset, encoding="utf-8") as f:
        for line in f:
            if len(rows) == count:
                break
            row = json.loads(line)
            if "chosen" in row and "prompt" in row:
                row = {"prompt": row["prompt"], "completion": row["chosen"]}
            rows.append(row)
    if len(rows) < count:
        raise ValueError(f"--dataset: {dataset} has {len(rows)} rows, --pairs asks for {count}")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def from_args(args) -> list[dict]:
    """`prefuse bench --task sft`'s records from its flags: --model_name_or_path (a directory or a .gguf file),
    --dataset (JSON lines: SFT rows, or preference pairs whose chosen side is trained), --pairs sequences per batch,
    --max_length, --peft lora/full/both, --paths, --rounds timed steps (after one untimed), --device."""
    from prefuse.engine.models.gguf import plain_directory

    if not args.model_name_or_path or not args.dataset:
        raise ValueError("--task sft: give --model_name_or_path (a model directory or .gguf file) and --dataset (a "
                         "JSON-lines file of SFT rows or preference pairs)")
    modes = MODES if args.peft == "both" else (args.peft,)
    if any(m not in MODES for m in modes):
        raise ValueError(f"--peft: {args.peft!r} is not lora, full or both")
    paths = tuple(args.paths or PATHS)
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"--paths: {unknown} are not --task sft paths {PATHS}")
    model_dir = plain_directory(args.model_name_or_path)
    with tempfile.TemporaryDirectory(prefix="prefuse-bench-sft-data-") as work:
        data = sft_rows(args.dataset, Path(work) / "rows.jsonl", args.pairs)
        return run(model_dir, str(data), modes=modes, paths=paths, steps=args.rounds + 1, warmup=1,
                   sequences=args.pairs, max_length=args.max_length, device=args.device)


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    worker = prefuse_worker if spec["worker"] == "prefuse" else trl_worker
    print(json.dumps({"result": worker(spec)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
