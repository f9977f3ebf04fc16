"""Meta-training functions that tests/metaopt/test_distributed.py runs in one process and under
``paddle.distributed.spawn`` (importable by the spawned processes, so not in the test module)."""
from __future__ import annotations

import os
import time

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from paddlefsl.episodes import shard_range
from paddlefsl.metaopt import ANIL, MAML, distributed

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 2, 8

# name -> (algorithm, meta-batch, learner options)
CONFIGS = {
    "maml": ("maml", 4, {}),
    "anil": ("anil", 4, {}),
    "learned-rates": ("maml", 4, dict(learn_inner_lr="per_step_per_layer", inner_steps=2, per_step_bn_weights=True,
                                      per_step_bn_stats=True)),
    "odd": ("maml", 5, {}),
    "empty-shard": ("maml", 1, {}),
    "shared-bn": ("maml", 3, dict(batch_norm="shared")),
}


class ConvNet(nn.Layer):
    """Two conv + batch-norm blocks and a linear head (convs without bias: batch norm cancels it)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2D(1, 4, 3, padding=1, bias_attr=False), nn.BatchNorm2D(4), nn.ReLU(), nn.MaxPool2D(2),
            nn.Conv2D(4, 4, 3, padding=1, bias_attr=False), nn.BatchNorm2D(4), nn.ReLU(), nn.MaxPool2D(2),
            nn.Flatten())
        self.head = nn.Linear(4 * (SIZE // 4) ** 2, WAYS)

    def forward(self, x):
        return self.head(self.features(x))


def task(iteration: int, index: int):
    """Task ``index`` of meta-batch ``iteration``: a function of the two numbers only, as a seeded sampler gives."""
    rng = np.random.default_rng(1000 * iteration + index)
    labels = lambda n: paddle.to_tensor(np.repeat(np.arange(WAYS), n))  # noqa: E731
    xs = rng.normal(size=(WAYS * SHOTS, 1, SIZE, SIZE)) + np.repeat(np.arange(WAYS), SHOTS)[:, None, None, None]
    xq = rng.normal(size=(WAYS * QUERIES, 1, SIZE, SIZE)) + np.repeat(np.arange(WAYS), QUERIES)[:, None, None, None]
    return paddle.to_tensor(xs), labels(SHOTS), paddle.to_tensor(xq), labels(QUERIES)


def train(name: str, iterations: int = 3) -> dict[str, np.ndarray]:
    """Meta-train config ``name`` for ``iterations`` meta-iterations (float64, second order, Adam) on this process's
    shard of each meta-batch; return the learner's state."""
    algorithm, meta_batch, options = CONFIGS[name]
    paddle.set_default_dtype("float64")
    paddle.seed(0)
    model = ConvNet()
    if algorithm == "anil":
        learner = ANIL(model.features, model.head, 0.3, **options)
    else:
        learner = MAML(model, 0.3, **options)
    learner.meta_optimizer = paddle.optimizer.Adam(0.01, parameters=learner.parameters())
    steps = options.get("inner_steps", 1)
    mine = shard_range(meta_batch, distributed.rank(), distributed.world_size())
    for iteration in range(iterations):
        losses = []
        for index in mine:
            xs, ys, xq, yq = task(iteration, index)
            clone = learner.clone()
            for _ in range(steps):
                clone.adapt(F.cross_entropy(clone(xs), ys))
            losses.append(F.cross_entropy(clone(xq), yq))
        learner.step(paddle.stack(losses).mean() if losses else None, num_tasks=len(losses))
    return {key: value.numpy() for key, value in learner.state_dict().items()}


def train_all(out: str, names: list[str]) -> None:
    """Spawned entry point: train every config in ``names`` and write each process's states to
    ``out/rank{R}.npz`` (keys ``config/state key``), plus the error a step without ``num_tasks`` gives."""
    distributed.init_parallel()
    states = {f"{name}/{key}": value for name in names for key, value in train(name).items()}
    r = distributed.rank()
    statistics = [paddle.to_tensor([10.0 * (r + 1)] * 3), paddle.to_tensor([0.1, 0.2], dtype="float32")]
    distributed.average_statistics(statistics, num_tasks=r + 1)
    states["helpers/average_statistics"] = statistics[0].numpy()
    states["helpers/same_everywhere"] = statistics[1].numpy()
    states["helpers/all_reduce_sum"] = np.array(distributed.all_reduce_sum([r + 1, 0.5]))
    states["helpers/all_gather_floats"] = np.array(distributed.all_gather_floats([r] * (3 - 2 * r)))
    for key, loss, num_tasks in (("missing-num-tasks-error", paddle.zeros([1]), None),
                                 ("loss-without-tasks-error", paddle.zeros([1]), 0),
                                 ("no-tasks-anywhere-error", None, 0)):
        try:
            MAML(ConvNet(), 0.3).step(loss, num_tasks=num_tasks)
        except ValueError as error:
            states[key] = np.array(str(error))
    np.savez(os.path.join(out, f"rank{distributed.rank()}.npz"), **states)


def fail_on_rank_one(message: str) -> None:
    """Spawned entry point: rank 1 raises ``message`` before the first meta-update; the others meta-train."""
    distributed.init_parallel()
    if distributed.rank() == 1:
        raise RuntimeError(message)
    train("maml", iterations=3)


def hang_on_rank_one(seconds: float) -> None:
    """Spawned entry point: rank 1 sleeps ``seconds`` before the first meta-update; the others meta-train."""
    distributed.init_parallel()
    if distributed.rank() == 1:
        time.sleep(seconds)
    train("maml", iterations=3)
