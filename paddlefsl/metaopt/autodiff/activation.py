"""Activations.

Stock (Paddle's double gradient checked against finite differences): relu, tanh, sigmoid, leaky_relu, elu, celu,
silu, softplus, exp. Exact rules (Paddle's kernel in forward, derivative in differentiable Paddle ops in backward):
softmax, log_softmax, gelu (erf form and tanh approximation), erf, swish, logsigmoid, tanh_shrink, mish, selu,
relu6, hardtanh, hardsigmoid, hardswish. Float attributes are read as float32, as Paddle's kernels do, so first-order
gradients equal stock Paddle's.
"""
from __future__ import annotations

import math

import numpy as np
import paddle
import paddle.nn.functional as F
from paddlefsl.metaopt.autodiff.released import GuardedPyLayer

from paddlefsl.metaopt.autodiff.common import pointwise
from paddlefsl.metaopt.autodiff.registry import exact, original, stock

stock(["leaky_relu", "elu", "celu", "silu", "softplus", "exp"],
      "activation", "Paddle's double gradient, checked against finite differences")
stock(["tanh", "sigmoid"], "activation", "Paddle's second and third derivatives, checked against finite differences",
      order=3)


# These rules save their input and compute the output again in backward (through `paddle._C_ops`, so the rule
# itself when a higher-order gradient is recorded). Saving the output would tie the PyLayer's context to its own
# output's grad node: a cycle through Paddle's C++ graph that Python's collector cannot see, so every call would
# leak the output (1.6 MB per softmax of a [25, 2, 64, 64] float32 tensor; test_activation.py checks it).
class _Softmax(GuardedPyLayer):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.save_for_backward(x)
        ctx.axis = axis
        return original("softmax")(x, axis)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensor()
        y = paddle._C_ops.softmax(x, ctx.axis)
        return y * (grad - (grad * y).sum(axis=ctx.axis, keepdim=True))


class _LogSoftmax(GuardedPyLayer):
    @staticmethod
    def forward(ctx, x, axis):
        ctx.save_for_backward(x)
        ctx.axis = axis
        return original("log_softmax")(x, axis)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensor()
        return grad - paddle._C_ops.softmax(x, ctx.axis) * grad.sum(axis=ctx.axis, keepdim=True)


@exact("softmax", "activation")
def softmax(x, axis=-1, out=None, **kwargs):
    """Exact ``paddle._C_ops.softmax`` (same signature)."""
    return _Softmax.apply(x, axis)


@exact("log_softmax", "activation")
def log_softmax(x, axis=-1, out=None, **kwargs):
    """Exact ``paddle._C_ops.log_softmax`` (same signature)."""
    return _LogSoftmax.apply(x, axis)


_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_CUBIC = 0.044715


def _gelu_derivative(x: paddle.Tensor, approximate: bool) -> paddle.Tensor:
    """d gelu / dx written in differentiable Paddle ops."""
    if approximate:
        t = paddle.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
    cdf = 0.5 * (1.0 + paddle.erf(x / _SQRT_2))
    return cdf + x * paddle.exp(-0.5 * x * x) * _INV_SQRT_2PI


class _Gelu(GuardedPyLayer):
    @staticmethod
    def forward(ctx, x, approximate):
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return original("gelu")(x, approximate)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensor()
        return grad * _gelu_derivative(x, ctx.approximate)


@exact("gelu", "activation", "exact erf form and tanh approximation")
def gelu(x, approximate=False, name=None, out=None, **kwargs):
    """Exact ``paddle._C_ops.gelu`` (same signature)."""
    if isinstance(approximate, str):
        approximate = approximate.lower() == "tanh"
    approximate = bool(approximate)
    if x.stop_gradient or not paddle.is_grad_enabled():
        return original("gelu")(x, approximate)
    return _Gelu.apply(x, approximate)


def _f32(value: float) -> float:
    """A float attribute as Paddle's kernel sees it (float32)."""
    return float(np.float32(value))


def _band(x: paddle.Tensor, low: float, high: float) -> paddle.Tensor:
    """Constant float mask of low < x < high (no graph)."""
    inside = original("logical_and")(original("greater_than")(x, paddle.full([], low, x.dtype)),
                                     original("less_than")(x, paddle.full([], high, x.dtype)))
    return original("cast")(inside, x.dtype)


@exact("erf", "activation")
def erf(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.erf`` (same signature)."""
    return pointwise("erf", x, (), lambda t: (2.0 / math.sqrt(math.pi)) * paddle.exp(-t * t))


@exact("swish", "activation", "x * sigmoid(x)")
def swish(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.swish`` (same signature)."""
    def deriv(t):
        s = F.sigmoid(t)
        return s + t * s * (1.0 - s)

    return pointwise("swish", x, (), deriv)


@exact("logsigmoid", "activation")
def logsigmoid(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.logsigmoid`` (same signature)."""
    return pointwise("logsigmoid", x, (), lambda t: F.sigmoid(-t))


@exact("tanh_shrink", "activation")
def tanh_shrink(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.tanh_shrink`` (same signature)."""
    return pointwise("tanh_shrink", x, (), lambda t: paddle.tanh(t) ** 2)


@exact("mish", "activation", "x * tanh(softplus(x)), softplus linear above the threshold as in Paddle")
def mish(x, threshold=20.0, out=None, **kwargs):
    """Exact ``paddle._C_ops.mish`` (same signature)."""
    def deriv(t):
        th = paddle.tanh(F.softplus(t, beta=1.0, threshold=threshold))
        return th + t * (1.0 - th * th) * F.sigmoid(t)

    return pointwise("mish", x, (threshold,), deriv)


@exact("selu", "activation")
def selu(x, scale=1.0507009873554804934193349852946, alpha=1.6732632423543772848170429916717, out=None,
         **kwargs):
    """Exact ``paddle._C_ops.selu`` (same signature)."""
    # Paddle keeps scale and alpha as float32 attributes; its gradient for x <= 0 is out + float32(scale * alpha).
    k = _f32(scale) * _f32(alpha)
    c = float(np.float32(scale) * np.float32(alpha))

    def deriv(t):
        pos = original("cast")(original("greater_than")(t, paddle.full([], 0.0, t.dtype)), t.dtype)
        neg_part = k * (paddle.exp(paddle.minimum(t, paddle.zeros([], t.dtype))) - 1.0) + c
        return pos * _f32(scale) + (1.0 - pos) * neg_part

    return pointwise("selu", x, (scale, alpha), deriv)


class _ReluMask(GuardedPyLayer):
    """``g -> g * (x > 0)`` for a fixed ``x``: one stock ``relu_grad`` kernel; the map is its own adjoint."""

    @staticmethod
    def forward(ctx, g, x):
        ctx.x = x
        return original("relu_grad")(x, g)  # relu_grad(out, dout) reads only out > 0, and out > 0 iff x > 0

    @staticmethod
    def backward(ctx, grad):
        return _ReluMask.apply(grad, ctx.x)


class _Relu(GuardedPyLayer):
    """``relu(x)`` whose gradient is `_ReluMask` (the mask is locally constant, so exact at every order)."""

    @staticmethod
    def forward(ctx, x):
        ctx.x = x.detach()
        return original("relu")(x)

    @staticmethod
    def backward(ctx, grad):
        return _ReluMask.apply(grad, ctx.x)


@exact("relu", "activation", "stock is exact at second order but raises at third (relu_double_grad)")
def relu(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.relu`` (same signature), differentiable at every order."""
    if x.stop_gradient or not paddle.is_grad_enabled():
        return original("relu")(x)
    return _Relu.apply(x)


@exact("relu6", "activation", "piecewise linear")
def relu6(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.relu6`` (same signature)."""
    return pointwise("relu6", x, (), lambda t: _band(t, 0.0, 6.0))


@exact("hardtanh", "activation", "piecewise linear")
def hardtanh(x, t_min=-1.0, t_max=1.0, out=None, **kwargs):
    """Exact ``paddle._C_ops.hardtanh`` (same signature)."""
    return pointwise("hardtanh", x, (t_min, t_max), lambda t: _band(t, t_min, t_max))


@exact("hardsigmoid", "activation", "piecewise linear")
def hardsigmoid(x, slope=0.1666667, offset=0.5, out=None, **kwargs):
    """Exact ``paddle._C_ops.hardsigmoid`` (same signature)."""
    slope32, offset32 = _f32(slope), _f32(offset)

    def deriv(t):
        lo, hi = sorted(((0.0 - offset32) / slope32, (1.0 - offset32) / slope32))
        return slope32 * _band(t, lo, hi)

    return pointwise("hardsigmoid", x, (slope, offset), deriv)


@exact("hardswish", "activation", "x * relu6(x + 3) / 6")
def hardswish(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.hardswish`` (same signature)."""
    def deriv(t):
        middle = _band(t, -3.0, 3.0)
        high = original("cast")(original("greater_equal")(t, paddle.full([], 3.0, t.dtype)), t.dtype)
        return middle * (2.0 * t + 3.0) / 6.0 + high

    return pointwise("hardswish", x, (), deriv)
