"""Resident memory across an evaluation loop: each task adapted with second-order steps, scored, then dropped.

    OMP_NUM_THREADS=2 python benchmarks/evaluation_memory.py --tasks 10 --bench-dir ../shared/bench

Prints the process's RSS after each task (`docs/memory.md`, "A task adapted and then dropped"). A task's graph must be
freed when the task is dropped: the figures stay flat after the first task.
"""
import argparse
import gc
import os
import sys

import paddle
import paddle.nn.functional as F
from paddle import nn

from paddlefsl.metaopt import MAML

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dir import load_workloads  # noqa: E402
from peer_model import conv4, random_tasks  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--workload", choices=("W1", "W2"), default="W2")
parser.add_argument("--tasks", type=int, default=10)
parser.add_argument("--bench-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench"))
args = parser.parse_args()
try:
    W = load_workloads(args.bench_dir)[args.workload]
except FileNotFoundError as error:
    parser.error(str(error))


def rss_mib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


paddle.seed(0)
maml = MAML(nn.Sequential(*conv4(W)), W["inner_lr"])
xs, ys, xq, yq = random_tasks(W)[0]
sizes = []
for _ in range(args.tasks):
    task = maml.clone()
    for _ in range(W["steps"]):
        task.adapt(F.cross_entropy(task(xs), ys))
    with paddle.no_grad():
        accuracy = float((task(xq).argmax(-1) == yq).astype("float32").mean())
    del task
    gc.collect()
    sizes.append(rss_mib())
print(f"{args.workload}: RSS MiB after each of {args.tasks} evaluated tasks: {sizes}")
