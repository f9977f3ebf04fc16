"""Speed suite: paddlefsl's MAML (second and first order) and ANIL on W1, W2 and W2 with 10 inner steps.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/suite.py --iterations 3 --json speed.json --png speed.png
    ... --peers --rounds 3  # also the PyTorch peers and plain Paddle, interleaved, in the same run

Every configuration runs in its own process, so each gets a fresh allocator and its own peak RSS; with ``--rounds R``
the whole set of configurations runs R times in turn (A B C A B C ...), so that a change in the machine's load hits
every configuration alike, and each figure is the median over the rounds. The table gives the median seconds per
meta-iteration (after one warm-up), tasks per second and the peak RSS. With ``--peers`` it adds learn2learn (second
and first order), higher and TorchOpt (second order), plain Paddle's first order (``paddle_raw.py``) and our first
order with the fast kernels and the reuse of freed memory switched off (``PADDLEFSL_FAST_KERNELS=0``,
``PADDLEFSL_REUSE_MEMORY=0``), and the ratios: learn2learn's time divided by ours (above 1: we are faster), our
first order against plain Paddle's, and for W2 the share of the machine's peak (``W2_PEAK_S``). ``--same-allocator``
adds learn2learn and plain Paddle with glibc's malloc thresholds raised as paddlefsl raises them for itself, and
our MAML with that reuse off, so both sides can be compared on either allocator setting. The workload shapes come from ``workload.py`` in ``--bench-dir`` (the same file the peers
read). Only ratios taken in one run mean something on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_dir import load_workloads as load_shared_workloads  # noqa: E402  (standard library only)

ALGORITHMS = {"maml2": "MAML 2nd", "maml1": "MAML 1st", "anil": "ANIL 2nd", "maml2b": "MAML 2nd, tasks batched",
              "maml1b": "MAML 1st, tasks batched"}
"""``maml2b``/``maml1b``: the same MAML with the meta-batch's tasks in one task learner (``clone(tasks=T)``)."""
PEERS = (("l2l", "second", "learn2learn MAML 2nd"), ("l2l", "first", "learn2learn MAML 1st"),
         ("higher", "second", "higher MAML 2nd"), ("torchopt", "second", "TorchOpt MAML 2nd"))
# Issue 19's estimate for W2: about 88 GFLOP per second-order meta-iteration, about 0.55 s at this machine's peak.
W2_PEAK_S = {"W2": 0.55}
FAST_OFF = "paddlefsl MAML 1st, fast kernels off"
# glibc thresholds as paddlefsl sets them (paddlefsl.metaopt.kernels.allocator), for the --same-allocator rows.
TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
TUNED = ", malloc tuned"
REUSE_OFF = ", memory reuse off"
WORKLOADS = ("W1", "W2", "W2x10")
_HERE = os.path.dirname(os.path.abspath(__file__))


def load_workloads(bench_dir: str) -> dict:
    """The shared workload table plus ``W2x10`` (W2 with 10 inner steps)."""
    try:
        table = dict(load_shared_workloads(bench_dir))
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    table["W2x10"] = dict(table["W2"], steps=10)
    return table


def worker(W: dict, algorithm: str, iterations: int) -> dict:
    """Time ``iterations`` meta-iterations (after one warm-up) of paddlefsl in this process."""
    import paddle
    import paddle.nn.functional as F
    from paddle import nn

    from paddlefsl.metaopt import ANIL, MAML
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peer_model import conv4, meta_iteration, random_tasks

    paddle.seed(0)
    features, head = conv4(W)
    optimizer = paddle.optimizer.Adam(1e-3, parameters=list(features.parameters()) + list(head.parameters()))
    if algorithm == "anil":
        learner = ANIL(features, head, W["inner_lr"], meta_optimizer=optimizer)
    else:
        learner = MAML(nn.Sequential(features, head), W["inner_lr"], first_order=algorithm.startswith("maml1"),
                       meta_optimizer=optimizer)
    tasks = random_tasks(W)
    xs, ys, xq, yq = (paddle.stack([task[i] for task in tasks]) for i in range(4))

    def batched_meta_iteration():
        task = learner.clone(tasks=len(tasks))
        for _ in range(W["steps"]):
            task.adapt(F.cross_entropy(task(xs), ys, reduction="none").mean(axis=1))
        learner.step(F.cross_entropy(task(xq), yq))

    def loop_meta_iteration():
        meta_iteration(learner, tasks, W["steps"])

    run = batched_meta_iteration if algorithm.endswith("b") else loop_meta_iteration
    run()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return {"times": times}


def _run(command: list[str], env: dict, cwd: str | None = None) -> tuple[str, float]:
    """Run ``command``; return its standard output and the peak RSS of that process in MiB."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text = out.read().decode()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}: "
                               f"{err.read().decode()[-2000:]}")
    return text, usage.ru_maxrss / 1024.0


def measure_ours(workload: str, algorithm: str, iterations: int, bench_dir: str, meta_batch: int | None,
                 env: dict) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", workload, algorithm,
               "--iterations", str(iterations), "--bench-dir", bench_dir]
    if meta_batch is not None:
        command += ["--meta-batch", str(meta_batch)]
    text, peak = _run(command, env)
    result = json.loads(text.strip().splitlines()[-1])
    return {"median_s": statistics.median(result["times"]), "times_s": result["times"], "peak_rss_mib": peak}


def measure_peer(script: str, args: list[str], python: str, bench_dir: str, workloads: dict, env: dict) -> dict:
    """Run a peer script from ``bench_dir`` in a copy whose ``workload.py`` also knows ``W2x10``."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(bench_dir, script), tmp)
        with open(os.path.join(tmp, "workload.py"), "w") as f:
            f.write(f"WORKLOADS = {workloads!r}\n")
        text, peak = _run([python, os.path.join(tmp, script)] + args, env, cwd=tmp)
    match = re.search(r"median ([0-9.]+) s", text)
    if match is None:
        match = re.search(r"([0-9]+\.[0-9]+)", text.strip().splitlines()[-1])
    if match is None:
        raise RuntimeError(f"cannot read a time from {script} {args}: {text[-500:]}")
    return {"median_s": float(match.group(1)), "peak_rss_mib": peak}


def table(results: list[dict]) -> str:
    """A Markdown table of the results (one row per workload and implementation)."""
    rows = ["| workload | implementation | s / meta-iteration | tasks / s | peak RSS MiB | learn2learn s / ours | "
            "notes |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{r['l2l_over_ours']:.2f}" if r.get("l2l_over_ours") else ""
        notes = []
        if r.get("over_plain_paddle") is not None:
            notes.append(f"{100 * (r['over_plain_paddle'] - 1):+.0f}% against plain Paddle 1st")
        if r.get("peak_fraction") is not None:
            notes.append(f"{100 * r['peak_fraction']:.0f}% of peak")
        rows.append(f"| {r['workload']} | {r['implementation']} | {r['median_s']:.3f} | {r['tasks_per_s']:.2f} | "
                    f"{r['peak_rss_mib']:.0f} | {ratio} | {'; '.join(notes)} |")
    return "\n".join(rows)


def ratios(results: list[dict]) -> None:
    """Add ``l2l_over_ours``, ``over_plain_paddle`` and ``peak_fraction`` to the rows of ``results`` (in place)."""
    def find(w: str, name: str) -> dict | None:
        return next((r for r in results if r["workload"] == w and r["implementation"] == name), None)

    for r in results:
        w, name = r["workload"], r["implementation"]
        for order in ("2nd", "1st"):
            # ours (reuse on) against learn2learn as it comes, and against learn2learn on the same allocator setting
            for ours, peer in ((f"paddlefsl MAML {order}", f"learn2learn MAML {order}"),
                               (f"paddlefsl MAML {order}, tasks batched", f"learn2learn MAML {order}"),
                               (f"paddlefsl MAML {order}{REUSE_OFF}", f"learn2learn MAML {order}")):
                if name == ours and find(w, peer):
                    r["l2l_over_ours"] = find(w, peer)["median_s"] / r["median_s"]
            if name == f"learn2learn MAML {order}{TUNED}" and find(w, f"paddlefsl MAML {order}"):
                r["l2l_over_ours"] = r["median_s"] / find(w, f"paddlefsl MAML {order}")["median_s"]
        if name in ("paddlefsl MAML 1st", FAST_OFF) and find(w, "plain Paddle 1st"):
            r["over_plain_paddle"] = r["median_s"] / find(w, "plain Paddle 1st")["median_s"]
        if w in W2_PEAK_S and name.endswith("2nd"):
            r["peak_fraction"] = W2_PEAK_S[w] / r["median_s"]


def chart(results: list[dict], path: str) -> None:
    """A grouped bar chart of seconds per meta-iteration (one group per workload)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in results))
    names = list(dict.fromkeys(r["implementation"] for r in results))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(2.5 + 1.8 * len(workloads), 4))
    for i, name in enumerate(names):
        xs, ys = [], []
        for j, w in enumerate(workloads):
            for r in results:
                if r["workload"] == w and r["implementation"] == name:
                    xs.append(j + i * width)
                    ys.append(r["median_s"])
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(workloads))], workloads)
    ax.set_ylabel("seconds per meta-iteration (median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--algorithms", nargs="+", choices=list(ALGORITHMS), default=list(ALGORITHMS))
    parser.add_argument("--iterations", type=int, default=3, help="timed meta-iterations after one warm-up")
    parser.add_argument("--meta-batch", type=int, default=None, help="override the workloads' meta-batch size")
    parser.add_argument("--bench-dir", default=os.path.join(_HERE, "..", "..", "shared", "bench"))
    parser.add_argument("--peers", action="store_true",
                        help="also time learn2learn, higher, TorchOpt, plain Paddle and our first order without the "
                             "fast kernels")
    parser.add_argument("--same-allocator", action="store_true",
                        help="with --peers: also the peers with glibc's thresholds raised, and ours without")
    parser.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, in turn")
    parser.add_argument("--peer-python", default="/tmp/peers/bin/python",
                        help="a Python with torch and learn2learn (see the bench README)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--png", help="draw the bar chart here")
    parser.add_argument("--worker", nargs=2, metavar=("WORKLOAD", "ALGORITHM"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    workloads = load_workloads(os.path.abspath(args.bench_dir))
    if args.meta_batch is not None:
        workloads = {k: dict(v, meta_batch=args.meta_batch) for k, v in workloads.items()}
    if args.worker:
        print(json.dumps(worker(workloads[args.worker[0]], args.worker[1], args.iterations)))
        return []
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(_HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    if args.peers and not os.path.exists(args.peer_python):
        parser.error(f"--peers: no Python at {args.peer_python}; install the peers as the bench README says or "
                     "pass --peer-python")
    bench_dir = os.path.abspath(args.bench_dir)
    jobs = []  # (workload, implementation, function returning {"median_s", "peak_rss_mib", ...})
    for w in args.workloads:
        for algorithm in args.algorithms:
            jobs.append((w, f"paddlefsl {ALGORITHMS[algorithm]}",
                         lambda w=w, a=algorithm: measure_ours(w, a, args.iterations, bench_dir, args.meta_batch, env)))
        if args.peers:
            for lib, order, label in PEERS:
                jobs.append((w, label, lambda w=w, lib=lib, order=order: measure_peer(
                    "peer_torch.py", [w, lib, order, str(args.iterations)], args.peer_python, bench_dir, workloads,
                    env)))
            jobs.append((w, "plain Paddle 1st", lambda w=w: measure_peer(
                "paddle_raw.py", [w, str(args.iterations)], sys.executable, bench_dir, workloads, env)))
            jobs.append((w, FAST_OFF, lambda w=w: measure_ours(w, "maml1", args.iterations, bench_dir, args.meta_batch,
                                                               dict(env, PADDLEFSL_FAST_KERNELS="0",
                                                                    PADDLEFSL_REUSE_MEMORY="0"))))
        if args.peers and args.same_allocator:
            tuned = dict(env, **TUNED_MALLOC)
            for lib, order, label in PEERS[:2]:
                jobs.append((w, label + TUNED, lambda w=w, lib=lib, order=order: measure_peer(
                    "peer_torch.py", [w, lib, order, str(args.iterations)], args.peer_python, bench_dir, workloads,
                    tuned)))
            jobs.append((w, "plain Paddle 1st" + TUNED, lambda w=w: measure_peer(
                "paddle_raw.py", [w, str(args.iterations)], sys.executable, bench_dir, workloads, tuned)))
            for algorithm in ("maml2", "maml1"):
                jobs.append((w, f"paddlefsl {ALGORITHMS[algorithm]}{REUSE_OFF}", lambda w=w, a=algorithm: measure_ours(
                    w, a, args.iterations, bench_dir, args.meta_batch, dict(env, PADDLEFSL_REUSE_MEMORY="0"))))
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for w, name, run in jobs:
            runs.setdefault((w, name), []).append(run())
    results = []
    for (w, name), rs in runs.items():
        row = {"workload": w, "implementation": name, "median_s": statistics.median(r["median_s"] for r in rs),
               "round_medians_s": [r["median_s"] for r in rs], "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
               "tasks_per_s": workloads[w]["meta_batch"] / statistics.median(r["median_s"] for r in rs)}
        if len(rs) == 1 and "times_s" in rs[0]:
            row["times_s"] = rs[0]["times_s"]
        results.append(row)
    ratios(results)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": os.environ.get("OMP_NUM_THREADS"), "results": results}, f, indent=1)
    if args.png:
        chart(results, args.png)
    return results


if __name__ == "__main__":
    main()
