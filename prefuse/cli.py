"""The `prefuse` command. Thin: parses arguments and calls the library."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefuse", description="Fused-kernel preference alignment.")
    sub = parser.add_subparsers(dest="command", required=True)

    from prefuse import demo

    p = sub.add_parser("demo", help="the embedded default: a CPU demo that needs no downloads",
                       description=demo.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo.add_arguments(p)
    p.set_defaults(run=demo.run)

    p = sub.add_parser("bench", help="forward+backward of the head: prefuse vs the materializing path and peers",
                       description="Extra peak memory (a fresh process per path) and time (one fresh process, "
                                   "the paths taking turns) of one forward+backward of a linear cross-entropy head; "
                                   "prints a table, --json writes the records.")
    p.add_argument("--task", default="head", choices=["head", "logprobs", "preference"],
                   help="head: linear cross-entropy; logprobs: per-token log-probs (backward of their sum); "
                        "preference: DPO with a reference model's hidden states")
    p.add_argument("--grid", action="store_true", help="the grid of shapes over V in {32000, 128256, 151936} "
                                                       "and two token counts, instead of the default shapes")
    p.add_argument("--plot", default=None, help="write PNG plots of memory and time against V and tokens here")
    p.add_argument("--shapes", nargs="+", default=None, metavar="SHAPE",
                   help="head: NxHxV (tokens x hidden x vocabulary, default 4096x1024x32000); preference: BxTxHxV "
                        "(pairs x sequence length x hidden x vocabulary, default 1x2048x1024x32000 4x512x1024x32000)")
    p.add_argument("--paths", nargs="+", default=None, help="subset of the installed paths")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--ignore_frac", type=float, default=0.25, help="fraction of labels set to -100")
    p.add_argument("--rounds", type=int, default=5, help="timed steps per path (the paths take turns)")
    p.add_argument("--quick", action="store_true", help="one small shape, two rounds")
    p.add_argument("--json", default=None, help="write the records to this file")
    p.add_argument("--static", action="store_true",
                   help="no measurement: compile every Triton kernel for sm_80/sm_90 (registers, spills, shared "
                        "memory) and print the bytes, FLOPs and H100 roofline time of a head step at --shapes")
    p.set_defaults(run=_bench)

    p = sub.add_parser("kernels", help="compile every Triton kernel for sm_80/sm_90/gfx942 and report registers",
                       description="Compiles each Triton kernel in every launch config for GPU targets (no GPU "
                                   "needed) and prints registers, spills and errors.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=lambda a: __import__("prefuse.kernels.compile_report", fromlist=["main"]).main(
        ["--json"] if a.json else []))
    return parser


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


def _bench(args) -> int:
    from prefuse.bench import report

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
                         rounds=2 if args.quick else args.rounds)
    print(report.format_table(records))
    if args.json:
        report.save(records, args.json, "prefuse " + " ".join(sys.argv[1:]))
    if args.plot:
        from prefuse.bench.plots import plot_records

        print("plots:", ", ".join(plot_records(records, args.plot)))
    return 1 if any(r["errors"] for r in records) else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
