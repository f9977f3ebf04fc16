"""MAML++ options of MAML: LSLR, MSL, derivative-order annealing, per-step batch norm, cosine meta LR."""
import gc
import math

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from paddlefsl.metaopt import MAML, check_meta_gradients
from paddlefsl.metaopt.schedules import multi_step_loss_weights
from tests.metaopt.models import adapted_query_loss, mlp, regression_task


def _bn_model(seed: int = 2) -> nn.Sequential:
    paddle.seed(seed)
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1D(4), nn.Tanh(), nn.Linear(4, 1))


def _bn_task(seed: int = 0):
    rng = np.random.default_rng(seed)
    xs, xq = (paddle.to_tensor(rng.normal(1.0, 2.0, (8, 2))) for _ in range(2))
    return xs, paddle.sin(xs).sum(1, keepdim=True), xq, paddle.sin(xq).sum(1, keepdim=True)


def _msl_loss(steps: int, epoch: float, anneal_epochs: float):
    """The documented multi-step-loss loop, as a loss_fn for check_meta_gradients."""
    weights = multi_step_loss_weights(steps, epoch, anneal_epochs)

    def loss_fn(learner, task):
        xs, ys, xq, yq = task
        clone = learner.clone()
        query_losses = []
        for _ in range(steps):
            clone.adapt(F.mse_loss(clone(xs), ys))
            query_losses.append(F.mse_loss(clone(xq), yq))
        return sum(w * q for w, q in zip(weights, query_losses))

    return loss_fn


# ----------------------------------------------------------------------------------------------- LSLR

@pytest.mark.parametrize("mode,length", [("per_step_per_layer", 3), ("per_layer", 1)])
def test_learned_rates_are_learner_parameters_initialised_to_inner_lr(mode, length):
    learner = MAML(mlp(), 0.25, inner_steps=3, learn_inner_lr=mode)
    rates = learner.learning_rates()
    assert [n for n, _ in rates] == [n for n, _ in learner.model.named_parameters()]
    ids = {id(p) for p in learner.parameters()}
    for _, rate in rates:
        assert rate.shape == [length] and id(rate) in ids and not rate.stop_gradient
        np.testing.assert_array_equal(rate.numpy(), np.full(length, 0.25))
    assert len(list(learner.parameters())) == 2 * len(list(learner.model.parameters()))


@pytest.mark.parametrize("mode,steps", [("per_step_per_layer", 1), ("per_step_per_layer", 3), ("per_layer", 2)])
def test_learned_rates_meta_gradient_matches_finite_differences(mode, steps):
    report = check_meta_gradients(lambda: MAML(mlp(), 0.3, inner_steps=steps, learn_inner_lr=mode),
                                  adapted_query_loss(steps), regression_task(), coordinates=4, rtol=1e-6)
    assert report.ok, str(report)
    assert sum(name.startswith("inner_lrs.") for name in report.errors) == len(list(mlp().parameters()))


def test_learned_rates_first_order_fails_the_same_check():
    report = check_meta_gradients(
        lambda: MAML(mlp(), 0.3, first_order=True, inner_steps=2, learn_inner_lr="per_step_per_layer"),
        adapted_query_loss(2), regression_task(), coordinates=4, rtol=1e-6)
    assert not report.ok and report.max_error > 1e-3


def test_kth_adapt_uses_the_kth_rates():
    xs, ys, _, _ = regression_task()
    learner = MAML(mlp(), 0.3, inner_steps=3, learn_inner_lr="per_step_per_layer")
    rng = np.random.default_rng(0)
    table = rng.uniform(0.05, 0.5, (len(learner.inner_lrs), 3))
    for rate, row in zip(learner.inner_lrs, table):
        paddle.assign(row, output=rate)
    task = learner.clone()
    for k in range(3):
        assert task.inner_step == k
        before = [p.numpy().copy() for p in task.model.parameters()]
        loss = F.mse_loss(task(xs), ys)
        grads = paddle.grad(loss, list(task.model.parameters()), retain_graph=True)
        task.adapt(loss)
        for i, (b, g, new) in enumerate(zip(before, grads, task.model.parameters())):
            np.testing.assert_allclose(new.numpy(), b - table[i, k] * g.numpy(), rtol=1e-12, atol=1e-15)
    with pytest.raises(RuntimeError, match="adapt call 4 .*inner_steps=3"):
        task.adapt(F.mse_loss(task(xs), ys))


def test_every_steps_rates_get_gradients_and_the_meta_optimizer_trains_them():
    xs, ys, xq, yq = regression_task()
    learner = MAML(mlp(), 0.3, inner_steps=2, learn_inner_lr="per_step_per_layer")
    with pytest.raises(ValueError, match="inner_lrs"):
        learner._check_meta_optimizer(paddle.optimizer.SGD(0.1, parameters=learner.model.parameters()))
    learner.meta_optimizer = paddle.optimizer.SGD(0.1, parameters=learner.parameters())
    before = [r.numpy().copy() for r in learner.inner_lrs]
    task = learner.clone()
    for _ in range(2):
        task.adapt(F.mse_loss(task(xs), ys))
    query = F.mse_loss(task(xq), yq)
    grads = paddle.grad(query, list(learner.inner_lrs), retain_graph=True)
    assert all(np.all(g.numpy() != 0) for g in grads)  # both steps of every tensor
    learner.step(query)
    for rate, b, g in zip(learner.inner_lrs, before, grads):
        np.testing.assert_allclose(rate.numpy(), b - 0.1 * g.numpy(), rtol=1e-12)


def test_uniform_learned_rates_equal_plain_maml():
    xs, ys, xq, yq = regression_task()
    grads = []
    for learner in (MAML(mlp(), 0.3, inner_steps=2, learn_inner_lr="per_step_per_layer"), MAML(mlp(), 0.3)):
        task = learner.clone()
        for _ in range(2):
            task.adapt(F.mse_loss(task(xs), ys))
        F.mse_loss(task(xq), yq).backward()
        grads.append([p.grad.numpy() for p in learner.model.parameters()])
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def test_clone_of_a_task_continues_at_its_step():
    xs, ys, _, _ = regression_task()
    learner = MAML(mlp(), 0.3, inner_steps=2, learn_inner_lr="per_step_per_layer")
    task = learner.clone()
    task.adapt(F.mse_loss(task(xs), ys))
    child = task.clone()
    assert child.inner_step == 1
    child.adapt(F.mse_loss(child(xs), ys))
    with pytest.raises(RuntimeError, match="inner_steps=2"):
        child.adapt(F.mse_loss(child(xs), ys))


# ----------------------------------------------------------------------------------------------- MSL

@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("epoch", [0, 1, 3.5, 9.7, 10, 25])
def test_msl_weights_sum_to_one_and_stay_in_bounds(steps, epoch):
    weights = multi_step_loss_weights(steps, epoch, anneal_epochs=10)
    assert len(weights) == steps and math.isclose(sum(weights), 1.0, rel_tol=1e-12)
    assert all(0.03 / steps - 1e-15 <= w <= 1.0 for w in weights)
    assert weights[-1] >= max(weights)


@pytest.mark.parametrize("steps", [2, 5])
def test_msl_weights_follow_the_paper_schedule(steps):
    np.testing.assert_allclose(multi_step_loss_weights(steps, 0, 10), np.full(steps, 1 / steps), rtol=1e-15)
    middle = multi_step_loss_weights(steps, 4, 10)
    np.testing.assert_allclose(middle[:-1], 1 / steps - 4 / (steps * 10), rtol=1e-12)
    floor, top = 0.03 / steps, 1 - (steps - 1) * 0.03 / steps
    for epoch in (9.7, 10, 100):
        end = multi_step_loss_weights(steps, epoch, 10)
        np.testing.assert_allclose(end, [floor] * (steps - 1) + [top], rtol=1e-12)
    schedule = [multi_step_loss_weights(steps, e, 10) for e in range(12)]
    assert all(a[0] >= b[0] and a[-1] <= b[-1] for a, b in zip(schedule, schedule[1:]))


@pytest.mark.parametrize("epoch", [0, 5])
def test_msl_loop_meta_gradient_matches_finite_differences(epoch):
    report = check_meta_gradients(lambda: MAML(mlp(), 0.3, inner_steps=3, learn_inner_lr="per_step_per_layer"),
                                  _msl_loss(3, epoch, 10), regression_task(), coordinates=3, rtol=1e-6)
    assert report.ok, str(report)


def test_msl_loop_equals_the_weighted_sum_of_single_loss_meta_gradients():
    task_data = regression_task()
    weights = multi_step_loss_weights(3, 4, 10)
    learner = MAML(mlp(), 0.3)
    _msl_loss(3, 4, 10)(learner, task_data).backward()
    msl = [p.grad.numpy().copy() for p in learner.parameters()]
    expected = [np.zeros_like(g) for g in msl]
    for k, w in enumerate(weights):
        learner.clear_gradients()
        adapted_query_loss(k + 1)(learner, task_data).backward()
        expected = [e + w * p.grad.numpy() for e, p in zip(expected, learner.parameters())]
    for a, b in zip(msl, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(inner_steps=0, epoch=0, anneal_epochs=1), ValueError, "inner_steps"),
    (dict(inner_steps=2.0, epoch=0, anneal_epochs=1), TypeError, "inner_steps"),
    (dict(inner_steps=2, epoch=-1, anneal_epochs=1), ValueError, "epoch must be >= 0"),
    (dict(inner_steps=2, epoch=0, anneal_epochs=0), ValueError, "anneal_epochs must be > 0"),
    (dict(inner_steps=2, epoch=float("nan"), anneal_epochs=1), TypeError, "epoch"),
    (dict(inner_steps=2, epoch=0, anneal_epochs=1, min_fraction=1.5), ValueError, "min_fraction"),
])
def test_msl_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        multi_step_loss_weights(**kwargs)


# ----------------------------------------------------------------------------------------------- DA

def _meta_grad(learner, task_data):
    learner.clear_gradients()
    adapted_query_loss(2)(learner, task_data).backward()
    return np.concatenate([p.grad.numpy().ravel() for p in learner.model.parameters()])


@pytest.mark.parametrize("counter", ["step", "set_iteration"])
def test_derivative_order_switches_exactly_at_n(counter):
    task_data = regression_task()
    first = _meta_grad(MAML(mlp(), 0.3, first_order=True), task_data)
    second = _meta_grad(MAML(mlp(), 0.3), task_data)
    assert not np.allclose(first, second)
    learner = MAML(mlp(), 0.3, first_order_until=3)
    orders = []
    for it in range(5):
        assert learner.iteration == it
        if counter == "set_iteration":
            learner.set_iteration(it)
        task = learner.clone()
        orders.append(task.first_order)
        expected = first if it < 3 else second
        np.testing.assert_allclose(_meta_grad(learner, task_data), expected, rtol=1e-12, atol=1e-15)
        if counter == "step":
            xs, ys, xq, yq = task_data
            task.adapt(F.mse_loss(task(xs), ys))
            learner.step(F.mse_loss(task(xq), yq))  # no optimizer: parameters unchanged, iteration + 1
        else:
            learner._iteration += 1  # what step() would do; set_iteration overrides it next round anyway
        learner.clear_gradients()
    assert orders == [True, True, True, False, False]


def test_derivative_order_annealing_passes_finite_differences_only_after_n():
    def factory(iteration):
        def make():
            learner = MAML(mlp(), 0.3, first_order_until=2)
            learner.set_iteration(iteration)
            return learner
        return make

    early = check_meta_gradients(factory(1), adapted_query_loss(2), regression_task(), coordinates=4)
    late = check_meta_gradients(factory(2), adapted_query_loss(2), regression_task(), coordinates=4)
    assert not early.ok and early.max_error > 1e-3
    assert late.ok, str(late)


def test_set_iteration_on_a_task_or_negative_raises():
    learner = MAML(mlp(), 0.3, first_order_until=2)
    with pytest.raises(ValueError, match="iteration must be an integer >= 0"):
        learner.set_iteration(-1)
    with pytest.raises(RuntimeError, match="set_iteration"):
        learner.clone().set_iteration(0)


# ----------------------------------------------------------------------------------------------- per-step BN

def _bn_query_loss(steps: int):
    def loss_fn(learner, task):
        xs, ys, xq, yq = task
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(F.mse_loss(clone(xs), ys))
        return F.mse_loss(clone(xq), yq)

    return loss_fn


@pytest.mark.parametrize("stats,weights,policy", [(True, True, "batch"), (False, True, "shared"),
                                                  (True, True, "running"), (True, False, "batch")])
def test_per_step_batch_norm_meta_gradient_matches_finite_differences(stats, weights, policy):
    def make():
        learner = MAML(_bn_model(), 0.3, inner_steps=2, per_step_bn_stats=stats, per_step_bn_weights=weights,
                       batch_norm=policy, learn_inner_lr="per_step_per_layer")
        for k, state in enumerate(learner.bn_steps):  # distinct per-step values
            for j in range(3):
                if stats:
                    paddle.assign(paddle.full([4], 0.2 * j - 0.1), output=state._buffers[f"mean_{j}"])
                    paddle.assign(paddle.full([4], 1.0 + 0.5 * j), output=state._buffers[f"variance_{j}"])
                if weights:
                    paddle.assign(paddle.full([4], 1.0 + 0.3 * j), output=state.weight[j])
                    paddle.assign(paddle.full([4], 0.1 * j), output=state.bias[j])
        return learner

    report = check_meta_gradients(make, _bn_query_loss(2), _bn_task(), coordinates=3, rtol=1e-6)
    assert report.ok, str(report)
    assert any(name.startswith("bn_steps.0.weight.2") for name in report.errors) == weights


def test_per_step_batch_norm_first_order_fails_the_check():
    report = check_meta_gradients(
        lambda: MAML(_bn_model(), 0.3, first_order=True, inner_steps=2, per_step_bn_stats=True,
                     per_step_bn_weights=True), _bn_query_loss(2), _bn_task(), coordinates=3, rtol=1e-6)
    assert not report.ok and report.max_error > 1e-3


def _reference_output(task, x, k, learner):
    """The task model's output in eval mode computed by hand with step k's statistics and weights."""
    h = task.model[0](x).numpy()
    state = learner.bn_steps[0]
    mean, var = state._buffers[f"mean_{k}"].numpy(), state._buffers[f"variance_{k}"].numpy()
    w, b = state.weight[k].numpy(), state.bias[k].numpy()
    h = np.tanh((h - mean) / np.sqrt(var + 1e-5) * w + b)
    lin = task.model[3]
    return h @ lin.weight.numpy() + lin.bias.numpy()


def test_forward_after_k_adapts_uses_step_k_statistics_and_weights():
    xs, ys, xq, _ = _bn_task()
    learner = MAML(_bn_model(), 0.3, inner_steps=2, per_step_bn_stats=True, per_step_bn_weights=True,
                   batch_norm="running")
    rng = np.random.default_rng(1)
    for k in range(3):
        state = learner.bn_steps[0]
        paddle.assign(rng.normal(0, 1, 4), output=state._buffers[f"mean_{k}"])
        paddle.assign(rng.uniform(0.5, 2, 4), output=state._buffers[f"variance_{k}"])
        paddle.assign(rng.uniform(0.5, 2, 4), output=state.weight[k])
        paddle.assign(rng.normal(0, 1, 4), output=state.bias[k])
    task = learner.clone()
    outputs = []
    for k in range(3):
        out = task(xq)
        np.testing.assert_allclose(out.numpy(), _reference_output(task, xq, k, learner), rtol=1e-12)
        outputs.append(out.numpy())
        if k < 2:
            task.adapt(F.mse_loss(task(xs), ys))
    assert not np.allclose(outputs[0], outputs[1])
    norm = task.model[1]  # the layer's own tensors are back in place after every forward
    assert norm.weight.stop_gradient and learner.model[1].weight.stop_gradient


@pytest.mark.parametrize("policy", ["batch", "shared", "running"])
def test_per_step_statistics_follow_the_batch_norm_policy(policy):
    xs, ys, _, _ = _bn_task()
    learner = MAML(_bn_model(), 0.3, inner_steps=2, per_step_bn_stats=True, batch_norm=policy)
    state = learner.bn_steps[0]
    meta_before = [state._buffers[f"mean_{k}"].numpy().copy() for k in range(3)]
    own_before = learner.model[1]._mean.numpy().copy()
    task = learner.clone()
    task.adapt(F.mse_loss(task(xs), ys))  # forward at step 0
    task(xs)  # forward at step 1; step 2 never runs
    meta_after = [state._buffers[f"mean_{k}"].numpy() for k in range(3)]
    task_after = [task.bn_steps[0]._buffers[f"mean_{k}"].numpy() for k in range(3)]
    np.testing.assert_array_equal(learner.model[1]._mean.numpy(), own_before)
    np.testing.assert_array_equal(task.model[1]._mean.numpy(), own_before)
    np.testing.assert_array_equal(meta_after[2], meta_before[2])
    if policy == "batch":
        for k in range(3):
            np.testing.assert_array_equal(meta_after[k], meta_before[k])
        assert not np.allclose(task_after[0], meta_before[0]) and not np.allclose(task_after[1], meta_before[1])
        # momentum 0.9 update of step 0's copy with the support batch's mean (Paddle keeps momentum in float32)
        h = learner.model[0](xs).numpy()
        np.testing.assert_allclose(task_after[0], 0.9 * meta_before[0] + 0.1 * h.mean(0), rtol=1e-6)
    elif policy == "shared":
        assert not np.allclose(meta_after[0], meta_before[0]) and not np.allclose(meta_after[1], meta_before[1])
        np.testing.assert_array_equal(task_after[0], meta_after[0])
    else:
        for k in range(3):
            np.testing.assert_array_equal(meta_after[k], meta_before[k])
            np.testing.assert_array_equal(task_after[k], meta_before[k])


def test_per_step_weights_are_trained_and_the_layers_own_frozen():
    xs, ys, xq, yq = _bn_task()
    model = _bn_model()
    learner = MAML(model, 0.3, inner_steps=2, per_step_bn_weights=True)
    assert model[1].weight.stop_gradient and model[1].bias.stop_gradient
    learner.meta_optimizer = paddle.optimizer.SGD(0.1, parameters=learner.parameters())
    before = [w.numpy().copy() for w in learner.bn_steps[0].weight]
    task = learner.clone()
    for _ in range(2):
        task.adapt(F.mse_loss(task(xs), ys))
    learner.step(F.mse_loss(task(xq), yq))
    assert all(not np.array_equal(w.numpy(), b) for w, b in zip(learner.bn_steps[0].weight, before))


# ----------------------------------------------------------------------------------------------- cosine meta LR

def test_cosine_annealing_of_the_meta_learning_rate_follows_the_schedule():
    xs, ys, xq, yq = regression_task()
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate=0.1, T_max=4, eta_min=0.01)
    model = mlp()
    learner = MAML(model, 0.3, meta_optimizer=paddle.optimizer.SGD(schedule, parameters=model.parameters()))
    for t in range(5):
        expected_lr = 0.01 + (0.1 - 0.01) * (1 + math.cos(math.pi * t / 4)) / 2
        assert math.isclose(learner.meta_optimizer.get_lr(), expected_lr, rel_tol=1e-12)
        before = [p.numpy().copy() for p in model.parameters()]
        task = learner.clone()
        task.adapt(F.mse_loss(task(xs), ys))
        query = F.mse_loss(task(xq), yq)
        grads = paddle.grad(query, list(model.parameters()), retain_graph=True)
        learner.step(query)
        schedule.step()
        for b, g, p in zip(before, grads, model.parameters()):
            np.testing.assert_allclose(p.numpy(), b - expected_lr * g.numpy(), rtol=1e-12, atol=1e-15)


# ----------------------------------------------------------------------------------------------- options

@pytest.mark.parametrize("kwargs,error,match", [
    (dict(learn_inner_lr="per_step"), ValueError, "learn_inner_lr must be one of"),
    (dict(learn_inner_lr=True), ValueError, "learn_inner_lr must be one of"),
    (dict(learn_inner_lr="per_step_per_layer"), ValueError, "learn_inner_lr='per_step_per_layer' needs inner_steps"),
    (dict(inner_steps=0), ValueError, "inner_steps must be an integer >= 1"),
    (dict(inner_steps=2.5), TypeError, "inner_steps must be an integer"),
    (dict(first_order_until=-1), ValueError, "first_order_until must be an integer >= 0"),
    (dict(first_order_until=1.5), TypeError, "first_order_until"),
    (dict(first_order_until=3, first_order=True), ValueError, "needs first_order=False"),
    (dict(per_step_bn_stats="yes", inner_steps=2), TypeError, "per_step_bn_stats must be True or False"),
    (dict(per_step_bn_weights=True), ValueError, "per_step_bn_weights=True needs inner_steps"),
    (dict(per_step_bn_stats=True, inner_steps=2), ValueError, "model has none"),
])
def test_bad_option_values_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        MAML(mlp(), 0.3, **kwargs)


def test_inner_steps_alone_bounds_plain_maml_adapts():
    xs, ys, _, _ = regression_task()
    task = MAML(mlp(), 0.3, inner_steps=1).clone()
    task.adapt(F.mse_loss(task(xs), ys))
    with pytest.raises(RuntimeError, match="inner_steps=1"):
        task.adapt(F.mse_loss(task(xs), ys))


def test_all_options_together_and_the_scope_is_released():
    from paddlefsl.metaopt.autodiff.scope import is_active
    xs, ys, xq, yq = _bn_task()
    learner = MAML(_bn_model(), 0.3, inner_steps=2, learn_inner_lr="per_step_per_layer", first_order_until=1,
                   per_step_bn_stats=True, per_step_bn_weights=True, batch_norm="shared")
    schedule = paddle.optimizer.lr.CosineAnnealingDecay(0.01, T_max=3)
    learner.meta_optimizer = paddle.optimizer.Adam(schedule, parameters=learner.parameters())
    state = learner.state_dict()
    assert any(k.startswith("inner_lrs.") for k in state) and "bn_steps.0.mean_2" in state
    losses = []
    for it in range(3):
        weights = multi_step_loss_weights(2, it, 2)
        task = learner.clone()
        assert task.first_order == (it < 1)
        query = []
        for _ in range(2):
            task.adapt(F.mse_loss(task(xs), ys))
            query.append(F.mse_loss(task(xq), yq))
        loss = sum(w * q for w, q in zip(weights, query))
        losses.append(float(query[-1]))
        learner.step(loss)
        schedule.step()
    assert learner.iteration == 3 and all(math.isfinite(v) for v in losses)
    del task, query, loss
    gc.collect()
    assert not is_active()


def test_plain_maml_reports_its_fixed_rate_and_has_no_extra_parameters():
    learner = MAML(mlp(), 0.25)
    assert len(list(learner.parameters())) == len(list(learner.model.parameters()))
    for (name, rate), (pname, p) in zip(learner.learning_rates(), learner.model.named_parameters()):
        assert name == pname and rate.dtype == p.dtype and rate.stop_gradient
        np.testing.assert_array_equal(rate.numpy(), [0.25])


def test_per_step_batch_norm_2d_in_a_conv_model_matches_finite_differences():
    def make():
        paddle.seed(3)
        model = nn.Sequential(nn.Conv2D(1, 2, 2), nn.BatchNorm2D(2), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 2 * 2, 1))
        return MAML(model, 0.3, inner_steps=2, per_step_bn_stats=True, per_step_bn_weights=True,
                    batch_norm="shared", learn_inner_lr="per_step_per_layer")

    rng = np.random.default_rng(0)
    xs, xq = (paddle.to_tensor(rng.normal(0, 1, (4, 1, 3, 3))) for _ in range(2))
    data = (xs, paddle.to_tensor(rng.normal(0, 1, (4, 1))), xq, paddle.to_tensor(rng.normal(0, 1, (4, 1))))
    report = check_meta_gradients(make, _bn_query_loss(2), data, coordinates=2, rtol=1e-6)
    assert report.ok, str(report)
