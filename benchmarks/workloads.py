"""Times one meta-iteration of paddlefsl's MAML on the shared peer workloads W1 and W2.

    python benchmarks/workloads.py W1 --order second --iterations 5 --bench-dir ../shared/bench

W1: Omniglot 5-way 1-shot, Conv4-64 strided, meta-batch 32, 1 inner step. W2: miniImageNet 5-way 1-shot, Conv4-32
with BN and max-pool, meta-batch 4, 5 inner steps. The shapes come from the shared ``workload.py`` (the same file the
PyTorch peer scripts read), so the figures compare side by side with ``peer_torch.py`` and ``paddle_raw.py`` run on
the same machine at the same time (set OMP_NUM_THREADS equally for all).
"""
import argparse
import os
import statistics
import sys
import time

import paddle
from paddle import nn

from paddlefsl.metaopt import MAML

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dir import load_workloads  # noqa: E402
from peer_model import conv4, random_tasks  # noqa: E402
from peer_model import meta_iteration as run_meta_iteration  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("workload", choices=("W1", "W2"))
parser.add_argument("--order", choices=("first", "second"), default="second")
parser.add_argument("--iterations", type=int, default=5, help="timed meta-iterations (after one warm-up)")
parser.add_argument("--bench-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench"))
parser.add_argument("--profile", action="store_true", help="print the top cProfile entries of one iteration")
args = parser.parse_args()
try:
    W = load_workloads(args.bench_dir)[args.workload]
except FileNotFoundError as error:
    parser.error(str(error))

paddle.seed(0)
model = nn.Sequential(*conv4(W))
maml = MAML(model, W["inner_lr"], first_order=args.order == "first",
            meta_optimizer=paddle.optimizer.Adam(1e-3, parameters=model.parameters()))
tasks = random_tasks(W)

def meta_iteration():
    run_meta_iteration(maml, tasks, W["steps"])


meta_iteration()
if args.profile:
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    meta_iteration()
    profiler.disable()
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
times = []
for _ in range(args.iterations):
    start = time.perf_counter()
    meta_iteration()
    times.append(time.perf_counter() - start)
print(f"{args.workload} paddlefsl {args.order}: median {statistics.median(times):.3f} s/meta-iter "
      f"(min {min(times):.3f}, max {max(times):.3f}, threads {os.environ.get('OMP_NUM_THREADS', 'default')})")
