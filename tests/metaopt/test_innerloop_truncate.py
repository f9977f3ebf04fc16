"""innerloop_ctx(inner_steps=K, truncate=k): only the last k steps second order, against the hand-built loop."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlefsl.metaopt import innerloop_ctx
from tests.metaopt.models import mlp, regression_task
from tests.metaopt.test_maml_truncate import LR, STEPS, hand_built


def ctx_gradient(**options) -> list[np.ndarray]:
    model = mlp()
    xs, ys, xq, yq = regression_task()
    opt = paddle.optimizer.SGD(LR, parameters=model.parameters())
    with innerloop_ctx(model, opt, copy_initial_weights=False, **options) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(F.mse_loss(fmodel(xs), ys))
        F.mse_loss(fmodel(xq), yq).backward()
    return [p.grad.numpy() for p in model.parameters()]


@pytest.mark.parametrize("k", [1, 2, 4])
def test_truncated_inner_loop_equals_the_hand_built_loop(k):
    for got, want in zip(ctx_gradient(inner_steps=STEPS, truncate=k), hand_built(k)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_truncation_changes_the_meta_gradient():
    full, truncated = ctx_gradient(), ctx_gradient(inner_steps=STEPS, truncate=1)
    assert max(np.abs(a - b).max() for a, b in zip(full, truncated)) > 1e-4


@pytest.mark.parametrize("options, error, match", [
    (dict(inner_steps=STEPS, truncate=0), ValueError, "truncate must be a positive integer"),
    (dict(inner_steps=STEPS, truncate=STEPS + 1), ValueError, "larger than inner_steps"),
    (dict(inner_steps=STEPS, truncate=1.0), TypeError, "truncate"),
    (dict(truncate=1), ValueError, "needs inner_steps"),
    (dict(inner_steps=0), ValueError, "inner_steps"),
    (dict(inner_steps=STEPS, truncate=1, track_higher_grads=False), ValueError, "track_higher_grads")])
def test_bad_truncation_is_refused(options, error, match):
    model = mlp()
    opt = paddle.optimizer.SGD(LR, parameters=model.parameters())
    with pytest.raises(error, match=match):
        with innerloop_ctx(model, opt, **options):
            pass


def test_more_steps_than_inner_steps_raise():
    model = mlp()
    xs, ys, _, _ = regression_task()
    opt = paddle.optimizer.SGD(LR, parameters=model.parameters())
    with innerloop_ctx(model, opt, inner_steps=1) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(xs), ys))
        with pytest.raises(RuntimeError, match="inner_steps=1"):
            diffopt.step(F.mse_loss(fmodel(xs), ys))
