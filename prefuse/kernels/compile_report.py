"""Compile every Triton kernel, in every config it can launch with, for GPU targets, without a GPU.

For NVIDIA targets the PTX is assembled by the ptxas that ships with Triton, with `-v`, and its log gives
registers, spills and shared memory. AMD targets are compiled to HSACO (register/spill counts from the metadata
when the backend reports them). Run as `python -m prefuse.kernels.compile_report [--json]`; it must run without
TRITON_INTERPRET (under the interpreter `triton.jit` returns interpreted functions).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

NVIDIA_TARGETS = (80, 90)
AMD_TARGETS = ("gfx942",)
DTYPES = ("fp32", "bf16", "fp16")


@dataclass
class CompileResult:
    kernel: str
    target: str
    dtype: str
    constexprs: dict
    num_warps: int
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    shared_bytes: int | None = None
    error: str | None = None


def _signature(kernel: str, dtype: str) -> dict[str, str]:
    logits = f"*{dtype}"
    if kernel == "forward":
        return {"LOGITS": logits, "stride_row": "i32", "LABELS": "*i64", "LOGP": "*fp32", "LSE": "*fp32",
                "MEAN_LOGP": "*fp32", "LOG_SUM_SQ": "*fp32", "INV_TEMP": "*fp32", "V": "i32", "inv_temp": "fp32",
                "softcap": "fp32"}
    if kernel == "grad":
        return {"LOGITS": logits, "stride_row": "i32", "GRAD": logits, "stride_grad_row": "i32", "LABELS": "*i64",
                "LSE": "*fp32", "COEF_T": "*fp32", "COEF_U": "*fp32", "INV_TEMP": "*fp32", "V": "i32",
                "inv_vocab": "fp32",
                "inv_temp": "fp32", "softcap": "fp32"}
    if kernel == "stats":
        return {"LOGITS": logits, "stride_row": "i32", "LABELS": "*i64", "LSE": "*fp32", "ENTROPY": "*fp32",
                "LOG_SUM_SQ": "*fp32", "TOPK_MASS": "*fp32", "TOPK_ENT": "*fp32", "TOPK_ENT_UNNORM": "*fp32",
                "LOGP": "*fp32", "IS_ARGMAX": "*i8", "INV_TEMP": "*fp32", "V": "i32", "top_k": "i32", "inv_temp": "fp32",
                "softcap": "fp32"}
    raise KeyError(kernel)


def flag_settings(n_flags: int, cover: bool) -> list[tuple[bool, ...]]:
    """Every combination of n boolean switches, or with `cover` the n + 2 that reach each switch's code: none,
    each alone, all (the most registers live at once)."""
    if not cover:
        return list(itertools.product((False, True), repeat=n_flags))
    alone = [tuple(i == j for j in range(n_flags)) for i in range(n_flags)]
    return [(False,) * n_flags, *alone, (True,) * n_flags]


def launch_variants(kernel: str, arch: int, cover: bool = False) -> list[tuple[dict, int]]:
    """Every (constexprs, num_warps) the launcher in triton_ops can use on this GPU generation (`cover`: the
    switch settings of flag_settings(cover=True) only)."""
    from prefuse.kernels.triton_ops import K_PADS, config_for

    tile, warps = config_for(kernel, arch)
    flags = {"forward": ("HAS_SOFTCAP", "WITH_MEAN", "WITH_SUM_SQ", "PER_ROW_TEMP"),
             "grad": ("HAS_SOFTCAP", "HAS_UNIFORM", "PER_ROW_TEMP"),
             "stats": ("HAS_SOFTCAP", "HAS_LABELS", "PER_ROW_TEMP")}[kernel]
    out = []
    for values in flag_settings(len(flags), cover):
        const = dict(zip(flags, values), BLOCK_V=tile)
        if kernel == "stats":
            out += [(dict(const, K_PAD=k), warps) for k in K_PADS]
        else:
            out.append((const, warps))
    return out


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", src, "-o", src + ".o"],
                              capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    return {name: int(m.group(1)) for name, rx in _PTXAS_RE.items() if (m := rx.search(log))}


def _amdgcn_report(asm: str) -> dict:
    """VGPRs and VGPR spills (to scratch memory) from the AMDGPU assembly's metadata notes. SGPR spills are not
    counted: they go to VGPR lanes, not to memory."""
    out = {}
    if m := re.search(r"; NumVgprs: (\d+)", asm):
        out["registers"] = int(m.group(1))
    if m := re.search(r"\.vgpr_spill_count:\s+(\d+)", asm):
        out["spill_stores"] = int(m.group(1))
    return out


def compile_one(kernel: str, target: str, dtype: str, const: dict, num_warps: int) -> CompileResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from prefuse.kernels.triton_ops import KERNELS

    result = CompileResult(kernel, target, dtype, const, num_warps)
    try:
        src = ASTSource(fn=KERNELS[kernel], signature=_signature(kernel, dtype), constexprs=const)
        if target.startswith("sm_"):
            arch = int(target[3:])
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
            for key, value in _ptxas_report(compiled.asm["ptx"], arch).items():
                setattr(result, key, value)
        else:
            compiled = triton.compile(src, target=GPUTarget("hip", target, 64), options={"num_warps": num_warps})
            for key, value in _amdgcn_report(compiled.asm["amdgcn"]).items():
                setattr(result, key, value)
        result.shared_bytes = getattr(compiled.metadata, "shared", None)
    except Exception as exc:  # reported, and the test fails on it
        result.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return result


def _compile_job(job: tuple) -> CompileResult:
    return compile_one(*job)


def compile_all(kernels=("forward", "grad", "stats"), amd: bool = True, workers: int | None = None,
                cover: bool = False):
    """Compile every launchable variant (`cover`: each switch reached, see flag_settings); jobs are spread over
    `workers` processes (default: all cores)."""
    jobs = []
    for kernel, arch, dtype in itertools.product(kernels, NVIDIA_TARGETS, DTYPES):
        jobs += [(kernel, f"sm_{arch}", dtype, const, warps) for const, warps in launch_variants(kernel, arch, cover)]
    if amd:
        # AMD is compiled to show the kernels are portable; launch configs are tuned for NVIDIA only.
        for kernel, target in itertools.product(kernels, AMD_TARGETS):
            jobs += [(kernel, target, "bf16", const, warps) for const, warps in launch_variants(kernel, 80, cover)]
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        return [_compile_job(job) for job in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_compile_job, jobs))


def format_table(results: list[CompileResult]) -> str:
    """Registers and spills of the tuned configs (the widest tile of each kernel and target), worst case over the
    flag and dtype variants."""
    rows = {}
    for r in results:
        key = (r.kernel, r.target, r.constexprs.get("BLOCK_V"), r.num_warps)
        regs, spills, err = rows.get(key, (0, 0, 0))
        rows[key] = (max(regs, r.registers or 0), max(spills, (r.spill_stores or 0) + (r.spill_loads or 0)),
                     err + (r.error is not None))
    lines = ["| kernel | target | BLOCK_V | warps | max registers | spill bytes | errors |", "|---|---|---|---|---|---|---|"]
    for (kernel, target, tile, warps), (regs, spills, err) in sorted(rows.items(), key=str):
        lines.append(f"| {kernel} | {target} | {tile} | {warps} | {regs} | {spills} | {err} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON list of results")
    parser.add_argument("--kernels", nargs="*", default=["forward", "grad", "stats"])
    parser.add_argument("--no-amd", action="store_true")
    parser.add_argument("--cover", action="store_true",
                        help="each switch none/alone/all instead of every combination (the test suite's sweep)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_report: unset TRITON_INTERPRET (kernels must be JIT functions to compile)", file=sys.stderr)
        return 2
    results = compile_all(tuple(args.kernels), amd=not args.no_amd, cover=args.cover)
    if args.json:
        print(json.dumps([asdict(r) for r in results]))
    else:
        print(format_table(results))
    bad = [r for r in results if r.error or (r.spill_stores or 0) or (r.spill_loads or 0)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
