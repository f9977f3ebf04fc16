"""The command-line contract and meta-training loop shared by examples/omniglot.py and examples/miniimagenet.py.

Each script builds its datasets and backbone, then calls `run`. Data, model and learner meet only here and in
those scripts; ``paddlefsl.metaopt`` knows nothing about files or loops.

Under ``python -m paddle.distributed.launch --nproc_per_node N`` (or ``paddle.distributed.spawn``) every process
draws the same meta-batches and adapts its shard of each; ``learner.step(loss, num_tasks=...)`` all-reduces the
meta-gradients, evaluation tasks are sharded and their accuracies gathered, and process 0 alone writes the metrics,
checkpoints and results (see docs/distributed.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from tqdm import tqdm

from paddlefsl.augment import RandomShift
from paddlefsl.episodes import EpisodeSampler, make_task, mean_confidence_interval, shard_range
from paddlefsl.metaopt import ANIL, IMAML, MAML, BaseLearner, distributed
from paddlefsl.training import (JSONLLogger, capture_rng_state, load_checkpoint, plot_learning_curve, read_jsonl,
                                save_checkpoint)

ALGORITHMS = ("maml", "fomaml", "anil", "imaml")

#: Options a resumed run may change: they decide what is evaluated and recorded, how long to go on and where the
#: files are, never what the meta-training so far meant. Every other option must match the checkpoint's run.
CHANGEABLE_ON_RESUME = ("iterations", "eval_tasks", "eval_at", "test_inner_steps", "checkpoint_every", "log_every",
                        "data_root", "download", "out", "resume", "batch_tasks")

# Paddle warns on every training-mode batch norm call from the first one on; the examples know, and the warning
# would print into the middle of the progress bar.
warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance",
                        category=UserWarning)


def int_list(text: str) -> list[int]:
    """Parse a comma-separated command-line value such as ``"500,1000"``."""
    return [int(i) for i in text.split(",") if i]


def parser(description: str, defaults: dict, algorithms: tuple = ALGORITHMS) -> argparse.ArgumentParser:
    """The shared command line; ``defaults`` sets each dataset's paper values, ``algorithms`` the --algorithm
    choices (a script may add its own, such as a non-meta-learned baseline)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--algorithm", choices=algorithms, default="maml")
    p.add_argument("--split", choices=("minimal", "standard"), default="minimal")
    p.add_argument("--data-root", required=True, help="folder holding the dataset files")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--query", type=int, default=defaults["query"], help="query examples per class")
    p.add_argument("--iterations", type=int, default=defaults["iterations"])
    p.add_argument("--meta-batch", type=int, default=defaults["meta_batch"])
    p.add_argument("--inner-steps", type=int, default=defaults["inner_steps"])
    p.add_argument("--test-inner-steps", type=int, default=defaults["test_inner_steps"])
    p.add_argument("--inner-lr", type=float, default=defaults["inner_lr"])
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--eval-tasks", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (metrics, checkpoints, results)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pkl")
    p.add_argument("--checkpoint-every", type=int, default=100, help="iterations between checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="iterations between metric records")
    p.add_argument("--eval-at", type=int_list, default=[],
                   help="comma-separated iterations at which to also evaluate on the test tasks (a test curve)")
    p.add_argument("--augment-shift", type=int, default=0,
                   help="shift each meta-training image by a random offset of up to this many pixels (0: off)")
    p.add_argument("--learn-inner-lr", choices=("per_layer", "per_step_per_layer"), default=None,
                   help="MAML++ learned inner rates (maml/fomaml only)")
    p.add_argument("--cosine-meta-lr", type=int, default=0, metavar="N",
                   help="anneal the meta learning rate along a cosine from --meta-lr to 1%% of it over the first N "
                        "iterations, then hold it (0: constant)")
    p.add_argument("--batch-tasks", action="store_true",
                   help="adapt each meta-batch's tasks in one batched task learner (learner.clone(tasks=T)): the same "
                        "meta-gradients as one clone per task, several times faster on many small tasks "
                        "(maml/fomaml only)")
    p.add_argument("--lam", type=float, default=2.0, help="iMAML's proximal strength lambda (imaml only)")
    p.add_argument("--cg-steps", type=int, default=5,
                   help="iMAML's conjugate-gradient iterations per meta-gradient (imaml only; the residual reached "
                        "is logged as cg_residual)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a clear message for arguments that cannot work."""
    minimum = dict.fromkeys(("ways", "shots", "query", "iterations", "meta_batch", "inner_steps", "test_inner_steps",
                             "eval_tasks", "checkpoint_every", "log_every"), 1)
    minimum.update(cosine_meta_lr=0, augment_shift=0)
    for name, least in minimum.items():
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if args.ways < 2:
        p.error("--ways must be at least 2")
    if not (args.inner_lr > 0 and args.meta_lr > 0):
        p.error("--inner-lr and --meta-lr must be positive")
    if getattr(args, "download", False):
        os.makedirs(args.data_root, exist_ok=True)
    elif not os.path.isdir(args.data_root):
        fetch = " (create it, or pass --download to have this script fetch the files into it)" \
            if "download" in args else ""
        p.error(f"--data-root {args.data_root!r} is not a folder{fetch}")
    if any(i < 1 or i > args.iterations for i in args.eval_at):
        p.error(f"--eval-at iterations must lie in 1..{args.iterations}, got {args.eval_at}")
    if args.batch_tasks and args.algorithm not in ("maml", "fomaml"):
        p.error(f"--batch-tasks applies to --algorithm maml or fomaml, not {args.algorithm}")
    if args.learn_inner_lr and args.algorithm in ("anil", "imaml"):
        p.error(f"--learn-inner-lr applies to --algorithm maml or fomaml, not {args.algorithm}")
    if not (args.lam > 0 and args.cg_steps >= 1):
        p.error(f"--lam must be positive and --cg-steps at least 1, got {args.lam} and {args.cg_steps}")
    if args.learn_inner_lr == "per_step_per_layer" and args.test_inner_steps > args.inner_steps:
        p.error(f"--learn-inner-lr per_step_per_layer learns --inner-steps={args.inner_steps} rates per layer, so "
                f"--test-inner-steps must not exceed it, got {args.test_inner_steps}")
    if args.resume:
        check_resume(p, args)


def run_config(args: argparse.Namespace) -> dict:
    """The options that define a run's meta-training (all but ``CHANGEABLE_ON_RESUME``), stored in its checkpoints."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in CHANGEABLE_ON_RESUME}


def config_differences(stored: dict, args: argparse.Namespace) -> list[str]:
    """One line per option whose value differs between a checkpoint's ``run_config`` and ``args``."""
    now = run_config(args)
    missing = object()
    lines = []
    for key in sorted(set(stored) | set(now)):
        before, after = stored.get(key, missing), now.get(key, missing)
        if before != after:
            show = (lambda v: "(not set)" if v is missing else repr(v))
            lines.append(f"  --{key.replace('_', '-')}: {show(before)} in the checkpoint, {show(after)} now")
    return lines


def check_resume(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a clear message unless ``OUT/checkpoint.pkl`` exists and was written with the same meta-training
    options as ``args`` (only those in ``CHANGEABLE_ON_RESUME`` may differ)."""
    path = os.path.join(args.out, "checkpoint.pkl")
    if not os.path.exists(path):
        p.error(f"--resume: no checkpoint at {path}")
    try:
        extra = load_checkpoint(path, restore_rng=False)["extra"] or {}
    except (ValueError, OSError, EOFError) as err:
        p.error(f"--resume: cannot read {path}: {err}")
    if "config" not in extra:
        print(f"note: {path} predates stored run settings, so they cannot be checked against these options; "
              f"resuming with them as given", file=sys.stderr)
        return
    differences = config_differences(extra["config"], args)
    if differences:
        changeable = ", ".join("--" + k.replace("_", "-") for k in CHANGEABLE_ON_RESUME if k != "resume")
        p.error(f"--resume: these options differ from the run in {path}:\n" + "\n".join(differences) +
                f"\nA resumed run must continue the same meta-training; only {changeable} may change. Pass the "
                f"checkpoint's values, or start a new run with another --out.")


def cosine_factor(iteration: int, horizon: int) -> float:
    """The meta learning rate's factor after ``iteration`` updates: a cosine from 1 to 0.01 over ``horizon``, then
    0.01. A function of the iteration alone, so a resumed run continues on the same curve."""
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(iteration, horizon) / horizon))


def add_head_init_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--head-init zero|random``, the choice `linear_head` takes (for the examples that build their head)."""
    parser.add_argument("--head-init", choices=("zero", "random"), default="zero",
                        help="meta-learners' linear head: zeros (default; episode labels are a random permutation, "
                             "so a random head only adds a bias the inner loop must undo) or PaddlePaddle's random "
                             "init")


def linear_head(in_features: int, ways: int, init: str = "zero") -> nn.Linear:
    """A ``ways``-way linear head, its weight and bias zeros (``init="zero"``) or Paddle's random init (``"random"``).

    Episode labels are a fresh permutation of the sampled classes, so a random initial head holds no information,
    only a per-task bias that the few inner steps must undo before they can fit the support set; from zeros, one
    inner step gives each class the (scaled) sum of its support features, a prototype (the "zeroing trick" of Kao et
    al., ICLR 2022; Ye and Chao's UNICORN-MAML, ICLR 2022, ties the initial class rows for the same reason).
    """
    head = nn.Linear(in_features, ways)
    if init == "zero":
        head.weight.set_value(paddle.zeros_like(head.weight))
        head.bias.set_value(paddle.zeros_like(head.bias))
    elif init != "random":
        raise ValueError(f"init must be 'zero' or 'random', got {init!r}")
    return head


def make_learner(args: argparse.Namespace, model: nn.Layer) -> BaseLearner:
    """The learner named by ``--algorithm`` (and ``--learn-inner-lr``) around ``model``, which has ``features`` and
    ``head``; it has no meta-optimizer yet."""
    if args.algorithm == "anil":
        return ANIL(model.features, model.head, args.inner_lr)
    if args.algorithm == "imaml":
        return IMAML(model, args.inner_lr, lam=args.lam, inner_steps=args.inner_steps, cg_steps=args.cg_steps,
                     cg_tol=None)
    return MAML(model, args.inner_lr, first_order=args.algorithm == "fomaml", learn_inner_lr=args.learn_inner_lr,
                inner_steps=args.inner_steps if args.learn_inner_lr == "per_step_per_layer" else None)


def adapt_and_predict(learner: BaseLearner, xs, ys, xq, steps: int, first_order: bool | None = None):
    """Clone, adapt ``steps`` times on the support set, return (task learner, query logits)."""
    task = learner.clone()
    if isinstance(learner, IMAML):
        task.adapt(lambda learner: F.cross_entropy(learner(xs), ys), steps=steps)
        return task, task(xq)
    for _ in range(steps):
        task.adapt(F.cross_entropy(task(xs), ys), first_order=first_order)
    return task, task(xq)


def meta_batch_loss(learner: BaseLearner, batch: list[tuple], steps: int, batched: bool) -> tuple:
    """The mean query loss of ``batch`` (tasks ``(xs, ys, xq, yq)``, each adapted ``steps`` times) and the sum of
    their query accuracies; ``(None, 0.0)`` for an empty batch. ``batched``: all tasks in one task learner
    (``learner.clone(tasks=len(batch))``), the same loss and meta-gradient."""
    if not batch:
        return None, 0.0
    if not batched:
        losses, correct = [], 0.0
        for xs, ys, xq, yq in batch:
            _, logits = adapt_and_predict(learner, xs, ys, xq, steps)
            losses.append(F.cross_entropy(logits, yq))
            correct += float((logits.argmax(axis=1) == yq).astype("float32").mean().item())
        return paddle.stack(losses).mean(), correct
    xs, ys, xq, yq = (paddle.stack([task[i] for task in batch]) for i in range(4))
    task = learner.clone(tasks=len(batch))
    for _ in range(steps):
        task.adapt(F.cross_entropy(task(xs), ys, reduction="none").mean(axis=1))
    logits = task(xq)
    correct = float((logits.argmax(axis=-1) == yq).astype("float32").mean(axis=1).numpy().astype("float64").sum())
    return F.cross_entropy(logits, yq), correct


def evaluate(learner: BaseLearner, args: argparse.Namespace, images, labels, tasks: int, seed: int,
             check: Callable[[], None] | None = None) -> tuple:
    """Mean accuracy and 95% CI over ``tasks`` test tasks, adapting ``--test-inner-steps`` times (first order);
    ``check()``, if given, is called before each task (``CtrlC.check``).

    With several processes each adapts its block of the tasks and the accuracies are gathered in task order."""
    sampler = EpisodeSampler(labels, args.ways, args.shots, args.query, seed=seed, num_tasks=tasks)
    mine = shard_range(tasks, distributed.rank(), distributed.world_size())
    accuracies = []
    bar = tqdm(sampler, total=tasks, desc="test tasks", leave=False, dynamic_ncols=True,
               disable=distributed.rank() != 0)
    for i, task in enumerate(bar):
        if check is not None:
            check()
        if i not in mine:
            continue
        xs, ys, xq, yq = make_task(images, labels, task, to_tensor=True)
        _, logits = adapt_and_predict(learner, xs, ys, xq, args.test_inner_steps, first_order=True)
        accuracies.append(float((logits.argmax(axis=1) == yq).astype("float32").mean().item()))
    return mean_confidence_interval(distributed.all_gather_floats(accuracies))


def test_record(learner: BaseLearner, args: argparse.Namespace, test,
                extra_eval: Callable[[BaseLearner], dict] | None, check: Callable[[], None] | None = None) -> dict:
    """Test accuracy and 95% CI over ``--eval-tasks`` tasks (always the same tasks), plus ``extra_eval``'s keys;
    ``check`` as in ``evaluate``, and once more after ``extra_eval``."""
    accuracy, ci95 = evaluate(learner, args, test.images, test.labels, args.eval_tasks, seed=args.seed + 1000,
                              check=check)
    record = {"test_accuracy": accuracy, "test_ci95": ci95}
    if extra_eval is not None:
        record.update(extra_eval(learner))
        if check is not None:
            check()
    return record


class CtrlC:
    """Inside this context the first Ctrl-C only asks to stop: the loops call ``check()`` at safe points (after a
    meta-update, between test tasks), which raises ``KeyboardInterrupt`` there. The signal cannot simply interrupt
    wherever it lands: inside a backward pass Paddle turns ``KeyboardInterrupt`` into an ``OSError`` with a long C++
    trace, and between two parameter updates it would leave the weights half-updated. A second Ctrl-C interrupts at
    once, without saving."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread():   # only the main thread may handle signals
            self._previous = signal.signal(signal.SIGINT, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)
        print("\nCtrl-C: stopping after the current step (press it again to quit at once, without saving)",
              file=sys.stderr, flush=True)

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if Ctrl-C was pressed."""
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def run(args: argparse.Namespace, model: nn.Layer, train, test,
        extra_eval: Callable[[BaseLearner], dict] | None = None) -> dict:
    """Meta-train ``model`` on ``train`` episodes, checkpointing and logging, then evaluate on ``test``.

    Started as one of several processes, it initialises the parallel environment and trains on its shard of each
    meta-batch; process 0 writes the outputs. Returns the results dict also written to ``OUT/results.json``. On
    Ctrl-C, finishes the current meta-iteration (or test task), saves a checkpoint, says how to resume, and exits
    with status 130.
    """
    rank, world = distributed.init_parallel()
    os.makedirs(args.out, exist_ok=True)
    paddle.seed(args.seed)
    np.random.seed(args.seed)
    learner = make_learner(args, model)
    schedule = paddle.optimizer.lr.LambdaDecay(args.meta_lr, lambda i: cosine_factor(i, args.cosine_meta_lr)) \
        if args.cosine_meta_lr else None
    optimizer = paddle.optimizer.Adam(args.meta_lr if schedule is None else schedule,
                                      parameters=learner.parameters())
    learner.meta_optimizer = optimizer
    sampler = EpisodeSampler(train.labels, args.ways, args.shots, args.query, seed=args.seed)
    shift = RandomShift(args.augment_shift, seed=args.seed + 1)
    checkpoint = os.path.join(args.out, "checkpoint.pkl")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start_iteration, seconds = 0, 0.0
    if args.resume:
        state = load_checkpoint(checkpoint, learner, optimizer)
        start_iteration, seconds = state["step"], state["extra"]["seconds"]
        sampler.set_state(state["extra"]["sampler"])
        if "augment" in state["extra"]:
            shift.set_state(state["extra"]["augment"])
        kept = [r for r in read_jsonl(metrics_path) if r["step"] <= start_iteration] \
            if os.path.exists(metrics_path) else []
        if rank == 0:
            with open(metrics_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    distributed.broadcast_parameters(learner)

    logger = JSONLLogger(metrics_path) if rank == 0 else None
    mine = shard_range(args.meta_batch, rank, world)
    support, query = args.ways * args.shots, args.ways * args.query
    with CtrlC() as ctrl_c:

        def test_at(iteration: int) -> None:
            record = test_record(learner, args, test, extra_eval, ctrl_c.check)
            if rank == 0:
                logger.log(step=iteration, **record)
                tqdm.write(f"iteration {iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()))

        def snapshot(iteration: int, elapsed: float) -> dict:
            """What a checkpoint at ``iteration`` holds besides the weights."""
            return dict(step=iteration, rng_state=capture_rng_state(),
                        extra={"sampler": sampler.get_state(), "augment": shift.get_state(), "seconds": elapsed,
                               "config": run_config(args)})

        last = snapshot(start_iteration, seconds)
        bar = tqdm(range(start_iteration + 1, args.iterations + 1), initial=start_iteration, total=args.iterations,
                   desc=f"{args.algorithm} {args.ways}-way {args.shots}-shot", dynamic_ncols=True,
                   disable=rank != 0)
        tic = time.time()
        try:
            if args.resume and start_iteration in args.eval_at and start_iteration != args.iterations \
                    and not any(r["step"] == start_iteration and "test_accuracy" in r for r in kept):
                test_at(start_iteration)          # the run was interrupted during this test evaluation
                last = snapshot(start_iteration, seconds)
            for iteration in bar:
                batch = []
                tasks = iter(sampler.sample_batch(args.meta_batch, rank, world))
                for i in range(args.meta_batch):
                    if i not in mine:  # another process's task: advance the augmentation stream as it does
                        if args.augment_shift:
                            shift.skip(support)
                            shift.skip(query)
                        continue
                    xs, ys, xq, yq = make_task(train.images, train.labels, next(tasks))
                    if args.augment_shift:  # images only; token ids and features go through unchanged
                        xs, xq = shift(xs), shift(xq)
                    batch.append(tuple(paddle.to_tensor(a) for a in (xs, ys, xq, yq)))
                loss, correct = meta_batch_loss(learner, batch, args.inner_steps, args.batch_tasks)
                learner.step(loss, num_tasks=len(batch))
                if schedule is not None:
                    schedule.step()
                loss_sum, correct = distributed.all_reduce_sum(
                    [0.0 if loss is None else loss.item() * len(batch), correct])
                mean_loss, accuracy = loss_sum / args.meta_batch, correct / args.meta_batch
                bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{accuracy:.3f}")
                if rank == 0 and (iteration % args.log_every == 0 or iteration == args.iterations):
                    extra = {"cg_residual": max(r.residual for r in learner.cg_reports),
                             "cg_stopped": sum(bool(r.stopped) for r in learner.cg_reports)} \
                        if isinstance(learner, IMAML) and learner.cg_reports else {}
                    logger.log(step=iteration, loss=mean_loss, accuracy=accuracy, **extra)
                last = snapshot(iteration, seconds + time.time() - tic)
                ctrl_c.check()
                if iteration in args.eval_at and iteration != args.iterations:
                    pause = time.time()
                    test_at(iteration)
                    tic += time.time() - pause
                    last = snapshot(iteration, seconds + time.time() - tic)
                if rank == 0 and (iteration % args.checkpoint_every == 0 or iteration == args.iterations):
                    save_checkpoint(checkpoint, learner, optimizer, **last)
        except KeyboardInterrupt:
            bar.close()
            if logger is not None:
                logger.close()
            if rank == 0:
                save_checkpoint(checkpoint, learner, optimizer, **last)
                print(f"interrupted: saved the run at iteration {last['step']} of {args.iterations} to "
                      f"{checkpoint}. To continue, run the same command with --resume.", file=sys.stderr)
            raise SystemExit(130)
        bar.close()
        if logger is not None:
            logger.close()
        seconds += time.time() - tic

        try:
            final = test_record(learner, args, test, extra_eval, ctrl_c.check)
        except KeyboardInterrupt:
            if rank == 0:
                print(f"interrupted during the final evaluation; meta-training is complete and saved in "
                      f"{checkpoint}. To evaluate, run the same command with --resume.", file=sys.stderr)
            raise SystemExit(130)
    if rank != 0:
        return dict(final)
    records = read_jsonl(metrics_path) + [{"step": args.iterations, **final}]
    steps = f"{args.inner_steps} inner step{'s' if args.inner_steps > 1 else ''}"
    plot_learning_curve(records, os.path.join(args.out, "learning_curve.png"),
                        keys=["loss", "accuracy", "test_accuracy"], smoothing={"loss": 5, "accuracy": 5},
                        title=f"{args.algorithm} {args.ways}-way {args.shots}-shot", xlabel="meta-train iteration",
                        labels={"loss": f"meta-train loss: query cross-entropy, meta-batch of {args.meta_batch} "
                                         f"tasks, {steps}",
                                "accuracy": f"meta-train accuracy: query accuracy of the same tasks, {steps}",
                                "test_accuracy": f"test accuracy: {args.eval_tasks} test tasks, "
                                                 f"{args.test_inner_steps} adaptation steps"})
    results = dict(final)
    results.update(iterations=args.iterations, seconds=round(seconds, 1),
                   seconds_per_iteration=round(seconds / args.iterations, 3), config=vars(args))
    if args.eval_at:
        results["test_curve"] = [r for r in records if "test_accuracy" in r]
    accuracy, ci95 = results["test_accuracy"], results["test_ci95"]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"test accuracy {100 * accuracy:.2f} +- {100 * ci95:.2f} % over {args.eval_tasks} tasks "
          f"({args.iterations} iterations, {seconds:.0f} s)")
    return results
