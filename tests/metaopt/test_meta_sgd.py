import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlefsl.metaopt import MAML, check_meta_gradients
from paddlefsl.metaopt.meta_sgd import MetaSGD
from tests.metaopt.models import adapted_query_loss, mlp, regression_task


def test_learning_rates_are_learner_parameters_of_each_parameters_shape():
    learner = MetaSGD(mlp(), inner_lr=0.25)
    rates = learner.learning_rates()
    model_params = list(learner.model.named_parameters())
    assert [n for n, _ in rates] == [n for n, _ in model_params]
    learner_ids = {id(p) for p in learner.parameters()}
    for (_, rate), (_, p) in zip(rates, model_params):
        assert rate.shape == p.shape and rate.dtype == p.dtype
        np.testing.assert_array_equal(rate.numpy(), np.full(p.shape, 0.25))
        assert id(rate) in learner_ids and not rate.stop_gradient
    assert len(list(learner.parameters())) == 2 * len(model_params)


@pytest.mark.parametrize("steps", [1, 2])
def test_second_order_meta_gradient_matches_finite_differences(steps):
    report = check_meta_gradients(lambda: MetaSGD(mlp(), inner_lr=0.3), adapted_query_loss(steps), regression_task(),
                                  coordinates=4, eps=1e-4, rtol=1e-6)
    assert report.ok, str(report)
    assert any(name.startswith("lrs.") for name in report.errors)


def test_first_order_fails_the_same_check():
    report = check_meta_gradients(lambda: MetaSGD(mlp(), inner_lr=0.3, first_order=True), adapted_query_loss(2),
                                  regression_task(), coordinates=4, eps=1e-4, rtol=1e-6)
    assert not report.ok and report.max_error > 1e-3


def test_equals_maml_when_rates_are_uniform():
    xs, ys, xq, yq = regression_task()
    grads = []
    for learner in (MetaSGD(mlp(), inner_lr=0.3), MAML(mlp(), inner_lr=0.3)):
        task = learner.clone()
        task.adapt(F.mse_loss(task(xs), ys))
        F.mse_loss(task(xq), yq).backward()
        grads.append([p.grad.numpy() for p in learner.model.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_adapt_is_elementwise_and_out_of_place():
    xs, ys, _, _ = regression_task()
    learner = MetaSGD(mlp(), inner_lr=0.3)
    rng = np.random.default_rng(0)
    for rate in learner.lrs:
        paddle.assign(rng.uniform(0.1, 0.5, rate.shape), output=rate)
    before = [p.numpy().copy() for p in learner.model.parameters()]
    task = learner.clone()
    loss = F.mse_loss(task(xs), ys)
    grads = paddle.grad(loss, list(task.model.parameters()), retain_graph=True)
    task.adapt(loss)
    for b, g, rate, new, meta in zip(before, grads, learner.lrs, task.model.parameters(), learner.model.parameters()):
        np.testing.assert_allclose(new.numpy(), b - rate.numpy() * g.numpy(), rtol=1e-12)
        np.testing.assert_array_equal(meta.numpy(), b)


def test_meta_optimizer_trains_model_and_rates_and_must_hold_the_rates():
    xs, ys, xq, yq = regression_task()
    model = mlp()
    with pytest.raises(ValueError, match="lrs"):
        MetaSGD(model, 0.3, meta_optimizer=paddle.optimizer.SGD(0.1, parameters=model.parameters()))
    learner = MetaSGD(mlp(), 0.3)
    learner.meta_optimizer = paddle.optimizer.SGD(0.1, parameters=learner.parameters())
    rates_before = [r.numpy().copy() for r in learner.lrs]
    task = learner.clone()
    task.adapt(F.mse_loss(task(xs), ys))
    learner.step(F.mse_loss(task(xq), yq))
    assert any(not np.array_equal(r.numpy(), b) for r, b in zip(learner.lrs, rates_before))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_inner_lr(bad):
    with pytest.raises(ValueError, match="inner_lr"):
        MetaSGD(mlp(), inner_lr=bad)


def test_adapt_on_the_meta_learner_raises():
    xs, ys, _, _ = regression_task()
    learner = MetaSGD(mlp(), 0.3)
    with pytest.raises(RuntimeError, match="clone"):
        learner.adapt(F.mse_loss(learner(xs), ys))
