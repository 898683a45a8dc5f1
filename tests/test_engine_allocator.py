"""engine/train/allocator.py: glibc's thresholds are set only on request (PREFUSE_CPU_ALLOCATOR=release), once."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the module alone, without importing torch through the package (it needs nothing else)
CODE = ("import importlib.util as u; s = u.spec_from_file_location('allocator', 'prefuse/engine/train/allocator.py'); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); r = m.return_freed_memory; print(r(), r())")


def applied(value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PREFUSE_CPU_ALLOCATOR"}
    if value is not None:
        env["PREFUSE_CPU_ALLOCATOR"] = value
    done = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_thresholds_are_set_only_when_asked():
    assert applied(None) == "False False" and applied("default") == "False False"
    assert applied("release") == "True True"  # mallopt accepted both; the second call finds them set
