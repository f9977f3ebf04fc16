"""benchmarks/evaluation_memory.py: a real (tiny) run prints the RSS after each evaluated task."""
from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.join(ROOT, "..", "shared", "bench")


@pytest.mark.skipif(not os.path.exists(os.path.join(BENCH_DIR, "workload.py")), reason="no ../shared/bench/workload.py")
def test_prints_the_memory_after_each_task():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "evaluation_memory.py"), "--workload",
                          "W1", "--tasks", "3", "--bench-dir", BENCH_DIR], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    line = run.stdout.strip().splitlines()[-1]
    assert line.startswith("W1: RSS MiB after each of 3 evaluated tasks: ")
    sizes = ast.literal_eval(line.split(": ", 2)[2])
    assert len(sizes) == 3 and all(isinstance(s, int) and s > 0 for s in sizes)


def test_a_missing_bench_dir_is_a_clear_error(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "evaluation_memory.py"), "--bench-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert run.returncode == 2 and "no workload.py in --bench-dir" in run.stderr
