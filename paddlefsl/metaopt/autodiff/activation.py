"""Activations: exact rules for softmax-type kernels, stock-verified elementwise activations."""
from __future__ import annotations

import paddle
from paddle.autograd import PyLayer

from paddlefsl.metaopt.autodiff.registry import exact, original, stock

stock(["relu", "tanh", "sigmoid", "leaky_relu", "elu", "silu", "swish", "softplus", "hardswish", "exp"],
      "activation", "Paddle's double gradient, checked against finite differences")


class _Softmax(PyLayer):
    @staticmethod
    def forward(ctx, x, axis):
        y = original("softmax")(x, axis)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensor()
        return y * (grad - (grad * y).sum(axis=ctx.axis, keepdim=True))


class _LogSoftmax(PyLayer):
    @staticmethod
    def forward(ctx, x, axis):
        y = original("log_softmax")(x, axis)
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensor()
        return grad - paddle.exp(y) * grad.sum(axis=ctx.axis, keepdim=True)


@exact("softmax", "activation")
def softmax(x, axis, out=None):
    return _Softmax.apply(x, axis)


@exact("log_softmax", "activation")
def log_softmax(x, axis, out=None):
    return _LogSoftmax.apply(x, axis)
