"""What first-order MAML adds to plain Paddle's first order, alternating meta-iterations in one process.

    python benchmarks/plain_overhead.py W1 --pairs 8 --fast-kernels off --bench-dir ../shared/bench

Plain Paddle's first order is the loop of ``../shared/bench/paddle_raw.py``: per task, the parameters times one
swapped into the model by hand, one ``paddle.grad`` per inner step, and one backward of the query loss. Ours is
`paddlefsl.metaopt.MAML` with ``first_order=True`` (``clone``, ``adapt``, ``step``). Both run the workload's Conv4
on the same random tasks, one meta-iteration each in turn, so that the machine's drift and other load fall on both
alike; the ratio of each pair and their median are printed (with ``--fast-kernels off`` both run Paddle's own
kernels, the issue's "at most 10% over plain Paddle" comparison). Separate processes, as ``suite.py`` runs them,
see the same ratio through much more noise on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import paddle
import paddle.nn.functional as F
from paddle import nn

from paddlefsl.metaopt import MAML, set_fast_kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dir import load_workloads  # noqa: E402
from peer_model import conv4, meta_iteration, random_tasks  # noqa: E402


def plain_iteration(model: nn.Layer, optimizer: paddle.optimizer.Optimizer, tasks: list, W: dict) -> None:
    """One first-order meta-iteration in plain Paddle, as ``paddle_raw.py`` runs it."""
    named = [(name.split("."), p) for name, p in model.named_parameters() if not p.stop_gradient]

    def swap(values):
        old = []
        for (path, _), value in zip(named, values):
            owner = model
            for part in path[:-1]:
                owner = getattr(owner, part)
            old.append((owner, path[-1], owner._parameters[path[-1]]))
            owner._parameters[path[-1]] = value
        return old

    def restore(old):
        for owner, key, value in old:
            owner._parameters[key] = value

    optimizer.clear_grad()
    for xs, ys, xq, yq in tasks:
        params = [p * 1.0 for _, p in named]
        for _ in range(W["steps"]):
            old = swap(params)
            loss = F.cross_entropy(model(xs), ys)
            restore(old)
            grads = paddle.grad(loss, params)
            params = [p - W["inner_lr"] * g.detach() for p, g in zip(params, grads)]
        old = swap(params)
        (F.cross_entropy(model(xq), yq) / len(tasks)).backward()
        restore(old)
    optimizer.step()


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=("W1", "W2"))
    parser.add_argument("--pairs", type=int, default=8, help="timed pairs of meta-iterations (after one warm-up)")
    parser.add_argument("--fast-kernels", choices=("on", "off"), default="off")
    parser.add_argument("--meta-batch", type=int, help="override the workload's meta-batch size")
    parser.add_argument("--bench-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench"))
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    if args.meta_batch is not None and args.meta_batch < 1:
        parser.error("--meta-batch must be at least 1")
    try:
        W = load_workloads(args.bench_dir)[args.workload]
    except FileNotFoundError as error:
        parser.error(str(error))
    if args.meta_batch is not None:
        W = dict(W, meta_batch=args.meta_batch)
    set_fast_kernels(args.fast_kernels == "on")

    paddle.seed(0)
    plain_model = nn.Sequential(*conv4(W))
    plain_optimizer = paddle.optimizer.Adam(1e-3, parameters=plain_model.parameters())
    model = nn.Sequential(*conv4(W))
    maml = MAML(model, W["inner_lr"], first_order=True,
                meta_optimizer=paddle.optimizer.Adam(1e-3, parameters=model.parameters()))
    tasks = random_tasks(W)

    plain_iteration(plain_model, plain_optimizer, tasks, W)   # warm-up
    meta_iteration(maml, tasks, W["steps"])
    ratios = []
    for _ in range(args.pairs):
        start = time.perf_counter()
        plain_iteration(plain_model, plain_optimizer, tasks, W)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        meta_iteration(maml, tasks, W["steps"])
        ratios.append((time.perf_counter() - start) / plain)
    print(f"{args.workload} first order, fast kernels {args.fast_kernels}, meta-batch {W['meta_batch']}: "
          f"paddlefsl / plain Paddle per meta-iteration, median of {args.pairs} pairs "
          f"{statistics.median(ratios):.3f} (pairs {' '.join(f'{r:.3f}' for r in ratios)})")
    return ratios


if __name__ == "__main__":
    main()
