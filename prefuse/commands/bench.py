"""`prefuse bench`: one forward+backward of the head through prefuse and its peers (prefuse/bench/report.py), the
compiler's static report (--static, prefuse/bench/roofline.py), or whole DPO training steps against TRL
(--task train, prefuse/bench/train.py). The flags are checked here; a bad one is one line and exit status 2."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

NAME = "bench"
HELP = "forward+backward of the head: prefuse vs the materializing path and peers"
DESCRIPTION = ("Extra peak memory (a fresh process per path) and time (one fresh process, the paths taking turns) of "
               "one forward+backward of a linear cross-entropy head; prints a table, --json writes the records. "
               "--task train: whole DPO training steps of prefuse train against TRL's DPOTrainer "
               "(prefuse/bench/train.py), or with --objective grpo GRPO steps against TRL's GRPOTrainer on the same "
               "fixed completions (prefuse/bench/train_grpo.py).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="head", choices=["head", "logprobs", "preference", "train", "sft"],
                   help="head: linear cross-entropy; logprobs: per-token log-probs (backward of their sum); "
                        "preference: DPO with a reference model's hidden states; train: a DPO training step of "
                        "a tiny head-heavy Llama, prefuse against TRL (and TRL with Liger's kernels on CUDA); sft: SFT "
                        "steps of --model_name_or_path on --dataset, prefuse sft against TRL's SFTTrainer")
    p.add_argument("--grid", action="store_true", help="the grid of shapes over V in {32000, 128256, 151936} "
                                                       "and two token counts, instead of the default shapes")
    p.add_argument("--plot", default=None, help="write PNG plots of memory and time against V and tokens here")
    p.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                   help="head: NxHxV (tokens x hidden x vocabulary, default 4096x1024x32000); preference: BxTxHxV "
                        "(pairs x sequence length x hidden x vocabulary, default 1x2048x1024x32000 4x512x1024x32000); "
                        "train: HxLxV (hidden x layers x vocabulary, default 256x4x32000)")
    p.add_argument("--paths", nargs="+", default=None, help="subset of the installed paths")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the benchmarked tensors or model")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu",
                   help="device to run on (default: cuda when there is one)")
    p.add_argument("--ignore_frac", type=float, default=0.25, help="fraction of labels set to -100")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per path (the paths take turns)")
    p.add_argument("--frozen_weight", action="store_true",
                   help="every path's lm_head weight needs no gradient (a LoRA policy); prefuse then takes its "
                        "frozen-weight path (the path prefuse_logprobs_frozen does so beside the trainable ones)")
    p.add_argument("--quick", action="store_true", help="one small shape, two rounds")
    p.add_argument("--peft", default="both", help="--task train: lora, full or both (default)")
    p.add_argument("--model_name_or_path", default=None,
                   help="--task train: a pretrained model (a directory or a .gguf file) instead of the built shape")
    p.add_argument("--dataset", default=None,
                   help="--task train: a JSON-lines preference file instead of the generated pairs; with "
                        "--model_name_or_path (TRL formats) its first --pairs rows that fit --max_length, with the "
                        "built shape (prompt, chosen, rejected strings) its first pairs of the shape")
    p.add_argument("--pairs", type=int, default=8, help="--task train with --model_name_or_path: pairs per batch "
                                                        "(--objective grpo: prompts, each pair's prompt)")
    p.add_argument("--max_length", type=int, default=256,
                   help="--task train with --model_name_or_path: the longest prompt + response, in tokens")
    p.add_argument("--objective", default="dpo", choices=["dpo", "grpo"],
                   help="--task train: dpo (prefuse train against TRL's DPOTrainer) or grpo (prefuse train --online "
                        "--loss_type grpo against TRL's GRPOTrainer on the same fixed completions, "
                        "prefuse/bench/train_grpo.py; --pairs then counts prompts)")
    p.add_argument("--num_generations", type=int, default=4, help="--objective grpo: completions per prompt")
    p.add_argument("--max_completion_length", type=int, default=64,
                   help="--objective grpo: the longest completion, in tokens (each is cut to a seeded length "
                        "between half and all of it)")
    p.add_argument("--beta", type=float, nargs="+", default=None,
                   help="--objective grpo: KL coefficients, one set of runs each (default 0 and 0.04; --quick: 0.04)")
    p.add_argument("--json", default=None, help="write the records to this file")
    p.add_argument("--markdown", default=None, help="write the table to this file")
    p.add_argument("--static", action="store_true",
                   help="no measurement: compile every Triton kernel for sm_80/sm_90 (registers, spills, shared "
                        "memory) and print the bytes, FLOPs and H100 roofline time of a head step at --shapes")


def run(args: argparse.Namespace) -> int:
    from prefuse.bench import report

    if args.task == "train":
        return run_train(args)
    if args.task == "sft":  # prefuse sft against TRL's SFTTrainer on a real model (prefuse/bench/sft.py)
        from prefuse.bench import sft

        records = sft.from_args(args)
        return write_output(args, records, sft.format_table(records))
    grpo_flags = [flag for flag, on in (("--objective", args.objective != "dpo"), ("--beta", args.beta is not None),
                                        ("--num_generations", args.num_generations != 4),
                                        ("--max_completion_length", args.max_completion_length != 64)) if on]
    if grpo_flags:
        raise ValueError(f"{' '.join(grpo_flags)}: for --task train")
    shapes = (report.QUICK_SHAPES if args.quick else report.GRID_SHAPES if args.grid
              else report.DEFAULT_SHAPES)[args.task]
    if args.shapes:
        dims = 4 if args.task == "preference" else 3
        try:
            shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
            assert all(len(s) == dims for s in shapes)
        except (ValueError, AssertionError):
            example = "4096x1024x32000" if dims == 3 else "1x2048x1024x32000"
            print(f"--shapes: expected {dims} numbers like {example} for --task {args.task}, got {args.shapes}",
                  file=sys.stderr)
            return 2
    if args.static:
        return run_static(args, shapes)
    installed = report.available_paths(args.device, args.task)
    paths = args.paths or installed
    unknown = [p for p in paths if p not in installed]
    if unknown:
        print(f"--paths: {unknown} not available on {args.device}; installed: {installed}", file=sys.stderr)
        return 2
    records = report.run(paths, shapes, dtype=args.dtype, device=args.device, ignore_frac=args.ignore_frac,
                         rounds=2 if args.quick else args.rounds, frozen_weight=args.frozen_weight)
    if args.plot:
        from prefuse.bench.plots import plot_records

        print("plots:", ", ".join(plot_records(records, args.plot)))
    return write_output(args, records, report.format_table(records))


def run_static(args: argparse.Namespace, shapes) -> int:
    from prefuse.bench import roofline
    from prefuse.kernels.compile_report import compile_all

    if args.task == "preference":
        shapes = [(2 * b * t, h, v) for b, t, h, v in shapes]
    results = compile_all(amd=False)
    kernels = roofline.kernel_table(results)
    dtype = "bfloat16" if args.dtype == "float32" and not args.shapes else args.dtype
    steps = roofline.roofline(shapes, dtype=dtype)
    print(roofline.format_report(kernels, steps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "prefuse " + " ".join(sys.argv[1:]), "kernels": kernels, "steps": steps}, f,
                      indent=1)
    return 1 if any(k["errors"] or k["spill_bytes"] for k in kernels) else 0


def train_settings(args: argparse.Namespace) -> tuple[list, tuple[str, ...]]:
    """(shapes, modes) of `--task train`; a flag it cannot take, or a bad value, is a ValueError."""
    from prefuse.bench import train

    other = [flag for flag, on in (("--grid", args.grid), ("--static", args.static), ("--plot", args.plot),
                                   ("--frozen_weight", args.frozen_weight)) if on]
    if other:
        raise ValueError(f"{' '.join(other)}: not for --task train")
    if args.model_name_or_path and args.dataset is None:
        raise ValueError("--model_name_or_path: give --dataset too (the pretrained model's pairs); without both, "
                         "the built shape")
    if args.model_name_or_path and args.shapes:
        raise ValueError("--shapes: not with --model_name_or_path (the model has its own shape)")
    if args.pairs < 1 or args.max_length < 2:
        raise ValueError(f"--pairs {args.pairs} --max_length {args.max_length}: expected >= 1 and >= 2")
    if args.model_name_or_path:
        shapes = [train.RealModel(args.model_name_or_path, args.dataset, args.pairs, args.max_length)]
    else:  # the built shape: generated pairs, or --dataset's
        shapes = ([train.parse_shape(s) for s in args.shapes] if args.shapes
                  else [train.QUICK_SHAPE if args.quick else train.DEFAULT_SHAPE])
        shapes = [dataclasses.replace(shape, dataset=args.dataset) for shape in shapes]
    modes = {"both": train.MODES, "lora": ("lora",), "full": ("full",)}.get(args.peft)
    if modes is None:
        raise ValueError(f"--peft: expected lora, full or both, got {args.peft!r}")
    unknown = [p for p in args.paths or [] if p not in train.TRAIN_PATHS] if args.objective == "dpo" else []
    if unknown:
        raise ValueError(f"--paths: {unknown} are not train paths; they are {list(train.TRAIN_PATHS)}")
    if args.rounds < 1:
        raise ValueError(f"--rounds: expected at least 1, got {args.rounds}")
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not _cuda()):
        raise ValueError(f"--device: {args.device!r} is not available here (cpu, or cuda with a GPU)")
    return shapes, modes


def run_train(args: argparse.Namespace) -> int:
    from prefuse.bench import train

    if args.objective == "grpo":
        return run_train_grpo(args)
    if args.beta is not None:
        raise ValueError("--beta: for --objective grpo (the DPO bench runs beta 0.1)")
    shapes, modes = train_settings(args)
    records = [rec for shape in shapes for rec in train.run(shape, modes, args.paths or train.DEFAULT_TRAIN_PATHS,
                                                             rounds=2 if args.quick else args.rounds,
                                                             device=args.device)]
    return write_output(args, records, train.format_table(records))


def run_train_grpo(args: argparse.Namespace) -> int:
    """--task train --objective grpo (prefuse/bench/train_grpo.py): the shapes and modes of --task train, the
    GRPO settings checked here."""
    from prefuse.bench import train_grpo

    paths = tuple(args.paths or train_grpo.GRPO_PATHS)
    if "prefuse" not in paths or set(paths) - set(train_grpo.GRPO_PATHS):
        raise ValueError(f"--paths: --objective grpo runs {list(train_grpo.GRPO_PATHS)}, prefuse among them (the "
                         f"others are checked against it), got {list(paths)}")
    shapes, modes = train_settings(args)
    settings = train_grpo.GRPOSettings(args.num_generations, args.max_completion_length)
    settings.check()
    betas = tuple(args.beta) if args.beta is not None else (0.04,) if args.quick else train_grpo.BETAS
    if any(not (math.isfinite(b) and b >= 0) for b in betas):
        raise ValueError(f"--beta: expected finite values >= 0, got {list(betas)}")
    records = [rec for shape in shapes for rec in train_grpo.run(shape, modes, betas, paths, settings=settings,
                                                                 rounds=2 if args.quick else args.rounds,
                                                                 device=args.device)]
    return write_output(args, records, train_grpo.format_table(records))


def write_output(args: argparse.Namespace, records: list[dict], table: str) -> int:
    """Print the table, write --json and --markdown; 1 when a record holds an error."""
    from prefuse.bench import report

    print(table)
    command = "prefuse " + " ".join(sys.argv[1:])
    if args.json:
        report.save(records, args.json, command)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"    {command}\n\n{table}\n")
    return 1 if any(r["errors"] for r in records) else 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
