"""Meta-iterations per second of paddlefsl's MAML on W1 / W2 with 1 and with N processes (data-parallel over tasks).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/distributed.py W1 W2 --processes 1,2 --iterations 5 --rounds 2

Each configuration runs in fresh processes with one thread each (OMP_NUM_THREADS=1): 1 process as a plain
``python``, N processes under ``python -m paddle.distributed.launch --nproc_per_node N`` (gloo on CPU). Every process
adapts its shard of each meta-batch (``shard_range``) and ``learner.step(loss, num_tasks=...)`` all-reduces the
meta-gradients. Rank 0 times each meta-iteration (one warm-up first), in wall-clock and in its own CPU seconds; the
figures are medians (on a machine shared with other work, the CPU seconds show what each process computed, the wall
seconds also how much of the machine it got). ``--rounds`` repeats
the whole sweep, alternating the process counts, so they share the machine's conditions side by side.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def arguments(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="+", choices=("W1", "W2"))
    p.add_argument("--processes", default="1,2", help="comma-separated process counts")
    p.add_argument("--iterations", type=int, default=5, help="timed meta-iterations (after one warm-up)")
    p.add_argument("--rounds", type=int, default=1, help="repeat the sweep, alternating the process counts")
    p.add_argument("--order", choices=("first", "second"), default="second")
    p.add_argument("--bench-dir", default=os.path.join(HERE, "..", "..", "shared", "bench"))
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)  # internal: run one configuration
    return p.parse_args(argv)


def worker(args) -> None:
    """One process of one configuration: time meta-iterations on this rank's shard; rank 0 writes OUT."""
    import paddle
    import paddle.nn.functional as F
    from paddle import nn

    from paddlefsl.episodes import shard_range
    from paddlefsl.metaopt import MAML, distributed
    sys.path.insert(0, HERE)
    from peer_model import conv4, random_tasks

    rank, world = distributed.init_parallel()
    spec = importlib.util.spec_from_file_location("workload", os.path.join(args.bench_dir, "workload.py"))
    workload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(workload)
    W = workload.WORKLOADS[args.workloads[0]]
    paddle.seed(0)
    model = nn.Sequential(*conv4(W))
    maml = MAML(model, W["inner_lr"], first_order=args.order == "first",
                meta_optimizer=paddle.optimizer.Adam(1e-3, parameters=model.parameters()))
    tasks = random_tasks(W)
    mine = [tasks[i] for i in shard_range(len(tasks), rank, world)]

    def meta_iteration():
        losses = []
        for xs, ys, xq, yq in mine:
            task = maml.clone()
            for _ in range(W["steps"]):
                task.adapt(F.cross_entropy(task(xs), ys))
            losses.append(F.cross_entropy(task(xq), yq))
        maml.step(paddle.stack(losses).mean() if losses else None, num_tasks=len(losses))

    meta_iteration()
    times, cpu = [], []
    for _ in range(args.iterations):
        start, start_cpu = time.perf_counter(), time.process_time()
        meta_iteration()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    if rank == 0:
        with open(args.worker, "w") as f:
            json.dump({"times": times, "cpu": cpu, "world": world, "tasks_on_rank_0": len(mine)}, f)


def measure(args, workload: str, processes: int) -> dict:
    """Run one configuration in fresh processes; return rank 0's timings."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, ".."), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        script = [os.path.abspath(__file__), workload, "--iterations", str(args.iterations), "--order", args.order,
                  "--bench-dir", args.bench_dir, "--worker", out]
        launch = [] if processes == 1 else ["-m", "paddle.distributed.launch", "--nproc_per_node", str(processes),
                                            "--log_dir", os.path.join(tmp, "log")]
        done = subprocess.run([sys.executable, *launch, *script], env=env, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.exists(out):
            logs = "".join(open(os.path.join(tmp, "log", name)).read()[-2000:]
                           for name in sorted(os.listdir(os.path.join(tmp, "log")))) if processes > 1 else ""
            raise RuntimeError(f"{workload} on {processes} processes failed:\n{done.stderr[-3000:]}{logs}")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    args = arguments()
    if args.worker:
        worker(args)
        return
    counts = [int(n) for n in args.processes.split(",") if n]
    results: dict = {}
    cpu: dict = {}
    for round_ in range(args.rounds):
        for workload in args.workloads:
            for processes in (counts if round_ % 2 == 0 else counts[::-1]):
                record = measure(args, workload, processes)
                results.setdefault((workload, processes), []).extend(record["times"])
                cpu.setdefault((workload, processes), []).extend(record["cpu"])
                print(f"round {round_ + 1}: {workload} on {processes} processes: wall {record['times']}, "
                      f"rank-0 CPU {record['cpu']}", flush=True)
    print(f"{args.order} order, {args.iterations} timed meta-iterations x {args.rounds} rounds, 1 thread per process, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}")
    print("| workload | processes | s / meta-iteration (median) | meta-iterations / s | speed-up | "
          "rank-0 CPU s / meta-iteration |")
    print("|---|---|---|---|---|---|")
    for workload in args.workloads:
        base = statistics.median(results[(workload, counts[0])])
        for processes in counts:
            median = statistics.median(results[(workload, processes)])
            print(f"| {workload} | {processes} | {median:.3f} | {1 / median:.3f} | {base / median:.2f}x | "
                  f"{statistics.median(cpu[(workload, processes)]):.3f} |")


if __name__ == "__main__":
    main()
