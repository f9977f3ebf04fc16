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

import math
from typing import Any, Callable, Sequence

import paddle

from paddlefsl.metaopt.autodiff.registry import exact, original
from paddlefsl.metaopt.autodiff.common import apply_rule, channel_affine, lean_shape, reduce_sum

Tensor = paddle.Tensor


def _stat(t: Tensor, axes: list[int]) -> Tensor:
    """Mean of ``t`` over ``axes``, shaped to broadcast against ``t`` with leading 1s dropped (Python operators
    reach Paddle's kernels directly, so the ``[C, 1, 1]`` layout is chosen here)."""
    m = reduce_sum(t, axes) * (1.0 / math.prod(int(t.shape[a]) for a in axes))
    return m.reshape(lean_shape(m.shape))


def _standardize(x: Tensor, axes: Sequence[int], eps: float) -> tuple[Tensor, Tensor]:
    """Return ``(x_hat, s)``: ``x`` standardized over ``axes`` with biased variance, and the inverse std.

    The statistics are subtracted and applied with `channel_affine`: one fused pass each where they are per channel
    of a large ``[N, C, H, W]`` tensor (batch norm), the plain broadcast otherwise."""
    axes = list(axes)
    xc = channel_affine(x, None, -_stat(x, axes))
    inv_std = paddle.rsqrt(_stat(xc * xc, axes) + eps)
    return channel_affine(xc, inv_std), inv_std


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
        return reduce_sum(g * x_hat, list(param_axes)).reshape(weight.shape)

    def grad_b(g):
        return reduce_sum(g, list(param_axes)).reshape(bias.shape)

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
    ``dx = a * g - a * sum(g) / m - x_hat * a * sum(g * x_hat) / m`` with ``a = w * s`` per channel (seven
    full-size kernels, eight before the regrouping), written ``dx = channel_affine(g, a, -a * sum(g) / m) -
    channel_affine(x_hat, a * sum(g * x_hat) / m)`` (fused passes for a large 4-D input).

    A backward pass that records no graph (its values are not differentiated again) takes ``dx`` and ``dw``
    from Paddle's fused ``batch_norm_grad`` kernel: one kernel, about five times faster than the composite, run
    once for both.
    """
    lean = lean_shape(bshape)
    count = math.prod(int(x.shape[a]) for a in axes)
    cache: dict = {}
    # Stock batch_norm_grad is right for training-mode batch statistics only (with is_test=True it treats the
    # batch statistics as constants: wrong).
    fused_ok = weight is not None and bias is not None and not bool(attrs[3])

    def stats():
        key = ("stats", paddle.is_grad_enabled())
        if key not in cache:
            cache[key] = _standardize(x, axes, eps)
        return cache[key]

    # The input and weight gradients of one backward get the same output-gradient tensor (`apply_rule`), so the
    # second of them takes the fused kernel's result that the first left here.
    shared = fused_ok and not x.stop_gradient and not weight.stop_gradient

    def fused(g):
        left = cache.pop("fused", None)
        if left is not None and left[0] is g:
            return left[1]
        mean_out, var_out, saved_mean, saved_var, reserve = rest
        result = original("batch_norm_grad")(x, weight, bias, mean_out, var_out, saved_mean, saved_var, reserve, g,
                                             *attrs)
        if shared:
            cache["fused"] = (g, result)
        return result

    def unrecorded() -> bool:
        return not paddle.is_grad_enabled() and fused_ok and len(rest) == 5

    def grad_x(g):
        if unrecorded():
            return fused(g)[0]
        x_hat, inv_std = stats()
        sum_g = reduce_sum(g, axes).reshape(lean)
        sum_gx = reduce_sum(g * x_hat, axes).reshape(lean)
        a = inv_std * weight.reshape(lean) if weight is not None else inv_std
        return (channel_affine(g, a, (a * sum_g) * (-1.0 / count))
                - channel_affine(x_hat, (a * sum_gx) * (1.0 / count)))

    def grad_w(g):
        if unrecorded():
            return fused(g)[1]
        x_hat, _ = stats()
        return reduce_sum(g * x_hat, axes).reshape(weight.shape)

    def grad_b(g):
        return reduce_sum(g, axes).reshape(bias.shape)

    return apply_rule([x, weight, bias], run, [grad_x, grad_w, grad_b])


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
