"""The static report for GPUs without one: what the compiler says of each Triton kernel (registers, spills, shared
memory on sm_80 and sm_90) and what a step must move and compute, giving its roofline time on an H100.

Bytes and FLOPs are counted per call from the shapes, as the kernels and matmuls are written:
- matmuls (cuBLAS): 2*m*H*V FLOPs each; bytes = the operands and the result once.
- forward kernel: reads the logits chunk once, writes 3 floats per row; grad kernel: reads and writes the chunk;
  the elementwise FLOPs per logit (transform, exp, compare, multiply-add) are counted as 8, exp as 1.
The roofline time of a call is max(bytes / HBM bandwidth, FLOPs / peak); a step's is the sum over its calls.
"""
from __future__ import annotations

from dataclasses import dataclass

# NVIDIA H100 SXM5 published peaks (dense): HBM3 bandwidth, and the matmul peak by operand type (fp32 matmuls run
# on the CUDA cores unless TF32 is allowed, which torch does not by default).
H100 = {"name": "H100 SXM5", "hbm_bytes_per_s": 3.35e12, "matmul_flops": {"float32": 67e12, "tf32": 494e12,
                                                                         "bfloat16": 989e12, "float16": 989e12},
        "vector_flops": 67e12}
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
ELEMENTWISE_FLOPS = 8


@dataclass
class Call:
    name: str
    flops: float
    bytes: float

    def seconds(self, gpu: dict, dtype: str) -> float:
        peak = gpu["matmul_flops"][dtype] if self.name.startswith("matmul") else gpu["vector_flops"]
        return max(self.bytes / gpu["hbm_bytes_per_s"], self.flops / peak)


def head_step_calls(n: int, h: int, v: int, dtype: str, mode: str) -> list[Call]:
    """The calls of one forward+backward of the head over n labeled tokens (all chunks together)."""
    item = ITEMSIZE[dtype]

    def matmul(name):
        return Call(f"matmul {name}", 2.0 * n * h * v, (n * h + v * h + n * v) * item)

    forward = Call("forward kernel", ELEMENTWISE_FLOPS * n * v, n * v * item + 3 * 4 * n)
    grad = Call("grad kernel", ELEMENTWISE_FLOPS * n * v, 2 * n * v * item + 4 * 4 * n)
    calls = [matmul("logits"), forward, grad, matmul("grad_hidden"), matmul("grad_weight")]
    if mode == "recompute":
        calls.insert(2, matmul("logits (recomputed in backward)"))
    return calls


def kernel_table(results) -> list[dict]:
    """Worst case over the variants of each (kernel, target, BLOCK_V, warps) from compile_report results."""
    rows: dict = {}
    for r in results:
        key = (r.kernel, r.target, r.constexprs.get("BLOCK_V"), r.num_warps)
        row = rows.setdefault(key, {"kernel": r.kernel, "target": r.target, "BLOCK_V": key[2], "warps": key[3],
                                    "registers": 0, "spill_bytes": 0, "shared_bytes": 0, "variants": 0,
                                    "errors": 0})
        row["registers"] = max(row["registers"], r.registers or 0)
        row["spill_bytes"] = max(row["spill_bytes"], (r.spill_stores or 0) + (r.spill_loads or 0))
        row["shared_bytes"] = max(row["shared_bytes"], r.shared_bytes or 0)
        row["variants"] += 1
        row["errors"] += r.error is not None
    return sorted(rows.values(), key=lambda r: (r["kernel"], r["target"]))


def roofline(shapes, dtype: str = "bfloat16", gpu: dict = H100) -> list[dict]:
    """Per shape (N, H, V) and mode: each call's bytes, FLOPs and roofline time on `gpu`, and the step total."""
    out = []
    for n, h, v in shapes:
        for mode in ("in_forward", "recompute"):
            calls = head_step_calls(n, h, v, dtype, mode)
            out.append({"n": n, "h": h, "v": v, "dtype": dtype, "mode": mode, "gpu": gpu["name"],
                        "calls": [{"name": c.name, "gflop": c.flops / 1e9, "mbytes": c.bytes / 1e6,
                                   "roofline_ms": c.seconds(gpu, dtype) * 1e3} for c in calls],
                        "step_roofline_ms": sum(c.seconds(gpu, dtype) for c in calls) * 1e3})
    return out


def format_report(kernels: list[dict], steps: list[dict]) -> str:
    lines = ["Triton kernels (worst case over each config's dtype and flag variants):", "",
             "| kernel | target | BLOCK_V | warps | registers | spill bytes | shared bytes | variants | errors |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        lines.append(f"| {k['kernel']} | {k['target']} | {k['BLOCK_V']} | {k['warps']} | {k['registers']} | "
                     f"{k['spill_bytes']} | {k['shared_bytes']} | {k['variants']} | {k['errors']} |")
    lines += ["", f"Roofline of one forward+backward of the head on an {steps[0]['gpu'] if steps else 'H100'} "
              "(published peaks; compare with `prefuse bench` on the GPU):", "",
              "| N | H | V | dtype | mode | call | GFLOP | MB moved | roofline ms |", "|---|---|---|---|---|---|---|---|---|"]
    for s in steps:
        for c in s["calls"]:
            lines.append(f"| {s['n']} | {s['h']} | {s['v']} | {s['dtype']} | {s['mode']} | {c['name']} | "
                         f"{c['gflop']:.1f} | {c['mbytes']:.1f} | {c['roofline_ms']:.3f} |")
        lines.append(f"| {s['n']} | {s['h']} | {s['v']} | {s['dtype']} | {s['mode']} | **step** | | | "
                     f"**{s['step_roofline_ms']:.3f}** |")
    return "\n".join(lines)
