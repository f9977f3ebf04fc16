"""Building blocks shared by the op rules: multi-input rules, elementwise rules and layout helpers.

Multi-input rules use one single-input PyLayer per differentiable input. Paddle prunes the input slots of a
PyLayer that do not lead to the tensors asked for in ``paddle.grad`` and then refuses a gradient for them, so a
multi-input PyLayer whose backward returns every gradient breaks ``paddle.grad(loss, [x])`` when another input also
needs a gradient. `apply_rule()` therefore gives each input that needs a gradient its own single-input PyLayer (a
`_Token`: a one-element output, whose backward returns that input's gradient) and joins the tokens in one
`_Join`, which runs the kernel. The join's backward keeps the output gradients for the tokens and returns ``None``
for every token (always accepted, pruned or not); Paddle then runs each token that leads to a tensor asked for, after
the join, and each computes its input's gradient from the kept output gradients, closing over the other (live,
differentiable) inputs, so cross derivatives are kept at every order. Joining the tokens costs two one-element
tensors per input, where adding one zero output per extra input to the first input's output cost a full-size
``zeros_like``, a full-size ``add`` and two full-size copies of the gradient in the ``add``'s backward.
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Iterator, Sequence

import paddle
from paddle.autograd import PyLayer

from paddlefsl.metaopt.autodiff.registry import original
from paddlefsl.metaopt.autodiff.released import GuardedPyLayer

Tensor = paddle.Tensor
_full = original("full")

__all__ = ["AFFINE_MIN_NUMEL", "affine_applies", "affine_kernel", "apply_rule", "channel_affine", "one_backward_pass",
           "pointwise", "ints", "lean_shape", "channel_last", "to_channel_first", "to_channel_last", "reduce_sum",
           "MATMUL_SUM_MIN_NUMEL"]

MATMUL_SUM_MIN_NUMEL = 1 << 16
"""Smallest tensor `reduce_sum` sums with a matrix product (below it Paddle's reduce kernel is as fast)."""


class _Slot(GuardedPyLayer):
    """The one differentiable input of a rule: forward returns ``value()``, backward returns ``grad(*gys)``."""

    @staticmethod
    def forward(ctx, t, value: Callable, grad: Callable):
        ctx.grad = grad
        return value()

    @staticmethod
    def backward(ctx, *gys):
        return ctx.grad(*gys)


class _Kept:
    """What a `_Join`'s backward leaves for its tokens: the output gradients, the memory they occupy, the memory of
    the gradients the tokens have returned so far, and how many tokens have not run yet.

    Kept output gradients must not outlive their backward pass. Recorded with ``create_graph=True`` they lead, through
    the gradient graph, back to the rule's own grad nodes, which hold this object: a reference cycle through Paddle's
    C++ nodes that Python's garbage collector cannot see, so a graph differentiated once and then dropped without a
    backward through it (an evaluation loop's adapted task) would never be freed. The last token to run releases
    them (`release`); `one_backward_pass` releases those of tokens that a ``paddle.grad`` pruned."""

    __slots__ = ("gys", "memory", "given", "pending")

    def __init__(self) -> None:
        self.release()

    def release(self) -> None:
        """Drop the output gradients and what was recorded about them."""
        self.gys: tuple = ()
        self.memory: set[int] = set()
        self.given: set[int] = set()
        self.pending = 0


_passes = threading.local()  # `.open`: one list of joined `_Kept` per `one_backward_pass` running in this thread


@contextlib.contextmanager
def one_backward_pass() -> Iterator[None]:
    """Run one backward pass (a ``paddle.grad``) and then release what every join it ran kept for its tokens.

    A token that the pass pruned (its input leads to no tensor asked for) never runs, so its join's kept output
    gradients would stay behind (see `_Kept`). A token only ever runs in the pass that ran its join, after it, so
    nothing kept is needed once the pass has returned.

    Example:
        >>> with one_backward_pass():
        ...     grads = paddle.grad(loss, params, create_graph=True)
    """
    stack = _passes.__dict__.setdefault("open", [])
    joined: list[_Kept] = []
    stack.append(joined)
    try:
        yield
    finally:
        stack.pop()
        for kept in joined:
            kept.release()


class _Token(PyLayer):
    """One of several differentiable inputs of a rule: forward returns a one-element zero (joined by `_Join`);
    backward returns ``grad(*gys)`` for the output gradients ``gys`` that the join kept.

    A plain PyLayer, not a `GuardedPyLayer`: its output goes to its join only, so every backward reaches a token
    through its join, whose guard raises first once a ``backward()`` has released the graph (and the join's guard
    is what `check_released` finds). A guard per token cost about 6 of the 26 microseconds a token took.

    Paddle accumulates gradients in place into the first one it receives, so a gradient that shares memory with
    another token's gradient is copied, and so is one that shares memory with a kept output gradient (``lambda g:
    g``) unless every other token has run (nothing reads the kept gradients any more)."""

    @staticmethod
    def forward(ctx, t, grad: Callable, kept: _Kept):
        ctx.grad, ctx.kept = grad, kept
        return _full([1], 0.0, t.dtype, t.place)   # the kernel itself: paddle.zeros adds 10 us of Python

    @staticmethod
    def backward(ctx, _):
        kept = ctx.kept
        kept.pending -= 1
        result = ctx.grad(*kept.gys)
        if isinstance(result, Tensor):
            memory = result.data_ptr()
            if memory in kept.given or (memory in kept.memory and kept.pending > 0):
                result = result.clone()
            kept.given.add(result.data_ptr())
        if kept.pending == 0:
            kept.release()
        return result


class _Join(GuardedPyLayer):
    """The outputs ``run()`` of a rule with several differentiable inputs, each behind a `_Token`. Backward keeps
    the output gradients for the tokens and gives none to them directly."""

    @staticmethod
    def forward(ctx, run: Callable, kept: _Kept, *tokens):
        ctx.kept, ctx.count = kept, len(tokens)
        return run()

    @staticmethod
    def backward(ctx, *gys):
        kept = ctx.kept
        kept.gys, kept.memory = gys, {g.data_ptr() for g in gys if isinstance(g, Tensor)}
        kept.given, kept.pending = set(), ctx.count
        stack = getattr(_passes, "open", None)
        if stack:
            stack[-1].append(kept)
        return (None,) * ctx.count


def apply_rule(inputs: Sequence[Tensor | None], run: Callable[[], Any],
               grads: Sequence[Callable[..., Tensor]]) -> Any:
    """Evaluate ``run()`` (Paddle's own kernel) with exact gradients for every input that needs one.

    Args:
        inputs: the rule's inputs (``None`` or tensors; those with ``stop_gradient=True`` get no gradient).
        run: computes the outputs (one tensor or a tuple of tensors), called once.
        grads: ``grads[i](*output_grads)`` returns the gradient for ``inputs[i]`` in differentiable public ops,
            closing over the live inputs (so higher-order and cross derivatives are kept).

    Returns:
        ``run()``'s outputs, carrying the gradient rules.
    """
    needed = [i for i, t in enumerate(inputs) if t is not None and not t.stop_gradient]
    if not paddle.is_grad_enabled() or not needed:
        return run()
    if len(needed) == 1:
        return _Slot.apply(inputs[needed[0]], run, grads[needed[0]])
    kept = _Kept()
    tokens = [_Token.apply(inputs[i], grads[i], kept) for i in needed]
    return _Join.apply(run, kept, *tokens)


AFFINE_MIN_NUMEL = 1 << 16
"""Smallest ``[N, C, H, W]`` tensor `channel_affine` sends to the fused kernel (below it the plain products)."""


def affine_applies(x: Tensor) -> bool:
    """Whether `affine_kernel` takes ``x``: a float32 or float64 ``[N, C, H, W]`` tensor of at least
    `AFFINE_MIN_NUMEL` elements."""
    return x.ndim == 4 and math.prod(x.shape) >= AFFINE_MIN_NUMEL and x.dtype in (paddle.float32, paddle.float64)


def affine_kernel(x: Tensor, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    """``x * scale + shift`` per channel of ``[N, C, H, W]`` ``x`` in one pass, without a graph: Paddle's
    inference-mode ``batch_norm`` kernel with mean 0, variance 1 and epsilon 0 (its scale and shift are then the
    whole transform). Use it where `affine_applies` holds."""
    c = int(x.shape[1])
    zero = _full([c], 0.0, x.dtype, x.place)
    one = _full([c], 1.0, x.dtype, x.place)
    scale = one if scale is None else scale.reshape([c])
    shift = zero if shift is None else shift.reshape([c])
    return original("batch_norm")(x, zero, one, scale, shift, True, 0.9, 0.0, "NCHW", True, False)[0]


def _per_channel_of(t: Tensor, x: Tensor) -> bool:
    """Whether ``t`` holds one value per channel of ``[N, C, H, W]`` ``x``, shaped to broadcast along axis 1."""
    c = int(x.shape[1])
    return t.dtype == x.dtype and [int(d) for d in t.shape] in ([c, 1, 1], [1, c, 1, 1])


def channel_affine(x: Tensor, scale: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
    """``x * scale + shift`` with one ``scale`` and one ``shift`` value per channel of a channel-first ``x``
    (``[N, C, H, W]``; ``scale`` and ``shift`` of ``C`` elements shaped ``[C, 1, 1]``; ``None`` means 1 and 0),
    exact at every order.

    Paddle's CPU kernels broadcast ``[C, 1, 1]`` operands two to three times slower than they multiply tensors of
    the same shape (``[5, 32, 84, 84]`` float32, 2 threads: ``x * s`` 1.09 ms, ``x * s + b`` 2.07 ms, ``x * y``
    0.36 ms). Large float tensors (`affine_applies`) with per-channel operands therefore take the whole transform
    in one pass of Paddle's inference-mode batch-norm kernel (0.46 ms), in a rule whose gradients are again
    `channel_affine` (``g * scale`` for ``x``) and per-channel sums (`reduce_sum`) for ``scale`` and ``shift``.
    Anything else (smaller tensors, other layouts, operands that broadcast otherwise, such as per-sample
    statistics ``[N, C, 1, 1]``) is the plain ``x * scale + shift``, broadcast as Paddle broadcasts it.

    Args:
        x: the input, ``[N, C, H, W]``.
        scale: per-channel factors, or ``None``.
        shift: per-channel offsets, or ``None``.

    Returns:
        ``x * scale + shift``.
    """
    if scale is None and shift is None:
        return x
    if not affine_applies(x) or not all(t is None or _per_channel_of(t, x) for t in (scale, shift)):
        out = x if scale is None else x * scale
        return out if shift is None else out + shift
    axes = [0, 2, 3]
    # x last: Paddle runs the tokens in input order, and x's gradient (the output gradient itself when there is no
    # scale) then needs no copy (`apply_rule`).
    return apply_rule([scale, shift, x], lambda: affine_kernel(x, scale, shift),
                      [lambda g: reduce_sum(g * x, axes).reshape(scale.shape),
                       lambda g: reduce_sum(g, axes).reshape(shift.shape),
                       lambda g: channel_affine(g, scale)])


class _Pointwise(GuardedPyLayer):
    """y = kernel(x, *attrs) elementwise; backward is grad * deriv(x), written in differentiable Paddle ops."""

    @staticmethod
    def forward(ctx, x, name, attrs, deriv):
        ctx.save_for_backward(x)
        ctx.deriv = deriv
        return original(name)(x, *attrs)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensor()
        return grad * ctx.deriv(x)


def pointwise(name: str, x: paddle.Tensor, attrs: tuple, deriv: Callable) -> paddle.Tensor:
    """Elementwise kernel ``name`` with gradient ``grad * deriv(x)`` (``deriv`` in differentiable ops)."""
    if x.stop_gradient or not paddle.is_grad_enabled():
        return original(name)(x, *attrs)
    return _Pointwise.apply(x, name, attrs, deriv)


def ints(values, n: int) -> list[int]:
    """Turn an int or a sequence of ints (or 0-d tensors) into a list of ``n`` Python ints."""
    if isinstance(values, (int, float)):
        return [int(values)] * n
    out = [int(v) for v in values]
    if len(out) == 1 and n > 1:
        out = out * n
    return out


def lean_shape(shape: Sequence[int]) -> list[int]:
    """``shape`` without its leading 1s (at least one axis kept).

    Paddle's CPU kernels broadcast ``[N, C, H, W]`` against ``[1, C, 1, 1]`` about ten times slower (forward and
    backward) than against the same values shaped ``[C, 1, 1]``.
    """
    shape = list(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def channel_last(data_format: str) -> bool:
    """True for channel-last layouts (NHWC, NLC, NDHWC)."""
    return str(data_format).upper().endswith("C")


def to_channel_first(t: paddle.Tensor) -> paddle.Tensor:
    """Move the channel axis from last to second."""
    nd = t.ndim - 2
    return paddle.transpose(t, [0, nd + 1] + list(range(1, nd + 1)))


def to_channel_last(t: paddle.Tensor) -> paddle.Tensor:
    """Move the channel axis from second to last."""
    nd = t.ndim - 2
    return paddle.transpose(t, [0] + list(range(2, nd + 2)) + [1])


def reduce_sum(t: Tensor, axes: Sequence[int]) -> Tensor:
    """``t.sum(axis=axes, keepdim=True)``, as matrix products with a ones vector where the kept axes are adjacent.

    Paddle's CPU reduce kernel over non-adjacent axes is slow: summing a ``[5, 32, 84, 84]`` tensor over
    ``[0, 2, 3]`` takes 1.3 ms, the same sum as a matrix-vector product 0.16 ms (``[75, 32, 84, 84]``: 32 ms
    against 1.7 ms). Matrix products are linear and differentiable at every order, so this is exact wherever the
    plain sum is. Small tensors (under `MATMUL_SUM_MIN_NUMEL` elements), non-adjacent kept axes and reductions
    that keep nothing use Paddle's sum.

    Args:
        t: the tensor.
        axes: the axes to sum over.

    Returns:
        The sum, with the reduced axes kept as size 1.
    """
    shape = [int(d) for d in t.shape]
    ndim = len(shape)
    axes = sorted(a % ndim for a in axes)
    kept = [a for a in range(ndim) if a not in axes]
    if (not kept or not axes or kept != list(range(kept[0], kept[-1] + 1))
            or math.prod(shape) < MATMUL_SUM_MIN_NUMEL):
        return t.sum(axis=axes, keepdim=True)
    lead, mid, tail = (math.prod(shape[:kept[0]]), math.prod(shape[kept[0]:kept[-1] + 1]),
                       math.prod(shape[kept[-1] + 1:]))
    out = t
    if tail > 1:
        out = paddle.matmul(out.reshape([lead * mid, tail]), paddle.ones([tail, 1], dtype=t.dtype))
    if lead > 1:
        out = paddle.matmul(paddle.ones([1, lead], dtype=t.dtype), out.reshape([lead, mid]))
    return out.reshape([1 if a in axes else d for a, d in enumerate(shape)])
