"""Exact rules of the norm family (batch/layer/group/instance norm): second and third order against finite
differences, forward values and running statistics equal to stock Paddle, and stock Paddle wrong or raising."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import _C_ops

from paddlefsl.metaopt.autodiff import exact_ops, registry
from tests.opcheck import _tensors, check_second_order, hvp_autograd

_rng = np.random.default_rng(11)


def _r(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape)


def _pos(*shape: int) -> np.ndarray:
    return 0.5 + _rng.random(shape)


def check_grad_in_scope(q: Callable, arrays: Sequence[np.ndarray], wrt: Sequence[int] | None = None,
                        eps: float = 1e-6, rtol: float = 1e-6, atol: float = 1e-8) -> None:
    """Assert that the gradient of the scalar ``q`` (evaluated inside the exact scope, where ``q`` may itself
    take gradients with ``create_graph=True``) matches central finite differences of ``q``'s value."""
    arrays = [np.asarray(a) for a in arrays]
    if wrt is None:
        wrt = [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]
    with exact_ops():
        ts = _tensors(arrays)
        grads = paddle.grad(q(*ts), [ts[i] for i in wrt], allow_unused=True)
    got = [np.zeros_like(arrays[i]) if g is None else g.numpy() for i, g in zip(wrt, grads)]
    want = []
    for i in wrt:
        fd = np.zeros_like(arrays[i])
        for idx in np.ndindex(arrays[i].shape):
            vals = []
            for sign in (1.0, -1.0):
                shifted = [a.copy() for a in arrays]
                shifted[i][idx] += sign * eps
                with exact_ops():
                    vals.append(float(q(*_tensors(shifted))))
            fd[idx] = (vals[0] - vals[1]) / (2 * eps)
        want.append(fd)
    scale = max(float(np.abs(w).max()) for w in want)
    assert scale > 1e-6, "the derivative is zero here: the check could not detect a dropped term"
    for i, g, w in zip(wrt, got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * max(1.0, scale),
                                   err_msg=f"gradient of input {i} differs from finite differences")


def grad_quantity(f: Callable, n_wrt: int, vs: Sequence[np.ndarray]) -> Callable:
    """Return ``q(*ts) = <grad f, v>`` (first order) built with ``create_graph=True``: its gradient is a
    Hessian-vector product."""

    def q(*ts):
        g = paddle.grad(f(*ts), list(ts[:n_wrt]), create_graph=True)
        return sum((gi * paddle.to_tensor(v)).sum() for gi, v in zip(g, vs))

    return q


def check_first_and_second_order_in_scope(f: Callable, arrays: Sequence[np.ndarray]) -> None:
    """For cases where stock Paddle's FIRST-order gradient is already wrong (so ``check_second_order``, which
    differences stock first-order gradients, cannot be used): first order against finite differences of the
    (stock) forward, then second order against finite differences of the scope's first-order gradients.
    The differentiable inputs must come first in ``arrays``."""
    n = sum(np.issubdtype(np.asarray(a).dtype, np.floating) for a in arrays)
    check_grad_in_scope(f, arrays)
    rng = np.random.default_rng(5)
    vs = [rng.standard_normal(np.shape(a)) for a in arrays[:n]]
    check_grad_in_scope(grad_quantity(f, n, vs), arrays, rtol=1e-5, atol=1e-7)


def hvp_quantity(f: Callable, n_wrt: int, vs: Sequence[np.ndarray], us: Sequence[np.ndarray]) -> Callable:
    """Return ``q(*ts) = <d/dx <grad f, v>, u>`` (second order), built with ``create_graph=True``: its gradient
    is a third-order quantity."""

    def q(*ts):
        xs = list(ts[:n_wrt])
        g = paddle.grad(f(*ts), xs, create_graph=True)
        inner = sum((gi * paddle.to_tensor(v)).sum() for gi, v in zip(g, vs))
        h = paddle.grad(inner, xs, create_graph=True)
        return sum((hi * paddle.to_tensor(u)).sum() for hi, u in zip(h, us))

    return q


def assert_stock_differs(f: Callable, arrays: Sequence[np.ndarray]) -> None:
    """Assert that stock Paddle (no scope) raises or gives a wrong Hessian-vector product through ``f``."""
    arrays = [np.asarray(a) for a in arrays]
    wrt = [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]
    vs = [np.random.default_rng(1).standard_normal(arrays[i].shape) for i in wrt]
    exact = hvp_autograd(f, arrays, wrt, vs)
    try:
        stock = hvp_autograd(f, arrays, wrt, vs, exact=False)
    except (RuntimeError, ValueError):
        return
    assert any(not np.allclose(s, e, rtol=1e-6, atol=1e-8) for s, e in zip(stock, exact)), \
        "stock Paddle is already exact here: the rule is not needed for this case"


def assert_forward_equal(f: Callable, arrays: Sequence[np.ndarray]) -> None:
    """Assert that ``f`` has the same value inside the scope (with inputs needing gradients) as stock Paddle."""
    stock = f(*_tensors(arrays)).numpy()
    with exact_ops():
        ours = f(*_tensors(arrays)).numpy()
    np.testing.assert_allclose(ours, stock, rtol=1e-12, atol=1e-12)


def _bn(training: bool, fmt: str = "NCHW", affine: bool = True, ugs: bool | None = None,
        channels: int = 2) -> Callable:
    mean, var = 0.3 * _r(channels), _pos(channels)

    def f(x, *wb):
        w, b = wb if affine else (None, None)
        y = F.batch_norm(x, paddle.to_tensor(mean), paddle.to_tensor(var), w, b, training=training,
                         data_format=fmt, use_global_stats=ugs)
        return (y ** 3).sum() + (y * y.flatten()[0]).sum()

    return f


def _ln(axis_shape: list[int], affine: str) -> Callable:
    def f(x, *params):
        w = params[0] if "w" in affine else None
        b = params[-1] if "b" in affine else None
        return (F.layer_norm(x, axis_shape, w, b) ** 3).sum()

    return f


def _gn(groups: int, fmt: str, affine: bool) -> Callable:
    def f(x, *wb):
        w, b = wb if affine else (None, None)
        y = F.group_norm(x, groups, weight=w, bias=b, data_format=fmt)
        return (y ** 3).sum() + (y * y.flatten()[1]).sum()

    return f


def _in(affine: bool) -> Callable:
    def f(x, *wb):
        w, b = wb if affine else (None, None)
        return (F.instance_norm(x, weight=w, bias=b) ** 3).sum()

    return f


_FW, _FB = paddle.to_tensor(_r(2)), paddle.to_tensor(_r(2))
_FW3, _FB3 = paddle.to_tensor(_r(3)), paddle.to_tensor(_r(3))

# name -> (kernel, f, arrays)
CASES: dict[str, tuple[str, Callable, list[np.ndarray]]] = {
    "bn2d_train": ("batch_norm", _bn(True), [_r(3, 2, 2, 2), _r(2), _r(2)]),
    "bn2d_train_noaffine": ("batch_norm", _bn(True, affine=False), [_r(3, 2, 2, 2)]),
    "bn2d_eval": ("batch_norm", _bn(False), [_r(3, 2, 2, 2), _r(2), _r(2)]),
    "bn2d_eval_noaffine": ("batch_norm", _bn(False, affine=False), [_r(3, 2, 2, 2)]),
    "bn2d_train_global_stats": ("batch_norm", _bn(True, ugs=True), [_r(3, 2, 2, 2), _r(2), _r(2)]),
    "bn2d_eval_batch_stats": ("batch_norm", _bn(False, ugs=False), [_r(3, 2, 2, 2), _r(2), _r(2)]),
    "bn2d_nhwc_train": ("batch_norm", _bn(True, "NHWC", channels=3), [_r(2, 2, 2, 3), _r(3), _r(3)]),
    "bn2d_nhwc_eval": ("batch_norm", _bn(False, "NHWC", channels=3), [_r(2, 2, 2, 3), _r(3), _r(3)]),
    "bn1d_nc_train": ("batch_norm", _bn(True, "NC", channels=3), [_r(4, 3), _r(3), _r(3)]),
    "bn1d_ncl_train": ("batch_norm", _bn(True, "NCL"), [_r(3, 2, 3), _r(2), _r(2)]),
    "bn1d_nlc_train": ("batch_norm", _bn(True, "NLC", channels=3), [_r(2, 2, 3), _r(3), _r(3)]),
    "bn1d_ncl_eval": ("batch_norm", _bn(False, "NCL"), [_r(3, 2, 3), _r(2), _r(2)]),
    "ln_last": ("layer_norm", _ln([3], "wb"), [_r(2, 2, 3), _r(3), _r(3)]),
    "ln_two_axes": ("layer_norm", _ln([2, 3], "wb"), [_r(2, 2, 3), _r(6), _r(6)]),
    "ln_no_affine": ("layer_norm", _ln([2, 3], ""), [_r(2, 2, 3)]),
    "ln_weight_only": ("layer_norm", _ln([3], "w"), [_r(3, 3), _r(3)]),
    "ln_bias_only": ("layer_norm", _ln([3], "b"), [_r(3, 3), _r(3)]),
    "gn_nchw": ("group_norm", _gn(2, "NCHW", True), [_r(2, 4, 2, 2), _r(4), _r(4)]),
    "gn_ncl": ("group_norm", _gn(2, "NCL", True), [_r(2, 4, 3), _r(4), _r(4)]),
    "gn_nhwc": ("group_norm", _gn(2, "NHWC", True), [_r(2, 2, 2, 4), _r(4), _r(4)]),
    "gn_no_affine": ("group_norm", _gn(1, "NCHW", False), [_r(2, 2, 2, 2)]),
    "in_2d": ("instance_norm", _in(True), [_r(2, 2, 2, 3), _r(2), _r(2)]),
    "in_1d": ("instance_norm", _in(True), [_r(2, 3, 4), _r(3), _r(3)]),
    "in_no_affine": ("instance_norm", _in(False), [_r(2, 2, 4)]),
    # affine parameters that need no gradient (frozen): the rule must return None for them
    "bn2d_train_frozen_affine": ("batch_norm", lambda x: _bn(True)(x, _FW, _FB), [_r(3, 2, 2, 2)]),
    "ln_frozen_affine": ("layer_norm", lambda x: _ln([3], "wb")(x, _FW3, _FB3), [_r(2, 3)]),
    "gn_frozen_affine": ("group_norm", lambda x: _gn(1, "NCHW", True)(x, _FW, _FB), [_r(2, 2, 2, 2)]),
    "in_frozen_affine": ("instance_norm", lambda x: _in(True)(x, _FW, _FB), [_r(2, 2, 3)]),
}


# Stock Paddle's first-order gradient is wrong here: in eval mode with use_global_stats=False the kernel normalizes
# with batch statistics but its gradient kernel treats them as constants.
# Stock group_norm without weight and bias, and stock layer_norm when only the input gradient is asked for, also
# return wrong first-order input gradients (Paddle 3.3.1, CPU).
STOCK_FIRST_ORDER_WRONG = {"bn2d_eval_batch_stats", "gn_no_affine", "ln_frozen_affine"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_second_order_matches_finite_differences(case: str) -> None:
    if case in STOCK_FIRST_ORDER_WRONG:
        check_first_and_second_order_in_scope(CASES[case][1], CASES[case][2])
    else:
        check_second_order(CASES[case][1], CASES[case][2])


@pytest.mark.parametrize("case", sorted(STOCK_FIRST_ORDER_WRONG))
def test_stock_first_order_is_wrong(case: str) -> None:
    f, arrays = CASES[case][1], CASES[case][2]
    ts = _tensors(arrays)
    (stock,) = paddle.grad(f(*ts), ts[0])
    with exact_ops():
        ts = _tensors(arrays)
        (ours,) = paddle.grad(f(*ts), ts[0])
    assert not np.allclose(stock.numpy(), ours.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_equals_stock(case: str) -> None:
    assert_forward_equal(CASES[case][1], CASES[case][2])


@pytest.mark.parametrize("case", ["bn2d_train", "bn2d_eval", "bn1d_nc_train", "bn2d_nhwc_train", "ln_two_axes",
                                  "gn_nchw", "gn_nhwc"])
def test_stock_paddle_is_wrong_or_raises(case: str) -> None:
    assert_stock_differs(CASES[case][1], CASES[case][2])


def test_stock_instance_norm_is_exact_at_second_order_but_raises_at_third() -> None:
    f, arrays = CASES["in_2d"][1], CASES["in_2d"][2]
    wrt = [0, 1, 2]
    vs = [np.random.default_rng(2).standard_normal(a.shape) for a in arrays]
    for s, e in zip(hvp_autograd(f, arrays, wrt, vs, exact=False), hvp_autograd(f, arrays, wrt, vs)):
        np.testing.assert_allclose(s, e, rtol=1e-9, atol=1e-10)
    x = _tensors(arrays)[0]
    (g,) = paddle.grad(f(x, *_tensors(arrays[1:])), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="instance_norm_double_grad"):
        (h,) = paddle.grad((g * g).sum(), [x], create_graph=True)
        paddle.grad((h * h).sum(), [x])


@pytest.mark.parametrize("name", ["batch_norm", "layer_norm", "group_norm", "instance_norm"])
def test_rule_is_installed(name: str) -> None:
    rule = registry.rules()[name]
    assert rule.status == registry.EXACT and rule.family == "norm"
    with exact_ops():
        assert getattr(_C_ops, name) is rule.replacement
    assert getattr(_C_ops, name) is registry.original(name)


@pytest.mark.parametrize("momentum", [0.9, 0.5])
@pytest.mark.parametrize("fmt,shape", [("NCHW", (3, 2, 2, 2)), ("NC", (4, 2)), ("NLC", (2, 3, 2))])
def test_running_statistics_updated_like_stock(momentum: float, fmt: str, shape: tuple[int, ...]) -> None:
    x, w, b = _r(*shape), _r(2), _r(2)
    mean, var = _r(2), _pos(2)
    results = []
    for scoped in (False, True):
        rm, rv = paddle.to_tensor(mean), paddle.to_tensor(var)
        ctx = exact_ops() if scoped else paddle.no_grad()
        with ctx:
            xt, wt, bt = _tensors([x, w, b])
            y = F.batch_norm(xt, rm, rv, wt, bt, training=True, momentum=momentum, data_format=fmt)
        results.append((y.numpy(), rm.numpy(), rv.numpy()))
    for ours, stock in zip(results[1], results[0]):
        np.testing.assert_allclose(ours, stock, rtol=1e-12, atol=1e-12)
    assert not np.allclose(results[1][1], mean)


def test_batchnorm_layer_in_scope_matches_stock_and_updates_buffers() -> None:
    x = _r(4, 3, 2, 2)
    layers = [paddle.nn.BatchNorm2D(3), paddle.nn.BatchNorm2D(3)]
    layers[1].set_state_dict(layers[0].state_dict())
    out_stock = layers[0](paddle.to_tensor(x)).numpy()
    with exact_ops():
        xt = paddle.to_tensor(x, stop_gradient=False)
        y = layers[1](xt)
        (g,) = paddle.grad((y ** 3).sum(), [xt], create_graph=True)
        (h,) = paddle.grad((g * g).sum(), [layers[1].weight])
    np.testing.assert_allclose(y.numpy(), out_stock, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layers[1]._mean.numpy(), layers[0]._mean.numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(layers[1]._variance.numpy(), layers[0]._variance.numpy(), rtol=1e-12, atol=1e-15)
    assert np.abs(h.numpy()).max() > 0


@pytest.mark.parametrize("case", ["bn2d_train", "bn1d_nc_train", "bn2d_nhwc_train", "bn1d_ncl_train",
                                  "bn2d_train_frozen_affine", "bn2d_eval", "ln_two_axes", "gn_nhwc", "in_2d"])
def test_third_order(case: str) -> None:
    f, arrays = CASES[case][1], CASES[case][2]
    rng = np.random.default_rng(3)
    vs = [rng.standard_normal(a.shape) for a in arrays]
    us = [rng.standard_normal(a.shape) for a in arrays]
    check_grad_in_scope(hvp_quantity(f, len(arrays), vs, us), arrays, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", ["bn2d_train", "bn2d_eval", "ln_last", "gn_nchw", "in_2d"])
def test_grad_with_respect_to_a_subset_of_inputs(case: str) -> None:
    f, arrays = CASES[case][1], CASES[case][2]
    with exact_ops():
        ts = _tensors(arrays)
        full = paddle.grad(f(*ts), ts, create_graph=True)
        for i in range(len(ts)):
            (gi,) = paddle.grad(f(*ts), [ts[i]], create_graph=True)
            (hi,) = paddle.grad((gi * gi).sum(), [ts[i]])
            np.testing.assert_allclose(gi.numpy(), full[i].numpy(), rtol=1e-12, atol=1e-12)
            assert np.abs(hi.numpy()).max() > 0


@pytest.mark.parametrize("fmt,shape", [("NCHW", (3, 2, 4, 4)), ("NHWC", (2, 3, 3, 2)), ("NC", (5, 2))])
def test_batch_norm_gradient_is_one_fused_kernel_call_recorded_or_not(fmt, shape):
    """Training-mode batch norm: every backward pass takes dx and dw from one call of the stock batch_norm_grad
    kernel (the input's and the weight's gradient share it); a recorded one through exact rules around it. Both
    give the same values, and a backward asking for only one of them too."""
    from tests.opcheck import kernel_calls
    c = shape[1] if fmt != "NHWC" else shape[-1]
    x, w, b, g = _r(*shape), _pos(c), _r(c), _r(*shape)
    results = {}
    for recorded in (False, True):
        with exact_ops():
            xt, wt, bt = _tensors([x, w, b])
            y = F.batch_norm(xt, paddle.zeros([c], "float64"), paddle.ones([c], "float64"), wt, bt, training=True,
                             data_format=fmt)
            with kernel_calls() as calls:
                results[recorded] = paddle.grad((y * paddle.to_tensor(g)).sum(), [xt, wt, bt],
                                                create_graph=recorded)
        assert calls.get("batch_norm_grad", 0) == 1, (recorded, calls)  # dx and dw from one call
    for fused, composite in zip(results[False], results[True]):
        np.testing.assert_allclose(fused.numpy(), composite.numpy(), rtol=1e-9, atol=1e-11)
    for i in range(3):   # one input at a time, twice from one graph: the shared result never goes stale
        with exact_ops():
            ts = _tensors([x, w, b])
            y = F.batch_norm(ts[0], paddle.zeros([c], "float64"), paddle.ones([c], "float64"), ts[1], ts[2],
                             training=True, data_format=fmt)
            for factor in (1.0, 2.0):
                (alone,) = paddle.grad((y * paddle.to_tensor(factor * g)).sum(), [ts[i]], retain_graph=True)
                np.testing.assert_allclose(alone.numpy(), factor * results[False][i].numpy(), rtol=1e-9,
                                           atol=1e-11)


@pytest.mark.parametrize("fast", [True, False])
def test_float32_conv_bn_relu_pool_block_gives_the_float64_derivatives(fast, monkeypatch):
    """One W2 block (convolution, training-mode batch norm, ReLU, 2x2 max pooling) in float32, large enough for the
    fast kernels: gradient, Hessian-vector product and third order agree with the float64 rules (exact: checked
    against finite differences above and in test_conv/test_activation/test_pool), with the fast path on and off;
    the fused batch_norm_grad kernel runs either way (in the backward that records no graph), oneDNN's
    convolutions and max pooling only when the fast path is on."""
    from paddlefsl.metaopt import kernels, set_fast_kernels
    from paddlefsl.metaopt.kernels import onednn
    from tests.metaopt.autodiff.test_conv import _third_order_quantities
    from tests.opcheck import kernel_calls
    if fast and not onednn.available():
        pytest.skip("oneDNN not loadable")
    conv_calls, pool_calls = [], []
    # oneDNN's pooling here, whatever this CPU: on one without AVX-512 the fast path declines its reference
    # (slower) implementation, but its values and workspace must still give exact derivatives where it runs
    monkeypatch.setattr(onednn, "is_reference", lambda name: False)
    real = onednn.conv2d_forward
    monkeypatch.setattr(onednn, "conv2d_forward", lambda *a: conv_calls.append(a[0].dtype) or real(*a))
    for name in ("max_pool2d_forward", "max_pool2d_backward"):
        original = getattr(onednn, name)
        monkeypatch.setattr(onednn, name, lambda *a, _f=original, _n=name: pool_calls.append(_n) or _f(*a))
    rng = np.random.default_rng(4)
    x = paddle.to_tensor(rng.standard_normal((4, 3, 48, 48)))
    assert 4 * 8 * 48 * 48 * 3 * 9 >= kernels.MIN_MACS
    arrays = [rng.standard_normal((8, 3, 3, 3)) * 0.3, 0.5 + rng.random(8), 0.1 * rng.standard_normal(8)]

    def f(w, scale, shift):
        h = F.conv2d(x.astype(w.dtype), w, padding=1)
        h = F.batch_norm(h, paddle.zeros([8], w.dtype), paddle.ones([8], w.dtype), scale, shift, training=True)
        h = F.max_pool2d(F.relu(h), 2)
        return (paddle.tanh(h) ** 2).sum()

    previous = set_fast_kernels(fast)
    try:
        with exact_ops(), kernel_calls() as calls:
            want = _third_order_quantities(f, arrays, "float64")
            assert conv_calls == []  # float64 never goes to oneDNN
            got = _third_order_quantities(f, arrays, "float32")
    finally:
        set_fast_kernels(previous)
    assert calls["batch_norm_grad"] > 0
    assert len(conv_calls) > 0 if fast else conv_calls == []
    assert set(pool_calls) == ({"max_pool2d_forward", "max_pool2d_backward"} if fast else set())
    assert 4 * 8 * 48 * 48 >= kernels.MIN_POOL_NUMEL
    for g, w in zip(got, want):
        scale = float(np.abs(w).max())
        np.testing.assert_allclose(g, w, rtol=0, atol=5e-4 * scale)


_AFFINE_CASES = ["bn2d_train", "bn2d_train_noaffine", "bn2d_train_frozen_affine", "bn2d_eval_batch_stats",
                 "bn2d_train_global_stats", "in_2d"]


@pytest.mark.parametrize("case", _AFFINE_CASES)
def test_batch_norm_through_the_fused_channel_affine_is_exact(case: str, monkeypatch) -> None:
    """Large batch-norm inputs subtract and apply their per-channel statistics with `channel_affine` (one pass of
    the inference batch-norm kernel) in the recorded backward: with its threshold at 1 every case takes it, and
    second order (finite differences) and third order still hold; the rule really runs."""
    from paddlefsl.metaopt.autodiff import common
    calls = []
    kernel = common.affine_kernel
    monkeypatch.setattr(common, "AFFINE_MIN_NUMEL", 1)
    monkeypatch.setattr(common, "affine_kernel", lambda *a: calls.append(1) or kernel(*a))
    f, arrays = CASES[case][1], CASES[case][2]
    test_second_order_matches_finite_differences(case)
    rng = np.random.default_rng(5)
    vs = [rng.standard_normal(a.shape) for a in arrays]
    us = [rng.standard_normal(a.shape) for a in arrays]
    check_grad_in_scope(hvp_quantity(f, len(arrays), vs, us), arrays, rtol=1e-5, atol=1e-7)
    # Running statistics (constants) and instance norm's per-sample axes keep the plain products.
    assert bool(calls) == (case not in ("bn2d_train_global_stats", "in_2d"))


def _live_pylayer_contexts() -> int:
    """How many PyLayer contexts are alive: each lives exactly as long as its grad node."""
    import gc
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__.endswith("_backward")
               and type(o).__module__.startswith("paddle.autograd"))


@pytest.mark.parametrize("case", ["bn2d_train", "bn2d_nhwc_train", "bn1d_nc_train", "bn2d_train_frozen_affine"])
@pytest.mark.parametrize("orders", [2, 3])
def test_a_recorded_batch_norm_gradient_dropped_without_backward_is_freed(case: str, orders: int) -> None:
    """The rules of a recorded batch-norm backward (`_SavedStatistics`) keep values without a graph only: a
    gradient recorded once (or twice) and dropped without a backward leaves no grad node behind, and one
    back-propagated frees everything too."""
    f, arrays = CASES[case][1], CASES[case][2]

    def once(backward: bool) -> float:
        with exact_ops():
            ts = _tensors(arrays)
            grads = paddle.grad(f(*ts), ts, create_graph=True)
            q = sum((g * g).sum() for g in grads)
            if orders == 3:
                grads = paddle.grad(q, ts, create_graph=True)
                q = sum((g * g).sum() for g in grads)
            if backward:
                paddle.grad(q, ts)
            return float(q)

    once(True)
    before = _live_pylayer_contexts()
    values = [once(False), once(True), once(False)]
    assert _live_pylayer_contexts() == before
    assert np.isfinite(values).all() and values[0] == values[1] > 0



def test_the_meta_backward_projects_each_output_gradient_once():
    """Backward through a recorded batch-norm gradient: the projection rule's x and g slots share one kernel call
    for P(u) (the other call is the batch-norm backward along the path through g), and the result matches finite
    differences of the recorded gradient."""
    from tests.opcheck import kernel_calls
    t = _r(4, 3, 3, 3)
    arrays = [_r(4, 3, 3, 3), _pos(3), _r(3)]

    def q(xt, wt, bt):
        y = F.batch_norm(xt, paddle.zeros([3], "float64"), paddle.ones([3], "float64"), wt, bt, training=True)
        gx, gw = paddle.grad(paddle.tanh(y).sum(), [xt, wt], create_graph=True)
        return (gx * paddle.to_tensor(t)).sum() + (gw * gw).sum()

    with exact_ops():
        ts = _tensors(arrays)
        quantity = q(*ts)
        with kernel_calls() as calls:
            paddle.grad(quantity, ts)
    assert calls.get("batch_norm_grad", 0) == 2, calls
    check_grad_in_scope(q, arrays, rtol=1e-5, atol=1e-7)
