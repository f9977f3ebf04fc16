"""examples/episodic.run on a tiny float64 dataset and model, in one process or under ``paddle.distributed.spawn``
(importable by the spawned processes, so not in the test module)."""
from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import paddle
from paddle import nn

from tests.examples.scripts import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import episodic  # noqa: E402

WAYS, SIZE = 3, 8


class Net(nn.Layer):
    """A conv + batch-norm body (no conv bias: batch norm cancels it) and a linear head, as the examples need."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2D(1, 4, 3, padding=1, bias_attr=False), nn.BatchNorm2D(4), nn.ReLU(),
                                      nn.MaxPool2D(2), nn.Flatten())
        self.head = nn.Linear(4 * (SIZE // 2) ** 2, WAYS)

    def forward(self, x):
        return self.head(self.features(x))


def dataset(seed: int, classes: int = 6, per_class: int = 4) -> SimpleNamespace:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    images = rng.normal(size=(len(labels), 1, SIZE, SIZE)) + labels[:, None, None, None] / classes
    return SimpleNamespace(images=images, labels=labels)


def run(out: str, iterations: int, resume: bool = False, algorithm: str = "maml", extra: tuple = ()) -> dict:
    """Meta-train with examples/episodic.run: float64, meta-batch 3 (2 + 1 tasks on 2 processes), augmentation on."""
    paddle.set_default_dtype("float64")
    argv = ["--data-root", out, "--out", out, "--algorithm", algorithm, "--ways", str(WAYS), "--shots", "1",
            "--query", "2", "--iterations", str(iterations), "--meta-batch", "3", "--eval-tasks", "5",
            "--checkpoint-every", "2", "--log-every", "1", "--augment-shift", "1", "--inner-lr", "0.3"]
    p = episodic.parser("test", dict(query=2, iterations=4, meta_batch=3, inner_steps=1, test_inner_steps=1,
                                     inner_lr=0.3))
    args = p.parse_args(argv + (["--resume"] if resume else []) + list(extra))
    episodic.check_args(p, args)
    paddle.seed(args.seed)
    return episodic.run(args, Net(), dataset(0), dataset(1))
