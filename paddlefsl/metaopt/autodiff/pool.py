"""Pooling: exact rules for the 2-D and 3-D pooling kernels (max and average, plain and adaptive).

* Average pooling is linear: ``y = A x``. Its rule is a pair of PyLayers, ``A`` and its adjoint ``A^T`` (Paddle's
  own ``pool2d_grad``/``pool3d_grad`` kernel applied to the output gradient), each differentiated by the other,
  so every order is exact for every option (kernel, stride, padding, ``ceil_mode``, ``exclusive``, adaptive,
  global, NCHW/NHWC).
* Max pooling selects one input per window: ``y = x[argmax]``. The argmax indices are computed once in forward
  (``max_pool2d_with_index``; asymmetric padding by padding the input with ``-inf`` first); the backward
  scatters the output gradient to those indices with a gather/scatter PyLayer pair, again each the other's
  gradient, so every order is exact (the indices are locally constant for inputs without ties).

``F.max_pool1d``, ``F.avg_pool1d`` and the adaptive 1-D pools reach the 2-D kernels on an unsqueezed input.
"""
from __future__ import annotations

import abc
from typing import Callable, Sequence

import paddle

from paddlefsl.metaopt import kernels
from paddlefsl.metaopt.autodiff.released import GuardedPyLayer

from paddlefsl.metaopt.autodiff.common import channel_last, ints, to_channel_first, to_channel_last
from paddlefsl.metaopt.autodiff.conv import resolve_padding
from paddlefsl.metaopt.autodiff.registry import exact, original

FAMILY = "pool"


# ----------------------------------------------------------------------------------------------------------------
# Linear maps: a PyLayer for the map and one for its adjoint, each the other's gradient.
# ----------------------------------------------------------------------------------------------------------------

class _LinearMap:
    """A fixed linear map on tensors given by a forward kernel and its adjoint kernel (both non-differentiable)."""

    def __init__(self, apply: Callable, adjoint: Callable) -> None:
        self.apply = apply
        self.adjoint = adjoint


class _Forward(GuardedPyLayer):
    @staticmethod
    def forward(ctx, x, op: _LinearMap):
        ctx.op = op
        return op.apply(x)

    @staticmethod
    def backward(ctx, grad):
        return _Adjoint.apply(grad, ctx.op)


class _Adjoint(GuardedPyLayer):
    @staticmethod
    def forward(ctx, g, op: _LinearMap):
        ctx.op = op
        return op.adjoint(g)

    @staticmethod
    def backward(ctx, grad):
        return _Forward.apply(grad, ctx.op)


def _avg_pool(name: str, x, args: tuple, kwargs: dict) -> paddle.Tensor:
    kernel = original(name)
    kernel_grad = original(name + "_grad")
    shape = list(x.shape)
    dtype = x.dtype
    holder: dict = {}

    def apply(t):
        y = kernel(t, *args, **kwargs)
        holder["out_shape"] = list(y.shape)
        return y

    def adjoint(g):
        zx = paddle.zeros(shape, dtype)
        zy = paddle.zeros(holder["out_shape"], dtype)
        return kernel_grad(zx, zy, g, *args)

    return _Forward.apply(x, _LinearMap(apply, adjoint))


# ----------------------------------------------------------------------------------------------------------------
# Max pooling: gather at precomputed argmax indices; scatter back. Gather and scatter are each other's gradient.
# ----------------------------------------------------------------------------------------------------------------

class _Gather(GuardedPyLayer):
    @staticmethod
    def forward(ctx, src, index, size: int):
        ctx.index = index
        ctx.size = size
        return original("take_along_axis")(src, index, 2)

    @staticmethod
    def backward(ctx, grad):
        return _Scatter.apply(grad, ctx.index, ctx.size)


class _Scatter(GuardedPyLayer):
    @staticmethod
    def forward(ctx, values, index, size: int):
        ctx.index = index
        ctx.size = size
        base = paddle.zeros(list(values.shape[:2]) + [size], values.dtype)
        return original("put_along_axis")(base, index, values, 2, "add", True)

    @staticmethod
    def backward(ctx, grad):
        return _Gather.apply(grad, ctx.index, ctx.size)


def scatter_add(values: paddle.Tensor, index: paddle.Tensor, size: int) -> paddle.Tensor:
    """Add ``values[n, c, l]`` into a zero ``[N, C, size]`` tensor at ``index[n, c, l]`` (exact at every order).

    Args:
        values: ``[N, C, L]`` floating tensor.
        index: ``[N, C, L]`` int64 indices in ``[0, size)``.
        size: the length of the last axis of the result.

    Returns:
        The ``[N, C, size]`` sum.
    """
    return _Scatter.apply(values, index, size)


class _Windows(abc.ABC):
    """The argmax of one max pooling whose every window holds an input element: `scatter` sends an output gradient
    to it (the adjoint of the pooling), `gather` reads an input-shaped gradient at it (the adjoint's adjoint)
    through flat spatial indices that the subclass builds (`flat_index`, on first use)."""

    def __init__(self, x_shape: Sequence[int], out_shape: Sequence[int]) -> None:
        self.x_shape = [int(d) for d in x_shape]
        self.out_shape = [int(d) for d in out_shape]
        self._index: paddle.Tensor | None = None

    @abc.abstractmethod
    def scatter(self, g: paddle.Tensor) -> paddle.Tensor:
        """The output gradient ``g`` sent to the argmax (an input-shaped tensor)."""

    @abc.abstractmethod
    def flat_index(self) -> paddle.Tensor:
        """The argmax as ``[N, C, L]`` int64 indices into the flattened spatial axes of the input."""

    def gather(self, g: paddle.Tensor) -> paddle.Tensor:
        n, c = self.x_shape[:2]
        if self._index is None:
            self._index = self.flat_index()
        return original("take_along_axis")(g.reshape([n, c, -1]), self._index, 2).reshape(self.out_shape)


class _MaxWindows(_Windows):
    """The argmax as Paddle's ``max_pool*_with_index`` mask (flat spatial argmax, shaped like the output); the
    adjoint is Paddle's ``max_pool*_with_index_grad`` kernel on that mask, one kernel instead of a zero tensor and a
    ``put_along_axis``."""

    def __init__(self, x: paddle.Tensor, mask: paddle.Tensor, attrs: tuple) -> None:
        super().__init__(x.shape, mask.shape)
        self.x = x  # read for its shape only
        self.mask = mask
        self.attrs = attrs

    def scatter(self, g: paddle.Tensor) -> paddle.Tensor:
        name = "max_pool2d_with_index_grad" if self.x.ndim == 4 else "max_pool3d_with_index_grad"
        return original(name)(self.x, self.mask, g, *self.attrs)

    def flat_index(self) -> paddle.Tensor:
        n, c = self.x_shape[:2]
        return self.mask.astype("int64").reshape([n, c, -1])


class _OnednnWindows(_Windows):
    """The argmax as oneDNN's workspace (`paddlefsl.metaopt.kernels.max_pool2d`): the adjoint is oneDNN's backward
    kernel on it; the flat indices read it (`paddlefsl.metaopt.kernels.max_pool2d_index`)."""

    def __init__(self, x_shape: Sequence[int], ws: paddle.Tensor, kernel, stride, pads) -> None:
        super().__init__(x_shape, ws.shape)
        self.ws = ws
        self.geometry = (list(kernel), list(stride), list(pads))

    def scatter(self, g: paddle.Tensor) -> paddle.Tensor:
        return kernels.max_pool2d_backward(g, self.ws, self.x_shape, *self.geometry)

    def flat_index(self) -> paddle.Tensor:
        return kernels.max_pool2d_index(self.ws, self.x_shape, *self.geometry)


class _WindowScatter(GuardedPyLayer):
    @staticmethod
    def forward(ctx, g, windows: _Windows):
        ctx.windows = windows
        return windows.scatter(g)

    @staticmethod
    def backward(ctx, grad):
        return _WindowGather.apply(grad, ctx.windows)


class _WindowGather(GuardedPyLayer):
    @staticmethod
    def forward(ctx, g, windows: _Windows):
        ctx.windows = windows
        return windows.gather(g)

    @staticmethod
    def backward(ctx, grad):
        return _WindowScatter.apply(grad, ctx.windows)


class _FastMaxPool(GuardedPyLayer):
    """Max pooling by one ``max_pool*_with_index`` kernel; backward scatters through `_WindowScatter`."""

    @staticmethod
    def forward(ctx, x, attrs: tuple, holder: dict):
        name = "max_pool2d_with_index" if x.ndim == 4 else "max_pool3d_with_index"
        kernel, stride, pad, _, adaptive, ceil_mode = attrs
        if not holder.get("need_mask") and not adaptive and not ceil_mode and kernels.max_pool2d_supported(x):
            pads = [int(pad[0]), int(pad[0]), int(pad[1]), int(pad[1])]
            fast = kernels.max_pool2d(x, kernel, stride, pads, lambda: original(name)(x, *attrs)[0])
            if fast is not None:
                y, ws = fast
                ctx.windows = _OnednnWindows(x.shape, ws, kernel, stride, pads)
                return y
        y, mask = original(name)(x, *attrs)
        holder["mask"] = mask
        ctx.windows = _MaxWindows(x.detach(), mask, attrs)
        return y

    @staticmethod
    def backward(ctx, grad):
        return _WindowScatter.apply(grad, ctx.windows)


def _windows_all_hold_input(spatial: Sequence[int], out: Sequence[int], kernel: Sequence[int],
                            stride: Sequence[int], pads: Sequence[int]) -> bool:
    """Whether every pooling window (symmetric ``pads``, one per axis) overlaps the input (known without data)."""
    for size, o, k, s, p in zip(spatial, out, kernel, stride, pads):
        if k - p <= 0 or (o - 1) * s - p >= size:
            return False
    return True


def _out_size(size: int, k: int, s: int, p: int, ceil_mode: bool) -> int:
    span = size + 2 * p - k
    return (span + s - 1) // s + 1 if ceil_mode else span // s + 1


class _MaxPool(GuardedPyLayer):
    @staticmethod
    def forward(ctx, x, compute: Callable):
        y, index, valid = compute(x)
        ctx.index = index
        ctx.valid = valid
        ctx.x_shape = list(x.shape)
        ctx.y_shape = list(y.shape)
        return y

    @staticmethod
    def backward(ctx, grad):
        n, c = ctx.x_shape[:2]
        g = grad.reshape([n, c, -1])
        if ctx.valid is not None:
            g = g * ctx.valid
        size = 1
        for s in ctx.x_shape[2:]:
            size *= s
        return scatter_add(g, ctx.index, size).reshape(ctx.x_shape)


def max_indices(x: paddle.Tensor, kernel: Sequence[int], stride: Sequence[int], pads: Sequence[int],
                ceil_mode: bool, adaptive: bool) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """Flat argmax indices of channel-first max pooling, as ``[N, C, L]`` int64 plus a validity mask.

    Args:
        x: channel-first input ``[N, C, *spatial]`` (2 or 3 spatial axes).
        kernel: kernel sizes (the output sizes when ``adaptive``).
        stride: strides.
        pads: explicit (before, after) pads per spatial axis.
        ceil_mode: Paddle's ``ceil_mode``.
        adaptive: adaptive pooling.

    Returns:
        The indices into the flattened spatial axes of ``x``, and a float mask that is 0 where a window holds
        only padding (``None`` when there is none).
    """
    nd = x.ndim - 2
    with_index = original("max_pool2d_with_index" if nd == 2 else "max_pool3d_with_index")
    n, c = x.shape[:2]
    spatial = list(x.shape[2:])
    with paddle.no_grad():
        if adaptive:
            _, mask = with_index(x, list(kernel), [1] * nd, [0] * nd, False, True, False)
            return _mask_to_index(x, mask)
        if all(pads[2 * i] == pads[2 * i + 1] for i in range(nd)):
            _, mask = with_index(x, list(kernel), list(stride), list(pads[0::2]), False, False, ceil_mode)
            return _mask_to_index(x, mask)
        padded = paddle.nn.functional.pad(x, [0, 0, 0, 0] + list(pads), value=float("-inf"))
        _, mask = with_index(padded, list(kernel), list(stride), [0] * nd, False, False, ceil_mode)
        flat = mask.astype("int64").reshape([n, c, -1])
        ok = flat >= 0
        rest = paddle.where(ok, flat, paddle.zeros_like(flat))
        coords = []
        for axis in reversed(range(nd)):
            size = spatial[axis] + pads[2 * axis] + pads[2 * axis + 1]
            coords.append(rest % size - pads[2 * axis])
            rest = rest // size
        coords.reverse()
        flat = paddle.zeros_like(flat)
        for axis in range(nd):
            ok = ok & (coords[axis] >= 0) & (coords[axis] < spatial[axis])
            flat = flat * spatial[axis] + coords[axis]
        index = paddle.where(ok, flat, paddle.zeros_like(flat))
        valid = None if bool(ok.all()) else ok.astype(x.dtype)
    return index, valid


def _max_pool_cf(x: paddle.Tensor, value: Callable, kernel, stride, pads, ceil_mode, adaptive) -> paddle.Tensor:
    def compute(t):
        return value(t), *max_indices(t, kernel, stride, pads, ceil_mode, adaptive)

    return _MaxPool.apply(x, compute)


def takes_onednn(x, kernel_size, strides, paddings, ceil_mode, data_format, pooling_type, global_pooling, adaptive,
                 padding_algorithm) -> bool:
    """Whether the ``pool2d`` rule computes this call's value and gradient with oneDNN: a channel-first 2-D max
    pooling (not global, adaptive or ``ceil_mode``) whose resolved pads are symmetric and whose every window holds an
    input element (so `_pool` takes `_FastMaxPool`), on an input `paddlefsl.metaopt.kernels.max_pool2d_supported`
    accepts."""
    if (pooling_type != "max" or channel_last(data_format) or global_pooling or adaptive or ceil_mode or x.ndim != 4
            or not kernels.max_pool2d_supported(x)):
        return False
    spatial, kernel, stride = list(x.shape[2:]), ints(kernel_size, 2), ints(strides, 2)
    pads, _ = resolve_padding(paddings, padding_algorithm, spatial, kernel, stride, [1, 1])
    return all(pads[2 * i] == pads[2 * i + 1] for i in range(2)) and _windows_all_hold_input(
        spatial, [_out_size(spatial[i], kernel[i], stride[i], pads[2 * i], False) for i in range(2)], kernel, stride,
        pads[0::2])


def _pool(name: str, x, kernel_size, strides, paddings, ceil_mode, exclusive, data_format, pooling_type,
          global_pooling, adaptive, padding_algorithm, extra: tuple, kwargs: dict) -> paddle.Tensor:
    args = (kernel_size, strides, paddings, ceil_mode, exclusive, data_format, pooling_type, global_pooling,
            adaptive, padding_algorithm) + tuple(extra)
    if not paddle.is_grad_enabled() or x.stop_gradient:
        return original(name)(x, *args, **kwargs)
    if pooling_type != "max":
        return _avg_pool(name, x, args, kwargs)
    last = channel_last(data_format)
    nd = x.ndim - 2
    xc = to_channel_first(x) if last else x
    spatial = list(xc.shape[2:])
    kernel = spatial if global_pooling else ints(kernel_size, nd)
    stride = ints(strides, nd)
    if global_pooling or adaptive:
        pads = [0] * (2 * nd)
    else:
        pads, _ = resolve_padding(paddings, padding_algorithm, spatial, kernel, stride, [1] * nd)
    cf = "NCHW" if nd == 2 else "NCDHW"
    symmetric = all(pads[2 * i] == pads[2 * i + 1] for i in range(nd))
    if symmetric and (adaptive or global_pooling or _windows_all_hold_input(
            spatial, [_out_size(spatial[i], kernel[i], stride[i], pads[2 * i], ceil_mode) for i in range(nd)],
            kernel, stride, pads[0::2])):
        if adaptive and not global_pooling:
            attrs = (list(kernel), [1] * nd, [0] * nd, False, True, False)
        else:
            attrs = (list(kernel), list(stride), list(pads[0::2]), False, False, bool(ceil_mode))
        y = _FastMaxPool.apply(xc, attrs, {})
        return to_channel_last(y) if last else y
    kernel_fn = original(name)

    def value(t):
        return kernel_fn(t, kernel_size, strides, paddings, ceil_mode, exclusive, cf, pooling_type, global_pooling,
                         adaptive, padding_algorithm, *extra, **kwargs)

    y = _max_pool_cf(xc, value, kernel, stride, pads, ceil_mode, adaptive and not global_pooling)
    return to_channel_last(y) if last else y


@exact("pool2d", FAMILY, "avg: linear map and adjoint; max: scatter to argmax")
def pool2d(x, kernel_size, strides, paddings, ceil_mode, exclusive, data_format, pooling_type, global_pooling,
           adaptive, padding_algorithm, *extra, **kwargs):
    """Exact replacement of ``paddle._C_ops.pool2d`` (``F.avg_pool1d/2d``, ``F.max_pool1d/2d``, adaptive avg)."""
    return _pool("pool2d", x, kernel_size, strides, paddings, ceil_mode, exclusive, data_format, pooling_type,
                 global_pooling, adaptive, padding_algorithm, extra, kwargs)


@exact("pool3d", FAMILY, "avg: linear map and adjoint; max: scatter to argmax")
def pool3d(x, kernel_size, strides, paddings, ceil_mode, exclusive, data_format, pooling_type, global_pooling,
           adaptive, padding_algorithm, *extra, **kwargs):
    """Exact replacement of ``paddle._C_ops.pool3d`` (``F.avg_pool3d``, ``F.max_pool3d``, adaptive avg 3-D)."""
    return _pool("pool3d", x, kernel_size, strides, paddings, ceil_mode, exclusive, data_format, pooling_type,
                 global_pooling, adaptive, padding_algorithm, extra, kwargs)


def _mask_to_index(x: paddle.Tensor, mask: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor | None]:
    """Turn a ``max_pool*_with_index`` mask (flat spatial argmax, -1 for a window of padding only) into indices."""
    n, c = x.shape[:2]
    with paddle.no_grad():
        flat = mask.astype("int64").reshape([n, c, -1])
        ok = flat >= 0
        index = paddle.where(ok, flat, paddle.zeros_like(flat))
        valid = None if bool(ok.all()) else ok.astype(x.dtype)
    return index, valid


def _with_index(name: str, x, kernel_size, strides, paddings, global_pooling, adaptive, ceil_mode, extra, kwargs):
    kernel_fn = original(name)
    run = lambda t: kernel_fn(t, kernel_size, strides, paddings, global_pooling, adaptive, ceil_mode, *extra,
                              **kwargs)
    if not paddle.is_grad_enabled() or x.stop_gradient:
        return run(x)
    holder: dict = {"need_mask": True}  # the caller gets Paddle's mask: keep Paddle's kernel
    nd = x.ndim - 2
    kernel, stride, pads = ints(kernel_size, nd), ints(strides, nd), ints(paddings, nd)
    spatial = list(x.shape[2:])
    if not global_pooling and not extra and not kwargs and len(pads) == nd and (adaptive or _windows_all_hold_input(
            spatial, [_out_size(spatial[i], kernel[i], stride[i], pads[i], ceil_mode) for i in range(nd)],
            kernel, stride, pads)):
        y = _FastMaxPool.apply(x, (kernel, stride, pads, False, bool(adaptive), bool(ceil_mode)), holder)
        return y, holder["mask"]

    def compute(t):
        out, mask = run(t)
        holder["mask"] = mask
        return (out,) + _mask_to_index(t, mask)

    y = _MaxPool.apply(x, compute)
    return y, holder["mask"]


@exact("max_pool2d_with_index", FAMILY, "scatter to the returned argmax")
def max_pool2d_with_index(x, kernel_size, strides, paddings, global_pooling, adaptive, ceil_mode, *extra,
                          **kwargs):
    """Exact replacement of ``paddle._C_ops.max_pool2d_with_index`` (``return_mask=True``, adaptive max pools)."""
    return _with_index("max_pool2d_with_index", x, kernel_size, strides, paddings, global_pooling, adaptive,
                       ceil_mode, extra, kwargs)


@exact("max_pool3d_with_index", FAMILY, "scatter to the returned argmax")
def max_pool3d_with_index(x, kernel_size, strides, paddings, global_pooling, adaptive, ceil_mode, *extra,
                          **kwargs):
    """Exact replacement of ``paddle._C_ops.max_pool3d_with_index`` (3-D ``return_mask=True``, adaptive max)."""
    return _with_index("max_pool3d_with_index", x, kernel_size, strides, paddings, global_pooling, adaptive,
                       ceil_mode, extra, kwargs)
