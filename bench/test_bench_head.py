"""pytest-benchmark microbenchmarks of the head's forward+backward, with the same paths as `prefuse bench`.

    .venv/bin/python -m pytest bench --benchmark-only            # timings (pytest-benchmark's table)
Each case also records the extra peak memory of the path, measured in a fresh process, in `extra_info`.
Shapes are kept CPU-sized; `prefuse bench --shapes ...` covers the large ones.
"""
import pytest
import torch

from prefuse.bench.measure import measure
from prefuse.bench.paths import PATHS, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1024, 256, 8000), (2048, 512, 32000)]
PATH_NAMES = [name for name, path in PATHS.items() if path.available(DEVICE)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("path", PATH_NAMES)
def test_head_forward_backward(benchmark, path, shape):
    n, h, v = shape
    hidden, weight, labels = make_inputs(n, h, v, torch.float32, DEVICE, ignore_frac=0.25)
    step = PATHS[path].make(hidden, weight, labels)
    for _ in range(PATHS[path].warmup):
        step()
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    loss = benchmark.pedantic(lambda: (step(), sync())[0], rounds=3, iterations=1)
    assert torch.isfinite(loss)
    memory = measure(path, n, h, v, device=DEVICE, repeats=0)
    assert memory.error is None, memory.error
    benchmark.extra_info["peak_extra_mib"] = memory.peak_extra_mib
    benchmark.extra_info["logits_mib"] = n * v * 4 / 2**20
