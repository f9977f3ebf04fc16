"""The non-meta-learned baseline shared by examples/fewrel.py and examples/spoken_words.py.

Pre-train ``features`` and a head over all meta-train classes with plain minibatch cross-entropy, then, on each test
episode, fit a fresh ``ways``-way linear head on the support features (the features stay fixed) and score the query
set. The test episodes are the ones `episodic.evaluate` draws (same sampler, same seed), so the numbers sit side
by side with MAML / FOMAML / ANIL. Same outputs as `episodic.run`: progress bar, OUT/metrics.jsonl,
OUT/learning_curve.png, OUT/checkpoint.pkl (plain model keys, exact --resume) and OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn
from tqdm import tqdm

from paddlefsl.episodes import EpisodeSampler, make_task, mean_confidence_interval
from paddlefsl.training import JSONLLogger, load_checkpoint, plot_learning_curve, read_jsonl, save_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The baseline's own options (the shared ones, such as --iterations and --meta-lr, keep their meaning)."""
    p.add_argument("--batch-size", type=int, default=64, help="baseline: pre-training minibatch size")
    p.add_argument("--finetune-steps", type=int, default=100,
                   help="baseline: optimizer steps of the fresh head on each test support set")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="baseline: Adam rate of the fresh head")


def check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with a clear message for baseline options that cannot work."""
    for name in ("batch_size", "finetune_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.finetune_lr > 0:
        p.error(f"--finetune-lr must be positive, got {args.finetune_lr}")


class Classifier(nn.Layer):
    """``head(features(x))``: the pre-training model (its checkpoint keys are ``features.*`` and ``head.*``)."""

    def __init__(self, features: nn.Layer, head: nn.Layer) -> None:
        super().__init__()
        self.features, self.head = features, head

    def forward(self, x):
        return self.head(self.features(x))


def _features(features: nn.Layer, images, indices: np.ndarray, batch: int = 256) -> paddle.Tensor:
    out = []
    with paddle.no_grad():
        for start in range(0, len(indices), batch):
            out.append(features(paddle.to_tensor(np.asarray(images[indices[start:start + batch]]))))
    return paddle.concat(out)


def finetune_head(features: nn.Layer, xs, ys, xq, ways: int, steps: int, lr: float) -> paddle.Tensor:
    """Fit a fresh zero-initialised linear head on the support features; return the query logits."""
    was_training = features.training
    features.eval()
    try:
        with paddle.no_grad():
            fs, fq = features(xs), features(xq)
    finally:
        features.train(was_training)
    weight = paddle.zeros([fs.shape[1], ways], dtype=fs.dtype)
    bias = paddle.zeros([ways], dtype=fs.dtype)
    weight.stop_gradient = bias.stop_gradient = False
    optimizer = paddle.optimizer.Adam(lr, parameters=[weight, bias])
    for _ in range(steps):
        loss = F.cross_entropy(paddle.matmul(fs, weight) + bias, ys)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
    return paddle.matmul(fq, weight) + bias


def evaluate(features: nn.Layer, args: argparse.Namespace, images, labels, tasks: int, seed: int) -> tuple:
    """Mean accuracy and 95% CI of a fresh fine-tuned head over ``tasks`` test episodes (those of
    ``episodic.evaluate`` for the same seed)."""
    sampler = EpisodeSampler(labels, args.ways, args.shots, args.query, seed=seed, num_tasks=tasks)
    accuracies = []
    for task in sampler:
        xs, ys, xq, yq = make_task(images, labels, task, to_tensor=True)
        logits = finetune_head(features, xs, ys, xq, args.ways, args.finetune_steps, args.finetune_lr)
        accuracies.append(float((logits.argmax(axis=1) == yq).astype("float32").mean().item()))
    return mean_confidence_interval(accuracies)


def run(args: argparse.Namespace, features: nn.Layer, feature_dim: int, train, test,
        extra_eval: Callable[[nn.Layer], dict] | None = None) -> dict:
    """Pre-train ``features`` with a head over every class of ``train``, then evaluate on ``test`` episodes.

    ``train`` and ``test`` have ``images`` (indexable by an index array) and integer ``labels``; ``extra_eval``
    receives the features and returns more result keys. Returns the dict also written to ``OUT/results.json``.
    """
    os.makedirs(args.out, exist_ok=True)
    paddle.seed(args.seed)
    np.random.seed(args.seed)
    classes = np.unique(train.labels)
    remap = np.full(int(classes.max()) + 1, -1, dtype=np.int64)
    remap[classes] = np.arange(len(classes))
    model = Classifier(features, nn.Linear(feature_dim, len(classes)))
    optimizer = paddle.optimizer.Adam(args.meta_lr, parameters=model.parameters())
    rng = np.random.default_rng(args.seed)
    checkpoint = os.path.join(args.out, "checkpoint.pkl")
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    start_iteration, seconds = 0, 0.0
    if args.resume:
        state = load_checkpoint(checkpoint, model, optimizer)
        start_iteration, seconds = state["step"], state["extra"]["seconds"]
        rng.bit_generator.state = state["extra"]["batches"]
        kept = [r for r in read_jsonl(metrics_path) if r["step"] <= start_iteration] \
            if os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    logger = JSONLLogger(metrics_path)
    bar = tqdm(range(start_iteration + 1, args.iterations + 1), initial=start_iteration, total=args.iterations,
               desc=f"baseline pre-training on {len(classes)} classes", dynamic_ncols=True)
    tic = time.time()
    model.train()
    for iteration in bar:
        batch = rng.choice(len(train.labels), size=min(args.batch_size, len(train.labels)), replace=False)
        x = paddle.to_tensor(np.asarray(train.images[batch]))
        y = paddle.to_tensor(remap[np.asarray(train.labels)[batch]])
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        accuracy = float((logits.argmax(axis=1) == y).astype("float32").mean().item())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.3f}")
        if iteration % args.log_every == 0 or iteration == args.iterations:
            logger.log(step=iteration, loss=float(loss.item()), accuracy=accuracy)
        if iteration % args.checkpoint_every == 0 or iteration == args.iterations:
            save_checkpoint(checkpoint, model, optimizer, step=iteration,
                            extra={"batches": rng.bit_generator.state, "seconds": seconds + time.time() - tic})
    logger.close()
    seconds += time.time() - tic

    model.eval()
    accuracy, ci95 = evaluate(features, args, test.images, test.labels, args.eval_tasks, seed=args.seed + 1000)
    final = {"test_accuracy": accuracy, "test_ci95": ci95}
    if extra_eval is not None:
        final.update(extra_eval(features))
    records = read_jsonl(metrics_path) + [{"step": args.iterations, **final}]
    plot_learning_curve(records, os.path.join(args.out, "learning_curve.png"),
                        keys=["loss", "accuracy", "test_accuracy"], smoothing={"loss": 5, "accuracy": 5},
                        title=f"baseline {args.ways}-way {args.shots}-shot")
    results = dict(final)
    results.update(iterations=args.iterations, seconds=round(seconds, 1),
                   seconds_per_iteration=round(seconds / args.iterations, 3), config=vars(args))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"test accuracy {100 * accuracy:.2f} +- {100 * ci95:.2f} % over {args.eval_tasks} tasks "
          f"({args.iterations} iterations, {seconds:.0f} s)")
    return results
