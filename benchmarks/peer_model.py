"""The model and random tasks of a peer workload (``WORKLOADS[name]`` of ``../shared/bench/workload.py``), shared by
the benchmark scripts: the MAML paper's Conv4 (strided for W1, BN + ReLU + 2x2 max-pool for W2) and one meta-batch of
random tasks of the workload's shapes, the same as the peers' scripts build, and one meta-iteration over them with
one clone per task."""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle import nn


def conv4(W: dict) -> tuple[nn.Sequential, nn.Linear]:
    """``(features, head)`` of the workload's Conv4, built in this order from the current seed."""
    c_in, size, _ = W["img"]
    layers: list[nn.Layer] = []
    for i in range(4):
        conv = nn.Conv2D(c_in if i == 0 else W["channels"], W["channels"], 3, stride=1 if W["pool"] else 2,
                         padding=1)
        layers += [conv, nn.BatchNorm2D(W["channels"]), nn.ReLU()] + ([nn.MaxPool2D(2)] if W["pool"] else [])
        size = size // 2 if W["pool"] else (size + 1) // 2
    return nn.Sequential(*layers, nn.Flatten()), nn.Linear(W["channels"] * size * size, W["ways"])


def random_tasks(W: dict) -> list[tuple[paddle.Tensor, ...]]:
    """``W["meta_batch"]`` tasks ``(x_support, y_support, x_query, y_query)`` of random images."""
    n_s, n_q = W["ways"] * W["shots"], W["ways"] * W["query"]
    return [(paddle.randn([n_s, *W["img"]]), paddle.arange(W["ways"]).repeat_interleave(W["shots"]),
             paddle.randn([n_q, *W["img"]]), paddle.arange(W["ways"]).repeat_interleave(W["query"]))
            for _ in range(W["meta_batch"])]


def meta_iteration(learner, tasks: list[tuple[paddle.Tensor, ...]], steps: int) -> None:
    """One meta-iteration of ``learner`` (MAML, ANIL, ...) with one clone per task: ``steps`` inner steps on each
    support set, then ``learner.step`` on the mean query loss."""
    losses = []
    for xs, ys, xq, yq in tasks:
        task = learner.clone()
        for _ in range(steps):
            task.adapt(F.cross_entropy(task(xs), ys))
        losses.append(F.cross_entropy(task(xq), yq))
    learner.step(paddle.stack(losses).mean())
