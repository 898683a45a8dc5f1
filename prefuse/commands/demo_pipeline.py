"""`prefuse demo --real --pipeline`: the pipeline end to end on SmolLM2-135M-Instruct, on the CPU.

    prefuse sft (LoRA)  ->  prefuse export --merge_lora  ->  prefuse train (DPO, LoRA)  ->  prefuse eval

The start is the bundled GGUF file's plain copy (engine/models/gguf.py). SFT rows are the chosen conversations of the
UltraFeedback sample (prompt + chosen as `messages`); DPO trains on other rows of the same file as pairs; the eval
answers held-out prompts (the eval file's) with the trained model and with the start, greedily, and judges each pair
of answers with a reward function written here (docs/eval.md's word-overlap reward): win rate, Wilson interval,
length-controlled win rate, mean lengths.

How the stages chain (what the engine supports): an SFT checkpoint is LoRA adapters on the start; `prefuse export
--merge_lora` folds them into the start's weights, and that merged model is what DPO trains (new LoRA adapters) and
what DPO's reference is (the policy with its adapters disabled), as DPO wants: the reference is the SFT model, not
the start. `prefuse eval` takes DPO's checkpoint directory as it is (rebuilt from the settings the checkpoint records:
the merged SFT model and the DPO adapters on it).

`chain()` is the pipeline on any model and files (the fast test runs it on a tiny model); `run()` the real demo.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

REWARD_TEXT = '''"""The pipeline demo's judge: how many distinct words of four or more letters of the prompt's last message the
answer uses (docs/eval.md's measurement)."""
import re


def prompt_words(prompts, completions, **kwargs):
    scores = []
    for prompt, completion in zip(prompts, completions):
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        answer = completion[-1]["content"] if isinstance(completion, list) else completion
        words = set(re.findall(r"[a-z]{4,}", text.lower()))
        scores.append(float(len(words & set(re.findall(r"[a-z]{4,}", answer.lower())))))
    return scores
'''


@dataclass
class Stages:
    """The sizes of the three stages (the real demo's defaults: minutes on a 2-core CPU)."""
    sft_steps: int = 4
    dpo_steps: int = 4
    batch_size: int = 2
    max_length: int = 320
    sft_learning_rate: float = 2e-4
    dpo_learning_rate: float = 5e-4
    beta: float = 0.1
    lora_r: int = 16
    max_new_tokens: int = 48
    seed: int = 0
    device: str = "cpu"


def chain(start: str, sft_file: str, pairs_file: str, prompts_file: str, reward_func: str, out: str,
          stages: Stages, start_name: str | None = None) -> dict:
    """sft -> merge -> DPO -> eval of DPO's checkpoint against `start`; every stage's files under `out`. Returns
    {"sft": [metrics], "dpo": [metrics], "sft_model": dir, "dpo_checkpoint": dir, "eval": eval's result}."""
    from prefuse.commands.export import export
    from prefuse.engine.eval import EvalConfig, evaluate
    from prefuse.engine.sft import SFTConfig, train_sft
    from prefuse.engine.train.config import TrainConfig
    from prefuse.engine.train.loop import train

    out = Path(out)
    common = {"use_peft": True, "lora_r": stages.lora_r, "lora_alpha": 2 * stages.lora_r, "lora_dropout": 0.0,
              "per_device_train_batch_size": stages.batch_size, "max_length": stages.max_length,
              "lr_scheduler_type": "constant", "logging_steps": 1, "report_to": "none", "seed": stages.seed,
              "device": stages.device, "overwrite_output_dir": True}  # a rerun replaces the demo's own runs
    train_sft(SFTConfig(model_name_or_path=start, dataset_name=sft_file, output_dir=str(out / "sft"),
                        learning_rate=stages.sft_learning_rate, max_steps=stages.sft_steps,
                        save_steps=stages.sft_steps, train_sampling_strategy="sequential", **common))
    sft_model = str(export(str(out / "sft" / f"checkpoint-{stages.sft_steps}"), str(out / "sft_model"),
                           merge_lora=True))
    train(TrainConfig(model_name_or_path=sft_model, dataset_name=pairs_file, output_dir=str(out / "dpo"),
                      loss_type=["sigmoid"], beta=stages.beta, learning_rate=stages.dpo_learning_rate,
                      max_steps=stages.dpo_steps, save_steps=stages.dpo_steps, **common))
    dpo_checkpoint = str(out / "dpo" / f"checkpoint-{stages.dpo_steps}")
    result = evaluate(EvalConfig(model_name_or_path=dpo_checkpoint, baseline_model=start, prompts=prompts_file,
                                 reward_funcs=[reward_func], max_new_tokens=stages.max_new_tokens,
                                 seed=stages.seed, device=stages.device, output=str(out / "eval.json"),
                                 markdown=str(out / "eval.md")),
                      {"model": dpo_checkpoint, "baseline_model": start_name or start})
    return {"sft": metrics(out / "sft"), "dpo": metrics(out / "dpo"), "sft_model": sft_model,
            "dpo_checkpoint": dpo_checkpoint, "eval": result}


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(records: list[dict], key: str = "loss") -> list[float]:
    return [r[key] for r in records if key in r]


def format_table(result: dict) -> str:
    """The pipeline's table, one row: each stage's loss (first -> last step), then the eval's figures."""
    sft, dpo, ev = _losses(result["sft"]), _losses(result["dpo"]), result["eval"]
    ci = ev["win_rate_ci95"]
    lc = "n/a" if ev["lc_win_rate"] is None else f"{100 * ev['lc_win_rate']:.1f}%"
    return (f"\n| sft loss ({len(sft)} steps) | DPO loss ({len(dpo)} steps) | n | win rate vs start | 95% CI (Wilson) | "
            "LC win rate | mean length | start's |\n|---|---|---:|---:|---:|---:|---:|---:|\n"
            f"| {sft[0]:.4f} -> {sft[-1]:.4f} | {dpo[0]:.4f} -> {dpo[-1]:.4f} | {ev['n']} | {100 * ev['win_rate']:.1f}% "
            f"| {100 * ci[0]:.1f}% - {100 * ci[1]:.1f}% | {lc} | {ev['mean_length']:.1f} | "
            f"{ev['baseline_mean_length']:.1f} |")


def real_files(data_dir: Path, out: Path, stages: Stages, held_out: int, max_chars: int = 900) -> tuple[str, ...]:
    """From the UltraFeedback sample: SFT rows (the chosen conversations), pairs (other rows) and held-out prompts
    (the eval file's first `held_out`), each file under `out`. Rows whose prompt + answer(s) run over `max_chars`
    characters are passed over, which keeps the sequences near max_length on a CPU."""
    train_rows = [json.loads(line) for line in (data_dir / "ultrafeedback_binarized_sample_train.conversational"
                                                ".jsonl").read_text().splitlines()]

    def size(row, *keys):
        return sum(len(m["content"]) for k in ("prompt", *keys) for m in row[k])

    short = [r for r in train_rows if size(r, "chosen", "rejected") <= max_chars]
    n_sft, n_pairs = stages.sft_steps * stages.batch_size, stages.dpo_steps * stages.batch_size
    if len(short) < n_sft + n_pairs:
        raise ValueError(f"real_sft_steps: {len(short)} short rows in the UltraFeedback sample, {n_sft + n_pairs} "
                         f"needed; take fewer steps")
    sft_file, pairs_file, prompts_file = out / "sft.jsonl", out / "pairs.jsonl", out / "prompts.jsonl"
    sft_file.write_text("".join(json.dumps({"messages": r["prompt"] + r["chosen"]}) + "\n" for r in short[:n_sft]))
    pairs_file.write_text("".join(json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                                  for r in short[n_sft:n_sft + n_pairs]))
    eval_lines = (data_dir / "ultrafeedback_binarized_sample_eval.conversational.jsonl").read_text().splitlines()
    prompts_file.write_text("".join(json.dumps({"prompt": json.loads(line)["prompt"]}) + "\n"
                                    for line in eval_lines[:held_out]))
    return str(sft_file), str(pairs_file), str(prompts_file)


def add_arguments(group) -> None:
    group.add_argument("--pipeline", action="store_true",
                       help="with --real: prefuse sft -> prefuse export --merge_lora -> prefuse train (DPO) -> prefuse "
                            "eval against the start, on UltraFeedback rows (--data_dir); minutes on a CPU")
    group.add_argument("--data_dir", default=None,
                       help="--pipeline: the folder of ultrafeedback_binarized_sample_{train,eval}.conversational.jsonl "
                            "(UltraFeedback binarized, TRL's conversational form)")
    group.add_argument("--pipeline_held_out", type=int, default=16, help="--pipeline: held-out prompts judged")


def run(args) -> int:
    from prefuse.engine.models.gguf import bundled, plain_directory

    started = time.time()
    if not args.data_dir:
        raise ValueError("data_dir: --pipeline trains on UltraFeedback rows; pass --data_dir DIR, the folder of "
                         "ultrafeedback_binarized_sample_{train,eval}.conversational.jsonl")
    data_dir = Path(args.data_dir)
    if not (data_dir / "ultrafeedback_binarized_sample_train.conversational.jsonl").is_file():
        raise ValueError(f"data_dir: {data_dir} has no ultrafeedback_binarized_sample_train.conversational.jsonl")
    out = Path(args.output_dir) / "pipeline"
    out.mkdir(parents=True, exist_ok=True)
    gguf = bundled("smollm2")
    start = plain_directory(str(gguf))
    stages = Stages(seed=args.seed)
    files = real_files(data_dir, out, stages, args.pipeline_held_out)
    reward = out / "prompt_words.py"
    reward.write_text(REWARD_TEXT)
    print(f"SmolLM2-135M-Instruct ({gguf}): sft {stages.sft_steps} steps -> merge -> DPO {stages.dpo_steps} steps "
          f"-> eval on {args.pipeline_held_out} held-out prompts against the start", flush=True)
    result = chain(start, *files, f"{reward}:prompt_words", str(out), stages, start_name=str(gguf))
    seconds = time.time() - started
    (out / "pipeline.json").write_text(json.dumps({**result, "seconds": seconds}, indent=1))
    print(format_table(result))
    print(f"\n{seconds:.0f} s; {out / 'pipeline.json'}, {out / 'eval.json'}")
    return 0
