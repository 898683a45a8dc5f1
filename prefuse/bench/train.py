"""`prefuse bench --task train`: the same DPO training step through prefuse and through TRL, side by side.

    records = run(TrainShape(256, 4, 32000), modes=["lora", "full"], paths=["prefuse", "trl", "trl_liger"])

One tiny-but-head-heavy Llama built from a config (hidden H, L layers, vocabulary V: the head's matmuls dominate),
saved with save_pretrained beside a byte-level BPE tokenizer trained here on the pairs' texts (a vocabulary the
text cannot fill is padded: the model keeps V rows); a few preference pairs, generated (prefuse/bench/train_data.py:
nothing is read from outside the package) or the first ones of a --dataset file, written to one JSON-lines file
that both paths read, cut to a fixed max_length. Paths:

- prefuse: `prefuse train`'s run (`engine/train/build.build_run`) and the body of `engine/train/loop.py:train` for one
  micro-batch: decoder -> fused head -> objective -> backward -> clip -> AdamW -> schedule;
- trl: TRL's `DPOTrainer(...).train()` (its own chunked log-prob head);
- trl_liger: the same with `use_liger_kernel=True`, which swaps Liger's Triton layer kernels (RMSNorm, SwiGLU,
  RoPE) into the model: CUDA only (on the CPU Triton has no driver), reported as not available there;
- prefuse_padding_free, prefuse_padding_free_one_row (only when named in --paths): prefuse's run with
  `--padding_free`, the decoders taking each batch's sequences packed without padding, in rows no wider than the
  padded batch (the default under sdpa and eager) or all in one row (`--padding_free_row_tokens` past the batch's
  tokens); checked equal to prefuse's padded losses like the others.

Both sides: float32, sigmoid DPO (beta 0.1), AdamW with the same learning rate, linear decay over the same steps,
no warm-up, no weight decay, gradient clipping at 1.0, no gradient checkpointing, one batch of all the pairs at every
step. LoRA: r 8, alpha 16, q_proj and v_proj, no dropout, the reference is the policy with its adapters disabled;
the adapters start from the same values on both sides (drawn from their names, B non-zero, so the first loss
already differs from log 2). Full: the reference is a second copy of the model.

Measurement: every (mode, path) runs in its own fresh worker process (prefuse/bench/train_workers.py), so its peak
memory is its own, with the allocator settings a user's process has (glibc's defaults; prefuse's run sets its own
on the CPU, engine/train/allocator.py); one mode's workers at a time; the workers build concurrently, then take
one training step at a time in turn, the order rotating each round, so the shared machine's drift falls on all of
them alike. After `warmup` steps each worker resets its high-water mark: peak memory is the resident high-water
mark over the timed steps (CPU) or `torch.cuda.max_memory_allocated` (CUDA), absolute and above the resident
(allocated) size at the reset. The losses of every step are kept and checked equal across paths
(`LOSS_TOLERANCE`); the token ids of the batch are hashed on both sides to show they are the same.
"""
from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prefuse.bench import train_data
from prefuse.bench.train_workers import SEED, SHARED_METRICS
from prefuse.engine.models.gguf import is_gguf, plain_directory

LOSS_TOLERANCE = 1e-4  # |loss - prefuse's loss| at every step, float32 on both sides
METRIC_TOLERANCE = 1e-4  # |logps - prefuse's| / max(|prefuse's|, 1): the same tokens scored by the same weights
LEARNING_RATE = {"lora": 1e-3, "full": 1e-4}


@dataclass(frozen=True)
class TrainPath:
    name: str
    devices: tuple[str, ...]
    why_not: str = ""  # why it is not available on the other devices
    default: bool = True  # run when --paths does not name the paths


TRAIN_PATHS = {p.name: p for p in [
    TrainPath("prefuse", ("cpu", "cuda")),
    TrainPath("trl", ("cpu", "cuda")),
    TrainPath("trl_liger", ("cuda",), "TRL's use_liger_kernel applies Liger's Triton layer kernels (RMSNorm, "
                                      "SwiGLU, RoPE), which need CUDA"),
    TrainPath("prefuse_padding_free", ("cpu", "cuda"), default=False),
    TrainPath("prefuse_padding_free_one_row", ("cpu", "cuda"), default=False),
]}
DEFAULT_TRAIN_PATHS = tuple(name for name, path in TRAIN_PATHS.items() if path.default)
MODES = ("lora", "full")


@dataclass(frozen=True)
class TrainShape:
    hidden: int
    layers: int
    vocab: int
    pairs: int = 4
    max_length: int = 256
    dataset: str | None = None  # a JSON-lines file of standard-format pairs; None: generated (bench/train_data.py)

    @property
    def label(self) -> str:
        return f"{self.hidden}x{self.layers}x{self.vocab}"

    def describe(self) -> dict:
        return {"shape": self.label, "hidden": self.hidden, "layers": self.layers, "vocab": self.vocab,
                "pairs": self.pairs, "max_length": self.max_length, "dataset": self.dataset or "generated"}

    def prepare(self, work: Path) -> tuple[Path, Path]:
        return prepare(self, work)


@dataclass(frozen=True)
class RealModel:
    """A pretrained model (a directory, or a GGUF file: its plain copy, engine/models/gguf.py) and the first `pairs`
    rows of a preference file that fit `max_length` tokens whole (nothing is truncated, so both paths see the same
    tokens): conversational rows through the model's chat template."""
    model: str
    dataset: str
    pairs: int = 8
    max_length: int = 256

    @property
    def label(self) -> str:
        return Path(self.model).stem if is_gguf(self.model) else Path(self.model).name

    def describe(self) -> dict:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(plain_directory(self.model), local_files_only=True)
        return {"shape": self.label, "hidden": config.hidden_size, "layers": config.num_hidden_layers,
                "vocab": config.vocab_size, "pairs": self.pairs, "max_length": self.max_length,
                "dataset": str(self.dataset)}

    def prepare(self, work: Path) -> tuple[Path, Path]:
        return plain_directory(self.model), write_fitting_pairs(self.model, self.dataset, work / "pairs.jsonl",
                                                                 self.pairs, self.max_length)


def write_fitting_pairs(model: str, dataset: str, out: Path, pairs: int, max_length: int) -> Path:
    """The first `pairs` rows of `dataset` (JSON lines, a TRL preference format) whose prompt with either response
    is at most `max_length` tokens as prefuse train tokenizes them, written to `out`; ValueError when fewer fit."""
    import datasets

    from prefuse.engine.data import tokenize_preferences
    from prefuse.engine.models.loading import load_tokenizer

    path = Path(dataset)
    if not path.is_file():
        raise ValueError(f"--dataset: no such file: {dataset}")
    tokenizer = load_tokenizer(plain_directory(model))
    rows = [json.loads(line) for line in path.open(encoding="utf-8") if line.strip()]
    kept = []
    for start in range(0, len(rows), 4 * pairs):
        chunk = rows[start:start + 4 * pairs]
        tokenized = tokenize_preferences(datasets.Dataset.from_list(chunk), tokenizer, truncation=False,
                                         max_length=max_length, skip_bad_rows=True, source=str(path))
        fitting = {e["where"] for e in tokenized.examples}
        kept += [row for k, row in enumerate(chunk) if f"{path}:{k + 1}" in fitting]
        if len(kept) >= pairs:
            break
    if len(kept) < pairs:
        raise ValueError(f"--dataset: {len(kept)} rows of {dataset} fit --max_length {max_length}, --pairs asks "
                         f"for {pairs}")
    out.write_text("".join(json.dumps(row) + "\n" for row in kept[:pairs]), encoding="utf-8")
    return out


DEFAULT_SHAPE = TrainShape(256, 4, 32000)
QUICK_SHAPE = TrainShape(64, 2, 2048, pairs=2, max_length=64)


# -- the model and the data, built once in the parent ---------------------------------------------------------------

def prepare(shape: TrainShape, work: Path) -> tuple[Path, Path]:
    """(model directory, pairs file) in `work`: the pairs file with `shape.pairs` rows (generated, or the first of
    `shape.dataset`), the tokenizer trained on their texts and a Llama of the shape."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if shape.dataset is None:
        pairs = train_data.generated_pairs(shape.pairs, shape.max_length)
        texts = train_data.tokenizer_texts(shape.max_length)
    else:
        pairs, texts = file_pairs(shape.dataset, shape.pairs, shape.max_length)
    pairs_file = work / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")

    special = ["<pad>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shape.vocab, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                             special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=2 * shape.hidden,
                         num_hidden_layers=shape.layers, num_attention_heads=max(1, shape.hidden // 64),
                         num_key_value_heads=max(1, shape.hidden // 64), max_position_embeddings=2 * shape.max_length,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model_dir = work / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    return model_dir, pairs_file


def file_pairs(dataset: str, count: int, max_length: int) -> tuple[list[dict], list[str]]:
    """The first `count` usable pairs of a JSON-lines file in TRL's standard format (prompt, chosen and rejected
    strings), the prompt cut to max_length // 2 characters (so its tokens leave room for the responses) and ended on
    a newline (so prompt and response tokenize apart), and every row's texts for the tokenizer; ValueError when
    the file is missing, a row is not in that format, or fewer pairs are usable."""
    path = Path(dataset)
    if not path.is_file():
        raise ValueError(f"--dataset: no such file: {dataset}")
    rows = []
    for number, line in enumerate(path.open(encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"--dataset: {dataset}:{number}: not JSON ({error})") from None
        if not (isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("prompt", "chosen", "rejected"))):
            raise ValueError(f"--dataset: {dataset}:{number}: the built shape takes prompt, chosen and rejected "
                             f"strings (TRL's standard format); other formats need --model_name_or_path")
        rows.append(row)
    pairs = []
    for row in rows:
        prompt = row["prompt"][: max_length // 2].rstrip()
        chosen, rejected = row["chosen"].lstrip(), row["rejected"].lstrip()
        if prompt and chosen and rejected and chosen != rejected:
            pairs.append({"prompt": prompt + "\n", "chosen": chosen, "rejected": rejected})
        if len(pairs) == count:
            break
    if len(pairs) < count:
        raise ValueError(f"--dataset: {dataset} has {len(pairs)} usable pairs (a prompt and two different "
                         f"responses), the shape asks for {count}")
    return pairs, [text for row in rows for text in (row["prompt"], row["chosen"], row["rejected"])]


# -- the parent: start the workers, step them in turn, collect ---------------------------------------------------------

class _Worker:
    def __init__(self, spec: dict, timeout: float, entry: str = "prefuse.bench.train_workers"):
        """entry: the module whose main(spec_json) the worker runs (GRPO's: prefuse/bench/train_grpo_workers.py)."""
        # the allocator each path has for its users: glibc's defaults, which `prefuse train` adjusts for itself on
        # the CPU (engine/train/allocator.py); the head bench's fixed thresholds would hide the difference
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX"):
            env.pop(name, None)
        # OpenMP threads that spin while they wait lose their core to other processes on a shared CPU and then
        # stall the step (measured here: a tiny step 15x slower); sleeping waits cost little at these sizes
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env.pop("TRITON_INTERPRET", None)
        self.spec, self.timeout, self.error = spec, timeout, None
        self.stderr = tempfile.TemporaryFile(mode="w+")
        code = f"import sys; from {entry} import main; main(sys.argv[1])"
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)

    def read(self) -> dict | None:
        """The next message, or None (and `error` set) when the worker died or went silent."""
        if self.error:
            return None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line.startswith("{"):
            return json.loads(line)
        if not ready:
            self.proc.kill()
        self.proc.wait()
        self.stderr.seek(0)
        lines = [ln for ln in self.stderr.read().splitlines() if ln.strip()]
        self.error = (lines[-1][:300] if lines else "no output") if ready else f"no answer within {self.timeout}s"
        return None

    def step(self) -> dict | None:
        try:
            self.proc.stdin.write("step\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def run(shape: "TrainShape | RealModel", modes=MODES, paths=DEFAULT_TRAIN_PATHS, *, rounds: int = 5,
        warmup: int = 1, device: str = "cpu", work_dir: str | None = None, timeout: float = 1800,
        log=print) -> list[dict]:
    """One record per (mode, path): losses and SHARED_METRICS of every step, step time (median, min, max over the
    `rounds` timed steps), tokens per second, peak memory; a path the device cannot run gets `available: False` and
    why. One mode's workers at a time (a real model's full fine-tuning holds several GiB per worker). The losses and
    metrics are checked against prefuse's (`check_losses`)."""
    with tempfile.TemporaryDirectory(prefix="prefuse-bench-train-") as tmp:
        work = Path(work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, pairs_file = shape.prepare(work)
        records = []
        for mode in modes:
            workers = {}
            for name in paths:
                rec = {"task": "train", "peft": mode, "path": name, **shape.describe(), "device": device,
                       "dtype": "float32", "learning_rate": LEARNING_RATE[mode],
                       "available": device in TRAIN_PATHS[name].devices, "losses": [], "metrics": [],
                       "times_s": [], "errors": []}
                records.append(rec)
                if not rec["available"]:
                    rec["why_not"] = f"not available on {device}: {TRAIN_PATHS[name].why_not}"
                    log(f"  {mode:4s} {name:10s} {rec['why_not']}")
                    continue
                spec = dict(path=name, mode=mode, device=device, model_dir=str(model_dir),
                            pairs_file=str(pairs_file), output_dir=str(work / f"out_{mode}_{name}"),
                            pairs=shape.pairs, max_length=shape.max_length, steps=warmup + rounds, warmup=warmup,
                            learning_rate=LEARNING_RATE[mode])
                workers[len(records) - 1] = _Worker(spec, timeout)
            try:
                _drive(records, workers, warmup + rounds, warmup, log)
            finally:
                for worker in workers.values():
                    worker.close()
    check_losses(records)
    return records


def _drive(records: list[dict], workers: dict, steps: int, warmup: int, log) -> None:
    for index, worker in workers.items():  # they build concurrently; wait for each to be ready
        if worker.read() is None:
            records[index]["errors"].append(worker.error)
    live = [i for i in workers if not records[i]["errors"]]
    for step in range(steps if live else 0):
        turn = step % len(live)  # the order rotates each round
        for index in live[turn:] + live[:turn]:
            rec, worker = records[index], workers[index]
            if rec["errors"]:
                continue
            answer = worker.step()
            if answer is None:
                rec["errors"].append(worker.error)
                continue
            rec["losses"].append(answer["loss"])
            rec["metrics"].append(answer.get("metrics", {}))
            rec["tokens_per_step"], rec["batch_digest"] = answer["tokens"], answer["digest"]
            if step >= warmup:
                rec["times_s"].append(answer["seconds"])
    for index in live:
        rec, worker = records[index], workers[index]
        final = None if rec["errors"] else worker.read()
        if final is None:
            rec["errors"].append(worker.error or "no final report")
            continue
        rec["peak_mib"], base = final["peak_mib"], final["base_mib"]
        rec.update(final.get("extras", {}))  # what a worker reports after its last step (GRPO's final_logp)
        rec["step_extra_mib"] = None if base is None else final["peak_mib"] - base
        times = rec["times_s"]
        if times:
            rec.update(rounds=len(times), time_median_s=statistics.median(times), time_min_s=min(times),
                       time_max_s=max(times), tokens_per_s=rec["tokens_per_step"] / statistics.median(times))
        log(f"  {rec['peft']:4s} {rec['path']:10s} median {rec.get('time_median_s', float('nan')):.3f} s, "
            f"peak {rec['peak_mib']:.0f} MiB, losses " + " ".join(f"{x:.6f}" for x in rec["losses"]))


def check_losses(records: list[dict], tolerance: float = LOSS_TOLERANCE) -> None:
    """Each path's losses (every step) and batch against prefuse's of the same mode: `loss_max_diff` on each
    record, an error when it exceeds `tolerance` or the batches' tokens differ."""
    for rec in records:
        ref = next((r for r in records if r["path"] == "prefuse" and r["peft"] == rec["peft"] and r["losses"]), None)
        if rec["path"] == "prefuse" or ref is None or not rec["losses"]:
            continue
        if len(rec["losses"]) != len(ref["losses"]):
            rec["errors"].append(f"{len(rec['losses'])} steps against prefuse's {len(ref['losses'])}")
            continue
        diff = max(abs(a - b) for a, b in zip(rec["losses"], ref["losses"]))
        rec["loss_max_diff"] = diff
        if diff > tolerance:
            rec["errors"].append(f"losses differ from prefuse's by {diff:.2e} (tolerance {tolerance:.0e})")
        for key in SHARED_METRICS:  # the sequence log-probs: relative to their size (sums over the tokens)
            pairs = [(m[key], r[key]) for m, r in zip(rec.get("metrics", []), ref.get("metrics", []))
                     if key in m and key in r]
            if pairs:
                rel = max(abs(a - b) / max(abs(b), 1.0) for a, b in pairs)
                rec.setdefault("metrics_max_rel_diff", {})[key] = rel
                if key.startswith("logps/") and rel > METRIC_TOLERANCE:
                    rec["errors"].append(f"{key} differs from prefuse's by {rel:.2e} of its size "
                                         f"(tolerance {METRIC_TOLERANCE:.0e})")
        if rec.get("batch_digest") != ref.get("batch_digest"):
            rec["errors"].append("the batch's token ids differ from prefuse's")


def format_table(records: list[dict]) -> str:
    """Markdown: time, tokens/s and peak memory of each (mode, path), against prefuse's of the same mode."""
    lines = ["| shape HxLxV | peft | path | step s (median) | spread s | tokens/s | peak MiB | step extra MiB | "
             "x prefuse time | x prefuse peak | losses (every step) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for rec in records:
        head = f"| {rec['shape']} | {rec['peft']} | {rec['path']} |"
        if not rec["available"] or "time_median_s" not in rec:
            why = rec.get("why_not") or "error: " + "; ".join(rec["errors"])[:80]
            lines.append(f"{head} {why} | | | | | | | |")
            continue
        ref = next((r for r in records if r["path"] == "prefuse" and r["peft"] == rec["peft"]
                    and "time_median_s" in r), None)
        ratio_t = f"{rec['time_median_s'] / ref['time_median_s']:.2f}" if ref else ""
        ratio_m = f"{rec['peak_mib'] / ref['peak_mib']:.2f}" if ref else ""
        extra = "" if rec["step_extra_mib"] is None else f"{rec['step_extra_mib']:.0f}"
        losses = " ".join(f"{x:.5f}" for x in rec["losses"])
        if rec["errors"]:
            losses += " (" + "; ".join(rec["errors"]) + ")"
        lines.append(f"{head} {rec['time_median_s']:.3f} | {rec['time_min_s']:.3f}-{rec['time_max_s']:.3f} | "
                     f"{rec['tokens_per_s']:.0f} | {rec['peak_mib']:.0f} | {extra} | {ratio_t} | {ratio_m} | "
                     f"{losses} |")
    return "\n".join(lines)


def parse_shape(text: str) -> TrainShape:
    """HxLxV (hidden x layers x vocabulary), e.g. 256x4x32000; ValueError otherwise."""
    try:
        hidden, layers, vocab = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shapes: expected hidden x layers x vocabulary like 256x4x32000 for --task train, "
                         f"got {text!r}") from None
    if hidden < 64 or hidden % 64 or layers < 1 or vocab < 300:
        raise ValueError(f"--shapes: {text!r}: hidden must be a multiple of 64, layers >= 1, vocabulary >= 300")
    return TrainShape(hidden, layers, vocab)


__all__ = ["run", "format_table", "check_losses", "parse_shape", "prepare", "file_pairs", "TrainShape", "TRAIN_PATHS",
           "DEFAULT_TRAIN_PATHS", "MODES", "DEFAULT_SHAPE", "QUICK_SHAPE"]
