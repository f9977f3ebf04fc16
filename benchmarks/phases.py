"""Where a meta-iteration's time goes: clone, support forward, adapt, query forward and meta-backward (step).

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/phases.py W2 --order second --iterations 3 \
        --bench-dir ../shared/bench

Runs paddlefsl's MAML on a shared workload (``--steps`` overrides its inner steps: ``--steps 10`` is W2x10) and prints
the median seconds per meta-iteration of each phase over ``--iterations`` timed iterations, after two warm-ups (the
first iterations fault in the memory that later ones reuse). Used for the phase tables of ``docs/speed.md``.
"""
import argparse
import os
import statistics
import sys
import time

import paddle
import paddle.nn.functional as F
from paddle import nn

from paddlefsl.metaopt import MAML

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dir import load_workloads  # noqa: E402
from peer_model import conv4, random_tasks  # noqa: E402

PHASES = ("clone", "support_forward", "adapt", "query_forward", "step")

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("workload", choices=("W1", "W2"))
parser.add_argument("--order", choices=("first", "second"), default="second")
parser.add_argument("--iterations", type=int, default=3, help="timed meta-iterations (after two warm-ups)")
parser.add_argument("--steps", type=int, default=None, help="inner steps instead of the workload's")
parser.add_argument("--bench-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench"))
args = parser.parse_args()
if args.iterations < 1:
    parser.error(f"--iterations must be at least 1, got {args.iterations}")
if args.steps is not None and args.steps < 1:
    parser.error(f"--steps must be at least 1, got {args.steps}")
try:
    W = dict(load_workloads(args.bench_dir)[args.workload])
except FileNotFoundError as error:
    parser.error(str(error))
if args.steps is not None:
    W["steps"] = args.steps

paddle.seed(0)
model = nn.Sequential(*conv4(W))
maml = MAML(model, W["inner_lr"], first_order=args.order == "first",
            meta_optimizer=paddle.optimizer.Adam(1e-3, parameters=model.parameters()))
tasks = random_tasks(W)


def meta_iteration() -> dict[str, float]:
    seconds = dict.fromkeys(PHASES, 0.0)
    losses = []

    def timed(phase, fn):
        start = time.perf_counter()
        result = fn()
        seconds[phase] += time.perf_counter() - start
        return result

    for xs, ys, xq, yq in tasks:
        task = timed("clone", maml.clone)
        for _ in range(W["steps"]):
            loss = timed("support_forward", lambda: F.cross_entropy(task(xs), ys))
            timed("adapt", lambda: task.adapt(loss))
        losses.append(timed("query_forward", lambda: F.cross_entropy(task(xq), yq)))
    timed("step", lambda: maml.step(paddle.stack(losses).mean()))
    return seconds


for _ in range(2):
    meta_iteration()
runs = [meta_iteration() for _ in range(args.iterations)]
medians = {phase: statistics.median(run[phase] for run in runs) for phase in PHASES}
total = statistics.median(sum(run.values()) for run in runs)
print(f"{args.workload} {args.order} order, {W['steps']} inner steps, median s per meta-iteration: "
      + "  ".join(f"{phase} {medians[phase]:.3f}" for phase in PHASES) + f"  total {total:.3f}")
