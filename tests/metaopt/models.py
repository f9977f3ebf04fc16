"""Small float64 models and tasks shared by the metaopt tests."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn


def mlp(sizes=(1, 8, 8, 1), seed: int = 1) -> nn.Sequential:
    paddle.seed(seed)
    layers: list[nn.Layer] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def regression_task(seed: int = 0, n: int = 10, dim: int = 1):
    rng = np.random.default_rng(seed)
    xs, xq = (paddle.to_tensor(rng.uniform(-2, 2, (n, dim))) for _ in range(2))
    ys, yq = paddle.sin(xs).sum(axis=1, keepdim=True), paddle.sin(xq).sum(axis=1, keepdim=True)
    return xs, ys, xq, yq


def adapted_query_loss(steps: int):
    """loss_fn for check_meta_gradients: clone, adapt ``steps`` times on the support set, query loss."""

    def loss_fn(learner, task):
        xs, ys, xq, yq = task
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(F.mse_loss(clone(xs), ys))
        return F.mse_loss(clone(xq), yq)

    return loss_fn


def maml_query_loss(model, x, y, first_order=False, lr=0.3, seed=7):
    """Clone, one MAML step on (x, y), cross-entropy on (x, y) again; ``paddle.seed(seed)`` first, so dropout
    masks are the same in every evaluation."""
    from paddlefsl.metaopt import MAML

    paddle.seed(seed)
    task = MAML(model, lr, first_order=first_order).clone()
    out = task(x)
    task.adapt(F.cross_entropy(out, y))
    return F.cross_entropy(task(x), y)


def _meta_gradient(model, x, y, lr, first_order):
    model.clear_gradients()
    maml_query_loss(model, x, y, first_order, lr).backward()
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters() if p.grad is not None}
    model.clear_gradients()
    return grads


def assert_meta_gradient_exact(model, x, y, lr, names, steps=(1e-5, 1e-6), rtol=1e-5):
    """Second-order MAML's meta-gradient on the first coordinate of each parameter in ``names`` against central
    differences at every step size in ``steps`` (a coordinate is wrong only if it misses every estimate); the
    first-order answer must miss them on at least one coordinate."""
    exact = _meta_gradient(model, x, y, lr, False)
    first = _meta_gradient(model, x, y, lr, True)
    params = dict(model.named_parameters())
    first_wrong = False
    for name in names:
        index = (0,) * exact[name].ndim
        p, base = params[name], params[name].numpy().copy()
        estimates = []
        for eps in steps:
            values = []
            for sign in (1.0, -1.0):
                shifted = base.copy()
                shifted[index] += sign * eps
                p.set_value(shifted)
                values.append(float(maml_query_loss(model, x, y, lr=lr)))
            p.set_value(base)
            estimates.append((values[0] - values[1]) / (2 * eps))
        scale = max(abs(e) for e in estimates) + 1e-9
        assert any(abs(exact[name][index] - e) <= rtol * scale for e in estimates), \
            (name, exact[name][index], estimates)
        first_wrong |= all(abs(first[name][index] - e) > 100 * rtol * scale for e in estimates)
    assert first_wrong, "the first-order answer passes too: this check could not tell first order from exact"

