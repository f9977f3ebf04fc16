"""Normalization layers: exact rules for ``batch_norm``, ``layer_norm``, ``group_norm`` and ``instance_norm``.

Each rule runs Paddle's own kernel in forward (so values, and the in-place update of batch norm's running
statistics, are exactly stock) and writes the backward with differentiable public Paddle ops. The backward
recomputes the normalized input from the live input, so every quantity it uses depends differentiably on the
inputs and the rule is exact at every order.

With ``x_hat = (x - mean_R(x)) * s``, ``s = 1 / sqrt(var_R(x) + eps)`` (biased variance over the reduced axes
``R``) and ``y = w * x_hat + b``, the gradients for an upstream gradient ``g`` are::

    dx = s * (h - mean_R(h) - x_hat * mean_R(h * x_hat)),   h = g * w
    dw = sum(g * x_hat),   db = sum(g)        (summed over the axes that w and b are broadcast along)

When statistics are fixed (batch norm in eval mode) ``dx = g * w * s``.

Inputs are differentiated one PyLayer each (`apply_rule()`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import paddle

from paddlefsl.metaopt.autodiff.registry import exact, original
from paddlefsl.metaopt.autodiff.common import apply_rule, lean_shape

Tensor = paddle.Tensor


def _stat(t: Tensor, axes: list[int]) -> Tensor:
    """Mean of ``t`` over ``axes``, shaped to broadcast against ``t`` with leading 1s dropped (Python operators
    reach Paddle's kernels directly, so the ``[C, 1, 1]`` layout is chosen here)."""
    m = t.mean(axis=axes, keepdim=True)
    return m.reshape(lean_shape(m.shape))


def _standardize(x: Tensor, axes: Sequence[int], eps: float) -> tuple[Tensor, Tensor]:
    """Return ``(x_hat, s)``: ``x`` standardized over ``axes`` with biased variance, and the inverse std."""
    axes = list(axes)
    xc = x - _stat(x, axes)
    inv_std = paddle.rsqrt(_stat(xc * xc, axes) + eps)
    return xc * inv_std, inv_std


def _standardize_grad(h: Tensor, x_hat: Tensor, inv_std: Tensor, axes: Sequence[int]) -> Tensor:
    """Gradient through ``x -> x_hat`` (batch statistics) for an upstream gradient ``h`` on ``x_hat``."""
    axes = list(axes)
    return inv_std * (h - _stat(h, axes) - x_hat * _stat(h * x_hat, axes))


def _channel_shape(ndim: int, channel_axis: int, channels: int) -> list[int]:
    shape = [1] * ndim
    shape[channel_axis] = channels
    return shape


def _affine_rule(x: Tensor, weight: Tensor | None, bias: Tensor | None, run: Callable[[], Any],
                 normalized: Callable[[], tuple[Tensor, Tensor]], input_grad: Callable[[Tensor, Tensor, Tensor],
                                                                                       Tensor],
                 pshape: Sequence[int], param_axes: Sequence[int]) -> Any:
    """Rule for ``y = w * x_hat(x) + b``: ``normalized()`` recomputes ``(x_hat, s)`` from the live ``x``,
    ``input_grad(h, x_hat, s)`` maps the gradient ``h`` on ``x_hat`` to ``x``; ``w``/``b`` broadcast as ``pshape``
    and are reduced over ``param_axes``."""

    cache: dict[bool, tuple[Tensor, Tensor]] = {}

    def stats():
        # Computed once per kind of backward pass (recorded or not) and shared by the x and w gradients.
        key = paddle.is_grad_enabled()
        if key not in cache:
            cache[key] = normalized()
        return cache[key]

    lean = lean_shape(pshape)

    def grad_x(g):
        x_hat, inv_std = stats()
        h = g * weight.reshape(lean) if weight is not None else g
        return input_grad(h, x_hat, inv_std)

    def grad_w(g):
        x_hat, _ = stats()
        return (g * x_hat).sum(axis=list(param_axes)).reshape(weight.shape)

    def grad_b(g):
        return g.sum(axis=list(param_axes)).reshape(bias.shape)

    return apply_rule([x, weight, bias], run, [grad_x, grad_w, grad_b])


def _needs_grad(*tensors: Tensor | None) -> bool:
    return paddle.is_grad_enabled() and any(t is not None and not t.stop_gradient for t in tensors)


# ----------------------------------------------------------------------------------------------- batch norm

@exact("batch_norm", "norm", "batch or running statistics; running statistics updated in place as stock")
def batch_norm(x, mean, variance, scale, bias, is_test, momentum, epsilon, data_format, use_global_stats,
               trainable_statistics, **kwargs):
    """Exact ``_C_ops.batch_norm``: returns ``(out, mean_out, variance_out, saved_mean, saved_variance,
    reserve_space)`` like the stock kernel; only ``out`` is differentiable (w.r.t. ``x``, ``scale``, ``bias``)."""
    args = (x, mean, variance, scale, bias, is_test, momentum, epsilon, data_format, use_global_stats,
            trainable_statistics)
    if not _needs_grad(x, scale, bias):
        return original("batch_norm")(*args, **kwargs)
    rest: list[Any] = []

    def run():
        outs = original("batch_norm")(*args)
        rest.extend(outs[1:])
        return outs[0]

    ndim = len(x.shape)
    channel_axis = 1 if data_format in ("NCHW", "NCDHW", "NC", "NCL") else ndim - 1
    axes = [a for a in range(ndim) if a != channel_axis]
    bshape = _channel_shape(ndim, channel_axis, x.shape[channel_axis])
    if bool(use_global_stats) or (bool(is_test) and not bool(trainable_statistics)):
        # Running statistics are constants here; copy them so later training steps cannot change them.
        stat_mean = mean.detach().clone().reshape(lean_shape(bshape))
        stat_inv_std = paddle.rsqrt(variance.detach().clone().reshape(lean_shape(bshape)) + epsilon)

        def normalized():
            return (x - stat_mean) * stat_inv_std, stat_inv_std

        def input_grad(h, x_hat, inv_std):
            return h * inv_std
    else:
        out = _batch_statistics_rule(x, scale, bias, run, rest, axes, bshape, epsilon,
                                     (momentum, epsilon, data_format, is_test, use_global_stats,
                                      trainable_statistics))
        return (out, *rest)

    out = _affine_rule(x, scale, bias, run, normalized, input_grad, bshape, axes)
    return (out, *rest)


def _batch_statistics_rule(x: Tensor, weight: Tensor | None, bias: Tensor | None, run: Callable[[], Any],
                           rest: list, axes: list[int], bshape: Sequence[int], eps: float, attrs: tuple) -> Any:
    """Batch norm with batch statistics: the statistics and the parameters share their reduced axes, so
    ``dx = a * g - a * sum(g) / m - x_hat * a * sum(g * x_hat) / m`` with ``a = w * s`` per channel.

    With an affine transform in training mode, ``dx`` and ``dw`` come from Paddle's fused ``batch_norm_grad``
    kernel (one kernel instead of about twelve). In a backward pass that records a graph (an inner step of
    second-order MAML) each of the two is itself an exact rule, `_BatchNormBackward`, whose derivatives are written
    in differentiable ops (and, for the derivative in ``g``, again the fused kernel), so every order stays exact.
    Without an affine transform (or with ``is_test``) the gradients are the composite formula.
    """
    lean = lean_shape(bshape)
    count = 1
    for a in axes:
        count *= int(x.shape[a])
    cache: dict = {}
    # Stock batch_norm_grad is right for training-mode batch statistics only (with is_test=True it treats the
    # batch statistics as constants: wrong).
    fused_ok = weight is not None and bias is not None and not bool(attrs[3])

    def stats():
        key = ("stats", paddle.is_grad_enabled())
        if key not in cache:
            cache[key] = _standardize(x, axes, eps)
        return cache[key]

    def use_fused() -> bool:
        return fused_ok and len(rest) == 5

    backward = _BatchNormBackward(x, weight, bias, rest, attrs, stats, axes, lean, count)

    def grad_x(g):
        if use_fused():
            return backward.dx(g)
        x_hat, inv_std = stats()
        sum_g = g.sum(axis=axes, keepdim=True).reshape(lean)
        sum_gx = (g * x_hat).sum(axis=axes, keepdim=True).reshape(lean)
        a = inv_std * weight.reshape(lean) if weight is not None else inv_std
        return a * g - (a * sum_g) * (1.0 / count) - x_hat * ((a * sum_gx) * (1.0 / count))

    def grad_w(g):
        if use_fused():
            return backward.dw(g)
        x_hat, _ = stats()
        return (g * x_hat).sum(axis=axes).reshape(weight.shape)

    def grad_b(g):
        return g.sum(axis=axes).reshape(bias.shape)

    return apply_rule([x, weight, bias], run, [grad_x, grad_w, grad_b])


class _BatchNormBackward:
    """The input and scale gradients of training-mode batch norm, ``dx(x, w, g)`` and ``dw(x, g)``, as exact rules
    whose value is Paddle's fused ``batch_norm_grad`` kernel (with the statistics saved by the forward).

    Per channel, with ``s = 1 / std``, ``a = w * s``, means ``mean`` over the ``m`` reduced positions,
    ``g_bar = mean(g)``, ``c = mean(g * x_hat)``: ``dx = a * (g - g_bar - x_hat * c)`` and ``dw = m * c``. For a
    cotangent ``u`` on ``dx`` (``u_bar = mean(u)``, ``d = mean(u * x_hat)``, ``K = mean(u * g) - u_bar * g_bar - c * d``):

        d<u, dx>/dg = dx(x, w, u)          (the same kernel again)
        d<u, dx>/dw = s * m * K
        d<u, dx>/dx = -a * s * (d * (g - g_bar) + c * (u - u_bar) + x_hat * (K - 2 * c * d))

    and for a cotangent ``v`` (per channel) on ``dw``: ``d/dg = v * x_hat`` and ``d/dx = v * s * (g - g_bar -
    x_hat * c)``. ``x_hat`` and ``s`` are recomputed from the live ``x``, so these are differentiable again.
    """

    def __init__(self, x, weight, bias, rest: list, attrs: tuple, stats: Callable, axes: list[int],
                 lean: list[int], count: int) -> None:
        self.x, self.weight, self.bias, self.rest, self.attrs = x, weight, bias, rest, attrs
        self.stats, self.axes, self.lean, self.count = stats, axes, lean, count

    def _kernel(self, g: Tensor) -> tuple:
        mean_out, var_out, saved_mean, saved_var, reserve = self.rest
        return original("batch_norm_grad")(self.x, self.weight, self.bias, mean_out, var_out, saved_mean, saved_var,
                                           reserve, g, *self.attrs)

    def _mean(self, t: Tensor) -> Tensor:
        return _stat(t, self.axes)

    def dx(self, g: Tensor) -> Tensor:
        """``a * (g - mean(g) - x_hat * mean(g * x_hat))``, exact at every order."""
        return apply_rule([g, self.x, self.weight], lambda: self._kernel(g)[0],
                          [self.dx, lambda u: self._dx_dx(g, u), lambda u: self._dx_dw(g, u)])

    def dw(self, g: Tensor) -> Tensor:
        """``sum(g * x_hat)`` over the reduced axes, exact at every order."""
        return apply_rule([g, self.x], lambda: self._kernel(g)[1],
                          [lambda v: v.reshape(self.lean) * self.stats()[0], lambda v: self._dw_dx(g, v)])

    def _moments(self, g: Tensor, u: Tensor) -> tuple:
        x_hat, inv_std = self.stats()
        m = self._mean
        g_bar, u_bar, c, d = m(g), m(u), m(g * x_hat), m(u * x_hat)
        k = m(u * g) - u_bar * g_bar - c * d
        return x_hat, inv_std, g_bar, u_bar, c, d, k

    def _dx_dw(self, g: Tensor, u: Tensor) -> Tensor:
        _, inv_std, _, _, _, _, k = self._moments(g, u)
        return (inv_std * k * float(self.count)).reshape(self.weight.shape)

    def _dx_dx(self, g: Tensor, u: Tensor) -> Tensor:
        x_hat, inv_std, g_bar, u_bar, c, d, k = self._moments(g, u)
        a_s = inv_std * inv_std * self.weight.reshape(self.lean)
        return -a_s * (d * (g - g_bar) + c * (u - u_bar) + x_hat * (k - 2.0 * c * d))

    def _dw_dx(self, g: Tensor, v: Tensor) -> Tensor:
        x_hat, inv_std = self.stats()
        return (v.reshape(self.lean) * inv_std) * (g - self._mean(g) - x_hat * self._mean(g * x_hat))


# ----------------------------------------------------------------------------------------------- layer norm

@exact("layer_norm", "norm")
def layer_norm(x, scale, bias, epsilon, begin_norm_axis, **kwargs):
    """Exact ``_C_ops.layer_norm`` (normalizes over the axes from ``begin_norm_axis`` on)."""
    if not _needs_grad(x, scale, bias):
        return original("layer_norm")(x, scale, bias, epsilon, begin_norm_axis, **kwargs)
    ndim = len(x.shape)
    begin = begin_norm_axis % ndim if ndim else 0
    axes = list(range(begin, ndim))
    return _affine_rule(x, scale, bias, lambda: original("layer_norm")(x, scale, bias, epsilon, begin_norm_axis),
                        lambda: _standardize(x, axes, epsilon),
                        lambda h, x_hat, s: _standardize_grad(h, x_hat, s, axes),
                        [1] * begin + list(x.shape[begin:]), list(range(begin)))


# ----------------------------------------------------------------------------------------------- group norm

@exact("group_norm", "norm")
def group_norm(x, scale, bias, epsilon, groups, data_format, **kwargs):
    """Exact ``_C_ops.group_norm`` (channel-first or channel-last layouts)."""
    if not _needs_grad(x, scale, bias):
        return original("group_norm")(x, scale, bias, epsilon, groups, data_format, **kwargs)
    shape = list(x.shape)
    ndim = len(shape)
    channel_axis = ndim - 1 if data_format in ("NHWC", "NDHWC", "NLC") else 1
    c = shape[channel_axis]
    if channel_axis == 1:
        gshape, gaxes = [shape[0], groups, -1], [2]
    else:
        gshape, gaxes = [shape[0], -1, groups, c // groups], [1, 3]

    def normalized():
        x_hat, inv_std = _standardize(x.reshape(gshape), gaxes, epsilon)
        return x_hat.reshape(shape), inv_std

    def input_grad(h, x_hat, inv_std):
        return _standardize_grad(h.reshape(gshape), x_hat.reshape(gshape), inv_std, gaxes).reshape(shape)

    return _affine_rule(x, scale, bias,
                        lambda: original("group_norm")(x, scale, bias, epsilon, groups, data_format),
                        normalized, input_grad, _channel_shape(ndim, channel_axis, c),
                        [a for a in range(ndim) if a != channel_axis])


# -------------------------------------------------------------------------------------------- instance norm

@exact("instance_norm", "norm")
def instance_norm(x, scale, bias, epsilon, **kwargs):
    """Exact ``_C_ops.instance_norm`` (per-sample, per-channel statistics over the spatial axes)."""
    if not _needs_grad(x, scale, bias):
        return original("instance_norm")(x, scale, bias, epsilon, **kwargs)
    ndim = len(x.shape)
    axes = list(range(2, ndim))
    return _affine_rule(x, scale, bias, lambda: original("instance_norm")(x, scale, bias, epsilon),
                        lambda: _standardize(x, axes, epsilon),
                        lambda h, x_hat, s: _standardize_grad(h, x_hat, s, axes),
                        _channel_shape(ndim, 1, x.shape[1]), [a for a in range(ndim) if a != 1])
