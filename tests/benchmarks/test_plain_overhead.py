"""benchmarks/plain_overhead.py: a real (tiny) run prints one ratio per pair and their median; bad counts are clear
errors."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "..", "shared", "bench")
SCRIPT = os.path.join(ROOT, "benchmarks", "plain_overhead.py")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


@pytest.mark.skipif(not os.path.exists(os.path.join(BENCH_DIR, "workload.py")), reason="no ../shared/bench/workload.py")
@pytest.mark.parametrize("fast", ["on", "off"])
def test_plain_overhead_prints_the_ratio_of_each_pair(fast):
    run = subprocess.run([sys.executable, SCRIPT, "W1", "--pairs", "2", "--meta-batch", "2", "--fast-kernels", fast,
                          "--bench-dir", BENCH_DIR], capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    line = run.stdout.strip().splitlines()[-1]
    match = re.fullmatch(rf"W1 first order, fast kernels {fast}, meta-batch 2: paddlefsl / plain Paddle per "
                         r"meta-iteration, median of 2 pairs (\S+) \(pairs (\S+) (\S+)\)", line)
    assert match, line
    median, *pairs = map(float, match.groups())
    assert all(r > 0 for r in pairs) and abs(median - (pairs[0] + pairs[1]) / 2) < 1.5e-3


@pytest.mark.parametrize("argument,message", [(["--pairs", "0"], "--pairs must be at least 1"),
                                              (["--meta-batch", "0"], "--meta-batch must be at least 1"),
                                              (["--bench-dir", "/nonexistent"], "/nonexistent")])
def test_plain_overhead_rejects_bad_arguments(argument, message):
    run = subprocess.run([sys.executable, SCRIPT, "W1", *argument, *(["--bench-dir", BENCH_DIR] if
                                                                     "--bench-dir" not in argument else [])],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 2 and message in run.stderr, run.stderr[-2000:]
