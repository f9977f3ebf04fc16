"""Exact higher-order gradients through the conv kernels, checked against finite differences (float64)."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlefsl.metaopt.autodiff import exact_ops, rules
from tests.opcheck import hvp_autograd, hvp_numeric

RNG = np.random.default_rng(1234)


def _arrays(*shapes):
    return [RNG.standard_normal(s) * 0.5 for s in shapes]


def _assert_forward_equal(op, arrays):
    """The rule's forward value equals stock Paddle's."""
    stock = op(*[paddle.to_tensor(a) for a in arrays])
    with exact_ops():
        ours = op(*[paddle.to_tensor(a) for a in arrays])
    np.testing.assert_allclose(ours.numpy(), stock.numpy(), rtol=0, atol=1e-12)


def _check(f, arrays, stock_wrt=(1,), rtol=1e-6):
    """Scope HVPs w.r.t. all inputs match finite differences; stock Paddle (no scope) raises or is wrong for the
    HVP w.r.t. the inputs ``stock_wrt`` alone (stock conv2d is silently first order when only the weight is
    differentiated, the meta-learning case: the data is a constant)."""
    wrt = list(range(len(arrays)))
    rng = np.random.default_rng(0)
    vs = [rng.standard_normal(a.shape) for a in arrays]
    want = hvp_numeric(f, arrays, wrt, vs)
    got = hvp_autograd(f, arrays, wrt, vs)
    scale = max(float(np.abs(w).max()) for w in want)
    assert scale > 1e-6
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-8 * max(1.0, scale))
    if stock_wrt:
        vs = [rng.standard_normal(arrays[i].shape) for i in stock_wrt]
        ours = hvp_autograd(f, arrays, stock_wrt, vs)
        try:
            stock = hvp_autograd(f, arrays, stock_wrt, vs, exact=False)
        except Exception:  # stock Paddle refuses the double gradient
            return
        scale = max(float(np.abs(o).max()) for o in ours)
        assert any(not np.allclose(s, o, rtol=1e-4, atol=1e-6 * scale) for s, o in zip(stock, ours)), \
            "stock Paddle already gets this second derivative right"


def _nchw_to(fmt, shape):
    """Move the channel axis of an NC... shape to the end for channel-last formats."""
    return tuple(shape) if fmt[1] == "C" else (shape[0],) + tuple(shape[2:]) + (shape[1],)


def test_rules_registered():
    table = rules()
    for name in ["conv2d", "depthwise_conv2d", "conv3d", "conv2d_transpose", "depthwise_conv2d_transpose",
                 "conv3d_transpose"]:
        assert table[name].status == "exact" and table[name].family == "conv"


CONV2D = [
    ((1, 2, 5, 5), (3, 2, 3, 3), {}),
    ((1, 2, 6, 5), (3, 2, 3, 3), dict(stride=2, padding=1)),            # 6 not divisible: needs output_size
    ((1, 2, 5, 6), (2, 2, 3, 3), dict(stride=2, padding=[1, 0, 2, 1])),  # asymmetric
    ((1, 2, 5, 6), (2, 2, 3, 3), dict(stride=2, padding="SAME")),
    ((1, 2, 5, 5), (2, 2, 3, 2), dict(padding="VALID", stride=(2, 1))),
    ((1, 2, 6, 6), (2, 2, 3, 3), dict(padding=1, dilation=2)),
    ((1, 2, 6, 5), (2, 2, 3, 3), dict(padding="SAME", dilation=2, stride=2)),
    ((1, 4, 4, 4), (4, 2, 3, 3), dict(groups=2, padding=1)),              # grouped conv2d
    ((1, 2, 5, 5), (4, 1, 3, 3), dict(groups=2, stride=2)),               # depthwise_conv2d (multiplier 2)
]


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
@pytest.mark.parametrize("xs,ws,kw", CONV2D)
def test_conv2d_second_order(xs, ws, kw, fmt):
    x, w, b = _arrays(_nchw_to(fmt, xs), ws, (ws[0],))
    op = lambda x, w, b: F.conv2d(x, w, b, data_format=fmt, **kw)
    _assert_forward_equal(op, [x, w, b])
    _check(lambda x, w, b: (op(x, w, b) ** 3).sum(), [x, w, b])


CONV2D_T = [
    ((1, 2, 3, 3), (2, 3, 3, 3), {}),
    ((1, 2, 3, 3), (2, 2, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ((1, 2, 3, 2), (2, 2, 3, 3), dict(stride=2, output_size=[8, 6])),
    ((1, 2, 3, 3), (2, 2, 3, 2), dict(stride=(2, 1), padding=[1, 0, 0, 1])),
    ((1, 2, 3, 3), (2, 2, 3, 3), dict(stride=2, padding="SAME")),
    ((1, 2, 3, 3), (2, 2, 2, 2), dict(padding="VALID", dilation=2)),
    ((1, 4, 3, 3), (4, 1, 3, 3), dict(groups=2, stride=2)),               # grouped conv2d_transpose
    ((1, 2, 3, 3), (2, 1, 3, 3), dict(groups=2, padding=1)),              # depthwise_conv2d_transpose
]


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
@pytest.mark.parametrize("xs,ws,kw", CONV2D_T)
def test_conv2d_transpose_second_order(xs, ws, kw, fmt):
    x, w = _arrays(_nchw_to(fmt, xs), ws)
    op = lambda x, w: F.conv2d_transpose(x, w, data_format=fmt, **kw)
    _assert_forward_equal(op, [x, w])
    _check(lambda x, w: (op(x, w) ** 3).sum(), [x, w])


CONV1D = [
    ((1, 2, 7), (3, 2, 3), dict(bias=True)),
    ((1, 2, 7), (2, 2, 3), dict(stride=2, padding=1)),
    ((1, 2, 6), (2, 2, 2), dict(padding="SAME", dilation=2)),
    ((1, 2, 6), (4, 1, 3), dict(groups=2, padding=[1, 0])),
]


@pytest.mark.parametrize("fmt", ["NCL", "NLC"])
@pytest.mark.parametrize("xs,ws,kw", CONV1D)
def test_conv1d_second_order(xs, ws, kw, fmt):
    kw = dict(kw)
    with_bias = kw.pop("bias", False)
    arrays = _arrays(_nchw_to(fmt, xs), ws) + (_arrays((ws[0],)) if with_bias else [])
    op = lambda x, w, *b: F.conv1d(x, w, b[0] if b else None, data_format=fmt, **kw)
    _assert_forward_equal(op, arrays)
    _check(lambda *a: (op(*a) ** 3).sum(), arrays)


@pytest.mark.parametrize("kw", [dict(stride=2, padding=1, output_padding=1), dict(groups=2, dilation=2)])
def test_conv1d_transpose_second_order(kw):
    x, w = _arrays((1, 2, 4), (2, 2, 3))
    op = lambda x, w: F.conv1d_transpose(x, w, **kw)
    _assert_forward_equal(op, [x, w])
    _check(lambda x, w: (op(x, w) ** 3).sum(), [x, w])


@pytest.mark.parametrize("fmt,kw", [("NCDHW", {}), ("NDHWC", dict(stride=2, padding=[1, 0, 0, 1, 1, 0])),
                                    ("NCDHW", dict(groups=2, padding="SAME", stride=(1, 2, 1)))])
def test_conv3d_second_order(fmt, kw):
    x, w = _arrays(_nchw_to(fmt, (1, 2, 3, 4, 3)), (2, 2 // kw.get("groups", 1), 2, 2, 2))
    op = lambda x, w: F.conv3d(x, w, data_format=fmt, **kw)
    _assert_forward_equal(op, [x, w])
    _check(lambda x, w: (op(x, w) ** 3).sum(), [x, w], stock_wrt=())  # stock conv3d double grad is right


@pytest.mark.parametrize("fmt,kw", [("NCDHW", dict(stride=2, padding=1, output_padding=1)),
                                    ("NDHWC", dict(groups=2, dilation=(1, 2, 1)))])
def test_conv3d_transpose_second_order(fmt, kw):
    x, w = _arrays(_nchw_to(fmt, (1, 2, 2, 3, 2)), (2, 1, 2, 2, 2))
    op = lambda x, w: F.conv3d_transpose(x, w, data_format=fmt, **kw)
    _assert_forward_equal(op, [x, w])
    _check(lambda x, w: (op(x, w) ** 3).sum(), [x, w])


LAYERS = [
    (lambda: paddle.nn.Conv1D(2, 2, 3, stride=2, padding=1), (1, 2, 5)),
    (lambda: paddle.nn.Conv2D(2, 2, 3, stride=2, padding=1, data_format="NHWC"), (1, 5, 5, 2)),
    (lambda: paddle.nn.Conv2DTranspose(2, 2, 3, stride=2, padding=1, output_padding=1), (1, 2, 2, 3)),
    (lambda: paddle.nn.Conv3D(2, 2, 2, padding=1), (1, 2, 2, 2, 2)),
]


@pytest.mark.parametrize("make,xs", LAYERS)
def test_layers_second_order_wrt_input_and_parameters(make, xs):
    """The nn layers (bias included) under the scope: second order w.r.t. the input and every parameter."""
    paddle.seed(0)
    layer = make()
    layer.to(dtype="float64")
    names = [n for n, _ in layer.named_parameters()]
    arrays = _arrays(xs) + [p.numpy() for p in layer.parameters()]

    def f(x, *params):
        for name, t in zip(names, params):
            layer._parameters[name] = t
        assert layer.weight is params[names.index("weight")]
        return paddle.tanh(layer(x)).sum()

    _check(f, arrays, stock_wrt=())


def _third_order_check(f, arrays, eps=1e-5, rtol=1e-5):
    """d/dx <H(x) v, u> by autograd (third order) vs central differences of <H(x) v, u> (exact second order)."""
    rng = np.random.default_rng(7)
    vs = [rng.standard_normal(a.shape) for a in arrays]
    us = [rng.standard_normal(a.shape) for a in arrays]

    def quantity(arrs, create_graph):
        ts = [paddle.to_tensor(a, stop_gradient=False) for a in arrs]
        loss = f(*ts)
        gs = paddle.grad(loss, ts, create_graph=True)
        inner = sum((g * paddle.to_tensor(v)).sum() for g, v in zip(gs, vs))
        hs = paddle.grad(inner, ts, create_graph=True)
        s = sum((h * paddle.to_tensor(u)).sum() for h, u in zip(hs, us))
        if not create_graph:
            return float(s)
        return [t.numpy() for t in paddle.grad(s, ts)]

    with exact_ops():
        got = quantity(arrays, True)
        for i, a in enumerate(arrays):
            want = np.zeros_like(a)
            for idx in np.ndindex(a.shape):
                vals = []
                for sign in (1.0, -1.0):
                    shifted = [b.copy() for b in arrays]
                    shifted[i][idx] += sign * eps
                    vals.append(quantity(shifted, False))
                want[idx] = (vals[0] - vals[1]) / (2 * eps)
            scale = max(1.0, float(np.abs(want).max()))
            assert np.abs(want).max() > 1e-6
            np.testing.assert_allclose(got[i], want, rtol=rtol, atol=1e-7 * scale)


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_conv2d_third_order(fmt):
    x, w = _arrays(_nchw_to(fmt, (1, 2, 4, 4)), (2, 2, 2, 2))
    _third_order_check(lambda x, w: (F.conv2d(x, w, stride=2, padding=[1, 0, 0, 1], data_format=fmt) ** 4).sum(),
                       [x, w])


def test_conv2d_transpose_third_order():
    x, w = _arrays((1, 2, 2, 2), (2, 1, 2, 2))
    _third_order_check(lambda x, w: (F.conv2d_transpose(x, w, stride=2, groups=2) ** 4).sum(), [x, w])


def _third_order_quantities(f, arrays, dtype):
    """Gradient, Hessian-vector product and third-order derivative ``d/dx <H v, u>`` of ``f`` by autograd."""
    rng = np.random.default_rng(7)
    vs = [rng.standard_normal(a.shape) for a in arrays]
    us = [rng.standard_normal(a.shape) for a in arrays]
    ts = [paddle.to_tensor(a, dtype=dtype, stop_gradient=False) for a in arrays]
    gs = paddle.grad(f(*ts), ts, create_graph=True)
    hs = paddle.grad(sum((g * paddle.to_tensor(v, dtype=dtype)).sum() for g, v in zip(gs, vs)), ts,
                     create_graph=True)
    ts3 = paddle.grad(sum((h * paddle.to_tensor(u, dtype=dtype)).sum() for h, u in zip(hs, us)), ts)
    return [t.numpy().astype(np.float64) for t in list(gs) + list(hs) + list(ts3)]


@pytest.mark.parametrize("groups,size", [(1, 16), (2, 24)])
@pytest.mark.parametrize("fast", [True, False])
def test_float32_fast_kernels_give_the_float64_derivatives(fast, groups, size, monkeypatch):
    """Float32 convolutions large enough for the fast kernels (oneDNN): gradient, HVP and third order agree with
    the float64 rules (exact: checked against finite differences above), with the fast path on and off, for one
    group and for grouped convolutions (a batched task learner's); the fast path really runs when on (forward,
    backward data and backward weights) and not when off."""
    from paddlefsl.metaopt import kernels, set_fast_kernels
    from paddlefsl.metaopt.kernels import onednn
    if fast and not onednn.available():
        pytest.skip("oneDNN not loadable")
    calls = []
    for name in ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights"):
        original = getattr(onednn, name)
        monkeypatch.setattr(onednn, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    monkeypatch.setattr(kernels, "_checked", {})
    rng = np.random.default_rng(5)
    x = paddle.to_tensor(rng.standard_normal((4, 8, size, size)) * 0.5)
    arrays = [rng.standard_normal((16, 8 // groups, 3, 3)) * 0.2, rng.standard_normal((16, 16 // groups, 3, 3)) * 0.1]

    def f(w1, w2):
        h = paddle.tanh(F.conv2d(x.astype(w1.dtype), w1, padding=1, groups=groups))
        return (paddle.tanh(F.conv2d(h, w2, padding=1, groups=groups)) ** 2).sum()

    previous = set_fast_kernels(fast)
    try:
        with exact_ops():
            want = _third_order_quantities(f, arrays, "float64")
            assert calls == []  # float64 never goes to oneDNN
            got = _third_order_quantities(f, arrays, "float32")
    finally:
        set_fast_kernels(previous)
    assert set(calls) == ({"conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights"} if fast else set())
    assert kernels.MIN_MACS <= 4 * 16 * size * size * (8 // groups) * 9
    assert kernels.self_check_failures() == []    # every oneDNN plan agreed with Paddle's kernel
    for g, w in zip(got, want):
        scale = float(np.abs(w).max())
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-4 * scale)


@pytest.mark.parametrize("fast", [True, False])
def test_a_first_order_learner_takes_its_convolution_gradients_from_the_fast_kernels(fast, monkeypatch):
    """First order, a convolution large enough for the first-order rule: the backward records no graph, so the
    input gradient (the transposed convolution, which a first-order lease leaves to Paddle's slow kernel) and the
    weight gradient go straight to oneDNN; the meta-gradient equals the one with the fast path off."""
    from paddle import nn
    from paddlefsl.metaopt import MAML, set_fast_kernels
    from paddlefsl.metaopt.autodiff.first_order import FIRST_ORDER_MIN_MACS
    from paddlefsl.metaopt.kernels import onednn
    if not onednn.available():
        pytest.skip("oneDNN not loadable")
    calls = []
    for name in ("conv2d_backward_data", "conv2d_backward_weights"):
        original = getattr(onednn, name)
        monkeypatch.setattr(onednn, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    assert 8 * 16 * 48 * 48 * 16 * 9 >= FIRST_ORDER_MIN_MACS
    rng = np.random.default_rng(7)
    x = paddle.to_tensor(rng.standard_normal((8, 16, 48, 48)), dtype="float32")

    def meta_gradient(fast_path: bool) -> list[np.ndarray]:
        paddle.seed(3)
        dtype = paddle.get_default_dtype()
        paddle.set_default_dtype("float32")
        try:
            model = nn.Sequential(nn.Conv2D(16, 16, 3, padding=1), nn.Tanh(), nn.Conv2D(16, 16, 3, padding=1))
        finally:
            paddle.set_default_dtype(dtype)
        maml = MAML(model, 0.1, first_order=True)
        previous = set_fast_kernels(fast_path)
        try:
            task = maml.clone()
            task.adapt((task(x) ** 2).mean())
            (task(x) ** 2).mean().backward()
        finally:
            set_fast_kernels(previous)
        return [p.grad.numpy() for p in model.parameters()]

    got = meta_gradient(fast)
    assert ("conv2d_backward_data" in calls) == fast and ("conv2d_backward_weights" in calls) == fast
    calls.clear()
    want = meta_gradient(False)
    assert calls == []
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * float(np.abs(w).max()))
