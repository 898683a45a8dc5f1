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

Measurement: each (mode, path) runs alone in a fresh process (its peak memory its own), one after another (not
interleaved: a loaded machine's drift falls on whichever runs then). The first `warmup` steps are not timed; then
the high-water mark is reset and the remaining steps are timed one by one. Time: the median step; peak: the
resident high-water mark over the timed steps (CPU) or torch.cuda.max_memory_allocated (CUDA), in MiB. Every
step's loss is kept; TRL's losses must equal prefuse's to LOSS_TOLERANCE (the same tokens, the same float32 math)
or the record holds an error.
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
    for number in range(spec["steps"]):
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
            if clock["number"] == spec["warmup"]:
                _reset_peak(spec["device"])
            _sync(spec["device"])
            clock["started"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            _sync(spec["device"])
            clock["times"].append(time.perf_counter() - clock["started"])
            clock["number"] += 1

    # every row once per epoch, in order; the batch is all of them: the same batch at every step
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[Timer()])
    if lora:
        from prefuse.bench.train_workers import init_adapters

        init_adapters(trainer.model)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    return {"losses": losses, "times": clock["times"][spec["warmup"]:], "peak_mib": _peak(spec["device"])}


def _worker(spec: dict, timeout: float) -> dict:
    """One (mode, path) in a fresh process: its record's numbers, or {"error": ...}."""
    done = subprocess.run([sys.executable, "-m", "prefuse.bench.sft", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{\"result\"")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {done.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])["result"]


def run(model_dir: str, data: str, *, modes=MODES, paths=PATHS, steps: int = 4, warmup: int = 1,
        sequences: int = 4, max_length: int = 256, device: str = "cpu", timeout: float = 3600, log=print) -> list[dict]:
    """The records of every (mode, path): time per step (median of the timed ones), peak memory, losses."""
    records = []
    with tempfile.TemporaryDirectory(prefix="prefuse-bench-sft-") as work:
        for mode in modes:
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
                result = _worker(spec, timeout)
                if "error" in result:
                    record["errors"].append(result["error"])
                else:
                    record.update(losses=result["losses"], peak_mib=result["peak_mib"],
                                  step_seconds=statistics.median(result["times"]))
                log(f"{mode} {path}: " + (record["errors"][0] if record["errors"] else
                                          f"{record['step_seconds']:.3f} s/step, peak {record['peak_mib']:.0f} MiB"))
                records.append(record)
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
