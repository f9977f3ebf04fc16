"""Fast CPU kernels the exact op layer may call for the value of a rule (used only by ``autodiff/``).

Today: the three float32 2-D convolution kernels (forward, backward data, backward weights) and 2-D max pooling
(forward with its argmax workspace, and the scatter backward) through the oneDNN library that the Paddle CPU wheel
ships (`paddlefsl.metaopt.kernels.onednn`). A convolution kernel is used when all of these hold (max pooling: the
same with `max_pool2d_supported`, at least `MIN_POOL_NUMEL` elements), otherwise the rule calls Paddle's own
kernel:

* the fast path is on: the environment variable ``PADDLEFSL_FAST_KERNELS`` is not ``0`` (read at import) and
  `set_fast_kernels` did not turn it off;
* oneDNN 3 loads from ``paddle/libs/libdnnl.so.3``;
* float32 tensors on the CPU, NCHW, dilation 1 (any number of groups);
* the convolution is large enough (`MIN_MACS` multiply-adds): below that, oneDNN's per-call overhead (about
  0.1 ms through ``ctypes``) costs more than Paddle's kernel;
* oneDNN has a JIT-compiled implementation for that shape on this CPU: its reference implementations (plain
  loops, such as max pooling on the NCHW layout without AVX-512, 4 times slower than Paddle's kernel) are declined
  quietly (`reference_only` lists them);
* the plan for that shape passed its one-time self-check: its first result is compared with Paddle's own kernel on
  the same inputs, each output within `SELF_CHECK_RTOL` of the magnitudes summed into it; a plan that disagrees is
  never used (a warning says so).

The reuse of freed memory (`paddlefsl.metaopt.kernels.allocator`, on by default) is switched separately.

Example:
    >>> from paddlefsl.metaopt import set_fast_kernels
    >>> previous = set_fast_kernels(False)   # Paddle's kernels only
    >>> _ = set_fast_kernels(previous)
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import paddle

from paddlefsl.metaopt.kernels import onednn
from paddlefsl.metaopt.kernels.allocator import memory_reuse_applied, memory_reuse_enabled, set_memory_reuse

__all__ = ["MIN_MACS", "SELF_CHECK_RTOL", "fast_kernels_enabled", "set_fast_kernels", "conv2d", "conv2d_backward_data",
           "conv2d_backward_weights", "conv2d_supported", "max_pool2d", "max_pool2d_backward", "max_pool2d_index",
           "max_pool2d_supported", "MIN_POOL_NUMEL", "memory_reuse_applied", "memory_reuse_enabled",
           "reference_only", "self_check_failures", "set_memory_reuse"]

ENV = "PADDLEFSL_FAST_KERNELS"
MIN_MACS = 1 << 20
"""Smallest convolution (multiply-adds, ``N * O * h * w * C * kh * kw``) sent to oneDNN."""

MIN_POOL_NUMEL = 1 << 15
"""Smallest max-pooling input (elements) sent to oneDNN."""

_enabled = os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")
_checked: dict = {}
_declined: set = set()


def fast_kernels_enabled() -> bool:
    """Whether the fast kernels may be used (the switch only; each call still checks dtype, shape and library)."""
    return _enabled


def set_fast_kernels(enabled: bool) -> bool:
    """Turn the fast CPU kernels on or off for the whole process; returns the previous setting.

    The environment variable ``PADDLEFSL_FAST_KERNELS=0`` turns them off from the start. Gradients are exact
    either way; only speed changes.

    Args:
        enabled: ``True`` to allow the fast kernels, ``False`` for Paddle's own kernels only.

    Returns:
        The previous setting.

    Raises:
        TypeError: if ``enabled`` is not a bool.

    Example:
        >>> previous = set_fast_kernels(False)
        >>> _ = set_fast_kernels(previous)
    """
    global _enabled
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {type(enabled).__name__} {enabled!r}")
    previous, _enabled = _enabled, enabled
    return previous


def self_check_failures() -> list[tuple]:
    """The plans whose self-check against Paddle's kernel failed (each is then never used)."""
    return [key for key, ok in _checked.items() if not ok and key not in _declined]


def reference_only() -> list[tuple]:
    """The kernels and shapes for which oneDNN has only a reference (not JIT-compiled) implementation on this CPU,
    which the fast path declines: Paddle's kernel runs them (2-D max pooling on a CPU without AVX-512, say)."""
    return [key for key in _checked if key in _declined]


def conv2d_supported(x: paddle.Tensor, w: paddle.Tensor, dilation: Sequence[int], groups: int,
                     channel_last: bool, macs: int) -> bool:
    """Whether a 2-D convolution of ``x`` (input or output gradient) with weight ``w`` goes to oneDNN (``groups``
    takes any value: oneDNN runs grouped convolutions too)."""
    return (_enabled and not channel_last and all(int(d) == 1 for d in dilation)
            and x.ndim == 4 and x.dtype == paddle.float32 and w.dtype == paddle.float32
            and x.place.is_cpu_place() and w.place.is_cpu_place() and macs >= MIN_MACS and onednn.available())


def _self_checked(key: tuple, fast: Callable[[], Any], agrees: Callable[[Any], bool]) -> Any:
    """``fast()``, checked once per ``key`` with ``agrees(result)``; ``None`` for a key whose kernel failed or
    disagreed (then and from then on, with a warning the first time)."""
    ok = _checked.get(key)
    if ok is False:
        return None
    try:
        value = fast()
    except onednn.ReferenceImplementation:   # slower than Paddle's kernel: declined quietly, for good
        _checked[key] = False
        _declined.add(key)
        return None
    except RuntimeError as error:  # oneDNN refused the geometry: Paddle's kernel for this shape from now on
        _checked[key] = False
        warnings.warn(f"oneDNN kernel {key[0]} for shapes {key[1:]} failed ({error}); using Paddle's kernel",
                      RuntimeWarning, stacklevel=4)
        return None
    if ok is None:
        _checked[key] = bool(agrees(value))
        if not _checked[key]:
            warnings.warn(f"oneDNN kernel {key[0]} for shapes {key[1:]} disagrees with Paddle's kernel; using "
                          "Paddle's kernel for it", RuntimeWarning, stacklevel=4)
            return None
    return value


SELF_CHECK_RTOL = 1e-4
"""Largest difference from Paddle's kernel a convolution plan may show in its self-check, relative to the sum of
the magnitudes of the products summed into each output (the same kernel on ``|a|`` and ``|b|``)."""


def _checked_call(key: tuple, fast: Callable[[], paddle.Tensor],
                  reference: Callable[[paddle.Tensor, paddle.Tensor], paddle.Tensor],
                  inputs: tuple[paddle.Tensor, paddle.Tensor]) -> paddle.Tensor:
    """``fast()``, compared once per ``key`` with Paddle's ``reference(*inputs)``; a key that disagreed gets
    ``reference(*inputs)``.

    Each output is a sum of products, rounded differently by the two kernels: its tolerance is `SELF_CHECK_RTOL`
    times the sum of the products' magnitudes (``reference`` on the inputs' absolute values). Measured against
    the largest output instead, sums that nearly cancel (a weight gradient over 75 x 84 x 84 positions of an
    output gradient that batch norm made zero-mean: oneDNN 5.5e-5 of the largest entry, 6e-7 of the magnitudes)
    failed the check by chance and sent the shape to Paddle's slower kernel for good. A plan that computes
    another function (a layout, padding or stride mistake) misses by whole products, far above the tolerance.
    """
    references: list[paddle.Tensor] = []

    def agrees(value: paddle.Tensor) -> bool:
        with paddle.no_grad():
            references.append(reference(*inputs))
            magnitude = reference(*(paddle.abs(t) for t in inputs)).numpy()
        got_np, want_np = value.numpy(), references[0].numpy()
        if got_np.shape != want_np.shape:
            return False
        floor = 1e-12 * float(magnitude.max(initial=0.0))   # outputs that are sums of zeros
        return bool((np.abs(got_np - want_np) <= SELF_CHECK_RTOL * magnitude + floor).all())

    value = _self_checked(key, fast, agrees)
    if value is None:
        return references[0] if references else reference(*inputs)
    return value


def _contiguous(t: paddle.Tensor) -> paddle.Tensor:
    return t if t.is_contiguous() else t.contiguous()


def conv2d(x: paddle.Tensor, w: paddle.Tensor, stride: Sequence[int], pads: Sequence[int],
           reference: Callable[[paddle.Tensor, paddle.Tensor], paddle.Tensor], groups: int = 1) -> paddle.Tensor:
    """Forward convolution on oneDNN (check `conv2d_supported` first); ``reference(x, w)`` is Paddle's."""
    key = ("conv2d", tuple(x.shape), tuple(w.shape), tuple(stride), tuple(pads), groups)
    return _checked_call(key, lambda: onednn.conv2d_forward(_contiguous(x), _contiguous(w), stride, pads, groups, True),
                         reference, (x, w))


def conv2d_backward_data(gy: paddle.Tensor, w: paddle.Tensor, x_shape: Sequence[int], stride: Sequence[int],
                         pads: Sequence[int], reference: Callable[[paddle.Tensor, paddle.Tensor], paddle.Tensor],
                         groups: int = 1) -> paddle.Tensor:
    """The transposed convolution of ``gy`` with ``w`` to shape ``x_shape`` on oneDNN; ``reference(gy, w)`` is
    Paddle's."""
    key = ("conv2d_backward_data", tuple(gy.shape), tuple(w.shape), tuple(x_shape), tuple(stride), tuple(pads),
           groups)
    return _checked_call(key, lambda: onednn.conv2d_backward_data(_contiguous(gy), _contiguous(w), x_shape, stride,
                                                                  pads, groups, True), reference, (gy, w))


def conv2d_backward_weights(x: paddle.Tensor, gy: paddle.Tensor, w_shape: Sequence[int], stride: Sequence[int],
                            pads: Sequence[int], reference: Callable[[paddle.Tensor, paddle.Tensor], paddle.Tensor],
                            groups: int = 1) -> paddle.Tensor:
    """The weight gradient of the convolution of ``x`` for the output gradient ``gy`` on oneDNN;
    ``reference(x, gy)`` is Paddle's."""
    key = ("conv2d_backward_weights", tuple(x.shape), tuple(gy.shape), tuple(w_shape), tuple(stride), tuple(pads),
           groups)
    return _checked_call(key, lambda: onednn.conv2d_backward_weights(_contiguous(x), _contiguous(gy), w_shape,
                                                                     stride, pads, groups, True), reference, (x, gy))


def max_pool2d_supported(x: paddle.Tensor) -> bool:
    """Whether a 2-D max pooling of ``x`` (NCHW, no ``ceil_mode``, not adaptive: the caller checks) goes to oneDNN."""
    return (_enabled and x.ndim == 4 and x.dtype == paddle.float32 and x.place.is_cpu_place()
            and int(x.numel()) >= MIN_POOL_NUMEL and onednn.available())


def max_pool2d_index(ws: paddle.Tensor, x_shape: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                     pads: Sequence[int]) -> paddle.Tensor:
    """oneDNN's max-pooling workspace (argmax offsets inside each window) as flat spatial indices into the input,
    ``[N, C, Ho * Wo]`` int64 (the form ``take_along_axis`` reads).

    Args:
        ws: the workspace of `max_pool2d`, shaped like the output.
        x_shape: the input shape ``[N, C, H, W]``.
        kernel: two kernel sizes.
        stride: two strides.
        pads: ``[top, bottom, left, right]``.
    """
    n, c, ho, wo = (int(d) for d in ws.shape)
    kw, width = int(kernel[1]), int(x_shape[3])
    # Integer arithmetic in floating point (Paddle's int64 kernels are several times slower): exact, as every
    # value is an integer below 2^24 (2^53 in float64); floor((k + 0.5) / kw) has a margin of 0.5 / kw.
    dtype = "float32" if int(x_shape[2]) * width < (1 << 24) else "float64"
    offset = ws.astype(dtype)
    rows = paddle.floor((offset + 0.5) * (1.0 / kw))
    within = rows * (width - kw) + offset          # row * width + (offset - row * kw)
    base = ((paddle.arange(ho, dtype=dtype) * int(stride[0]) - int(pads[0])).reshape([ho, 1]) * width
            + (paddle.arange(wo, dtype=dtype) * int(stride[1]) - int(pads[2])).reshape([1, wo]))
    flat = (within.reshape([n * c, ho * wo]) + base.reshape([1, ho * wo])).astype("int64")
    return flat.reshape([n, c, ho * wo])


def max_pool2d(x: paddle.Tensor, kernel: Sequence[int], stride: Sequence[int], pads: Sequence[int],
               reference: Callable[[], paddle.Tensor]) -> tuple[paddle.Tensor, paddle.Tensor] | None:
    """2-D max pooling on oneDNN (check `max_pool2d_supported` first): the value and the workspace, or ``None``
    where oneDNN refused this geometry or its self-check failed (the caller then uses Paddle's kernel).

    The self-check, once per geometry: the value equals ``reference()`` (Paddle's) and the workspace points at
    each window's maximum (ties may pick another position than Paddle's: both are the maximum).
    """
    key = ("max_pool2d", tuple(x.shape), tuple(kernel), tuple(stride), tuple(pads))
    x = _contiguous(x)

    def agrees(result: tuple[paddle.Tensor, paddle.Tensor]) -> bool:
        y, ws = result
        n, c = x.shape[:2]
        picked = paddle.take_along_axis(x.reshape([n, c, -1]), max_pool2d_index(ws, x.shape, kernel, stride, pads),
                                        2).reshape(y.shape)
        want = reference()
        return list(want.shape) == list(y.shape) and bool((want == y).all()) and bool((picked == y).all())

    return _self_checked(key, lambda: onednn.max_pool2d_forward(x, kernel, stride, pads, True), agrees)


def max_pool2d_backward(gy: paddle.Tensor, ws: paddle.Tensor, x_shape: Sequence[int], kernel: Sequence[int],
                        stride: Sequence[int], pads: Sequence[int]) -> paddle.Tensor:
    """The adjoint of `max_pool2d`: ``gy`` scattered to the positions of the workspace ``ws`` (oneDNN)."""
    return onednn.max_pool2d_backward(_contiguous(gy), ws, x_shape, kernel, stride, pads)
