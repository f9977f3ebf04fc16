"""What the graph audit costs per second-order `adapt`, on the W1 and W2 backbones.

    python benchmarks/audit_cost.py --tasks 8

W1: Omniglot Conv4-64 (strided), 5 support images of 28x28, 1 inner step. W2: miniImageNet Conv4-32 (BN, max-pool),
5 support images of 84x84, 5 inner steps. For each, the audit's own time (every call of
`paddlefsl.metaopt.autodiff.audit.audit`, timed in place) is compared with the time of the `adapt` calls that contain
it and with the whole task (clone, adapt, query loss, backward).
"""
import argparse
import statistics
import time

import paddle
import paddle.nn.functional as F

from paddlefsl.backbones import Conv4
from paddlefsl.metaopt import MAML
from paddlefsl.metaopt.autodiff import audit

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--tasks", type=int, default=8, help="timed tasks per workload (after one warm-up)")
args = parser.parse_args()
if args.tasks < 1:
    parser.error(f"--tasks must be a positive integer, got {args.tasks}")

WORKLOADS = {
    "W1": dict(model=lambda: Conv4.omniglot(5), image=(1, 28, 28), steps=1, lr=0.4, query=5),
    "W2": dict(model=lambda: Conv4.miniimagenet(5), image=(3, 84, 84), steps=5, lr=0.01, query=75),
}

_audit = audit.audit
spent = {"audit": 0.0, "nodes": 0, "calls": 0}


def timed_audit(*a, **k):
    start = time.perf_counter()
    nodes = _audit(*a, **k)
    spent["audit"] += time.perf_counter() - start
    spent["nodes"] += nodes
    spent["calls"] += 1
    return nodes


audit.audit = timed_audit
for name, w in WORKLOADS.items():
    paddle.seed(0)
    learner = MAML(w["model"](), w["lr"])
    xs, ys = paddle.randn([5, *w["image"]]), paddle.arange(5)
    xq, yq = paddle.randn([w["query"], *w["image"]]), paddle.arange(5).tile([w["query"] // 5])
    rows = []
    for i in range(args.tasks + 1):
        spent.update(audit=0.0, nodes=0, calls=0)
        start = time.perf_counter()
        task = learner.clone()
        adapt = 0.0
        for _ in range(w["steps"]):
            loss = F.cross_entropy(task(xs), ys)
            t0 = time.perf_counter()
            task.adapt(loss)
            adapt += time.perf_counter() - t0
        F.cross_entropy(task(xq), yq).backward()
        learner.clear_gradients()
        if i:
            rows.append((spent["audit"], adapt, time.perf_counter() - start, spent["nodes"] / spent["calls"]))
    per_adapt = statistics.median(r[0] for r in rows) / w["steps"]
    print(f"{name}: audit {1e3 * per_adapt:.2f} ms per adapt ({statistics.median(r[3] for r in rows):.0f} nodes), "
          f"{100 * statistics.median(r[0] / r[1] for r in rows):.2f} % of the adapt calls, "
          f"{100 * statistics.median(r[0] / r[2] for r in rows):.2f} % of the task "
          f"(median over {args.tasks} tasks; task {statistics.median(r[2] for r in rows):.3f} s)")
