"""IMAML: the implicit meta-gradient against finite differences of the converged proximal inner solution."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

import paddlefsl.metaopt.recompute as recompute_module
from paddlefsl.metaopt import IMAML, ConvergenceError, check_meta_gradients, conjugate_gradient
from tests.metaopt.models import mlp, regression_task

# lam = 4 and lr = 0.15 contract the proximal objective by |1 - 0.15 * (4 + h)| per step (h: a curvature of the
# support loss): 60 steps converge it to machine precision (checked below), so finite differences see the proximal
# solution itself.
LAM = 4.0
CONVERGED = dict(inner_lr=0.15, lam=LAM, inner_steps=60, cg_steps=100, cg_tol=1e-12)


def query_after_adapt(learner, task):
    xs, ys, xq, yq = task
    clone = learner.clone()
    clone.adapt(lambda l: F.mse_loss(l(xs), ys))
    return F.mse_loss(clone(xq), yq)


def small_mlp():
    return mlp((1, 4, 1))


def test_inner_loop_reaches_the_proximal_solution():
    xs, ys, _, _ = regression_task()
    learner = IMAML(small_mlp(), **CONVERGED)
    task = learner.clone()
    task.adapt(lambda l: F.mse_loss(l(xs), ys))
    phi = [p.detach() for p in task.model.parameters()]
    for p in phi:
        p.stop_gradient = False
    theta = [p.detach() for p in learner.model.parameters()]
    loss = F.mse_loss(paddle.nn.functional.linear(
        paddle.tanh(paddle.nn.functional.linear(xs, phi[0], phi[1])), phi[2], phi[3]), ys)
    grads = paddle.grad(loss, phi)
    stationarity = max(float(paddle.abs(g + LAM * (p - t)).max()) for g, p, t in zip(grads, phi, theta))
    assert stationarity < 1e-12


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_meta_gradient_matches_finite_differences_of_the_proximal_solution(eps):
    report = check_meta_gradients(lambda: IMAML(small_mlp(), **CONVERGED), query_after_adapt, regression_task(),
                                  coordinates=None, eps=eps, rtol=1e-6)
    assert report.ok, str(report)


def test_first_order_answer_fails_the_same_check():
    report = check_meta_gradients(lambda: IMAML(small_mlp(), first_order=True, **CONVERGED), query_after_adapt,
                                  regression_task(), coordinates=None, rtol=1e-6)
    assert not report.ok and report.max_error > 1e-3


def test_a_conjugate_gradient_that_stops_early_raises_with_iterations_and_residual():
    learner = IMAML(small_mlp(), inner_lr=0.2, lam=0.05, inner_steps=20, cg_steps=1, cg_tol=1e-12)
    with pytest.raises(ConvergenceError, match=r"after 1 iterations") as info:
        learner.step(query_after_adapt(learner, regression_task()))
    assert info.value.iterations == 1 and info.value.residual > 1e-12
    assert all(p.grad is None for p in learner.parameters())


def test_without_a_tolerance_every_solve_is_reported():
    learner = IMAML(small_mlp(), inner_lr=0.2, lam=0.05, inner_steps=20, cg_steps=2, cg_tol=None)
    losses = [query_after_adapt(learner, regression_task(seed)) for seed in range(2)]
    learner.step(losses[0] + losses[1])
    assert len(learner.cg_reports) == 2
    assert all(r.iterations == 2 and r.residual > 0 and not r.converged for r in learner.cg_reports)


def test_conjugate_gradient_solves_and_reports():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 6))
    a = paddle.to_tensor(m @ m.T + 6 * np.eye(6))
    b = paddle.to_tensor(rng.normal(size=6))
    x, report = conjugate_gradient(lambda v: a @ v, b, 50, 1e-12)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(a.numpy(), b.numpy()), rtol=1e-9)
    assert report.converged and report.iterations <= 6
    with pytest.raises(ConvergenceError, match="non-positive curvature"):
        conjugate_gradient(lambda v: -v, b, 5, 1e-8)
    x, report = conjugate_gradient(lambda v: -v, b, 5, None)
    np.testing.assert_array_equal(x.numpy(), b.numpy())
    assert report.iterations == 0 and not report.converged and "non-positive curvature" in report.stopped


def conv_bn(dropout=0.0):
    paddle.seed(1)
    layers = [nn.Conv2D(1, 3, 3, padding=1), nn.BatchNorm2D(3), nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(3 * 6 * 6, 2))


def test_meta_backward_leaves_running_statistics_and_random_stream_alone():
    rng = np.random.default_rng(2)
    xs, xq = paddle.to_tensor(rng.normal(size=(4, 1, 6, 6))), paddle.to_tensor(rng.normal(size=(6, 1, 6, 6)))
    ys, yq = paddle.to_tensor([0, 1, 0, 1]), paddle.to_tensor([0, 1] * 3)
    learner = IMAML(conv_bn(0.2), inner_lr=0.1, lam=1.0, inner_steps=3, cg_steps=3, cg_tol=None)
    task = learner.clone()
    task.adapt(lambda l: F.cross_entropy(l(xs), ys))
    query = F.cross_entropy(task(xq), yq)
    stats = [t.numpy().copy() for sub in task.sublayers() for t in recompute_module._stat_tensors(sub)]
    state = paddle.get_rng_state()
    expected = paddle.rand([3]).numpy()
    paddle.set_rng_state(state)
    learner.step(query)
    np.testing.assert_array_equal(paddle.rand([3]).numpy(), expected)
    after = [t.numpy().copy() for sub in task.sublayers() for t in recompute_module._stat_tensors(sub)]
    for a, b in zip(stats, after):
        np.testing.assert_array_equal(a, b)
    assert all(p.grad is not None for p in learner.parameters() if not p.stop_gradient)


def test_differentiating_the_meta_gradient_again_raises():
    learner = IMAML(small_mlp(), inner_lr=0.2, lam=1.0, inner_steps=5)
    query = query_after_adapt(learner, regression_task())
    with pytest.raises(Exception, match="imaml"):
        paddle.grad(query, list(learner.parameters()), create_graph=True)


@pytest.mark.parametrize("options, error, match", [
    (dict(lam=0.0), ValueError, "lam"), (dict(lam=-1.0), ValueError, "lam"),
    (dict(inner_steps=0), ValueError, "inner_steps"), (dict(inner_steps=2.5), TypeError, "inner_steps"),
    (dict(cg_steps=0), ValueError, "cg_steps"), (dict(cg_tol=1.5), ValueError, "cg_tol"),
    (dict(cg_tol=0.0), ValueError, "cg_tol")])
def test_bad_options_are_refused(options, error, match):
    kwargs = dict(inner_lr=0.1, lam=1.0, inner_steps=3)
    kwargs.update(options)
    with pytest.raises(error, match=match):
        IMAML(small_mlp(), **kwargs)


def test_adapt_takes_a_function_once_per_task_learner():
    xs, ys, _, _ = regression_task()
    learner = IMAML(small_mlp(), inner_lr=0.1, lam=1.0, inner_steps=3)
    task = learner.clone()
    with pytest.raises(TypeError, match="function of the learner"):
        task.adapt(F.mse_loss(task(xs), ys))
    task.adapt(lambda l: F.mse_loss(l(xs), ys))
    with pytest.raises(RuntimeError, match="already solved"):
        task.adapt(lambda l: F.mse_loss(l(xs), ys))
    with pytest.raises(RuntimeError, match="clone"):
        learner.adapt(lambda l: F.mse_loss(l(xs), ys))


def test_meta_iterations_with_a_meta_optimizer():
    xs, ys, xq, yq = regression_task()
    model = small_mlp()
    learner = IMAML(model, inner_lr=0.1, lam=1.0, inner_steps=3, cg_tol=None,
                    meta_optimizer=paddle.optimizer.Adam(1e-2, parameters=model.parameters()))
    before = [p.numpy().copy() for p in model.parameters()]
    for _ in range(2):
        learner.step(query_after_adapt(learner, (xs, ys, xq, yq)))
    assert all(np.abs(a - p.numpy()).max() > 0 for a, p in zip(before, model.parameters()))


def test_the_hessian_graph_is_released_by_a_last_backward(monkeypatch):
    """paddle.grad inside the implicit node's backward kept the Hessian graph alive (memory grew with every task,
    Paddle 3.3.1): the solve must end with one paddle.autograd.backward over the inner gradient."""
    calls = []
    original = paddle.autograd.backward
    monkeypatch.setattr(paddle.autograd, "backward", lambda *a, **k: calls.append(1) or original(*a, **k))
    learner = IMAML(small_mlp(), inner_lr=0.1, lam=1.0, inner_steps=3, cg_steps=2, cg_tol=None)
    query = query_after_adapt(learner, regression_task())
    query.backward()
    assert calls == [1]
