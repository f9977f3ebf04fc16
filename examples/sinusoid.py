"""MAML sinusoid regression (Finn et al., 2017, section 5.1), meta-trained second order.

Tasks are y = A sin(x - phase) with A in [0.1, 5], phase in [0, pi], x in [-5, 5]. An MLP 1-40-40-1 is meta-trained
with K-shot support sets; the baseline is the same MLP pre-trained on all tasks jointly and then fine-tuned the same
way. Writes to ``--out``:

- ``sinusoid.png``: fits to one test task after 0, 1 and ``--test-steps`` adaptation steps on its K support points,
  before meta-training, after it, and for the baseline, with each model's test MSE in its panel's title;
- ``results.json``: ``query_mse``, the mean squared error on 100 query points per test task after adapting on K
  support points, averaged over ``--eval-tasks`` test tasks, for each model and step count;
- ``metrics.jsonl``: meta-training progress; ``train_query_mse`` is the mean query MSE, after one inner step, of the
  current meta-batch of ``--meta-batch`` training tasks with K query points each: the meta-training loss, a noisy
  figure (it jumps with the tasks drawn) that is not comparable with the test MSE in ``results.json``.

    python examples/sinusoid.py --out runs/sinusoid
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from paddle import nn  # noqa: E402

from paddlefsl.metaopt import MAML  # noqa: E402

PANELS = (("maml_before_training", "before meta-training"), ("maml", "MAML (meta-trained)"),
          ("pretrained_baseline", "pre-trained baseline"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv`` defaults to ``sys.argv``); exits with a clear message on bad values."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sinusoid", help="output folder")
    parser.add_argument("--iterations", type=int, default=3000, help="meta-training iterations")
    parser.add_argument("--meta-batch", type=int, default=10, help="tasks per meta-iteration")
    parser.add_argument("--shots", type=int, default=10, help="support (and query) points per task, K")
    parser.add_argument("--inner-lr", type=float, default=0.01, help="inner-loop learning rate")
    parser.add_argument("--meta-lr", type=float, default=1e-3, help="Adam learning rate of the meta update")
    parser.add_argument("--test-steps", type=int, default=10, help="gradient steps when adapting at test time")
    parser.add_argument("--eval-tasks", type=int, default=200, help="test tasks for the reported MSE")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("iterations", "meta_batch", "shots", "test_steps", "eval_tasks"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.inner_lr > 0 and args.meta_lr > 0):
        parser.error("--inner-lr and --meta-lr must be positive")
    return args


def sample_tasks(count: int, generator: np.random.Generator) -> np.ndarray:
    """Amplitude and phase of ``count`` tasks, shape [count, 2]."""
    return np.stack([generator.uniform(0.1, 5.0, count), generator.uniform(0.0, math.pi, count)], axis=1)


def sample_points(task: np.ndarray, k: int, generator: np.random.Generator):
    """``k`` points of ``task``'s sinusoid: x uniform in [-5, 5], y = A sin(x - phase); float32 [k, 1] tensors."""
    x = generator.uniform(-5.0, 5.0, (k, 1)).astype("float32")
    y = (task[0] * np.sin(x - task[1])).astype("float32")
    return paddle.to_tensor(x), paddle.to_tensor(y)


def make_model() -> nn.Layer:
    """The paper's MLP 1-40-40-1 with ReLU."""
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def adapted_mse(model: nn.Layer, tasks: np.ndarray, steps: int, shots: int, inner_lr: float,
                generator: np.random.Generator) -> float:
    """Mean query MSE (100 points) after ``steps`` plain gradient steps at ``inner_lr`` on ``shots`` support points,
    over ``tasks``."""
    learner = MAML(model, inner_lr, first_order=True)
    errors = []
    for task in tasks:
        xs, ys = sample_points(task, shots, generator)
        xq, yq = sample_points(task, 100, generator)
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(F.mse_loss(clone(xs), ys))
        errors.append(float(F.mse_loss(clone(xq), yq).item()))
    return float(np.mean(errors))


def plot_fits(task: np.ndarray, xs, ys, models: dict[str, nn.Layer], query_mse: dict[str, dict[str, float]],
              inner_lr: float, test_steps: int, eval_tasks: int) -> Figure:
    """One panel per model of ``PANELS``: the true sinusoid of ``task``, the support points ``xs, ys``, and the model's
    fit after 0, 1 and ``test_steps`` adaptation steps at ``inner_lr``. Each panel's title gives the model's test
    MSE from ``query_mse`` (as in results.json, over ``eval_tasks`` tasks); one legend below the panels."""
    fig = Figure(figsize=(15, 5), dpi=100)
    axes = fig.subplots(1, 3, sharey=True)
    grid = paddle.to_tensor(np.linspace(-5, 5, 200, dtype="float32").reshape(-1, 1))
    steps = sorted({1, test_steps})
    for ax, (key, title) in zip(axes, PANELS):
        ax.plot(grid.numpy(), task[0] * np.sin(grid.numpy() - task[1]), "k", lw=2, label="true function")
        clone = MAML(models[key], inner_lr, first_order=True).clone()
        ax.plot(grid.numpy(), clone(grid).numpy(), ":", color="C0", label="0 steps (no adaptation)")
        for step in range(1, test_steps + 1):
            clone.adapt(F.mse_loss(clone(xs), ys))
            if step in steps:
                ax.plot(grid.numpy(), clone(grid).numpy(), color="C1" if step == 1 else "C2",
                        label=f"after {step} step{'s' if step > 1 else ''}")
        ax.scatter(xs.numpy(), ys.numpy(), marker="^", color="k", zorder=3, label=f"{len(xs)} support points")
        mse = ", ".join(f"{query_mse[key][f'{s}_steps']:.3f} ({s} step{'s' if s > 1 else ''})" for s in steps)
        ax.set_title(f"{title}\ntest MSE {mse}", fontsize=10)
        ax.set_xlabel("x")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("y = A sin(x - phase)")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"MAML sinusoid regression, {len(xs)}-shot: fits to one test task after adapting on its "
                 f"{len(xs)} support points (lr {inner_lr}); test MSE over {eval_tasks} test tasks, lower is better")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    paddle.seed(args.seed)
    rng = np.random.default_rng(args.seed)

    # Meta-training (second order).
    model = make_model()
    initial = make_model()
    initial.set_state_dict(model.state_dict())
    maml = MAML(model, args.inner_lr,
                meta_optimizer=paddle.optimizer.Adam(args.meta_lr, parameters=model.parameters()))
    start = time.time()
    with open(os.path.join(args.out, "metrics.jsonl"), "w") as log:
        for it in range(1, args.iterations + 1):
            losses = []
            for task in sample_tasks(args.meta_batch, rng):
                xs, ys = sample_points(task, args.shots, rng)
                xq, yq = sample_points(task, args.shots, rng)
                clone = maml.clone()
                clone.adapt(F.mse_loss(clone(xs), ys))
                losses.append(F.mse_loss(clone(xq), yq))
            loss = paddle.stack(losses).mean()
            maml.step(loss)
            if it % max(1, args.iterations // 20) == 0 or it == args.iterations:
                record = {"iteration": it, "train_query_mse": float(loss.item()),
                          "seconds": round(time.time() - start, 2)}
                log.write(json.dumps(record) + "\n")
                print(f"iteration {it}/{args.iterations}  meta-batch query MSE {record['train_query_mse']:.3f} "
                      f"(training tasks, noisy)  {record['seconds']}s", flush=True)
    train_seconds = time.time() - start

    # Baseline: the same network pre-trained on all tasks jointly (regressing the pooled data), then fine-tuned.
    print("pre-training the baseline, then evaluating on the test tasks", flush=True)
    baseline = make_model()
    optimizer = paddle.optimizer.Adam(args.meta_lr, parameters=baseline.parameters())
    for _ in range(args.iterations):
        batch = [sample_points(task, args.shots, rng) for task in sample_tasks(args.meta_batch, rng)]
        x = paddle.concat([b[0] for b in batch])
        y = paddle.concat([b[1] for b in batch])
        F.mse_loss(baseline(x), y).backward()
        optimizer.step()
        optimizer.clear_grad()

    # Evaluation on the same test tasks and points for every model.
    models = {"maml": model, "pretrained_baseline": baseline, "maml_before_training": initial}
    test_tasks = sample_tasks(args.eval_tasks, np.random.default_rng(args.seed + 1))
    results = {"iterations": args.iterations, "shots": args.shots, "train_seconds": round(train_seconds, 1),
               "config": vars(args), "query_mse": {}}
    for label, net in models.items():
        results["query_mse"][label] = {
            f"{steps}_steps": adapted_mse(net, test_tasks, steps, args.shots, args.inner_lr,
                                          np.random.default_rng(args.seed + 2))
            for steps in sorted({1, args.test_steps})
        }
    results["maml_beats_baseline"] = all(
        results["query_mse"]["maml"][k] < results["query_mse"]["pretrained_baseline"][k]
        for k in results["query_mse"]["maml"])
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"query MSE over {args.eval_tasks} test tasks after adapting on {args.shots} points:")
    print(json.dumps(results["query_mse"], indent=2))

    # Figure: one test task, K support points, fits after 0, 1 and test-steps gradient steps.
    plot_rng = np.random.default_rng(args.seed + 3)
    task = sample_tasks(1, plot_rng)[0]
    xs, ys = sample_points(task, args.shots, plot_rng)
    fig = plot_fits(task, xs, ys, models, results["query_mse"], args.inner_lr, args.test_steps, args.eval_tasks)
    fig.savefig(os.path.join(args.out, "sinusoid.png"))
    print(f"wrote {args.out}/sinusoid.png, results.json, metrics.jsonl")


if __name__ == "__main__":
    main()
