"""Each differentiable twin against Paddle's own optimizer, and its meta-gradients against finite differences."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from paddlefsl.metaopt.innerloop import innerloop_ctx
from paddlefsl.metaopt.optim import (AdadeltaTwin, AdagradTwin, AdamTwin, AdamWTwin, MomentumTwin, OptimizerTwin,
                                     RMSPropTwin, SGDTwin, register_twin, registered_twins, safe_sqrt, twin_for)
from paddlefsl.metaopt.optim.base import _TWINS

O = paddle.optimizer
L1, L2 = paddle.regularizer.L1Decay, paddle.regularizer.L2Decay


def make_model(seed: int = 3) -> nn.Layer:
    paddle.seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def data(seed: int):
    rng = np.random.default_rng(seed)
    return paddle.to_tensor(rng.normal(size=(6, 3))), paddle.to_tensor(rng.normal(size=(6, 2)))


XS, YS = data(0)
XQ, YQ = data(1)


def groups(model, first: dict, second: dict | None = None):
    return [dict(params=model[0].parameters(), **first), dict(params=model[2].parameters(), **(second or {}))]


def decay_weights_only(name: str) -> bool:
    return name.endswith("w_0")


# ------------------------------------------------------------------------------------------- forward parity
PARITY = {
    "sgd": lambda m: O.SGD(0.1, parameters=m.parameters()),
    "sgd_l2_float": lambda m: O.SGD(0.1, parameters=m.parameters(), weight_decay=0.05),
    "sgd_l1": lambda m: O.SGD(0.1, parameters=m.parameters(), weight_decay=L1(0.05)),
    "sgd_groups": lambda m: O.SGD(0.1, weight_decay=0.02, parameters=groups(
        m, {"learning_rate": 0.5, "weight_decay": L1(0.03)}, {"weight_decay": 0.07})),
    "sgd_scheduler": lambda m: O.SGD(O.lr.StepDecay(0.2, step_size=1, gamma=0.5), parameters=m.parameters()),
    "sgd_clip_value": lambda m: O.SGD(0.1, parameters=m.parameters(), grad_clip=nn.ClipGradByValue(0.02)),
    "sgd_clip_global": lambda m: O.SGD(0.1, parameters=m.parameters(), grad_clip=nn.ClipGradByGlobalNorm(0.1)),
    "momentum": lambda m: O.Momentum(0.1, momentum=0.7, parameters=m.parameters()),
    "momentum_nesterov_l2": lambda m: O.Momentum(0.1, momentum=0.7, use_nesterov=True, weight_decay=0.05,
                                                 parameters=m.parameters()),
    "momentum_l1_rescale": lambda m: O.Momentum(0.1, momentum=0.6, weight_decay=L1(0.05), rescale_grad=0.5,
                                                parameters=m.parameters()),
    "momentum_groups": lambda m: O.Momentum(0.1, momentum=0.9, weight_decay=0.01, parameters=groups(
        m, {"momentum": 0.3, "learning_rate": 2.0, "weight_decay": L2(0.04)}, {"use_nesterov": True})),
    "momentum_scheduler": lambda m: O.Momentum(O.lr.ExponentialDecay(0.1, gamma=0.7), momentum=0.7,
                                               parameters=m.parameters()),
    "adam": lambda m: O.Adam(0.05, parameters=m.parameters()),
    "adam_l2_amsgrad": lambda m: O.Adam(0.05, beta1=0.8, beta2=0.9, epsilon=1e-3, weight_decay=0.05, amsgrad=True,
                                        parameters=m.parameters()),
    "adam_groups_clip": lambda m: O.Adam(0.05, parameters=groups(m, {"beta1": 0.5, "learning_rate": 0.3},
                                                                 {"epsilon": 1e-2}),
                                         grad_clip=nn.ClipGradByGlobalNorm(0.2)),
    "adamw": lambda m: O.AdamW(0.05, weight_decay=0.2, parameters=m.parameters()),
    "adamw_selective_groups": lambda m: O.AdamW(0.05, weight_decay=0.1, apply_decay_param_fun=decay_weights_only,
                                                parameters=groups(m, {"weight_decay": 0.3, "beta2": 0.8})),
    "adamw_amsgrad_scheduler": lambda m: O.AdamW(O.lr.StepDecay(0.05, 1, 0.5), amsgrad=True,
                                                 parameters=m.parameters()),
    "rmsprop": lambda m: O.RMSProp(0.05, parameters=m.parameters()),
    "rmsprop_centered_momentum": lambda m: O.RMSProp(0.05, rho=0.8, epsilon=1e-4, momentum=0.5, centered=True,
                                                     weight_decay=0.03, parameters=m.parameters()),
    "rmsprop_groups": lambda m: O.RMSProp(0.05, parameters=groups(m, {"rho": 0.5, "centered": True},
                                                                  {"momentum": 0.3})),
    "adagrad": lambda m: O.Adagrad(0.1, parameters=m.parameters()),
    "adagrad_init_l1": lambda m: O.Adagrad(0.1, epsilon=1e-4, initial_accumulator_value=0.1,
                                           weight_decay=L1(0.01), parameters=m.parameters()),
    "adagrad_groups": lambda m: O.Adagrad(0.1, parameters=groups(m, {"initial_accumulator_value": 0.5,
                                                                     "learning_rate": 0.5}, {"epsilon": 0.1})),
    "adadelta": lambda m: O.Adadelta(0.5, parameters=m.parameters()),
    "adadelta_l2_groups": lambda m: O.Adadelta(0.5, weight_decay=0.02, parameters=groups(m, {"rho": 0.7},
                                                                                         {"epsilon": 1e-3})),
}


def _step_scheduler(opt):
    if isinstance(opt._learning_rate, O.lr.LRScheduler):
        opt._learning_rate.step()


@pytest.mark.parametrize("case", sorted(PARITY))
def test_twin_matches_paddle_optimizer(case):
    steps = 4
    reference = make_model()
    opt = PARITY[case](reference)
    for _ in range(steps):
        F.mse_loss(reference(XS), YS).backward()
        opt.step()
        opt.clear_grad()
        _step_scheduler(opt)
    model = make_model()
    before = [p.numpy().copy() for p in model.parameters()]
    opt = PARITY[case](model)
    with innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(XS), YS))
            _step_scheduler(opt)
        final = fmodel.parameters()
    moved = False
    for want, got, b in zip(reference.parameters(), final, before):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-12)
        moved |= not np.allclose(want.numpy(), b)
    assert moved
    for p, b in zip(model.parameters(), before):              # the model itself is never touched
        np.testing.assert_array_equal(p.numpy(), b)


def test_clip_by_norm_matches_paddle_in_float32():
    """Paddle's clip_by_norm kernel exists only for float32 on CPU, so this parity check is float32 (rtol 1e-6)."""
    paddle.set_default_dtype("float32")
    xs, ys = XS.astype("float32"), YS.astype("float32")
    reference = make_model()
    opt = O.Momentum(0.1, parameters=reference.parameters(), grad_clip=nn.ClipGradByNorm(0.05))
    for _ in range(3):
        F.mse_loss(reference(xs), ys).backward()
        opt.step()
        opt.clear_grad()
    model = make_model()
    opt = O.Momentum(0.1, parameters=model.parameters(), grad_clip=nn.ClipGradByNorm(0.05))
    with innerloop_ctx(model, opt) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(xs), ys))
    unclipped = make_model()
    for want, got, start in zip(reference.parameters(), fmodel.parameters(), unclipped.parameters()):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)
        assert np.linalg.norm(got.numpy() - start.numpy()) <= 0.1 * 0.05 * (1 + 1.9 + 2.71) + 1e-6


@pytest.mark.parametrize("case", ["adam", "adamw", "rmsprop", "adagrad", "adadelta", "momentum"])
def test_parameter_with_exactly_zero_gradient_gives_finite_meta_gradients(case):
    model = make_model()
    xs = XS * paddle.to_tensor([1.0, 0.0, 1.0])              # column 1 of the first weight gets gradient 0
    opt = PARITY[case](model)
    with innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(xs), YS))
        F.mse_loss(fmodel(XQ), YQ).backward()
    for p in model.parameters():
        assert p.grad is not None and np.isfinite(p.grad.numpy()).all()
    assert np.abs(model[0].weight.grad.numpy()).max() > 0


# ------------------------------------------------------------------------------------------- meta-gradients
HYPER = {
    "sgd": (lambda m: O.SGD(0.1, parameters=m.parameters()), {"learning_rate": 0.1, "weight_decay": 0.05}),
    "momentum": (lambda m: O.Momentum(0.1, momentum=0.6, parameters=m.parameters()),
                 {"learning_rate": 0.1, "momentum": 0.6, "weight_decay": 0.05}),
    "momentum_nesterov": (lambda m: O.Momentum(0.1, momentum=0.6, use_nesterov=True, parameters=m.parameters()),
                          {"learning_rate": 0.1, "momentum": 0.6, "weight_decay": 0.05}),
    "adam": (lambda m: O.Adam(0.05, parameters=m.parameters()),
             {"learning_rate": 0.05, "beta1": 0.8, "beta2": 0.9, "epsilon": 0.01, "weight_decay": 0.05}),
    "adam_amsgrad": (lambda m: O.Adam(0.05, amsgrad=True, parameters=m.parameters()),
                     {"learning_rate": 0.05, "beta1": 0.8, "beta2": 0.9, "epsilon": 0.01, "weight_decay": 0.02}),
    "adamw": (lambda m: O.AdamW(0.05, parameters=m.parameters()),
              {"learning_rate": 0.05, "beta1": 0.8, "beta2": 0.9, "epsilon": 0.01, "weight_decay": 0.3}),
    "rmsprop_centered": (lambda m: O.RMSProp(0.05, centered=True, parameters=m.parameters()),
                         {"learning_rate": 0.05, "rho": 0.8, "epsilon": 0.01, "momentum": 0.4,
                          "weight_decay": 0.05}),
    "adagrad": (lambda m: O.Adagrad(0.1, parameters=m.parameters()),
                {"learning_rate": 0.1, "epsilon": 0.05, "weight_decay": 0.05}),
    "adadelta": (lambda m: O.Adadelta(0.5, parameters=m.parameters()),
                 {"learning_rate": 0.5, "rho": 0.8, "epsilon": 0.01, "weight_decay": 0.05}),
}


def _meta_loss(case, hyper: dict, w0=None, backward=False):
    factory, _ = HYPER[case]
    model = make_model()
    if w0 is not None:
        for p, value in zip(model.parameters(), w0):
            paddle.assign(value, output=p)
    tensors = {k: paddle.to_tensor(v, stop_gradient=False) for k, v in hyper.items()}
    with innerloop_ctx(model, factory(model), copy_initial_weights=False, override=tensors) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(XS), YS))
        loss = F.mse_loss(fmodel(XQ), YQ)
        if not backward:
            return float(loss.item())
        loss.backward()
    return ([p.grad.numpy().copy() for p in model.parameters()], {k: float(t.grad.item()) for k, t in tensors.items()})


@pytest.mark.parametrize("case", sorted(HYPER))
def test_meta_gradients_match_finite_differences(case):
    eps = 1e-6
    _, hyper = HYPER[case]
    assert set(hyper) == set(twin_for(HYPER[case][0](make_model())).hyper_names)   # every overridable one
    grads_w, grads_h = _meta_loss(case, hyper, backward=True)
    for name, value in hyper.items():
        up = _meta_loss(case, {**hyper, name: value + eps})
        down = _meta_loss(case, {**hyper, name: value - eps})
        numeric = (up - down) / (2 * eps)
        assert abs(numeric) > 1e-8, name
        np.testing.assert_allclose(grads_h[name], numeric, rtol=2e-6, atol=1e-10, err_msg=name)
    w0 = [p.numpy() for p in make_model().parameters()]
    rng = np.random.default_rng(0)
    for k in rng.choice(len(w0), size=3, replace=False):
        index = tuple(rng.integers(0, s) for s in w0[k].shape)
        values = []
        for sign in (1, -1):
            shifted = [w.copy() for w in w0]
            shifted[k][index] += sign * eps
            values.append(_meta_loss(case, hyper, shifted))
        numeric = (values[0] - values[1]) / (2 * eps)
        np.testing.assert_allclose(grads_w[k][index], numeric, rtol=2e-6, atol=1e-10, err_msg=f"w0[{k}]{index}")


# ------------------------------------------------------------------------------------------- safe sqrt
def test_safe_sqrt_forward_and_derivatives():
    x = paddle.to_tensor([0.0, 1e-30, 0.25, 4.0], stop_gradient=False)
    y = safe_sqrt(x)
    np.testing.assert_array_equal(y.numpy(), paddle.sqrt(x).numpy())
    (g,) = paddle.grad(y.sum(), x, create_graph=True)
    np.testing.assert_allclose(g.numpy()[1:], 0.5 / np.sqrt(x.numpy()[1:]), rtol=1e-15)
    assert g.numpy()[0] == 0.0
    (h,) = paddle.grad(g[2:].sum(), x)
    np.testing.assert_allclose(h.numpy()[2:], -0.25 * x.numpy()[2:] ** -1.5, rtol=1e-14)


def test_paddle_sqrt_gives_nan_where_safe_sqrt_does_not():
    x = paddle.to_tensor([0.0, 1.0], stop_gradient=False)
    (stock,) = paddle.grad((paddle.sqrt(x * x) * 0).sum() + paddle.sqrt(x * x).sum() * 0, x)
    (safe,) = paddle.grad(safe_sqrt(x * x).sum(), x)
    assert not np.isfinite(stock.numpy()).all()
    assert np.isfinite(safe.numpy()).all()


# ------------------------------------------------------------------------------------------- registry
def test_registry_holds_the_seven_twins():
    twins = registered_twins()
    expected = {O.SGD: SGDTwin, O.Momentum: MomentumTwin, O.Adam: AdamTwin, O.AdamW: AdamWTwin,
                O.RMSProp: RMSPropTwin, O.Adagrad: AdagradTwin, O.Adadelta: AdadeltaTwin}
    for paddle_type, twin_type in expected.items():
        assert type(twins[paddle_type]) is twin_type and twin_type.paddle_type is paddle_type


@pytest.mark.parametrize("factory", [lambda p: O.Adamax(0.1, parameters=p), lambda p: O.Lamb(0.1, parameters=p)])
def test_unsupported_optimizer_type_raises(factory):
    model = make_model()
    with pytest.raises(TypeError, match="no differentiable twin"):
        twin_for(factory(model.parameters()))


def test_subclass_is_not_matched_until_registered_and_custom_twins_work():
    class HalfSGD(O.SGD):
        """SGD whose steps are half as long (a user's own optimizer)."""

    class HalfSGDTwin(SGDTwin):
        paddle_type = HalfSGD

        def update_one(self, grad, state, param, hyper):
            return param - 0.5 * self.lr(param, hyper) * grad, state

    model = make_model()
    with pytest.raises(TypeError, match="HalfSGD"):
        twin_for(HalfSGD(0.1, parameters=model.parameters()))
    register_twin(HalfSGD, HalfSGDTwin)
    try:
        results = []
        for opt_type, lr in ((HalfSGD, 0.2), (O.SGD, 0.1)):
            model = make_model()
            with innerloop_ctx(model, opt_type(lr, parameters=model.parameters())) as (fmodel, diffopt):
                diffopt.step(F.mse_loss(fmodel(XS), YS))
                results.append([p.numpy() for p in fmodel.parameters()])
        for a, b in zip(*results):
            np.testing.assert_allclose(a, b, rtol=1e-15)
    finally:
        del _TWINS[HalfSGD]
    with pytest.raises(TypeError):
        register_twin(int, SGDTwin)
    with pytest.raises(TypeError):
        register_twin(HalfSGD, object())


def test_functional_protocol_directly():
    twin = AdamTwin()
    params = [paddle.to_tensor([1.0, -2.0])]
    hyper = [{"learning_rate": 0.1, "lr_scale": 1.0, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8,
              "decay_kind": None, "weight_decay": 0.0}]
    state = twin.init(params, hyper)
    new, state2 = twin.update([paddle.to_tensor([0.5, -0.5])], state, params, hyper)
    np.testing.assert_allclose(new[0].numpy(), [0.9, -1.9], rtol=1e-6)     # first Adam step moves by lr
    assert state[0]["beta1_pow"] is None and float(state2[0]["beta1_pow"]) == pytest.approx(0.81)
    same, state3 = twin.update([None], state2, new, hyper)
    assert same[0] is new[0] and state3[0] is state2[0]
    assert isinstance(twin, OptimizerTwin)


def test_adam_with_stock_sqrt_would_give_nan_meta_gradients(monkeypatch):
    """The safe sqrt matters: with paddle.sqrt the zero-gradient coordinates turn the meta-gradient into NaN."""
    import paddlefsl.metaopt.optim.adam as adam_module

    monkeypatch.setattr(adam_module, "safe_sqrt", paddle.sqrt)
    model = make_model()
    xs = XS * paddle.to_tensor([1.0, 0.0, 1.0])
    with innerloop_ctx(model, O.Adam(0.05, parameters=model.parameters()), copy_initial_weights=False) as (fm, d):
        for _ in range(3):
            d.step(F.mse_loss(fm(xs), YS))
        F.mse_loss(fm(XQ), YQ).backward()
    assert not np.isfinite(model[0].weight.grad.numpy()).all()


def make_attr_model() -> nn.Layer:
    """Per-parameter settings through ParamAttr: a learning-rate scale, an own regularizer, no clipping."""
    paddle.seed(4)
    attr = paddle.ParamAttr(learning_rate=2.0, regularizer=L1(0.01), need_clip=False)
    return nn.Sequential(nn.Linear(3, 4, weight_attr=attr), nn.Tanh(),
                         nn.Linear(4, 2, bias_attr=paddle.ParamAttr(learning_rate=0.5, regularizer=L2(0.02))))


@pytest.mark.parametrize("factory", [
    lambda p: O.SGD(0.1, parameters=p, weight_decay=0.05, grad_clip=nn.ClipGradByGlobalNorm(0.1)),
    lambda p: O.Momentum(0.1, momentum=0.8, parameters=p, weight_decay=L1(0.03), grad_clip=nn.ClipGradByValue(0.05)),
    lambda p: O.Adam(0.05, parameters=p, weight_decay=0.05),
    lambda p: O.RMSProp(0.05, centered=True, parameters=p),
], ids=["sgd", "momentum", "adam", "rmsprop"])
def test_param_attr_settings_match_paddle(factory):
    reference = make_attr_model()
    opt = factory(reference.parameters())
    for _ in range(3):
        F.mse_loss(reference(XS), YS).backward()
        opt.step()
        opt.clear_grad()
    model = make_attr_model()
    with innerloop_ctx(model, factory(model.parameters())) as (fmodel, diffopt):
        for _ in range(3):
            diffopt.step(F.mse_loss(fmodel(XS), YS))
    for want, got in zip(reference.parameters(), fmodel.parameters()):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-12)
