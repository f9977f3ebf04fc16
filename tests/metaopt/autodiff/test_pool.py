"""Exact higher-order gradients through the pool kernels, checked against finite differences (float64).

Inputs are random floats, so max-pool windows have no ties and the argmax is locally constant.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlefsl.metaopt.autodiff import exact_ops, rules
from tests.metaopt.autodiff.test_conv import _arrays, _assert_forward_equal, _check, _nchw_to, _third_order_check
from tests.opcheck import hvp_autograd, hvp_numeric


def test_rules_registered():
    table = rules()
    for name in ["pool2d", "pool3d", "max_pool2d_with_index", "max_pool3d_with_index"]:
        assert table[name].status == "exact" and table[name].family == "pool"


# Stock Paddle 3.3.1 raises on the double gradient of max pooling ("grad grad only supports avgpool") and of
# 3-D average pooling; its 2-D average pooling double gradient is right (the rule is exact all the same).
_STOCK_WRONG = {F.max_pool2d: (0,), F.adaptive_max_pool2d: (0,), F.avg_pool2d: (), F.adaptive_avg_pool2d: ()}

MAX2D = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1, padding=1),                  # overlapping windows share argmaxes
    dict(kernel_size=2, stride=1, padding=[1, 0, 0, 1]),       # asymmetric padding
    dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),  # a window of padding only
    dict(kernel_size=3, stride=2, padding="SAME"),
    dict(kernel_size=(3, 2), stride=(1, 2), padding="VALID"),
]
AVG2D = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=2, padding=1, exclusive=False),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=2, stride=1, padding=[0, 1, 1, 0]),
    dict(kernel_size=3, stride=2, padding="SAME"),
    dict(kernel_size=2, divisor_override=3),
]


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
@pytest.mark.parametrize("fn,kw", [(F.max_pool2d, kw) for kw in MAX2D] + [(F.avg_pool2d, kw) for kw in AVG2D])
def test_pool2d_second_order(fn, kw, fmt):
    (x,) = _arrays(_nchw_to(fmt, (1, 2, 5, 5)))
    op = lambda x: fn(x, data_format=fmt, **kw)
    _assert_forward_equal(op, [x])
    _check(lambda x: (op(x) ** 3).sum(), [x], stock_wrt=_STOCK_WRONG[fn])


@pytest.mark.parametrize("fn,size,fmt", [
    (F.adaptive_avg_pool2d, [2, 3], "NCHW"), (F.adaptive_avg_pool2d, [2, 3], "NHWC"),
    (F.adaptive_avg_pool2d, 1, "NCHW"), (F.adaptive_avg_pool2d, 1, "NHWC"),
    (F.adaptive_max_pool2d, [2, 3], "NCHW"), (F.adaptive_max_pool2d, 1, "NCHW"),  # max: NCHW only in Paddle
])
def test_adaptive_pool2d_second_order(fn, size, fmt):
    (x,) = _arrays(_nchw_to(fmt, (1, 2, 5, 4)))
    op = (lambda x: fn(x, size)) if fn is F.adaptive_max_pool2d else (lambda x: fn(x, size, data_format=fmt))
    _assert_forward_equal(op, [x])
    _check(lambda x: (op(x) ** 3).sum(), [x], stock_wrt=_STOCK_WRONG[fn])


@pytest.mark.parametrize("op", [
    # (stock max_pool2d_with_index_grad aborts the process on a window of padding only, whose mask is -1, so
    # the finite-difference reference cannot use one here; the pool2d tests cover that case)
    lambda x: F.max_pool2d(x, 3, 2, padding=1, ceil_mode=True, return_mask=True),
    lambda x: F.max_pool2d(x, 3, 1, padding=1, return_mask=True),
    lambda x: F.adaptive_max_pool2d(x, [2, 3], return_mask=True),
    lambda x: F.max_pool1d(x.reshape([1, 2, -1]), 3, 2, padding=1, return_mask=True),
])
def test_max_pool_with_index_second_order(op):
    """return_mask=True reaches max_pool2d_with_index: same values and mask as stock, exact second order."""
    (x,) = _arrays((1, 2, 5, 5))
    stock_y, stock_mask = op(paddle.to_tensor(x))
    with exact_ops():
        y, mask = op(paddle.to_tensor(x))
    np.testing.assert_array_equal(mask.numpy(), stock_mask.numpy())
    np.testing.assert_allclose(y.numpy(), stock_y.numpy(), rtol=0, atol=1e-12)
    _check(lambda x: (op(x)[0] ** 3).sum(), [x], stock_wrt=(0,))


@pytest.mark.parametrize("op,stock_wrt", [
    (lambda x: F.max_pool1d(x, 2), (0,)),
    (lambda x: F.max_pool1d(x, 3, 2, padding=1, ceil_mode=True), (0,)),
    (lambda x: F.avg_pool1d(x, 3, 2, padding=1, exclusive=False), ()),
    (lambda x: F.avg_pool1d(x, 2, 1, padding=[0, 1]), ()),
    (lambda x: F.adaptive_avg_pool1d(x, 3), ()),
    (lambda x: F.adaptive_max_pool1d(x, 3), (0,)),
])
def test_pool1d_second_order(op, stock_wrt):
    (x,) = _arrays((1, 2, 7))
    _assert_forward_equal(op, [x])
    _check(lambda x: (op(x) ** 3).sum(), [x], stock_wrt=stock_wrt)


@pytest.mark.parametrize("fmt", ["NCDHW", "NDHWC"])
@pytest.mark.parametrize("fn,kw", [
    (F.max_pool3d, dict(kernel_size=2, stride=1, padding=[0, 1, 1, 0, 0, 0])),
    (F.avg_pool3d, dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)),
    (F.adaptive_avg_pool3d, dict(output_size=[2, 1, 2])),
])
def test_pool3d_second_order(fn, kw, fmt):
    (x,) = _arrays(_nchw_to(fmt, (1, 2, 3, 3, 4)))
    op = lambda x: fn(x, data_format=fmt, **kw)
    _assert_forward_equal(op, [x])
    _check(lambda x: (op(x) ** 3).sum(), [x], stock_wrt=(0,))


@pytest.mark.parametrize("op", [
    lambda x: F.max_pool3d(x, 2, 1, padding=1, return_mask=True)[0],
    lambda x: F.adaptive_max_pool3d(x, [2, 1, 2]),
])
def test_max_pool3d_with_index_second_order(op):
    (x,) = _arrays((1, 2, 3, 3, 4))
    _assert_forward_equal(op, [x])
    _check(lambda x: (op(x) ** 3).sum(), [x], stock_wrt=(0,))


@pytest.mark.parametrize("pooling_type", ["max", "avg"])
def test_global_pooling_kernel(pooling_type):
    """The kernel's global_pooling flag (kernel size and padding ignored)."""
    (x,) = _arrays((1, 2, 3, 4))
    op = lambda x: paddle._C_ops.pool2d(x, [1, 1], [1, 1], [1, 1], False, True, "NCHW", pooling_type, True,
                                        False, "EXPLICIT")
    _assert_forward_equal(op, [x])
    _check(lambda x: (op(x) ** 3).sum(), [x], stock_wrt=())


def test_small_cnn_second_order_wrt_weights():
    """conv -> max pool -> conv -> adaptive avg pool: exact HVP w.r.t. the weights with the data constant."""
    x, w1, w2 = _arrays((2, 1, 6, 6), (2, 1, 3, 3), (2, 2, 2, 2))
    xt = paddle.to_tensor(x)

    def f(w1, w2):
        h = F.max_pool2d(paddle.tanh(F.conv2d(xt, w1, padding=1)), 2)
        return paddle.tanh(F.adaptive_avg_pool2d(F.conv2d(h, w2), 1)).sum()

    _check(f, [w1, w2], stock_wrt=(0, 1))


@pytest.mark.parametrize("fn", [lambda x: F.max_pool2d(x, 3, 2, padding=1), lambda x: F.avg_pool2d(x, 2, 1)])
def test_pool2d_third_order(fn):
    (x,) = _arrays((1, 1, 4, 4))
    _third_order_check(lambda x: (fn(x) ** 4).sum(), [x])


def test_with_index_window_of_padding_only():
    """A window of padding only (mask -1): stock max_pool2d_with_index_grad aborts on it, so the rule's HVP is
    compared with finite differences of the same max pool reached through pool2d (no mask)."""
    (x,) = _arrays((1, 2, 5, 5))
    with_mask = lambda x: (F.max_pool2d(x, 2, 2, padding=1, ceil_mode=True, return_mask=True)[0] ** 3).sum()
    plain = lambda x: (F.max_pool2d(x, 2, 2, padding=1, ceil_mode=True) ** 3).sum()
    with exact_ops():
        _, mask = F.max_pool2d(paddle.to_tensor(x), 2, 2, padding=1, ceil_mode=True, return_mask=True)
    assert int(mask.min()) == -1
    v = [np.random.default_rng(3).standard_normal(x.shape)]
    got = hvp_autograd(with_mask, [x], [0], v)
    want = hvp_numeric(plain, [x], [0], v)
    assert np.abs(want[0]).max() > 1e-6
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("op", [
    lambda x: F.max_pool2d(x, 2),
    lambda x: F.max_pool2d(x, 3, 1, padding=1),
    lambda x: F.max_pool2d(x, 3, 2, padding=1, ceil_mode=True),
    lambda x: F.max_pool2d(x, 3, 1, padding=1, return_mask=True)[0],
    lambda x: F.adaptive_max_pool2d(x, [2, 3]),
    lambda x: F.max_pool3d(x.reshape([1, 2, 5, 5, 1]), [2, 2, 1]),
])
def test_max_pool_is_one_kernel_each_way(op):
    """Max pooling whose windows all overlap the input: forward is one max_pool*_with_index kernel (no pool2d
    beside it, no device-to-host read of the mask), the gradient one max_pool*_with_index_grad kernel (not a
    zero tensor and a put_along_axis), and the gradient's gradient one take_along_axis."""
    from tests.opcheck import kernel_calls
    (x,) = _arrays((1, 2, 5, 5))
    xt = paddle.to_tensor(x, stop_gradient=False)
    with exact_ops(), kernel_calls() as calls:
        y = op(xt)
        (g,) = paddle.grad((y ** 3).sum(), [xt], create_graph=True)
        paddle.grad((g * g).sum(), [xt])
    pools = {k: v for k, v in calls.items() if "pool" in k or k.endswith("along_axis")}
    nd = "3d" if "3d" in next(iter(pools)) else "2d"
    assert pools == {f"max_pool{nd}_with_index": 1, f"max_pool{nd}_with_index_grad": 2, "take_along_axis": 1}, calls
    assert "put_along_axis" not in calls and "all" not in calls
