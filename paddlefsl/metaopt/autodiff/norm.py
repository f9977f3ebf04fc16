"""Normalization layers: exact rules for ``batch_norm``, ``layer_norm``, ``group_norm`` and ``instance_norm``.

Each rule runs Paddle's own kernel in forward (so values, and the in-place update of batch norm's running
statistics, are exactly stock) and writes the backward with differentiable public Paddle ops. The backward
recomputes the normalized input from the live input, so every quantity it uses depends differentiably on the
inputs and the rule is exact at every order. Training-mode batch norm with an affine transform instead takes its
gradients from Paddle's fused kernel in every pass, recorded ones included, through rules whose own derivatives
are written in that kernel and differentiable ops (`_SavedStatistics`).

With ``x_hat = (x - mean_R(x)) * s``, ``s = 1 / sqrt(var_R(x) + eps)`` (biased variance over the reduced axes
``R``) and ``y = w * x_hat + b``, the gradients for an upstream gradient ``g`` are::

    dx = s * (h - mean_R(h) - x_hat * mean_R(h * x_hat)),   h = g * w
    dw = sum(g * x_hat),   db = sum(g)        (summed over the axes that w and b are broadcast along)

When statistics are fixed (batch norm in eval mode) ``dx = g * w * s``.

Inputs are differentiated one PyLayer each (`apply_rule()`).
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Sequence

import paddle

from paddlefsl.metaopt.autodiff.registry import exact, original
from paddlefsl.metaopt.autodiff.common import apply_rule, channel_affine, lean_shape, reduce_sum

_full = original("full")

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
    ``dx = w * P(g)`` and ``dw = sum(g * x_hat)`` with the projection ``P(g) = s * (g - mean(g) - x_hat *
    mean(g * x_hat))`` per channel.

    With an affine transform in training mode both come from Paddle's fused ``batch_norm_grad`` kernel (one call,
    with the statistics the forward saved) in every backward pass: one that records no graph takes them as they
    are; one that records a graph (an inner step of second-order MAML) takes them through `_SavedStatistics`,
    whose rules have derivatives written again in that kernel and differentiable ops, so every order stays exact.
    Otherwise (no affine transform, ``is_test``) the composite ``dx = channel_affine(g, a, -a * sum(g) / m) -
    channel_affine(x_hat, a * sum(g * x_hat) / m)`` with ``a = w * s``, recomputing the statistics from ``x``.
    """
    lean = lean_shape(bshape)
    count = math.prod(int(x.shape[a]) for a in axes)
    cache: dict = {}
    # Stock batch_norm_grad is right for training-mode batch statistics only (with is_test=True it treats the
    # batch statistics as constants: wrong).
    fused_ok = weight is not None and bias is not None and not bool(attrs[3])
    saved = _SavedStatistics(x, weight.dtype, rest, attrs, axes, lean, count) if fused_ok else None

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

    def fast() -> bool:
        return fused_ok and len(rest) == 5

    def grad_x(g):
        if fast():
            if not paddle.is_grad_enabled():
                return fused(g)[0]
            return channel_affine(saved.project(g), weight.reshape(lean))
        x_hat, inv_std = stats()
        sum_g = reduce_sum(g, axes).reshape(lean)
        sum_gx = reduce_sum(g * x_hat, axes).reshape(lean)
        a = inv_std * weight.reshape(lean) if weight is not None else inv_std
        return (channel_affine(g, a, (a * sum_g) * (-1.0 / count))
                - channel_affine(x_hat, (a * sum_gx) * (1.0 / count)))

    def grad_w(g):
        if fast():
            if not paddle.is_grad_enabled():
                return fused(g)[1]
            return saved.dot(g).reshape(weight.shape)
        x_hat, _ = stats()
        return reduce_sum(g * x_hat, axes).reshape(weight.shape)

    def grad_b(g):
        return reduce_sum(g, axes).reshape(bias.shape)

    return apply_rule([x, weight, bias], run, [grad_x, grad_w, grad_b])


class _SavedStatistics:
    """Training-mode batch norm's input ``x`` with the statistics its forward saved (mean and ``s = 1 / std`` per
    channel), as exact rules whose values come from those statistics and Paddle's fused ``batch_norm_grad`` kernel
    (run with unit scale), for a backward pass that records a graph.

    With ``M`` positions per channel, per-channel sums ``<a, b>`` and ``c = <g, x_hat> / M``:

    - ``project(g) = P(g) = s * (g - mean(g) - x_hat * c)`` (the input gradient at unit scale). ``P`` is symmetric
      in ``g``, so the derivative in ``g`` for a cotangent ``u`` is ``P(u)``; in ``x`` it is
      ``-(s / M) * (<u, P(g)> * x_hat + <u, x_hat> * P(g) + <g, x_hat> * P(u))``.
    - ``dot(g) = <g, x_hat>``: derivative ``v * x_hat`` in ``g`` and ``v * P(g)`` in ``x``.
    - ``x_hat()``: derivative ``P(u)``; ``inv_std()``: derivative ``-(s^2 / M) * v * x_hat``.

    A backward that records no graph evaluates these derivatives with constants (the saved statistics and the
    kernel's outputs); one that records a graph (third order) builds them from the rules again. Only values
    without a graph are kept here (a kept tensor with a graph could lead back to the rules that keep it: a cycle
    through Paddle's nodes that is never freed), and output gradients are only referred to weakly.
    """

    def __init__(self, x: Tensor, param_dtype: Any, rest: list, attrs: tuple, axes: list[int], lean: list[int],
                 count: int) -> None:
        self.x, self.rest, self.attrs, self.axes, self.lean, self.count = x, rest, attrs, axes, lean, count
        self.param_dtype = param_dtype   # the kernel's scale and bias (float32 for a float16 input)
        self._last: tuple | None = None     # (weakref to g, P(g), <g, x_hat>) of the latest kernel call
        self._constants: dict[str, Tensor] = {}

    def _kernel(self, g: Tensor, keep: bool = True) -> tuple[Tensor, Tensor]:
        """``(P(g), <g, x_hat>)`` as values without a graph. With ``keep`` consecutive requests for one ``g`` share
        one call (the input and weight gradients of one recorded pass); an output gradient's projection in the
        meta-backward is not kept (it is handed to Paddle, see `_Shared`)."""
        if keep and self._last is not None and self._last[0]() is g:
            return self._last[1], self._last[2]
        c = math.prod(self.lean)
        one = _full([c], 1.0, self.param_dtype, self.x.place)
        zero = _full([c], 0.0, self.param_dtype, self.x.place)
        with paddle.no_grad():
            p, g_x, _ = original("batch_norm_grad")(self.x.detach(), one, zero, *self._saved(), g.detach(),
                                                    *self.attrs)
        g_x = g_x.reshape(self.lean)
        if keep:
            self._last = (weakref.ref(g), p, g_x)
        return p, g_x

    def _saved(self) -> list[Tensor]:
        if "saved" not in self._constants:
            self._constants["saved"] = [t.detach() for t in self.rest]
        return self._constants["saved"]

    def _inv_std_value(self) -> Tensor:
        return self._saved()[3].reshape(self.lean)

    def _x_hat_value(self) -> Tensor:
        if "x_hat" not in self._constants:
            s = self._inv_std_value()
            with paddle.no_grad():
                self._constants["x_hat"] = channel_affine(self.x.detach(), s, -(self._saved()[2].reshape(self.lean)
                                                                                  * s))
        return self._constants["x_hat"]

    def _sum(self, t: Tensor) -> Tensor:
        return reduce_sum(t, self.axes).reshape(self.lean)

    def project(self, g: Tensor) -> Tensor:
        """``P(g)``, exact at every order in ``x`` and ``g``."""
        p_g, g_x = self._kernel(g)
        p_u = _Shared(self._projected)
        # x's gradient reads P(u) and leaves it for g's, which takes it (Paddle may accumulate g's other gradients
        # into the tensor it is handed, in place); in the other order g's computes its own.
        return apply_rule([self.x, g], p_g.detach,
                          [lambda u: self._project_grad_x(g, p_g, g_x, u, p_u(u)), p_u.take])

    def _projected(self, u: Tensor) -> Tensor:
        return self.project(u) if paddle.is_grad_enabled() else self._kernel(u, keep=False)[0]

    def _project_grad_x(self, g: Tensor, p_g: Tensor, g_x: Tensor, u: Tensor, p_u: Tensor) -> Tensor:
        if paddle.is_grad_enabled():
            x_hat, s, p_g, g_x = self.x_hat(), self.inv_std(), self.project(g), self.dot(g)
        else:
            x_hat, s = self._x_hat_value(), self._inv_std_value()
        k = s * (-1.0 / self.count)
        return (channel_affine(x_hat, k * self._sum(u * p_g)) + channel_affine(p_g, k * self._sum(u * x_hat))
                + channel_affine(p_u, k * g_x))

    def dot(self, g: Tensor) -> Tensor:
        """``<g, x_hat>`` per channel (shaped to broadcast against ``x``), exact at every order."""
        p_g, g_x = self._kernel(g)
        return apply_rule([self.x, g], g_x.detach,
                          [lambda v: channel_affine(self.project(g) if paddle.is_grad_enabled() else p_g, v),
                           lambda v: channel_affine(self.x_hat() if paddle.is_grad_enabled() else self._x_hat_value(),
                                                    v)])

    def x_hat(self) -> Tensor:
        """The standardized input, exact at every order in ``x``."""
        return apply_rule([self.x], lambda: self._x_hat_value().detach(), [self._projected])

    def inv_std(self) -> Tensor:
        """``1 / sqrt(var + eps)`` per channel, exact at every order in ``x``."""
        def grad(v):
            if paddle.is_grad_enabled():
                s, x_hat = self.inv_std(), self.x_hat()
            else:
                s, x_hat = self._inv_std_value(), self._x_hat_value()
            return channel_affine(x_hat, s * s * v * (-1.0 / self.count))
        return apply_rule([self.x], lambda: self._inv_std_value().detach(), [grad])


class _Shared:
    """``fn(u)`` for the output gradient ``u`` of a backward pass that records no graph, computed once for two
    gradient functions of one rule (`apply_rule` hands them the same tensor): a reader (``shared(u)``) and the last
    user (``shared.take(u)``), which gets the tensor and clears it, so nothing here can read it after Paddle has
    been handed it. In a pass that records a graph nothing is kept (see `_SavedStatistics`)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn, self._last = fn, None

    def __call__(self, u: Tensor) -> Tensor:
        if paddle.is_grad_enabled():
            return self.fn(u)
        if self._last is None or self._last[0]() is not u:
            self._last = (weakref.ref(u), self.fn(u))
        return self._last[1]

    def take(self, u: Tensor) -> Tensor:
        """``fn(u)``, the reader's result if it ran for this ``u`` (then forgotten here), else computed anew."""
        last, self._last = self._last, None
        if last is not None and last[0]() is u and not paddle.is_grad_enabled():
            return last[1]
        return self.fn(u)


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
