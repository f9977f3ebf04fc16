"""The fast-kernel policy: the switch (function and environment variable), the automatic choice with fallback to
Paddle's kernel, and the one-time self-check."""
from __future__ import annotations

import os
import subprocess
import sys

import warnings

import numpy as np
import paddle
import pytest

from paddlefsl.metaopt import kernels, set_fast_kernels
from paddlefsl.metaopt.kernels import onednn

needs_onednn = pytest.mark.skipif(not onednn.available(), reason="oneDNN not loadable")


@pytest.fixture
def fast_on():
    previous = set_fast_kernels(True)
    yield
    set_fast_kernels(previous)


@pytest.fixture
def any_implementation(monkeypatch):
    """oneDNN's pooling whatever this CPU: the fast path declines reference implementations (a CPU without AVX-512
    has only one for max pooling on NCHW), but the tests of what the kernel computes must run everywhere."""
    monkeypatch.setattr(onednn, "is_reference", lambda name: False)


def _tensors(dtype="float32", x_shape=(5, 16, 20, 20), w_shape=(16, 16, 3, 3)):
    return paddle.randn(list(x_shape), dtype=dtype), paddle.randn(list(w_shape), dtype=dtype)


def test_switch_returns_the_previous_setting_and_checks_its_argument():
    previous = set_fast_kernels(False)
    try:
        assert kernels.fast_kernels_enabled() is False
        assert set_fast_kernels(True) is False
        assert kernels.fast_kernels_enabled() is True
        with pytest.raises(TypeError, match="enabled must be True or False"):
            set_fast_kernels("no")
    finally:
        set_fast_kernels(previous)


@pytest.mark.parametrize("value,expected", [("0", False), (None, True)])
def test_environment_variable(value, expected):
    env = {k: v for k, v in os.environ.items() if k != kernels.ENV}
    if value is not None:
        env[kernels.ENV] = value
    out = subprocess.run([sys.executable, "-c", "from paddlefsl.metaopt import kernels; "
                          "print(kernels.fast_kernels_enabled())"], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))))
    assert out.stdout.strip().splitlines()[-1] == str(expected)


@needs_onednn
def test_automatic_choice(fast_on, monkeypatch):
    x, w = _tensors()
    big = kernels.MIN_MACS
    assert kernels.conv2d_supported(x, w, [1, 1], 1, False, big)
    assert not kernels.conv2d_supported(x, w, [1, 1], 1, False, big - 1)    # too small: Paddle's kernel
    assert not kernels.conv2d_supported(x, w, [2, 2], 1, False, big)        # dilation
    assert kernels.conv2d_supported(x, w, [1, 1], 2, False, big)            # groups: oneDNN's grouped plans
    assert not kernels.conv2d_supported(x, w, [1, 1], 1, True, big)         # channel-last
    x64, w64 = _tensors("float64")
    assert not kernels.conv2d_supported(x64, w64, [1, 1], 1, False, big)    # float64
    set_fast_kernels(False)
    assert not kernels.conv2d_supported(x, w, [1, 1], 1, False, big)        # switched off
    set_fast_kernels(True)
    monkeypatch.setattr(onednn, "available", lambda: False)                 # library missing / other version
    assert not kernels.conv2d_supported(x, w, [1, 1], 1, False, big)


def test_missing_library_is_reported(monkeypatch):
    monkeypatch.setattr(onednn, "_LIB", None)
    monkeypatch.setattr(onednn, "_LOAD_ERROR", None)
    monkeypatch.setattr(onednn, "_library_path", lambda: "/nonexistent/libdnnl.so.3")
    assert onednn.available() is False
    assert "libdnnl.so.3" in onednn.load_error()
    with pytest.raises(OSError, match="oneDNN is not available"):
        onednn.conv2d_forward(*_tensors(), [1, 1], [1, 1, 1, 1])


@needs_onednn
def test_self_check_rejects_a_wrong_kernel_once_and_for_all(fast_on, monkeypatch):
    x, w = _tensors(x_shape=(3, 16, 11, 11))
    stock = lambda a, b: paddle._C_ops.conv2d(a, b, [1, 1], [1, 1, 1, 1], "EXPLICIT", [1, 1], 1, "NCHW")
    calls = []

    def wrong(*args):
        calls.append(1)
        return stock(x, w) + 1.0

    monkeypatch.setattr(onednn, "conv2d_forward", wrong)
    monkeypatch.setattr(kernels, "_checked", {})
    with pytest.warns(RuntimeWarning, match="disagrees with Paddle's kernel"):
        got = kernels.conv2d(x, w, [1, 1], [1, 1, 1, 1], stock)
    np.testing.assert_array_equal(got.numpy(), stock(x, w).numpy())
    assert len(kernels.self_check_failures()) == 1
    kernels.conv2d(x, w, [1, 1], [1, 1, 1, 1], stock)
    assert calls == [1]  # never called again for that shape


@needs_onednn
def test_self_check_passes_and_compares_only_once(fast_on, monkeypatch):
    x, w = _tensors(x_shape=(3, 16, 13, 13))
    references = []

    def stock(a, b):
        references.append(1)
        return paddle._C_ops.conv2d(a, b, [1, 1], [1, 1, 1, 1], "EXPLICIT", [1, 1], 1, "NCHW")

    monkeypatch.setattr(kernels, "_checked", {})
    first = kernels.conv2d(x, w, [1, 1], [1, 1, 1, 1], stock)
    second = kernels.conv2d(x, w, [1, 1], [1, 1, 1, 1], stock)
    assert references == [1, 1] and kernels.self_check_failures() == []   # the values, then their magnitudes
    np.testing.assert_array_equal(first.numpy(), second.numpy())


def _weight_grad(a, b):
    zero = paddle.zeros([8, 3, 3, 3], dtype=a.dtype)
    return paddle._C_ops.conv2d_grad(a, zero, b, [1, 1], [1, 1], "EXPLICIT", [1, 1], 1, "NCHW")[1]


def _cancelling_weight_gradient():
    """A weight gradient whose every entry is a sum that cancels exactly in real arithmetic: a constant input and
    an output gradient with zero mean per channel and zero border (batch norm makes output gradients zero-mean).
    Both kernels return rounding noise, so they differ by about their whole (tiny) largest entry."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal((16, 8, 40, 40)).astype(np.float32)
    g[:, :, [0, -1], :] = 0.0
    g[:, :, :, [0, -1]] = 0.0
    g[:, :, 1:-1, 1:-1] -= g[:, :, 1:-1, 1:-1].mean(axis=(0, 2, 3), keepdims=True)
    return paddle.ones([16, 3, 40, 40], dtype="float32"), paddle.to_tensor(g)


@needs_onednn
def test_self_check_accepts_rounding_of_sums_that_cancel(fast_on, monkeypatch):
    """The tolerance is relative to the magnitudes summed into each output, not to the largest output: measured
    against the largest output, a weight gradient that nearly cancels (W2's first layer on the query batch: oneDNN
    5.5e-5 of the largest entry, 6e-7 of the magnitudes) failed the check by chance and sent the shape to Paddle's
    slower kernel for good."""
    x, gy = _cancelling_weight_gradient()
    monkeypatch.setattr(kernels, "_checked", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = kernels.conv2d_backward_weights(x, gy, [8, 3, 3, 3], [1, 1], [1, 1, 1, 1], _weight_grad)
    assert kernels.self_check_failures() == []
    magnitude = _weight_grad(paddle.abs(x), paddle.abs(gy)).numpy()
    assert np.abs(got.numpy() - _weight_grad(x, gy).numpy()).max() <= 1e-5 * magnitude.max()


@needs_onednn
def test_self_check_rejects_a_kernel_that_drops_one_border_row(fast_on, monkeypatch):
    """A geometry mistake misses whole products: leaving out the last input row of every image changes the
    weight gradient by about 1/40 of its magnitudes, far above the tolerance."""
    rng = np.random.default_rng(1)
    x = paddle.to_tensor(rng.standard_normal((16, 3, 40, 40)).astype(np.float32))
    gy = paddle.to_tensor(rng.standard_normal((16, 8, 40, 40)).astype(np.float32))
    cropped = np.array(x.numpy())
    cropped[:, :, -1, :] = 0.0
    monkeypatch.setattr(onednn, "conv2d_backward_weights", lambda *args: _weight_grad(paddle.to_tensor(cropped), gy))
    monkeypatch.setattr(kernels, "_checked", {})
    with pytest.warns(RuntimeWarning, match="disagrees with Paddle's kernel"):
        got = kernels.conv2d_backward_weights(x, gy, [8, 3, 3, 3], [1, 1], [1, 1, 1, 1], _weight_grad)
    np.testing.assert_array_equal(got.numpy(), _weight_grad(x, gy).numpy())


_POOLS = [([2, 2], [2, 2], [0, 0, 0, 0]), ([3, 3], [2, 2], [1, 1, 1, 1]), ([3, 2], [1, 2], [1, 1, 0, 0])]


@needs_onednn
@pytest.mark.parametrize("kernel,stride,pads", _POOLS)
def test_max_pool_workspace_reads_as_paddles_argmax(fast_on, any_implementation, kernel, stride, pads):
    """The workspace, read as flat indices, is Paddle's own argmax (continuous data: no ties), and the backward
    equals Paddle's scatter; the value equals Paddle's."""
    x = paddle.randn([2, 3, 12, 11], dtype="float32")
    attrs = (kernel, stride, pads[0::2], False, False, False)
    want, mask = paddle._C_ops.max_pool2d_with_index(x, *attrs)
    y, ws = kernels.max_pool2d(x, kernel, stride, pads, lambda: want)
    np.testing.assert_array_equal(y.numpy(), want.numpy())
    index = kernels.max_pool2d_index(ws, x.shape, kernel, stride, pads)
    np.testing.assert_array_equal(index.numpy(), mask.astype("int64").reshape(index.shape).numpy())
    g = paddle.randn(y.shape, dtype="float32")
    np.testing.assert_allclose(kernels.max_pool2d_backward(g, ws, x.shape, kernel, stride, pads).numpy(),
                               paddle._C_ops.max_pool2d_with_index_grad(x, mask, g, *attrs).numpy(), rtol=1e-6,
                               atol=1e-6)


@needs_onednn
@pytest.mark.parametrize("wrong", ["value", "workspace"])
def test_max_pool_self_check_rejects_a_wrong_kernel_once_and_for_all(fast_on, monkeypatch, wrong):
    x = paddle.randn([2, 3, 10, 10], dtype="float32")
    stock = lambda: paddle._C_ops.max_pool2d_with_index(x, [2, 2], [2, 2], [0, 0], False, False, False)[0]
    real, calls = onednn.max_pool2d_forward, []

    def broken(x, kernel, stride, pads, accelerated_only=False):
        calls.append(1)
        y, ws = real(x, kernel, stride, pads)   # whatever implementation oneDNN has here
        return (y + 1.0, ws) if wrong == "value" else (y, (ws.astype("int32") + 1) % 4)

    monkeypatch.setattr(onednn, "max_pool2d_forward", broken)
    monkeypatch.setattr(kernels, "_checked", {})
    with pytest.warns(RuntimeWarning, match="disagrees with Paddle's kernel"):
        assert kernels.max_pool2d(x, [2, 2], [2, 2], [0, 0, 0, 0], stock) is None
    assert kernels.max_pool2d(x, [2, 2], [2, 2], [0, 0, 0, 0], stock) is None and calls == [1]
    assert len(kernels.self_check_failures()) == 1


@pytest.mark.parametrize("name,reference", [("ref:any", True), ("simple_nchw:any", True), ("simple:any", True),
                                            ("gemm:ref", True), ("jit:avx2", False), ("jit:uni", False),
                                            ("brg_conv_fwd:avx512_core", False), ("gemm:jit", False),
                                            ("jit_1x1:avx2", False)])
def test_reference_implementation_names(name, reference):
    assert onednn.is_reference(name) is reference


def _forget_plans(monkeypatch):
    monkeypatch.setattr(onednn, "_PLANS", {})
    monkeypatch.setattr(kernels, "_checked", {})
    monkeypatch.setattr(kernels, "_declined", set())


@needs_onednn
def test_reference_implementations_are_declined_quietly_once_and_for_all(fast_on, monkeypatch):
    # On a CPU without AVX-512, oneDNN's max pooling on the NCHW layout is a plain loop ("simple_nchw:any"), 4 times
    # slower than Paddle's kernel, and the fast path used it: W2 second order 8.4-9.0 s a meta-iteration against
    # 7.0-7.7 s with it declined.
    _forget_plans(monkeypatch)
    x, w = _tensors(x_shape=(3, 16, 12, 12))
    stock_pool = lambda: paddle._C_ops.max_pool2d_with_index(x, [2, 2], [2, 2], [0, 0], False, False, False)[0]
    stock_conv = lambda a, b: paddle._C_ops.conv2d(a, b, [1, 1], [1, 1, 1, 1], "EXPLICIT", [1, 1], 1, "NCHW")
    names = []
    real = onednn.implementation
    monkeypatch.setattr(onednn, "implementation", lambda lib, pd: names.append(real(lib, pd)) or "ref:any")
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # quietly: declining is expected, not a failure
        assert kernels.max_pool2d(x, [2, 2], [2, 2], [0, 0, 0, 0], stock_pool) is None
        np.testing.assert_array_equal(kernels.conv2d(x, w, [1, 1], [1, 1, 1, 1], stock_conv).numpy(),
                                      stock_conv(x, w).numpy())
        built = len(names)
        assert kernels.max_pool2d(x, [2, 2], [2, 2], [0, 0, 0, 0], stock_pool) is None
        kernels.conv2d(x, w, [1, 1], [1, 1, 1, 1], stock_conv)
    assert built == 3 and len(names) == built          # forward and backward pooling, convolution: asked once
    assert [key[0] for key in kernels.reference_only()] == ["max_pool2d", "conv2d"]
    assert kernels.self_check_failures() == []


@needs_onednn
def test_the_fast_path_runs_no_reference_implementation(fast_on, monkeypatch):
    _forget_plans(monkeypatch)
    x = paddle.randn([5, 32, 84, 84], dtype="float32")      # a W2 pooling
    stock = lambda: paddle._C_ops.max_pool2d_with_index(x, [2, 2], [2, 2], [0, 0], False, False, False)[0]
    result = kernels.max_pool2d(x, [2, 2], [2, 2], [0, 0, 0, 0], stock)
    plan = onednn.max_pool2d_plan(x.shape, [2, 2], [2, 2], [0, 0, 0, 0])
    assert (result is None) == any(onednn.is_reference(name) for name in plan.implementation)
    assert (result is None) == bool(kernels.reference_only())


def test_max_pool_choice(fast_on, monkeypatch):
    big, small = paddle.randn([4, 8, 32, 32], dtype="float32"), paddle.randn([1, 2, 8, 8], dtype="float32")
    available = onednn.available()
    assert kernels.max_pool2d_supported(big) == available
    assert not kernels.max_pool2d_supported(small)
    assert not kernels.max_pool2d_supported(big.astype("float64"))
    set_fast_kernels(False)
    assert not kernels.max_pool2d_supported(big)
    set_fast_kernels(True)
    monkeypatch.setattr(onednn, "available", lambda: False)
    assert not kernels.max_pool2d_supported(big)


@needs_onednn
@pytest.mark.parametrize("width", [11, 5000])
def test_max_pool_index_is_exact_integer_arithmetic(fast_on, any_implementation, width):
    """The workspace's offsets become flat indices exactly, also where H * W reaches 2^24 (float64 there)."""
    x = paddle.randn([2, 3, 12, 11], dtype="float32")
    kernel, stride, pads = [3, 3], [2, 2], [1, 1, 1, 1]
    _, ws = kernels.max_pool2d(x, kernel, stride, pads, lambda: paddle._C_ops.max_pool2d_with_index(
        x, kernel, stride, pads[0::2], False, False, False)[0])
    height = 12 if width == 11 else 4000
    assert (height * width < 2 ** 24) == (width == 11)
    got = kernels.max_pool2d_index(ws, [2, 3, height, width], kernel, stride, pads).numpy()
    off = ws.numpy().astype(np.int64)
    rows = np.arange(ws.shape[2])[:, None] * stride[0] - pads[0] + off // kernel[1]
    cols = np.arange(ws.shape[3])[None, :] * stride[1] - pads[2] + off % kernel[1]
    np.testing.assert_array_equal(got, (rows * width + cols).reshape(got.shape))
