"""The fast-kernel policy: the switch (function and environment variable), the automatic choice with fallback to
Paddle's kernel, and the one-time self-check."""
from __future__ import annotations

import os
import subprocess
import sys

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
    assert not kernels.conv2d_supported(x, w, [1, 1], 2, False, big)        # groups
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
    stock = lambda: paddle._C_ops.conv2d(x, w, [1, 1], [1, 1, 1, 1], "EXPLICIT", [1, 1], 1, "NCHW")
    calls = []

    def wrong(*args):
        calls.append(1)
        return stock() + 1.0

    monkeypatch.setattr(onednn, "conv2d_forward", wrong)
    monkeypatch.setattr(kernels, "_checked", {})
    with pytest.warns(RuntimeWarning, match="disagrees with Paddle's kernel"):
        got = kernels.conv2d(x, w, [1, 1], [1, 1, 1, 1], stock)
    np.testing.assert_array_equal(got.numpy(), stock().numpy())
    assert len(kernels.self_check_failures()) == 1
    kernels.conv2d(x, w, [1, 1], [1, 1, 1, 1], stock)
    assert calls == [1]  # never called again for that shape


@needs_onednn
def test_self_check_passes_and_compares_only_once(fast_on, monkeypatch):
    x, w = _tensors(x_shape=(3, 16, 13, 13))
    references = []

    def stock():
        references.append(1)
        return paddle._C_ops.conv2d(x, w, [1, 1], [1, 1, 1, 1], "EXPLICIT", [1, 1], 1, "NCHW")

    monkeypatch.setattr(kernels, "_checked", {})
    first = kernels.conv2d(x, w, [1, 1], [1, 1, 1, 1], stock)
    second = kernels.conv2d(x, w, [1, 1], [1, 1, 1, 1], stock)
    assert references == [1] and kernels.self_check_failures() == []
    np.testing.assert_array_equal(first.numpy(), second.numpy())


@needs_onednn
def test_relu_backward_choice(fast_on, monkeypatch):
    n = kernels.MIN_ELEMENTS
    x, g = paddle.randn([n], dtype="float32"), paddle.randn([n], dtype="float32")
    assert kernels.relu_backward_supported(x, g)
    assert not kernels.relu_backward_supported(x[:-1], g[:-1])                        # too small
    assert not kernels.relu_backward_supported(x.astype("float64"), g.astype("float64"))  # float64
    assert not kernels.relu_backward_supported(x, g.reshape([2, -1]))                  # shapes differ
    set_fast_kernels(False)
    assert not kernels.relu_backward_supported(x, g)                                   # switched off
    set_fast_kernels(True)
    monkeypatch.setattr(onednn, "available", lambda: False)                            # library missing
    assert not kernels.relu_backward_supported(x, g)


@needs_onednn
def test_relu_backward_self_check_rejects_a_wrong_kernel(fast_on, monkeypatch):
    x, g = paddle.randn([3, 5, 7], dtype="float32"), paddle.randn([3, 5, 7], dtype="float32")
    stock = lambda: paddle._C_ops.relu_grad(x, g)
    calls = []
    monkeypatch.setattr(onednn, "relu_backward", lambda *a: calls.append(1) or stock() * 2.0)
    monkeypatch.setattr(kernels, "_checked", {})
    with pytest.warns(RuntimeWarning, match="disagrees with Paddle's kernel"):
        got = kernels.relu_backward(x, g, stock)
    np.testing.assert_array_equal(got.numpy(), stock().numpy())
    kernels.relu_backward(x, g, stock)
    assert calls == [1] and len(kernels.self_check_failures()) == 1


@pytest.mark.parametrize("fast,size,dtype,expected", [
    (True, kernels.MIN_ELEMENTS, "float32", 3), (True, kernels.MIN_ELEMENTS - 1, "float32", 0),
    (True, kernels.MIN_ELEMENTS, "float64", 0), (False, kernels.MIN_ELEMENTS, "float32", 0)])
def test_relu_rule_calls_onednn_only_when_supported(fast, size, dtype, expected, monkeypatch):
    """The exact ReLU rule sends its backward (and the backward of that) to oneDNN for large float32 tensors with
    the fast path on, and gives Paddle's values either way."""
    if fast and not onednn.available():
        pytest.skip("oneDNN not loadable")
    from paddlefsl.metaopt.autodiff import exact_ops
    calls = []
    real = onednn.relu_backward
    monkeypatch.setattr(onednn, "relu_backward", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal(size), dtype=dtype, stop_gradient=False)
    previous = set_fast_kernels(fast)
    try:
        with exact_ops():
            y = paddle.nn.functional.relu(x)
            (g,) = paddle.grad((y * y * y).sum(), [x], create_graph=True)
            (h,) = paddle.grad((g * g).sum(), [x])
    finally:
        set_fast_kernels(previous)
    assert len(calls) == expected
    xn = x.numpy().astype(np.float64)
    np.testing.assert_allclose(g.numpy(), 3 * np.maximum(xn, 0) ** 2, rtol=1e-5)
    np.testing.assert_allclose(h.numpy(), 36 * np.maximum(xn, 0) ** 3, rtol=1e-5)
