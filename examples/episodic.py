"""The command-line contract and meta-training loop shared by examples/omniglot.py and examples/miniimagenet.py.

Each script builds its datasets and backbone, then calls :func:`run`. Data, model and learner meet only here and in
those scripts; ``paddlefsl.metaopt`` knows nothing about files or loops.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from tqdm import tqdm

from paddlefsl.augment import RandomShift
from paddlefsl.episodes import EpisodeSampler, make_task, mean_confidence_interval
from paddlefsl.metaopt import ANIL, MAML, BaseLearner
from paddlefsl.training import JSONLLogger, load_checkpoint, plot_learning_curve, read_jsonl, save_checkpoint

ALGORITHMS = ("maml", "fomaml", "anil")


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
    if not os.path.isdir(args.data_root):
        p.error(f"--data-root {args.data_root!r} is not a folder")
    if any(i < 1 or i > args.iterations for i in args.eval_at):
        p.error(f"--eval-at iterations must lie in 1..{args.iterations}, got {args.eval_at}")
    if args.learn_inner_lr and args.algorithm == "anil":
        p.error("--learn-inner-lr applies to --algorithm maml or fomaml, not anil")
    if args.learn_inner_lr == "per_step_per_layer" and args.test_inner_steps > args.inner_steps:
        p.error(f"--learn-inner-lr per_step_per_layer learns --inner-steps={args.inner_steps} rates per layer, so "
                f"--test-inner-steps must not exceed it, got {args.test_inner_steps}")
    if args.resume and not os.path.exists(os.path.join(args.out, "checkpoint.pkl")):
        p.error(f"--resume: no checkpoint at {os.path.join(args.out, 'checkpoint.pkl')}")


def cosine_factor(iteration: int, horizon: int) -> float:
    """The meta learning rate's factor after ``iteration`` updates: a cosine from 1 to 0.01 over ``horizon``, then
    0.01. A function of the iteration alone, so a resumed run continues on the same curve."""
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(iteration, horizon) / horizon))


def make_learner(args: argparse.Namespace, model: nn.Layer) -> BaseLearner:
    """The learner named by ``--algorithm`` (and ``--learn-inner-lr``) around ``model``, which has ``features`` and
    ``head``; it has no meta-optimizer yet."""
    if args.algorithm == "anil":
        return ANIL(model.features, model.head, args.inner_lr)
    return MAML(model, args.inner_lr, first_order=args.algorithm == "fomaml", learn_inner_lr=args.learn_inner_lr,
                inner_steps=args.inner_steps if args.learn_inner_lr == "per_step_per_layer" else None)


def adapt_and_predict(learner: BaseLearner, xs, ys, xq, steps: int, first_order: bool | None = None):
    """Clone, adapt ``steps`` times on the support set, return (task learner, query logits)."""
    task = learner.clone()
    for _ in range(steps):
        task.adapt(F.cross_entropy(task(xs), ys), first_order=first_order)
    return task, task(xq)


def evaluate(learner: BaseLearner, args: argparse.Namespace, images, labels, tasks: int, seed: int) -> tuple:
    """Mean accuracy and 95% CI over ``tasks`` test tasks, adapting ``--test-inner-steps`` times (first order)."""
    sampler = EpisodeSampler(labels, args.ways, args.shots, args.query, seed=seed, num_tasks=tasks)
    accuracies = []
    for task in sampler:
        xs, ys, xq, yq = make_task(images, labels, task, to_tensor=True)
        _, logits = adapt_and_predict(learner, xs, ys, xq, args.test_inner_steps, first_order=True)
        accuracies.append(float((logits.argmax(axis=1) == yq).astype("float32").mean().item()))
    return mean_confidence_interval(accuracies)


def test_record(learner: BaseLearner, args: argparse.Namespace, test,
                extra_eval: Callable[[BaseLearner], dict] | None) -> dict:
    """Test accuracy and 95% CI over ``--eval-tasks`` tasks (always the same tasks), plus ``extra_eval``'s keys."""
    accuracy, ci95 = evaluate(learner, args, test.images, test.labels, args.eval_tasks, seed=args.seed + 1000)
    record = {"test_accuracy": accuracy, "test_ci95": ci95}
    if extra_eval is not None:
        record.update(extra_eval(learner))
    return record


def run(args: argparse.Namespace, model: nn.Layer, train, test,
        extra_eval: Callable[[BaseLearner], dict] | None = None) -> dict:
    """Meta-train ``model`` on ``train`` episodes, checkpointing and logging, then evaluate on ``test``.

    Returns the results dict also written to ``OUT/results.json``.
    """
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
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    logger = JSONLLogger(metrics_path)
    bar = tqdm(range(start_iteration + 1, args.iterations + 1), initial=start_iteration, total=args.iterations,
               desc=f"{args.algorithm} {args.ways}-way {args.shots}-shot", dynamic_ncols=True)
    tic = time.time()
    for iteration in bar:
        losses, correct = [], 0.0
        for _ in range(args.meta_batch):
            xs, ys, xq, yq = make_task(train.images, train.labels, sampler.sample())
            if args.augment_shift:  # images only; token ids and features go through unchanged
                xs, xq = shift(xs), shift(xq)
            xs, ys, xq, yq = (paddle.to_tensor(a) for a in (xs, ys, xq, yq))
            _, logits = adapt_and_predict(learner, xs, ys, xq, args.inner_steps)
            losses.append(F.cross_entropy(logits, yq))
            correct += float((logits.argmax(axis=1) == yq).astype("float32").mean().item())
        loss = paddle.stack(losses).mean()
        learner.step(loss)
        if schedule is not None:
            schedule.step()
        accuracy = correct / args.meta_batch
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
        if iteration % args.log_every == 0 or iteration == args.iterations:
            logger.log(step=iteration, loss=float(loss.item()), accuracy=accuracy)
        if iteration in args.eval_at and iteration != args.iterations:
            pause = time.time()
            record = test_record(learner, args, test, extra_eval)
            logger.log(step=iteration, **record)
            bar.write(f"iteration {iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in record.items()))
            tic += time.time() - pause
        if iteration % args.checkpoint_every == 0 or iteration == args.iterations:
            save_checkpoint(checkpoint, learner, optimizer, step=iteration,
                            extra={"sampler": sampler.get_state(), "augment": shift.get_state(),
                                   "seconds": seconds + time.time() - tic})
    logger.close()
    seconds += time.time() - tic

    final = test_record(learner, args, test, extra_eval)
    records = read_jsonl(metrics_path) + [{"step": args.iterations, **final}]
    plot_learning_curve(records, os.path.join(args.out, "learning_curve.png"),
                        keys=["loss", "accuracy", "test_accuracy"], smoothing={"loss": 5, "accuracy": 5},
                        title=f"{args.algorithm} {args.ways}-way {args.shots}-shot")
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
