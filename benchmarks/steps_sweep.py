"""Time and peak memory of one W2 meta-iteration against the number of inner steps, for each way of back-propagating.

    OMP_NUM_THREADS=2 python benchmarks/steps_sweep.py --steps 1 2 5 10 20 --out benchmarks/results/steps_sweep

Modes (all second order, W2 from the shared ``workload.py``: miniImageNet 5-way 1-shot, Conv4-32 with BN and
max-pool, meta-batch 4, 84x84 images, random data of those shapes):

* ``stored``: plain MAML, every inner step's graph kept until the meta-backward.
* ``recomputed``: ``MAML(..., recompute=1)``: inner steps replayed during the meta-backward.
* ``truncated``: ``MAML(..., truncate=1)``: only the last inner step second order (an approximation).
* ``implicit``: ``IMAML`` (proximal inner loop, meta-gradient by conjugate gradient).
* ``innerloop_stored`` and ``innerloop_recomputed`` (not in the default sweep): the same inner loop written with
  ``innerloop_ctx`` and SGD, without and with ``recompute=1``.

Each configuration runs in a fresh Python process (so its peak resident memory, ``ru_maxrss``, is its own):
``--warmup`` untimed meta-iterations (default 0: on a slow shared machine the first iteration's one-time costs are
small against its minutes), then ``--iterations`` timed ones. The process also reports its resident memory just
before the first meta-iteration (model, data and Paddle loaded), so ``peak - base`` is what the meta-iterations
added.
Writes ``OUT.json`` and ``OUT.png`` (time and peak memory against steps).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

MODES = ("stored", "recomputed", "truncated", "implicit", "innerloop_stored", "innerloop_recomputed")
DEFAULT_MODES = MODES[:4]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(mode: str, steps: int, bench_dir: str, meta_batch: int | None = None):
    """The W2 model, learner and random tasks for one configuration; returns ``meta_iteration()``."""
    import paddle
    import paddle.nn.functional as F
    from paddle import nn

    from paddlefsl.metaopt import IMAML, MAML, innerloop_ctx

    spec = importlib.util.spec_from_file_location("workload", os.path.join(bench_dir, "workload.py"))
    workload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workload)
    W = workload.WORKLOADS["W2"]
    paddle.seed(0)
    c_in, size, _ = W["img"]
    layers = []
    for i in range(4):
        layers += [nn.Conv2D(c_in if i == 0 else W["channels"], W["channels"], 3, padding=1),
                   nn.BatchNorm2D(W["channels"]), nn.ReLU(), nn.MaxPool2D(2)]
        size //= 2
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(W["channels"] * size * size, W["ways"]))
    optimizer = paddle.optimizer.Adam(1e-3, parameters=model.parameters())
    n_s, n_q = W["ways"] * W["shots"], W["ways"] * W["query"]
    tasks = [(paddle.randn([n_s, *W["img"]]), paddle.arange(W["ways"]).repeat_interleave(W["shots"]),
              paddle.randn([n_q, *W["img"]]), paddle.arange(W["ways"]).repeat_interleave(W["query"]))
             for _ in range(meta_batch or W["meta_batch"])]
    if mode.startswith("innerloop"):
        inner = paddle.optimizer.SGD(W["inner_lr"], parameters=model.parameters())
        recompute = dict(recompute=1) if mode == "innerloop_recomputed" else {}

        def loop_iteration():
            losses = []
            for xs, ys, xq, yq in tasks:
                with innerloop_ctx(model, inner, copy_initial_weights=False, inner_steps=steps,
                                   **recompute) as (fmodel, diffopt):
                    for _ in range(steps):
                        if recompute:
                            diffopt.step(lambda f: F.cross_entropy(f(xs), ys))
                        else:
                            diffopt.step(F.cross_entropy(fmodel(xs), ys))
                    losses.append(F.cross_entropy(fmodel(xq), yq))
            paddle.stack(losses).mean().backward()
            optimizer.step()
            optimizer.clear_grad()

        return loop_iteration
    if mode == "implicit":
        learner = IMAML(model, W["inner_lr"], inner_steps=steps, lam=1.0, cg_steps=5, cg_tol=None,
                        meta_optimizer=optimizer)
    else:
        options = {"recomputed": dict(recompute=1), "truncated": dict(truncate=1), "stored": {}}[mode]
        learner = MAML(model, W["inner_lr"], inner_steps=steps, meta_optimizer=optimizer, **options)

    def meta_iteration():
        losses = []
        for xs, ys, xq, yq in tasks:
            task = learner.clone()
            if mode == "implicit":
                task.adapt(lambda l: F.cross_entropy(l(xs), ys))
            else:
                for _ in range(steps):
                    task.adapt(lambda l: F.cross_entropy(l(xs), ys))
            losses.append(F.cross_entropy(task(xq), yq))
        learner.step(paddle.stack(losses).mean())

    return meta_iteration


def interleaved(steps: int, modes: list[str], rounds: int, meta_batch: int | None, bench_dir: str) -> dict:
    """Time the modes side by side in one process, one meta-iteration of each in turn, ``rounds`` times (after one
    untimed round): ratios to ``stored`` that a drifting machine speed moves much less than separate runs."""
    runs = {mode: build(mode, steps, bench_dir, meta_batch) for mode in modes}
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for r in range(rounds + 1):
        for mode, run in runs.items():
            start = time.perf_counter()
            run()
            if r:
                times[mode].append(time.perf_counter() - start)
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    ratios = {mode: medians[mode] / medians["stored"] for mode in modes} if "stored" in medians else {}
    return dict(steps=steps, meta_batch=meta_batch, rounds=rounds, times=times, median_seconds=medians,
                ratio_to_stored=ratios, threads=os.environ.get("OMP_NUM_THREADS", "default"))


def child(mode: str, steps: int, iterations: int, warmup: int, bench_dir: str, meta_batch: int | None = None) -> dict:
    """Run one configuration in this process and return its figures."""
    import resource

    meta_iteration = build(mode, steps, bench_dir, meta_batch)
    base = _rss_mib()
    times = []
    for i in range(warmup + iterations):
        start = time.perf_counter()
        meta_iteration()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(mode=mode, steps=steps, meta_batch=meta_batch, seconds=statistics.median(times), times=times,
                peak_mib=peak,
                base_mib=base, added_mib=peak - base, threads=os.environ.get("OMP_NUM_THREADS", "default"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 5, 10, 20])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(DEFAULT_MODES))
    parser.add_argument("--iterations", type=int, default=1, help="timed meta-iterations per configuration")
    parser.add_argument("--warmup", type=int, default=0, help="untimed meta-iterations before them")
    parser.add_argument("--bench-dir", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "steps_sweep"))
    parser.add_argument("--child", nargs=2, metavar=("MODE", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--interleave", type=int, metavar="STEPS",
                        help="instead of the sweep: time the modes side by side in one process at STEPS inner steps "
                             "(--iterations rounds, --meta-batch tasks) and write OUT_time.json")
    parser.add_argument("--meta-batch", type=int, default=None, help="tasks per meta-batch (default W2's 4)")
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.bench_dir, "workload.py")):
        parser.error(f"no workload.py in --bench-dir {args.bench_dir}")
    if any(s < 1 for s in args.steps) or args.iterations < 1 or args.warmup < 0:
        parser.error("--steps and --iterations must be positive integers, --warmup a non-negative one")
    if args.meta_batch is not None and args.meta_batch < 1:
        parser.error(f"--meta-batch must be a positive integer, got {args.meta_batch}")
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.iterations, args.warmup, args.bench_dir,
                               args.meta_batch)))
        return
    if args.interleave is not None:
        if args.interleave < 1:
            parser.error("--interleave must be a positive integer")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        result = interleaved(args.interleave, args.modes, args.iterations, args.meta_batch, args.bench_dir)
        with open(args.out + "_time.json", "w") as f:
            json.dump(result, f, indent=1)
        for mode, seconds in result["median_seconds"].items():
            print(f"{mode:>10} {args.interleave:>3} steps: {seconds:8.2f} s/meta-iter "
                  f"({result['ratio_to_stored'].get(mode, float('nan')):.2f}x stored)")
        return
    results = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    for steps, mode in _order(args.steps, args.modes):
        command = [sys.executable, os.path.abspath(__file__), "--child", mode, str(steps), "--iterations",
                   str(args.iterations), "--warmup", str(args.warmup), "--bench-dir", args.bench_dir]
        if args.meta_batch is not None:
            command += ["--meta-batch", str(args.meta_batch)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode} with {steps} steps failed:\n{done.stderr[-3000:]}")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(row)
        print(f"{mode:>10} {steps:>3} steps: {row['seconds']:8.2f} s/meta-iter  peak {row['peak_mib']:7.0f} MiB "
              f"(+{row['added_mib']:.0f} over {row['base_mib']:.0f} before the first iteration)", flush=True)
        with open(args.out + ".json", "w") as f:   # after each configuration, so a cut-short sweep keeps its rows
            json.dump(dict(workload="W2", date=time.strftime("%Y-%m-%d", time.gmtime()), results=results), f,
                      indent=1)
    plot(results, args.out + ".png")
    print(table(results))


def _order(steps: list[int], modes: list[str]) -> list[tuple[int, str]]:
    """Smallest and largest step counts first (the memory ratio needs those), then the rest."""
    ends = sorted({min(steps), max(steps)})
    return [(s, m) for s in ends for m in modes] + [(s, m) for s in steps if s not in ends for m in modes]


def table(results: list[dict]) -> str:
    """A Markdown table: one row per mode, time and peak memory per step count."""
    steps = sorted({r["steps"] for r in results})
    modes = [m for m in MODES if any(r["mode"] == m for r in results)]
    by = {(r["mode"], r["steps"]): r for r in results}
    head = "| mode | " + " | ".join(f"{s} steps: s / peak MiB (+added)" for s in steps) + " |"
    lines = [head, "|---" * (len(steps) + 1) + "|"]
    for m in modes:
        cells = []
        for s in steps:
            r = by.get((m, s))
            cells.append("" if r is None else f"{r['seconds']:.1f} / {r['peak_mib']:.0f} (+{r['added_mib']:.0f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        rows = sorted((r for r in results if r["mode"] == mode), key=lambda r: r["steps"])
        if not rows:
            continue
        xs = [r["steps"] for r in rows]
        ax_t.plot(xs, [r["seconds"] for r in rows], marker="o", label=mode)
        ax_m.plot(xs, [r["peak_mib"] for r in rows], marker="o", label=mode)
    ax_t.set(xlabel="inner steps", ylabel="seconds per meta-iteration", title="W2 time")
    ax_m.set(xlabel="inner steps", ylabel="peak resident memory (MiB)", title="W2 peak memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
