"""Every mutation of tests/golden/mutations.py is killed by the seed objectives' tests (about 90 s, so opt-in).

    PREFUSE_MUTATIONS=1 .venv/bin/python -m pytest -q tests/test_seed_mutations.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("PREFUSE_MUTATIONS") != "1", reason="set PREFUSE_MUTATIONS=1 to run")


def test_every_mutation_is_killed():
    # a fresh process: mutations.py forks its test runs, which is unsafe from one that has run torch ops already
    script = Path(__file__).parent / "golden" / "mutations.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].endswith("killed, 0 survived")
