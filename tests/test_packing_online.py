"""`prefuse train --online --padding_free`: the online source's batches (sampled completions, right-padded) go
through the packed decoder passes; the first step logs the padded run's values (the same samples: generation does
not depend on the flag)."""
import math

import pytest

from prefuse.cli import main
from tests import test_engine_online as online

files = online.files  # the tiny Llama, its prompts and reward functions (a module-scoped fixture)

pytestmark = pytest.mark.usefixtures("one_thread", "offline_hf_home")


@pytest.mark.parametrize("loss_type, flags", [("sigmoid", []), ("grpo", ["--beta", "0.04", "--num_generations", "4"])])
def test_online_padding_free_first_step_equals_padded(files, tmp_path, loss_type, flags):
    records = {}
    for name, extra in (("padded", []), ("packed", ["--padding_free", "true"])):
        assert main(online.online_argv(files, tmp_path / name, loss_type, *flags, *extra, steps=1)) == 0
        records[name] = online.read_metrics(tmp_path / name)[0]
    padded, packed = records["padded"], records["packed"]
    # float32, per-token arithmetic laid out differently: each value a sum over at most the batch's positions
    rel = 2.0 ** -24 * 8 * 64
    timings = ("tokens_per_second", "peak_memory_mib", "seconds")
    compared = [k for k, v in padded.items() if isinstance(v, float) and math.isfinite(v)
                and not any(t in k for t in timings)]
    assert {"loss", "grad_norm"} <= set(compared)
    for key in compared:
        assert packed[key] == pytest.approx(padded[key], rel=rel, abs=rel), key
