"""benchmarks/phases.py: a real (tiny) run prints each phase of a meta-iteration; bad counts are clear errors."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "..", "shared", "bench")


@pytest.mark.skipif(not os.path.exists(os.path.join(BENCH_DIR, "workload.py")), reason="no ../shared/bench/workload.py")
def test_phases_prints_each_phase_of_a_meta_iteration():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "phases.py"), "W1", "--order", "first",
                          "--iterations", "1", "--steps", "2", "--bench-dir", BENCH_DIR], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    line = run.stdout.strip().splitlines()[-1]
    assert line.startswith("W1 first order, 2 inner steps, median s per meta-iteration: ")
    fields = line.split(": ", 1)[1].split()
    values = dict(zip(fields[::2], map(float, fields[1::2])))
    assert list(values) == ["clone", "support_forward", "adapt", "query_forward", "step", "total"]
    assert all(v > 0 for v in values.values())
    assert abs(sum(v for k, v in values.items() if k != "total") - values["total"]) < 0.05 * values["total"] + 1e-3


@pytest.mark.parametrize("argument,message", [(["--iterations", "0"], "--iterations must be at least 1"),
                                              (["--steps", "0"], "--steps must be at least 1")])
def test_phases_rejects_bad_counts(argument, message):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "phases.py"), "W1", *argument,
                          "--bench-dir", BENCH_DIR], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert run.returncode == 2 and message in run.stderr
