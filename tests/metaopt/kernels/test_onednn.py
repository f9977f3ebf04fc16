"""The oneDNN convolution kernels against Paddle's own kernels (float32, NCHW)."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddlefsl.metaopt.kernels import onednn

pytestmark = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN not loadable: {onednn.load_error()}")

# (x shape, w shape, stride, pads [top, bottom, left, right], groups)
GEOMETRIES = [
    ([5, 3, 20, 20], [8, 3, 3, 3], [1, 1], [1, 1, 1, 1], 1),     # W2's first layer, smaller
    ([5, 16, 14, 14], [16, 16, 3, 3], [2, 2], [1, 1, 1, 1], 1),  # W1's strided layers
    ([2, 4, 7, 6], [5, 4, 3, 2], [2, 1], [0, 1, 1, 0], 1),       # asymmetric pads and kernel
    ([3, 6, 5, 5], [4, 6, 1, 1], [1, 1], [0, 0, 0, 0], 1),       # 1x1
    ([5, 4 * 16, 14, 14], [4 * 16, 16, 3, 3], [2, 2], [1, 1, 1, 1], 4),  # W1's layer for 4 tasks at once
    ([3, 6, 7, 6], [9, 2, 3, 2], [2, 1], [0, 1, 1, 0], 3),       # groups with asymmetric pads and kernel
    ([2, 3, 9, 9], [6, 1, 3, 3], [1, 1], [1, 1, 1, 1], 3),       # one input channel per group
]


def _stock(x, w, stride, pads, groups=1):
    y = paddle._C_ops.conv2d(x, w, stride, pads, "EXPLICIT", [1, 1], groups, "NCHW")
    return y


def _close(got: paddle.Tensor, want: paddle.Tensor) -> None:
    assert list(got.shape) == list(want.shape) and got.dtype == paddle.float32
    scale = float(np.abs(want.numpy()).max())
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=2e-6 * scale)


def test_version_is_three():
    assert onednn.version()[0] == 3


@pytest.mark.parametrize("x_shape,w_shape,stride,pads,groups", GEOMETRIES)
def test_three_kernels_equal_paddle(x_shape, w_shape, stride, pads, groups):
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal(x_shape), dtype="float32")
    w = paddle.to_tensor(rng.standard_normal(w_shape), dtype="float32")
    y = _stock(x, w, stride, pads, groups)
    gy = paddle.to_tensor(rng.standard_normal(y.shape), dtype="float32")
    gx, gw = paddle._C_ops.conv2d_grad(x, w, gy, stride, pads, "EXPLICIT", [1, 1], groups, "NCHW")
    _close(onednn.conv2d_forward(x, w, stride, pads, groups), y)
    _close(onednn.conv2d_backward_data(gy, w, x_shape, stride, pads, groups), gx)
    _close(onednn.conv2d_backward_weights(x, gy, w_shape, stride, pads, groups), gw)


def test_plans_are_cached_per_shape():
    x, w = paddle.randn([2, 3, 9, 9], dtype="float32"), paddle.randn([4, 3, 3, 3], dtype="float32")
    onednn.conv2d_forward(x, w, [1, 1], [1, 1, 1, 1])
    count = len(onednn._PLANS)
    onednn.conv2d_forward(x * 2, w, [1, 1], [1, 1, 1, 1])
    assert len(onednn._PLANS) == count
    onednn.conv2d_forward(x, w, [2, 2], [1, 1, 1, 1])
    assert len(onednn._PLANS) == count + 1


def test_inconsistent_geometry_is_refused():
    """oneDNN checks the sizes: a wrong output size raises instead of writing out of bounds."""
    with pytest.raises(RuntimeError, match=r"oneDNN convolution_\w+_primitive_desc_create failed"):
        onednn.conv2d_backward_data(paddle.randn([1, 4, 5, 5], dtype="float32"),
                                    paddle.randn([4, 3, 3, 3], dtype="float32"), [1, 3, 20, 20], [1, 1], [1, 1, 1, 1])


@pytest.mark.parametrize("shape", [[5, 32, 21, 21], [3, 7], [2, 3, 4, 5, 6]])
def test_relu_equals_paddle(shape):
    """Forward and backward, bit for bit, with exact zeros and negative values in the input."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    x.flat[::5] = 0.0
    x = paddle.to_tensor(x, dtype="float32")
    g = paddle.to_tensor(rng.standard_normal(shape), dtype="float32")
    np.testing.assert_array_equal(onednn.relu_forward(x).numpy(), paddle._C_ops.relu(x).numpy())
    np.testing.assert_array_equal(onednn.relu_backward(x, g).numpy(), paddle._C_ops.relu_grad(x, g).numpy())


# (x shape, kernel, stride, pads [top, bottom, left, right])
POOLS = [
    ([5, 32, 21, 21], [2, 2], [2, 2], [0, 0, 0, 0]),  # W2's 2x2 pool, odd size
    ([2, 3, 9, 8], [3, 3], [2, 2], [1, 1, 1, 1]),     # overlapping windows with padding
    ([2, 4, 7, 7], [3, 2], [1, 2], [0, 0, 1, 1]),
]


@pytest.mark.parametrize("x_shape,kernel,stride,pads", POOLS)
def test_max_pool_equals_paddle(x_shape, kernel, stride, pads):
    """Value, argmax (ties after a ReLU go to the first maximum, as in Paddle) and the scatter backward."""
    rng = np.random.default_rng(2)
    x = paddle.nn.functional.relu(paddle.to_tensor(rng.standard_normal(x_shape), dtype="float32"))
    y, ws = onednn.max_pool2d_forward(x, kernel, stride, pads)
    want, mask = paddle._C_ops.max_pool2d_with_index(x, kernel, stride, pads[0::2], False, False, False)
    np.testing.assert_array_equal(y.numpy(), want.numpy())
    assert bool((want == 0).any())  # ties present
    k = ws.numpy().astype(np.int64)
    oh = np.arange(y.shape[2])[:, None] * stride[0] - pads[0]
    ow = np.arange(y.shape[3])[None, :] * stride[1] - pads[2]
    index = (oh + k // kernel[1]) * x_shape[3] + ow + k % kernel[1]
    np.testing.assert_array_equal(index, mask.numpy())
    gy = paddle.to_tensor(rng.standard_normal(y.shape), dtype="float32")
    gx = paddle._C_ops.max_pool2d_with_index_grad(x, mask, gy, kernel, stride, pads[0::2], False, False, False)
    _close(onednn.max_pool2d_backward(gy, ws, x_shape, kernel, stride, pads), gx)


@pytest.mark.parametrize("shape", [[5, 32, 21, 21], [3, 4, 5, 6]])
def test_batch_norm_equals_paddle(shape):
    """Training-mode forward (value and batch statistics) and backward against Paddle's kernels."""
    rng = np.random.default_rng(3)
    x = paddle.to_tensor(rng.standard_normal(shape) * 2 + 1, dtype="float32")
    c = shape[1]
    w = paddle.to_tensor(0.5 + rng.random(c), dtype="float32")
    b = paddle.to_tensor(rng.standard_normal(c), dtype="float32")
    gy = paddle.to_tensor(rng.standard_normal(shape), dtype="float32")
    outs = paddle._C_ops.batch_norm(x, paddle.zeros([c], "float32"), paddle.ones([c], "float32"), w, b, False, 0.9,
                                    1e-5, "NCHW", False, False)
    y, mean, variance = onednn.batch_norm_forward(x, w, b, 1e-5)
    _close(y, outs[0])
    _close(mean, outs[3])
    want_var = x.numpy().astype(np.float64).var(axis=(0, 2, 3))
    np.testing.assert_allclose(variance.numpy(), want_var, rtol=1e-5)
    grads = paddle._C_ops.batch_norm_grad(x, w, b, outs[1], outs[2], outs[3], outs[4], outs[5], gy, 0.9, 1e-5,
                                          "NCHW", False, False, False)
    for got, want in zip(onednn.batch_norm_backward(x, gy, w, mean, variance, 1e-5), grads):
        _close(got, want)
