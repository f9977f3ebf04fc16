"""Convolutions: exact rules for the 2-D and 3-D convolution kernels and their transposes.

A convolution ``y = conv(x, w)`` is bilinear. Its gradient with respect to ``x`` is the transposed convolution of
the output gradient with ``w``; its gradient with respect to ``w`` is Paddle's fused weight-gradient kernel, itself
bilinear in ``(x, gy)`` with gradients that are again a convolution and a transposed convolution. The transposed
convolution is the adjoint of the convolution, so its gradients are the same maps the other way round. Every
backward is written with the public ``paddle.nn.functional`` convolutions, which inside the exact scope route back
to these rules, so every order is exact.

``nn.Conv1D`` and ``F.conv1d`` reach ``conv2d`` (or ``depthwise_conv2d``) on an unsqueezed input; ``conv1d_transpose``
reaches ``conv2d_transpose``; the bias is added by the stock ``add`` kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import paddle
import paddle.nn.functional as F

from paddlefsl.metaopt import kernels
from paddlefsl.metaopt.autodiff.registry import exact, original
from paddlefsl.metaopt.autodiff.common import apply_rule, channel_last, ints, to_channel_first, to_channel_last

FAMILY = "conv"


def resolve_padding(padding, algorithm: str, in_sizes: Sequence[int], kernel: Sequence[int],
                    stride: Sequence[int], dilation: Sequence[int]) -> tuple[list[int], list[int]]:
    """Resolve Paddle's padding attributes into explicit ``[before_0, after_0, before_1, after_1, ...]`` pads.

    Follows Paddle's own rule (``UpdatePaddingAndDilation``): ``"SAME"`` pads so that the output size is
    ``ceil(in / stride)`` and resets the dilation to 1, ``"VALID"`` pads nothing, and an explicit list holds either
    one pad per spatial axis or a (before, after) pair per axis.

    Args:
        padding: the kernel's ``paddings`` attribute.
        algorithm: ``"EXPLICIT"``, ``"SAME"`` or ``"VALID"``.
        in_sizes: the spatial sizes of the input the padding applies to.
        kernel: the spatial kernel sizes.
        stride: the strides.
        dilation: the dilations.

    Returns:
        The explicit pads (two per spatial axis) and the effective dilations.
    """
    nd = len(in_sizes)
    dilation = list(dilation)
    algorithm = (algorithm or "EXPLICIT").upper()
    if algorithm == "SAME":
        pads = []
        for size, k, s in zip(in_sizes, kernel, stride):
            out = (size + s - 1) // s
            total = max((out - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return pads, [1] * nd
    if algorithm == "VALID":
        return [0] * (2 * nd), dilation
    flat = ints(padding, nd)
    if len(flat) == nd:
        flat = [p for p in flat for _ in range(2)]
    if len(flat) != 2 * nd:
        raise ValueError(f"cannot read padding {padding!r} for {nd} spatial axes")
    return flat, dilation


@dataclass(frozen=True)
class ConvGeometry:
    """The resolved geometry of one convolution, channel-first (the spatial layout Paddle's weights use).

    Attributes:
        stride: strides, one per spatial axis.
        pads: explicit pads, a (before, after) pair per spatial axis.
        dilation: effective dilations.
        groups: the number of channel groups.
    """

    stride: tuple
    pads: tuple
    dilation: tuple
    groups: int

    @property
    def nd(self) -> int:
        """The number of spatial axes."""
        return len(self.stride)


def _cf_format(nd: int) -> str:
    return "NCHW" if nd == 2 else "NCDHW"


def _unrecorded(x: paddle.Tensor, w: paddle.Tensor) -> bool:
    """Whether a kernel's result here gets no grad node (a backward pass that records no graph)."""
    return not paddle.is_grad_enabled() or (x.stop_gradient and w.stop_gradient)


def conv_cf(x: paddle.Tensor, w: paddle.Tensor, geo: ConvGeometry) -> paddle.Tensor:
    """Channel-first convolution with explicit pads, through the public (scope-routed) functional API.

    Where no graph is recorded, a 2-D convolution goes straight to the fast kernel when it supports the call
    (the scope may route the public API to Paddle's own kernel, as a first-order lease does)."""
    if geo.nd == 2 and _unrecorded(x, w):
        stride, pads, dilation = list(geo.stride), list(geo.pads), list(geo.dilation)
        stock = lambda a, b: original("conv2d")(a, b, stride, pads, "EXPLICIT", dilation, geo.groups, "NCHW")
        return _fast_conv2d(stock, geo, False)(x, w)
    fn = F.conv2d if geo.nd == 2 else F.conv3d
    return fn(x, w, None, stride=list(geo.stride), padding=list(geo.pads), dilation=list(geo.dilation),
              groups=geo.groups, data_format=_cf_format(geo.nd))


def conv_transpose_cf(x: paddle.Tensor, w: paddle.Tensor, geo: ConvGeometry,
                      out_sizes: Sequence[int]) -> paddle.Tensor:
    """Channel-first transposed convolution with explicit pads and output size, through the public API (straight
    to the fast kernel where no graph is recorded, as `conv_cf`)."""
    if geo.nd == 2 and _unrecorded(x, w):
        stride, pads, dilation = list(geo.stride), list(geo.pads), list(geo.dilation)
        sizes = [int(s) for s in out_sizes]
        stock = lambda a, b: original("conv2d_transpose")(a, b, stride, pads, [], sizes, "EXPLICIT", geo.groups,
                                                          dilation, "NCHW")
        return _fast_conv2d_transpose(stock, geo, False, [], sizes)(x, w)
    fn = F.conv2d_transpose if geo.nd == 2 else F.conv3d_transpose
    return fn(x, w, None, stride=list(geo.stride), padding=list(geo.pads), dilation=list(geo.dilation),
              groups=geo.groups, output_size=[int(s) for s in out_sizes], data_format=_cf_format(geo.nd))


def conv_weight_grad(x: paddle.Tensor, gy: paddle.Tensor, kernel: Sequence[int], geo: ConvGeometry) -> paddle.Tensor:
    """Gradient of ``<conv(x, w), gy>`` with respect to ``w`` (channel-first), exact at every order.

    The value is Paddle's own fused weight-gradient kernel (``conv2d_grad``/``conv3d_grad``). The map is bilinear
    in ``(x, gy)`` with ``<gw(x, gy), G> = <conv(x, G), gy>``, so its gradients are standard convolutions with
    weight ``G``: ``conv_transpose(gy, G)`` for ``x`` and ``conv(x, G)`` for ``gy``.

    Args:
        x: the convolution input, ``[N, C, *spatial]``.
        gy: the output gradient, ``[N, O, *out_spatial]``.
        kernel: the spatial kernel sizes of ``w``.
        geo: the convolution geometry.

    Returns:
        The weight gradient, ``[O, C / groups, *kernel]``.
    """
    w_shape = [gy.shape[1], x.shape[1] // geo.groups] + [int(k) for k in kernel]
    stride, pads, dilation = list(geo.stride), list(geo.pads), list(geo.dilation)
    fmt = _cf_format(geo.nd)

    def stock(a, b):
        zero = paddle.zeros(w_shape, dtype=a.dtype)
        if geo.nd == 2:
            grads = original("conv2d_grad")(a, zero, b, stride, pads, "EXPLICIT", dilation, geo.groups, fmt)
        else:
            grads = original("conv3d_grad")(a, zero, b, stride, pads, "EXPLICIT", geo.groups, dilation, fmt)
        return grads[1]

    def run():
        if geo.nd == 2 and kernels.conv2d_supported(x, gy, dilation, geo.groups, False, _macs(gy.shape, w_shape)):
            return kernels.conv2d_backward_weights(x, gy, w_shape, stride, pads, stock, geo.groups)
        return stock(x, gy)

    sizes = list(x.shape[2:])
    return apply_rule([x, gy], run, [lambda g: conv_transpose_cf(gy, g, geo, sizes), lambda g: conv_cf(x, g, geo)])


def _macs(y_shape: Sequence[int], w_shape: Sequence[int]) -> int:
    """Multiply-adds of a convolution with output ``y_shape`` and weight ``w_shape`` (channel-first)."""
    total = 1
    for d in list(y_shape) + list(w_shape[1:]):
        total *= int(d)
    return total


def bilinear(x: paddle.Tensor, w: paddle.Tensor, run: Callable, grad_x: Callable, grad_w: Callable) -> paddle.Tensor:
    """Apply a bilinear kernel ``run(x, w)`` with exact gradients given by differentiable ``grad_x``/``grad_w``.

    Args:
        x: the first operand.
        w: the second operand.
        run: computes the value (Paddle's own kernel).
        grad_x: ``grad_x(gy, w)``, the gradient with respect to ``x``, in differentiable public ops.
        grad_w: ``grad_w(x, gy)``, the gradient with respect to ``w``, in differentiable public ops.

    Returns:
        ``run(x, w)``, carrying the gradient rules.
    """
    return apply_rule([x, w], lambda: run(x, w), [lambda gy: grad_x(gy, w), lambda gy: grad_w(x, gy)])


def _conv_grads(geo: ConvGeometry, channel_last: bool, transposed: bool):
    def grad_x(gy, w, x_shape):
        g = to_channel_first(gy) if channel_last else gy
        if transposed:
            out = conv_cf(g, w, geo)
        else:
            sizes = x_shape[1:-1] if channel_last else x_shape[2:]
            out = conv_transpose_cf(g, w, geo, sizes)
        return to_channel_last(out) if channel_last else out

    def grad_w(x, gy, kernel):
        xc, g = (to_channel_first(x), to_channel_first(gy)) if channel_last else (x, gy)
        return conv_weight_grad(g, xc, kernel, geo) if transposed else conv_weight_grad(xc, g, kernel, geo)

    return grad_x, grad_w


def _apply_bilinear(x, w, run, geo: ConvGeometry, channel_last: bool, transposed: bool) -> paddle.Tensor:
    grad_x, grad_w = _conv_grads(geo, channel_last, transposed)
    x_shape, kernel = list(x.shape), list(w.shape[2:])
    return bilinear(x, w, run, lambda gy, w_: grad_x(gy, w_, x_shape), lambda x_, gy: grad_w(x_, gy, kernel))


def _spatial(x: paddle.Tensor, channel_last: bool) -> list[int]:
    return list(x.shape[1:-1]) if channel_last else list(x.shape[2:])


def _geometry(x, w, strides, paddings, padding_algorithm, dilations, groups, data_format) -> tuple[ConvGeometry,
                                                                                                bool]:
    """The channel-first geometry of a (transposed) convolution, and whether its layout is channel-last."""
    last = channel_last(data_format)
    nd = x.ndim - 2
    stride = ints(strides, nd)
    pads, dil = resolve_padding(paddings, padding_algorithm, _spatial(x, last), list(w.shape[2:]), stride,
                                ints(dilations, nd))
    return ConvGeometry(tuple(stride), tuple(pads), tuple(dil), int(groups)), last


def _apply_conv(name: str, x, w, strides, paddings, padding_algorithm, dilations, groups, data_format,
                extra: tuple, kwargs: dict) -> paddle.Tensor:
    geo, last = _geometry(x, w, strides, paddings, padding_algorithm, dilations, groups, data_format)
    kernel = original(name)
    if name in ("conv2d",):
        run = lambda a, b: kernel(a, b, strides, paddings, padding_algorithm, dilations, groups, data_format,
                                  *extra, **kwargs)
        if not extra and not kwargs:
            run = _fast_conv2d(run, geo, last)
    else:
        run = lambda a, b: kernel(a, b, strides, paddings, padding_algorithm, groups, dilations, data_format,
                                  *extra, **kwargs)
    return _apply_bilinear(x, w, run, geo, last, transposed=False)


def _apply_conv_transpose(name: str, x, w, strides, paddings, output_padding, output_size, padding_algorithm,
                          groups, dilations, data_format, extra: tuple, kwargs: dict) -> paddle.Tensor:
    geo, last = _geometry(x, w, strides, paddings, padding_algorithm, dilations, groups, data_format)
    kernel = original(name)
    run = lambda a, b: kernel(a, b, strides, paddings, output_padding, output_size, padding_algorithm, groups,
                              dilations, data_format, *extra, **kwargs)
    if name == "conv2d_transpose" and not extra and not kwargs:
        run = _fast_conv2d_transpose(run, geo, last, output_padding, output_size)
    return _apply_bilinear(x, w, run, geo, last, transposed=True)


def _fast_conv2d(stock: Callable, geo: ConvGeometry, last: bool) -> Callable:
    """``run(x, w)`` of a 2-D convolution: oneDNN's kernel where `paddlefsl.metaopt.kernels` supports the
    call, ``stock`` otherwise (same value; the rule's gradients do not depend on which computed it)."""
    def run(x, w):
        sizes = [(x.shape[2 + i] + geo.pads[2 * i] + geo.pads[2 * i + 1] - w.shape[2 + i]) // geo.stride[i] + 1
                 for i in range(2)]
        if not kernels.conv2d_supported(x, w, geo.dilation, geo.groups, last,
                                        _macs([x.shape[0], w.shape[0]] + sizes, w.shape)):
            return stock(x, w)
        return kernels.conv2d(x, w, list(geo.stride), list(geo.pads), stock, geo.groups)

    return run


def _fast_conv2d_transpose(stock: Callable, geo: ConvGeometry, last: bool, output_padding, output_size) -> Callable:
    """``run(x, w)`` of a 2-D transposed convolution (oneDNN's backward-data kernel where supported)."""
    def run(x, w):
        if output_size is not None and len(output_size) > 0:
            sizes = ints(output_size, 2)
        else:
            extra = ints(output_padding, 2) if output_padding is not None and len(output_padding) > 0 else [0, 0]
            sizes = [(x.shape[2 + i] - 1) * geo.stride[i] - geo.pads[2 * i] - geo.pads[2 * i + 1] + w.shape[2 + i]
                     + extra[i] for i in range(2)]
        consistent = all((sizes[i] + geo.pads[2 * i] + geo.pads[2 * i + 1] - w.shape[2 + i]) // geo.stride[i] + 1
                         == x.shape[2 + i] for i in range(2))
        if not consistent or not kernels.conv2d_supported(x, w, geo.dilation, geo.groups, last,
                                                          _macs(x.shape, [w.shape[0], w.shape[1]] + list(w.shape[2:]))):
            return stock(x, w)
        x_shape = [x.shape[0], w.shape[1] * geo.groups] + sizes
        return kernels.conv2d_backward_data(x, w, x_shape, list(geo.stride), list(geo.pads), stock, geo.groups)

    return run


@exact("conv2d", FAMILY, "grad: conv2d_transpose (input), fused weight-gradient kernel")
def conv2d(x, weight, strides, paddings, padding_algorithm, dilations, groups, data_format, *extra, **kwargs):
    """Exact replacement of ``paddle._C_ops.conv2d`` (reached by ``nn.Conv1D``, ``nn.Conv2D``, ``F.conv1d/2d``)."""
    return _apply_conv("conv2d", x, weight, strides, paddings, padding_algorithm, dilations, groups, data_format,
                       extra, kwargs)


@exact("depthwise_conv2d", FAMILY, "grad: conv2d_transpose (input), fused weight-gradient kernel")
def depthwise_conv2d(x, weight, strides, paddings, padding_algorithm, groups, dilations, data_format, *extra,
                     **kwargs):
    """Exact replacement of ``paddle._C_ops.depthwise_conv2d`` (convs with ``groups == in_channels``)."""
    return _apply_conv("depthwise_conv2d", x, weight, strides, paddings, padding_algorithm, dilations, groups,
                       data_format, extra, kwargs)


@exact("conv3d", FAMILY, "grad: conv3d_transpose (input), fused weight-gradient kernel")
def conv3d(x, weight, strides, paddings, padding_algorithm, groups, dilations, data_format, *extra, **kwargs):
    """Exact replacement of ``paddle._C_ops.conv3d`` (reached by ``nn.Conv3D`` and ``F.conv3d``)."""
    return _apply_conv("conv3d", x, weight, strides, paddings, padding_algorithm, dilations, groups, data_format,
                       extra, kwargs)


@exact("conv2d_transpose", FAMILY, "grad: conv2d (input), fused weight-gradient kernel")
def conv2d_transpose(x, weight, strides, paddings, output_padding, output_size, padding_algorithm, groups,
                     dilations, data_format, *extra, **kwargs):
    """Exact replacement of ``paddle._C_ops.conv2d_transpose`` (``nn.Conv2DTranspose``, ``F.conv1d_transpose``)."""
    return _apply_conv_transpose("conv2d_transpose", x, weight, strides, paddings, output_padding, output_size,
                                 padding_algorithm, groups, dilations, data_format, extra, kwargs)


@exact("depthwise_conv2d_transpose", FAMILY, "grad: conv2d (input), fused weight-gradient kernel")
def depthwise_conv2d_transpose(x, weight, strides, paddings, output_padding, output_size, padding_algorithm,
                               groups, dilations, data_format, *extra, **kwargs):
    """Exact replacement of ``paddle._C_ops.depthwise_conv2d_transpose``."""
    return _apply_conv_transpose("depthwise_conv2d_transpose", x, weight, strides, paddings, output_padding,
                                 output_size, padding_algorithm, groups, dilations, data_format, extra, kwargs)


@exact("conv3d_transpose", FAMILY, "grad: conv3d (input), fused weight-gradient kernel")
def conv3d_transpose(x, weight, strides, paddings, output_padding, output_size, padding_algorithm, groups,
                     dilations, data_format, *extra, **kwargs):
    """Exact replacement of ``paddle._C_ops.conv3d_transpose`` (``nn.Conv3DTranspose``)."""
    return _apply_conv_transpose("conv3d_transpose", x, weight, strides, paddings, output_padding, output_size,
                                 padding_algorithm, groups, dilations, data_format, extra, kwargs)
