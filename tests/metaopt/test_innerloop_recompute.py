"""innerloop_ctx(recompute=r): the meta-gradient equals the stored loop's, for every optimizer twin, with BN,
dropout, learned (override) rates, clipping, callbacks and schedulers."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

import paddlefsl.metaopt.recompute as recompute_module
from paddlefsl.metaopt import SecondOrderError, innerloop_ctx
from paddlefsl.metaopt.optim import OptimizerTwin
from paddlefsl.metaopt.optim.base import _TWINS
from tests.metaopt.models import mlp, regression_task
from tests.metaopt.test_recompute import image_task

O = paddle.optimizer
STEPS = 3

OPTIMIZERS = {
    "sgd": lambda ps: O.SGD(0.1, parameters=ps),
    "momentum": lambda ps: O.Momentum(0.1, momentum=0.9, parameters=ps),
    "nesterov": lambda ps: O.Momentum(0.1, momentum=0.9, use_nesterov=True, parameters=ps),
    "adam": lambda ps: O.Adam(0.05, parameters=ps),
    "amsgrad": lambda ps: O.Adam(0.05, amsgrad=True, parameters=ps),
    "adamw": lambda ps: O.AdamW(0.05, weight_decay=0.1, parameters=ps),
    "rmsprop": lambda ps: O.RMSProp(0.01, momentum=0.5, centered=True, parameters=ps),
    "adagrad": lambda ps: O.Adagrad(0.1, parameters=ps),
    "adadelta": lambda ps: O.Adadelta(1.0, parameters=ps),
    "clipped_l2": lambda ps: O.Momentum(0.1, momentum=0.5, weight_decay=0.01,
                                        grad_clip=paddle.nn.ClipGradByGlobalNorm(0.5), parameters=ps),
}

def conv_bn(dropout: float = 0.0) -> nn.Layer:
    """A conv net with batch norm; the convolution has no bias: batch norm cancels it, so its true gradient is 0 and
    Adam would turn the rounding noise of that gradient (which differs between a gradient taken with and without
    ``create_graph``) into updates of size ``lr * noise / eps`` that move the running mean."""
    paddle.seed(1)
    layers = [nn.Conv2D(1, 4, 3, padding=1, bias_attr=False), nn.BatchNorm2D(4), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.MaxPool2D(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers)


class RunningCenter(nn.Layer):
    """Subtracts a running mean that every call updates first, so each output depends on the buffer's history: a
    replay that did not start from the buffer as it was before the step would compute other values."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", paddle.zeros([features]))

    def forward(self, x):
        with paddle.no_grad():
            self.mean.set_value(0.5 * self.mean + 0.5 * x.mean(axis=0))
        return x - self.mean.clone()


def running_center_mlp() -> nn.Layer:
    paddle.seed(1)
    return nn.Sequential(nn.Linear(1, 8), RunningCenter(8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))


MODELS = {
    "mlp": (lambda: mlp(), "regression"),
    "conv_bn": (lambda: conv_bn(), "image"),
    "conv_bn_dropout": (lambda: conv_bn(0.3), "image"),
    "conv_bn_eval": (lambda: _eval(conv_bn()), "image"),  # running statistics used, not updated
    "running_center": (running_center_mlp, "regression"),  # a buffer read and updated by every forward
}


def _eval(model):
    model.eval()
    return model


def _stats(model):
    return [t.numpy().copy() for sub in model.sublayers(include_self=True)
            for t in recompute_module._stat_tensors(sub)]


def loop_run(model_name="mlp", opt_name="sgd", override=None, multi_step=False, copy=False, callback=None,
             schedule=False, **options):
    """One meta-gradient through innerloop_ctx; returns gradients, the meta-loss, the next random number and the
    BN statistics."""
    factory, kind = MODELS[model_name]
    model = factory()
    xs, ys, xq, yq = regression_task() if kind == "regression" else image_task()
    loss_fn = F.mse_loss if kind == "regression" else F.cross_entropy
    extra = override() if override else {}
    opt = OPTIMIZERS[opt_name](model.parameters())
    scheduler = O.lr.StepDecay(0.2, step_size=1, gamma=0.5) if schedule else None
    if schedule:
        opt = O.SGD(scheduler, parameters=model.parameters())
    paddle.seed(7)
    recompute = "recompute" in options
    with innerloop_ctx(model, opt, copy_initial_weights=copy, override=extra, inner_steps=STEPS,
                       **options) as (fmodel, diffopt):
        losses = []
        for _ in range(STEPS):
            support = (lambda f: loss_fn(f(xs), ys))
            diffopt.step(support if recompute else support(fmodel), grad_callback=callback)
            if scheduler is not None:
                scheduler.step()  # a rate that changes between inner steps, read by each step as it runs
            losses.append(loss_fn(fmodel(xq), yq))
        query = sum((k + 1) * q for k, q in enumerate(losses)) if multi_step else losses[-1]
        query.backward()
    leaves = fmodel.parameters(time=0) if copy else list(model.parameters())
    grads = {f"w{i}": p.grad.numpy().copy() for i, p in enumerate(leaves) if p.grad is not None}
    for key, value in extra.items():
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(v, paddle.Tensor) and not v.stop_gradient:
                grads[f"{key}{i}"] = v.grad.numpy().copy()
    return grads, float(query), float(paddle.rand([1]).item()), _stats(model)


def assert_same(stored, recomputed):
    grads_a, loss_a, rand_a, stats_a = stored
    grads_b, loss_b, rand_b, stats_b = recomputed
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    assert rand_a == rand_b, "the random stream after the meta-step differs (dropout masks redrawn?)"
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=1e-10, atol=1e-12, err_msg=name)
    assert len(stats_a) == len(stats_b)
    for a, b in zip(stats_a, stats_b):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


def learned_lr():
    return {"lr": paddle.to_tensor(0.1, stop_gradient=False)}


def learned_lr_and_momentum():
    return {"lr": paddle.to_tensor(0.1, stop_gradient=False), "momentum": paddle.to_tensor(0.5, stop_gradient=False)}


def per_parameter_lr():
    return {"lr": [paddle.to_tensor(0.05 * (i + 1), stop_gradient=False) for i in range(5)]}


@pytest.mark.parametrize("interval", [1, 2, 3])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_meta_gradient_equals_the_stored_one_per_model(model_name, interval):
    options = dict(model_name=model_name, opt_name="adam", override=learned_lr)
    assert_same(loop_run(**options), loop_run(**options, recompute=interval))


@pytest.mark.parametrize("interval", [1, 2])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_meta_gradient_equals_the_stored_one_per_optimizer(opt_name, interval):
    assert_same(loop_run(opt_name=opt_name), loop_run(opt_name=opt_name, recompute=interval))


@pytest.mark.parametrize("override, opt_name", [(learned_lr, "sgd"), (learned_lr_and_momentum, "momentum"),
                                                (per_parameter_lr, "adam")])
def test_learned_hyper_parameters(override, opt_name):
    """Override tensors (learned inner rates, a learned momentum) are segment inputs: their gradients match."""
    options = dict(model_name="conv_bn_dropout", opt_name=opt_name, override=override)
    assert_same(loop_run(**options), loop_run(**options, recompute=2))


def test_copied_initial_weights_get_their_gradient():
    options = dict(model_name="conv_bn", opt_name="momentum", copy=True)
    assert_same(loop_run(**options), loop_run(**options, recompute=1))


def test_multi_step_loss_through_open_segments():
    """Query losses after every step read weights from inside a segment; each replays from the kept boundary."""
    options = dict(model_name="conv_bn_dropout", opt_name="adam", override=learned_lr, multi_step=True)
    assert_same(loop_run(**options), loop_run(**options, recompute=3))


def test_grad_callback_and_a_scheduler_between_steps():
    mask = lambda grads: [None if g is None else g * 0.5 for g in grads]  # noqa: E731
    assert_same(loop_run(callback=mask, schedule=True), loop_run(callback=mask, schedule=True, recompute=2))


def test_truncated_and_recomputed_together_equal_truncated_stored():
    options = dict(model_name="conv_bn_dropout", opt_name="adam", override=learned_lr, truncate=2)
    assert_same(loop_run(**options), loop_run(**options, recompute=2))


def test_the_replay_runs_in_the_meta_backward(monkeypatch):
    """Segments hold the steps since the last kept boundary: with 3 steps and interval 2, segments of 2 and 1."""
    replayed = []
    original = recompute_module._LoopReplay.vjp

    def spy(self, inputs, grads):
        replayed.append([r.index for r in self.records])
        return original(self, inputs, grads)

    monkeypatch.setattr(recompute_module._LoopReplay, "vjp", spy)
    loop_run(model_name="conv_bn", recompute=2)
    assert replayed == [[2], [0, 1]]


def test_first_order_steps_take_the_plain_path(monkeypatch):
    replayed = []
    original = recompute_module._LoopReplay.vjp
    monkeypatch.setattr(recompute_module._LoopReplay, "vjp",
                        lambda self, *a: replayed.append([r.index for r in self.records]) or original(self, *a))
    loop_run(truncate=1, recompute=1)
    assert replayed == [[2]]


def _meta_loss(flat, track=True, recompute=None):
    """The query loss after STEPS Adam steps with a learned rate, as a function of (weights..., rate)."""
    model = mlp()
    xs, ys, xq, yq = regression_task()
    with paddle.no_grad():
        for p, v in zip(model.parameters(), flat[:-1]):
            p.set_value(v)
    lr = paddle.to_tensor(flat[-1], stop_gradient=False)
    opt = O.Adam(0.05, parameters=model.parameters())
    with innerloop_ctx(model, opt, copy_initial_weights=False, override={"lr": lr}, inner_steps=STEPS,
                       track_higher_grads=track, recompute=recompute) as (fmodel, diffopt):
        for _ in range(STEPS):
            diffopt.step(lambda f: F.mse_loss(f(xs), ys))
        loss = F.mse_loss(fmodel(xq), yq)
    return model, lr, loss


def _finite_difference_errors(track, recompute):
    base = [p.numpy().copy() for p in mlp().parameters()] + [np.array(0.05)]
    model, lr, loss = _meta_loss(base, track, recompute)
    loss.backward()
    grads = [p.grad.numpy() for p in model.parameters()] + [lr.grad.numpy()]
    errors = []
    for h in (1e-4, 1e-5):
        for t, value in enumerate(base):
            for c in range(min(value.size, 4)):
                def at(delta):
                    moved = [v.copy() for v in base]
                    moved[t].reshape(-1)[c] += delta
                    return float(_meta_loss(moved)[2])
                numeric = (at(h) - at(-h)) / (2 * h)
                got = float(grads[t].reshape(-1)[c])
                errors.append(abs(got - numeric) / max(abs(numeric), 1e-3))
    return max(errors)


def test_recomputed_meta_gradient_matches_central_differences():
    assert _finite_difference_errors(True, 1) < 1e-5
    assert _finite_difference_errors(False, None) > 1e-3  # first order fails the same check


def test_differentiating_the_meta_gradient_again_raises():
    model, lr, loss = _meta_loss([p.numpy() for p in mlp().parameters()] + [np.array(0.05)], recompute=2)
    with pytest.raises(Exception) as info:
        paddle.grad(loss, list(model.parameters()), create_graph=True)
    assert "SecondOrderError" in repr(info.value) or isinstance(info.value, SecondOrderError)
    assert "innerloop_ctx" in str(info.value) and "recompute" in str(info.value)


def test_a_tensor_loss_is_refused_with_recompute():
    model = mlp()
    xs, ys, _, _ = regression_task()
    with innerloop_ctx(model, O.SGD(0.1, parameters=model.parameters()), inner_steps=2, recompute=1) as (f, d):
        with pytest.raises(TypeError, match="loss must be a function of a functional model"):
            d.step(F.mse_loss(f(xs), ys))


@pytest.mark.parametrize("reads", ["outer_fmodel", "captured_tensor", "callback"])
def test_a_function_reading_other_trainable_tensors_is_refused(reads, monkeypatch):
    monkeypatch.setattr(recompute_module, "_walked", recompute_module.weakref.WeakSet())
    model = mlp()
    xs, ys, _, _ = regression_task()
    scale = paddle.to_tensor(2.0, stop_gradient=False)
    with innerloop_ctx(model, O.SGD(0.1, parameters=model.parameters()), inner_steps=2, recompute=1) as (f, d):
        loss = {"outer_fmodel": lambda g: F.mse_loss(g(xs), ys) + F.mse_loss(f(xs), ys),
                "captured_tensor": lambda g: F.mse_loss(g(xs) * scale, ys),
                "callback": lambda g: F.mse_loss(g(xs), ys)}[reads]
        callback = (lambda grads: [g * scale for g in grads]) if reads == "callback" else None
        with pytest.raises(ValueError, match="not a fast weight of the functional model"):
            d.step(loss, grad_callback=callback)


def test_the_graph_walk_runs_once_per_model(monkeypatch):
    """Walking grad nodes from Python keeps the walked graph alive in Paddle 3.3.1, so the check walks a model's
    first recomputed step only, not one per inner loop."""
    monkeypatch.setattr(recompute_module, "_walked", recompute_module.weakref.WeakSet())
    walks = []
    original = recompute_module._check_loop_leaves
    monkeypatch.setattr(recompute_module, "_check_loop_leaves", lambda *a: walks.append(1) or original(*a))
    model = mlp()
    xs, ys, xq, yq = regression_task()
    opt = O.SGD(0.1, parameters=model.parameters())
    for _ in range(2):
        with innerloop_ctx(model, opt, copy_initial_weights=False, inner_steps=2, recompute=1) as (f, d):
            for _ in range(2):
                d.step(lambda g: F.mse_loss(g(xs), ys))
            F.mse_loss(f(xq), yq).backward()
    assert walks == [1]


def test_a_function_loss_without_recompute_equals_a_tensor_loss():
    model = mlp()
    xs, ys, xq, yq = regression_task()
    results = []
    for as_function in (False, True):
        model.clear_gradients()
        with innerloop_ctx(model, O.Adam(0.05, parameters=model.parameters()), copy_initial_weights=False) as (f, d):
            for _ in range(2):
                d.step((lambda g: F.mse_loss(g(xs), ys)) if as_function else F.mse_loss(f(xs), ys))
            F.mse_loss(f(xq), yq).backward()
        results.append([p.grad.numpy().copy() for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, "positive integer"), (-2, ValueError, "positive integer"), (1.5, TypeError, "positive integer"),
    (True, TypeError, "positive integer"), ("2", TypeError, "positive integer"),
    (STEPS + 1, ValueError, f"larger than inner_steps={STEPS}")])
def test_bad_intervals_are_refused(value, error, match):
    model = mlp()
    with pytest.raises(error, match=match) as info:
        with innerloop_ctx(model, O.SGD(0.1, parameters=model.parameters()), inner_steps=STEPS, recompute=value):
            pass
    assert "recompute" in str(info.value)


@pytest.mark.parametrize("options, match", [
    (dict(recompute=1), r"needs inner_steps .*innerloop_ctx\(\.\.\., inner_steps=K\)"),
    (dict(inner_steps=2, recompute=1, track_higher_grads=False), "track_higher_grads=False")])
def test_recompute_needs_inner_steps_and_second_order(options, match):
    model = mlp()
    with pytest.raises(ValueError, match=match):
        with innerloop_ctx(model, O.SGD(0.1, parameters=model.parameters()), **options):
            pass


class _NestedSGD(O.SGD):
    """An SGD whose registered twin keeps its state in a nested list (not carried by a segment)."""


class _NestedTwin(OptimizerTwin):
    paddle_type = _NestedSGD

    def init_one(self, param, hyper):
        return {"history": [paddle.zeros_like(param)]}

    def update_one(self, grad, state, param, hyper):
        return param - self.lr(param, hyper) * grad, {"history": state["history"] + [grad]}


def test_a_twin_state_that_cannot_be_carried_is_refused(monkeypatch):
    monkeypatch.setitem(_TWINS, _NestedSGD, _NestedTwin())
    model = mlp()
    opt = _NestedSGD(0.1, parameters=model.parameters())
    with pytest.raises(TypeError, match="_NestedSGD twin's state of parameter 0 holds 'history' of type list"):
        with innerloop_ctx(model, opt, inner_steps=2, recompute=1):
            pass
    xs, ys, _, _ = regression_task()
    with innerloop_ctx(model, opt, inner_steps=2) as (f, d):  # the stored loop still takes it
        d.step(F.mse_loss(f(xs), ys))


@pytest.mark.parametrize("interval", [1, 2])
def test_recomputed_first_in_a_fresh_process(interval, monkeypatch):
    """Recomputed before any stored loop, with no graph audited yet (the first replay's graph is audited, and
    walking it keeps it alive): every replay still runs, and matches the stored loop run afterwards."""
    from paddlefsl.metaopt.autodiff import audit

    monkeypatch.setattr(audit, "_audited", set())
    monkeypatch.setattr(recompute_module, "_walked", recompute_module.weakref.WeakSet())
    options = dict(model_name="conv_bn", opt_name="momentum", override=learned_lr)
    recomputed = loop_run(**options, recompute=interval)
    assert_same(loop_run(**options), recomputed)
