"""The systematic mutation run over prefuse/algorithms/ (tests/golden/mutate_algorithms.py) kills at least 90% of
its mutants, equivalent ones excluded. About an hour on one core, so opt-in:

    PREFUSE_MUTATIONS=1 .venv/bin/python -m pytest -q tests/test_algorithm_mutations.py
    PREFUSE_MUTATIONS=1 PREFUSE_MUTATION_SAMPLE=200 .venv/bin/python -m pytest -q tests/test_algorithm_mutations.py

PREFUSE_MUTATION_SAMPLE runs a seeded sample of that many mutants instead of all of them (the rate is then an
estimate); PREFUSE_MUTATION_JOBS runs that many mutants at once.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("PREFUSE_MUTATIONS") != "1", reason="set PREFUSE_MUTATIONS=1 to run")

MIN_KILL_RATE = 0.90


def test_algorithm_mutants_are_killed():
    # a fresh process: the script forks its test runs, which is unsafe from one that has run torch ops already
    command = [sys.executable, str(Path(__file__).parent / "golden" / "mutate_algorithms.py"),
               "--min-kill-rate", str(MIN_KILL_RATE), "--jobs", os.environ.get("PREFUSE_MUTATION_JOBS", "1")]
    if os.environ.get("PREFUSE_MUTATION_SAMPLE"):
        command += ["--sample", os.environ["PREFUSE_MUTATION_SAMPLE"], "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    report = done.stdout[-6000:] + done.stderr[-3000:]
    result = re.search(r"^RESULT kill_rate=([0-9.]+)", done.stdout, re.MULTILINE)
    assert result is not None, report
    assert float(result.group(1)) >= MIN_KILL_RATE, report
    assert done.returncode == 0, report
