"""MAML(truncate=k): only the last k inner steps carry second-order terms, checked against a hand-built loop."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlefsl.metaopt import MAML, exact_ops, functional_call
from tests.metaopt.models import mlp, regression_task

STEPS = 4
LR = 0.3


def hand_built(k: int) -> list[np.ndarray]:
    """w_{i+1} = w_i - lr * g_i, with g_i a constant (detached) for the first STEPS - k steps."""
    model = mlp()
    xs, ys, xq, yq = regression_task()
    params = list(model.parameters())
    with exact_ops():
        fast = list(params)
        for i in range(STEPS):
            second = i >= STEPS - k
            loss = F.mse_loss(functional_call(model, fast, xs), ys)
            grads = paddle.grad(loss, fast, create_graph=second)
            fast = [w - LR * (g if second else g.detach()) for w, g in zip(fast, grads)]
        query = F.mse_loss(functional_call(model, fast, xq), yq)
        return [g.numpy() for g in paddle.grad(query, params)]


def learner_gradient(**options) -> list[np.ndarray]:
    xs, ys, xq, yq = regression_task()
    learner = MAML(mlp(), LR, inner_steps=STEPS, **options)
    task = learner.clone()
    for _ in range(STEPS):
        task.adapt(F.mse_loss(task(xs), ys))
    learner.step(F.mse_loss(task(xq), yq))
    return [p.grad.numpy() for p in learner.model.parameters()]


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_truncated_meta_gradient_equals_the_hand_built_loop(k):
    for got, want in zip(learner_gradient(truncate=k), hand_built(k)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_full_truncation_length_is_exact_maml_and_shorter_ones_differ():
    full = learner_gradient()
    for got, want in zip(learner_gradient(truncate=STEPS), full):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    for k in range(1, STEPS):
        diff = max(np.abs(a - b).max() for a, b in zip(learner_gradient(truncate=k), full))
        assert diff > 1e-4, f"truncate={k} should differ from exact MAML"
    # and the hand-built reference itself is not the first-order answer
    first = learner_gradient(first_order=True)
    assert max(np.abs(a - b).max() for a, b in zip(hand_built(1), first)) > 1e-4


def test_truncate_with_first_order_is_refused():
    with pytest.raises(ValueError, match="truncate=2"):
        MAML(mlp(), LR, inner_steps=STEPS, truncate=2, first_order=True)
