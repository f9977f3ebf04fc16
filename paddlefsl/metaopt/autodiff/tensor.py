"""Arithmetic, reductions, shape/indexing and linear-algebra kernels.

Kernels whose stock Paddle double gradient was checked against finite differences are declared stock. The others
(Paddle raises "doesn't have any grad op" when differentiating their gradient twice, or they are guarded by
default) get exact rules here. Linear kernels use `_LinearMap`, a PyLayer whose backward is the same PyLayer
applied with the adjoint map, so every order is exact: the adjoint of the adjoint is the forward's linear part.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import paddle
from paddlefsl.metaopt.autodiff.released import GuardedPyLayer

from paddlefsl.metaopt.autodiff.common import (MATMUL_SUM_MIN_NUMEL, apply_rule, channel_affine, lean_shape,
                                               pointwise, reduce_sum)
from paddlefsl.metaopt.autodiff.registry import exact, original, stock, verified, verified_operator_node

_CHECKED = "Paddle's double gradient, checked against finite differences"
_CHECKED3 = "Paddle's second and third derivatives, checked against finite differences"
stock(["scale", "sqrt", "log", "abs", "maximum", "minimum", "clip", "cast", "assign", "sign", "sin", "cos", "rsqrt"],
      "tensor", "elementwise; " + _CHECKED)
stock(["pow", "where"], "tensor", "elementwise; " + _CHECKED3, order=3)
stock(["sum"], "tensor", "reduction; " + _CHECKED3, order=3)
stock(["transpose", "unsqueeze", "concat", "split", "split_with_num", "gather", "index_select", "expand", "tile",
       "full_like", "take_along_axis", "flip", "unbind"], "tensor", "shape or indexing (linear); " + _CHECKED)
stock(["reshape", "squeeze", "stack", "slice", "gather_nd"], "tensor", "shape or indexing (linear); " + _CHECKED3,
      order=3)
stock(["pad", "pad3d"], "tensor", "F.pad (constant, reflect, replicate); " + _CHECKED)
stock(["repeat_interleave", "index_add", "masked_select"], "tensor", "indexing (linear); " + _CHECKED)
stock(["zeros_like", "ones_like"], "tensor", "constant output, no gradient")
stock(["bmm", "linear"], "linalg", "Paddle's double gradient (transpose flags included), checked against finite "
      "differences")
stock(["matmul"], "linalg", _CHECKED3 + " (transpose flags included)", order=3)
verified(["add", "subtract", "multiply"], 3)
verified(["divide"], 2)
verified_operator_node("DivScaleGradNode", "`x / c` for a Python number c (Tensor operator bound in C++); "
                       "checked against finite differences at second order")


# ------------------------------------------------------------------------------------------------ arithmetic


def _binary(name: str) -> Callable:
    """The stock binary kernel ``name``, with the leading size-1 axes of a broadcast operand dropped first
    (`lean_shape()`: conv biases and normalization statistics hit Paddle's
    slow broadcast). The values and Paddle's own (exact) gradients are unchanged, except for a per-channel bias
    added to a large tensor (`_bias_add`)."""
    kernel = original(name)

    def binary(x, y, *args, **kwargs):
        if isinstance(x, paddle.Tensor) and isinstance(y, paddle.Tensor):
            xs, ys = x.shape, y.shape
            if xs != ys and len(xs) == len(ys) and len(xs) > 1:
                if ys[0] == 1 and xs[0] != 1:
                    y = original("reshape")(y, lean_shape(ys))
                elif xs[0] == 1 and ys[0] != 1:
                    x = original("reshape")(x, lean_shape(xs))
            if name == "add" and not args and not kwargs:
                if _is_channel_bias(x, y):
                    return _bias_add(x, y)
                if _is_channel_bias(y, x):
                    return _bias_add(y, x)
        return kernel(x, y, *args, **kwargs)

    binary.__name__ = name
    binary.__doc__ = f"``paddle._C_ops.{name}`` on a leaner broadcast layout (values and gradients as stock)."
    return binary


BIAS_ADD_MIN_NUMEL = MATMUL_SUM_MIN_NUMEL
"""Smallest tensor to which `_bias_add` adds a per-channel bias (below it Paddle's ``add`` gradient is as fast)."""


def _is_channel_bias(x: paddle.Tensor, b: paddle.Tensor) -> bool:
    """True for a channel-first ``x`` (``[N, C, ...]``, at least `BIAS_ADD_MIN_NUMEL` elements) and a bias ``b``
    of shape ``[C, 1, ...]`` (one value per channel, broadcast over the batch and the other axes) that needs a
    gradient."""
    xs, bs = x.shape, b.shape
    return (not b.stop_gradient and len(xs) >= 3 and len(bs) == len(xs) - 1 and bs[0] == xs[1]
            and all(d == 1 for d in bs[1:]) and x.dtype == b.dtype and paddle.is_grad_enabled()
            and math.prod(xs) >= BIAS_ADD_MIN_NUMEL)


def _bias_add(x: paddle.Tensor, b: paddle.Tensor) -> paddle.Tensor:
    """``x + b`` for a per-channel bias ``b``: the stock kernel, with the gradients ``g`` for ``x`` and the
    per-channel sum of ``g`` (`reduce_sum`, a matrix product) for ``b``. Paddle's ``add`` gradient copies ``g``
    for ``x`` and reduces over the batch and spatial axes with its slow reduce kernel (the ``add`` and its
    gradient: 43 against 31 ms on a ``[75, 32, 84, 84]`` float32 tensor, 2 threads)."""
    axes = [a for a in range(len(x.shape)) if a != 1]

    # The sum itself is `channel_affine`'s value (run without a graph): one fused pass on a large 4-D tensor
    # (``[5, 32, 84, 84]``: 0.46 against 1.25 ms for the broadcast ``add``). The bias first: Paddle runs the tokens
    # in this order, and x's (which returns g itself) need not copy g when it runs last (`apply_rule`).
    return apply_rule([b, x], lambda: channel_affine(x, None, b),
                      [lambda g: original("reshape")(reduce_sum(g, axes), b.shape), lambda g: g])


_BINARY_NOTE = "composite: reshape a [1, C, 1, 1]-style operand to [C, 1, 1], then the stock kernel (10x faster " \
               "broadcast on CPU)"
for _name in ("add", "subtract", "multiply", "divide"):
    exact(_name, "tensor", _BINARY_NOTE + ("; a per-channel bias added to a large tensor has its own rule (the bias "
                                           "gradient as a matrix product)" if _name == "add" else ""))(_binary(_name))


@exact("mean", "tensor", "composite: sum, then scale by 1/count (Paddle's mean gradient kernel is ~6x slower)")
def mean(x, axis=None, keepdim=False, out=None, **kwargs):
    """``paddle._C_ops.mean`` as ``sum`` then ``scale``: the same values and exact stock gradients, faster."""
    if not x.is_floating_point() or math.prod(x.shape) == 0:
        return original("mean")(x, axis, keepdim, **kwargs)
    total = original("sum")(x, axis, None, keepdim)
    return original("scale")(total, math.prod(total.shape) / math.prod(x.shape), 0.0, True)


@exact("square", "tensor", "composite: x * x (Paddle's square has no third derivative; multiply's is verified)")
def square(x, out=None, **kwargs):
    """``paddle._C_ops.square`` as ``multiply(x, x)``: the same values, derivatives exact to third order."""
    return original("multiply")(x, x)


# --------------------------------------------------------------------------------------------------- helpers


def _as_list(value: Any) -> list[int]:
    if isinstance(value, paddle.Tensor):
        return [int(v) for v in value.numpy().reshape([-1]).tolist()]
    if isinstance(value, (list, tuple)):
        return [int(v.item()) if isinstance(v, paddle.Tensor) else int(v) for v in value]
    return [int(value)]


def _sum_to(g: paddle.Tensor, shape: Sequence[int]) -> paddle.Tensor:
    """Sum ``g`` over broadcast dimensions so that it gets ``shape`` (Paddle's kernels, no graph)."""
    shape = list(shape)
    lead = len(g.shape) - len(shape)
    axes = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1]
    if axes:
        g = original("sum")(g, axes, None, False)
    return original("reshape")(g, shape)


def _sum_to_public(g: paddle.Tensor, shape: Sequence[int]) -> paddle.Tensor:
    """Like `_sum_to()` with public (recorded, differentiable) ops, for use inside backward."""
    shape = list(shape)
    lead = len(g.shape) - len(shape)
    axes = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1]
    if axes:
        g = paddle.sum(g, axis=axes)
    return paddle.reshape(g, shape)


class _LinearMap(GuardedPyLayer):
    """y = fwd(x) for a linear (or affine) map; backward applies the adjoint ``adj`` as another _LinearMap."""

    @staticmethod
    def forward(ctx, x, fwd: Callable, adj: Callable, lin: Callable | None = None):
        ctx.adj = adj
        ctx.lin = lin if lin is not None else fwd
        return fwd(x)

    @staticmethod
    def backward(ctx, grad):
        return _LinearMap.apply(grad, ctx.adj, ctx.lin)


def _linear(x: paddle.Tensor, fwd: Callable, adj: Callable, lin: Callable | None = None) -> paddle.Tensor:
    if x.stop_gradient or not paddle.is_grad_enabled():
        return fwd(x)
    return _LinearMap.apply(x, fwd, adj, lin)


# --------------------------------------------------------------------------------------------- linear kernels


@exact("cumsum", "tensor", "adjoint: reversed cumsum")
def cumsum(x, axis=-1, flatten=False, exclusive=False, reverse=False, out=None, **kwargs):
    """Exact ``paddle._C_ops.cumsum`` (same signature)."""
    shape = list(x.shape)
    if isinstance(axis, paddle.Tensor):
        axis = int(axis.item())

    def fwd(t):
        return original("cumsum")(t, axis, flatten, exclusive, reverse)

    def adj(g):
        if flatten:
            return original("reshape")(original("cumsum")(g, 0, False, exclusive, not reverse), shape)
        return original("cumsum")(g, axis, False, exclusive, not reverse)

    return _linear(x, fwd, adj)


@exact("flatten", "tensor", "adjoint: reshape")
def flatten(x, start_axis=0, stop_axis=-1, out=None, **kwargs):
    """Exact ``paddle._C_ops.flatten`` (same signature)."""
    shape = list(x.shape)
    return _linear(x, lambda t: original("flatten")(t, start_axis, stop_axis),
                   lambda g: original("reshape")(g, shape))


@exact("roll", "tensor", "adjoint: roll back")
def roll(x, shifts, axis, out=None, **kwargs):
    """Exact ``paddle._C_ops.roll`` (same signature)."""
    shifts = _as_list(shifts)
    axis = _as_list(axis) if axis is not None else []
    back = [-s for s in shifts]
    return _linear(x, lambda t: original("roll")(t, shifts, axis), lambda g: original("roll")(g, back, axis))


@exact("strided_slice", "tensor", "adjoint: Paddle's strided_slice_grad kernel")
def strided_slice(x, axes, starts, ends, strides, out=None, **kwargs):
    """Exact ``paddle._C_ops.strided_slice`` (same signature)."""
    axes, starts, ends, strides = (_as_list(v) for v in (axes, starts, ends, strides))
    like = x.detach()
    return _linear(x, lambda t: original("strided_slice")(t, axes, starts, ends, strides),
                   lambda g: original("strided_slice_grad")(like, g, axes, starts, ends, strides))


def _tri(name: str) -> Callable:
    def rule(x, diagonal=0, out=None, **kwargs):
        fn = original(name)
        return _linear(x, lambda t: fn(t, diagonal), lambda g: fn(g, diagonal))

    rule.__name__ = name
    rule.__doc__ = f"Exact ``{name}``: a projection, hence its own adjoint."
    return rule


exact("tril", "tensor", "self-adjoint projection")(_tri("tril"))
exact("triu", "tensor", "self-adjoint projection")(_tri("triu"))


@exact("expand_as", "tensor", "adjoint: sum over broadcast dimensions")
def expand_as(x, y=None, target_shape=None, out=None, **kwargs):
    """Exact ``paddle._C_ops.expand_as`` (same signature)."""
    shape = list(x.shape)
    return _linear(x, lambda t: original("expand_as")(t, y, target_shape), lambda g: _sum_to(g, shape))


@exact("mean_all", "tensor", "adjoint: broadcast / numel")
def mean_all(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.mean_all`` (same signature)."""
    shape = list(x.shape)
    n = max(1, math.prod(shape))

    def adj(g):
        return original("scale")(original("expand")(original("reshape")(g, [1] * len(shape)), shape),
                                 1.0 / n, 0.0, True)

    return _linear(x, lambda t: original("mean_all")(t), adj)


class _Unstack(GuardedPyLayer):
    @staticmethod
    def forward(ctx, x, axis, num):
        ctx.axis = axis
        ctx.shape = list(x.shape)
        ctx.dtype = x.dtype
        return tuple(original("unstack")(x, axis, num))

    @staticmethod
    def backward(ctx, *grads):
        axis = ctx.axis % len(ctx.shape)
        part = ctx.shape[:axis] + ctx.shape[axis + 1:]
        grads = [paddle.zeros(part, ctx.dtype) if g is None else g for g in grads]
        return paddle.stack(grads, axis=axis)


@exact("unstack", "tensor", "adjoint: stack")
def unstack(x, axis=0, num=0, out=None, **kwargs):
    """Exact ``paddle._C_ops.unstack`` (same signature)."""
    if x.stop_gradient or not paddle.is_grad_enabled():
        return original("unstack")(x, axis, num)
    return list(_Unstack.apply(x, axis, num))


@exact("broadcast_tensors", "tensor", "adjoint: sum over broadcast dimensions")
def broadcast_tensors(input, out=None, **kwargs):
    """Exact ``paddle._C_ops.broadcast_tensors`` (same signature)."""
    xs = list(input)

    shape = list(functools.reduce(paddle.broadcast_shape, [list(x.shape) for x in xs]))

    def grad(i):
        def g(*gys):
            gy = gys[i] if gys[i] is not None else paddle.zeros(shape, xs[i].dtype)
            return _sum_to_public(gy, xs[i].shape)
        return g

    result = apply_rule(xs, lambda: tuple(original("broadcast_tensors")(xs)), [grad(i) for i in range(len(xs))])
    return list(result)


# ------------------------------------------------------------------------------------------ nonlinear kernels


def _reduced_axes(axis: Any, ndim: int) -> list[int]:
    axes = _as_list(axis) if axis is not None else []
    if not axes or len(axes) == ndim:
        return list(range(ndim))
    return sorted(a % ndim for a in axes)


class _Extremum(GuardedPyLayer):
    """max/min/amax/amin: the gradient goes to the arg-extrema, split evenly among ties (as Paddle does)."""

    @staticmethod
    def forward(ctx, x, name, axis, keepdim):
        y = original(name)(x, axis, keepdim)
        axes = _reduced_axes(axis, len(x.shape))
        yk = y if keepdim else original("reshape")(y, [1 if i in axes else n for i, n in enumerate(x.shape)])
        hit = original("cast")(original("equal")(x, yk), x.dtype)
        count = original("sum")(hit, axes, None, True)
        ctx.weight = original("divide")(hit, count)
        ctx.keep_shape = list(yk.shape)
        return y

    @staticmethod
    def backward(ctx, grad):
        return paddle.reshape(grad, ctx.keep_shape) * ctx.weight


def _extremum(name: str) -> Callable:
    def rule(x, axis=None, keepdim=False, out=None, **kwargs):
        if axis is None:
            axis = []
        if x.stop_gradient or not paddle.is_grad_enabled():
            return original(name)(x, axis, keepdim)
        return _Extremum.apply(x, name, axis, keepdim)

    rule.__name__ = name
    rule.__doc__ = f"Exact ``{name}`` reduction: piecewise linear, gradient split evenly among ties."
    return rule


for _name in ("max", "min", "amax", "amin"):
    exact(_name, "tensor", "gradient to the arg-extrema, ties split evenly")(_extremum(_name))


class _Reciprocal(GuardedPyLayer):
    """Saves its input, not its output (see activation._Softmax: a saved output leaks)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return original("reciprocal")(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensor()
        y = paddle._C_ops.reciprocal(x)
        return -grad * y * y


@exact("reciprocal", "tensor")
def reciprocal(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.reciprocal`` (same signature)."""
    return _Reciprocal.apply(x)


@exact("elementwise_pow", "tensor", "d/dy uses log(x): defined for x > 0 as in Paddle")
def elementwise_pow(x, y, out=None, **kwargs):
    """Exact ``paddle._C_ops.elementwise_pow`` (same signature)."""
    return apply_rule([x, y], lambda: original("elementwise_pow")(x, y), [
        lambda g: _sum_to_public(g * y * paddle.pow(x, y - 1.0), x.shape),
        lambda g: _sum_to_public(g * paddle.pow(x, y) * paddle.log(x), y.shape),
    ])


@exact("dot", "linalg")
def dot(x, y, out=None, **kwargs):
    """Exact ``paddle._C_ops.dot`` (same signature)."""
    return apply_rule([x, y], lambda: original("dot")(x, y), [
        lambda g: paddle.unsqueeze(g, -1) * y,
        lambda g: paddle.unsqueeze(g, -1) * x,
    ])


@exact("masked_fill", "tensor", "composite: where(mask, value, x)")
def masked_fill(x, mask, value, out=None, **kwargs):
    """Exact ``paddle._C_ops.masked_fill`` (same signature)."""
    if not isinstance(value, paddle.Tensor):
        value = paddle.full([], value, x.dtype)
    return paddle.where(mask, paddle.cast(value, x.dtype), x)


@exact("bilinear", "linalg", "composite of matmul, reshape and sum")
def bilinear(x, y, weight, bias=None, out=None, **kwargs):
    """Exact ``paddle._C_ops.bilinear`` (same signature)."""
    k, i, j = weight.shape
    w = paddle.reshape(paddle.transpose(weight, [1, 0, 2]), [i, k * j])
    xw = paddle.reshape(paddle.matmul(x, w), [-1, k, j])
    result = paddle.sum(xw * paddle.unsqueeze(y, 1), axis=-1)
    if bias is not None:
        result = result + bias
    return result


class _PNorm(GuardedPyLayer):
    @staticmethod
    def forward(ctx, x, porder, axis, epsilon, keepdim, asvector):
        ctx.save_for_backward(x)  # not the output: see activation._Softmax (a saved output leaks)
        ctx.args = (porder, axis, epsilon, keepdim, asvector)
        return original("p_norm")(x, porder, axis, epsilon, keepdim, asvector)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensor()
        porder, axis, epsilon, keepdim, asvector = ctx.args
        y = paddle._C_ops.p_norm(x, porder, axis, epsilon, keepdim, asvector)
        if asvector:
            kshape = [1] * len(x.shape)
        else:
            kshape = list(x.shape)
            kshape[axis % len(x.shape)] = 1
        if not keepdim:
            y, grad = paddle.reshape(y, kshape), paddle.reshape(grad, kshape)
        if porder == 0:
            return paddle.zeros_like(x) * grad
        if math.isinf(porder):
            hit = paddle.cast(paddle.abs(x) == y, x.dtype)
            return grad * paddle.sign(x) * hit
        if porder == 2:
            num, den = x, y + epsilon
        else:
            num = paddle.sign(x) * paddle.pow(paddle.abs(x), porder - 1.0)
            den = paddle.pow(y, porder - 1.0) + epsilon
        zero = den == 0
        safe = paddle.where(zero, paddle.ones_like(den), den)
        return paddle.where(zero, paddle.zeros_like(x), grad * num * paddle.reciprocal(safe))


@exact("p_norm", "tensor", "p > 0 finite, inf and 0; zero vectors give zero gradient as in Paddle")
def p_norm(x, porder=2.0, axis=-1, epsilon=1e-12, keepdim=False, asvector=False, out=None, **kwargs):
    """Exact ``paddle._C_ops.p_norm`` (same signature)."""
    if x.stop_gradient or not paddle.is_grad_enabled():
        return original("p_norm")(x, porder, axis, epsilon, keepdim, asvector)
    return _PNorm.apply(x, float(porder), int(axis), float(epsilon), bool(keepdim), bool(asvector))


def _einsum_terms(equation: str, operands: Sequence[paddle.Tensor]) -> tuple[list[str], str] | None:
    """Explicit subscripts (ellipses spelled out with unused letters), or None for unsupported equations."""
    equation = equation.replace(" ", "")
    if "->" not in equation:
        return None
    lhs, rhs = equation.split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        return None
    free = [c for c in "zyxwvutsrqponmlkjihgfedcba" if c not in equation]
    ranks = [len(op.shape) - (len(t) - 3) for t, op in zip(terms, operands) if "..." in t]
    width = max(ranks + [0])
    if width > len(free):
        return None
    letters = "".join(reversed(free[:width]))
    out = []
    for t, op in zip(terms, operands):
        if "..." in t:
            r = len(op.shape) - (len(t) - 3)
            t = t.replace("...", letters[width - r:])
        if len(set(t)) != len(t) or len(t) != len(op.shape):
            return None
        out.append(t)
    rhs = rhs.replace("...", letters)
    return out, rhs


def _einsum_grad(operands: list[paddle.Tensor], terms: list[str], rhs: str, i: int) -> Callable:
    """The gradient of an einsum with respect to operand ``i``, itself an einsum (then expanded if needed)."""

    def grad(g):
        op, term = operands[i], terms[i]
        others = [(o, t) for j, (o, t) in enumerate(zip(operands, terms)) if j != i]
        present = set(rhs).union(*[set(t) for _, t in others])
        reduced = "".join(c for c in term if c in present)
        eq = ",".join([rhs] + [t for _, t in others]) + "->" + reduced
        gi = paddle._C_ops.einsum([g] + [o for o, _ in others], eq)[0]
        if reduced != term:
            for axis, c in enumerate(term):
                if c not in present:
                    gi = paddle.unsqueeze(gi, axis)
            sizes = dict(zip(term, op.shape))
            gi = paddle.expand(gi, [sizes[c] if c not in present else gi.shape[a] for a, c in enumerate(term)])
        return _sum_to_public(gi, op.shape)

    return grad


@exact("einsum", "linalg", "one or two operands, ellipses allowed; no repeated subscript within one operand")
def einsum(x, equation, out=None, **kwargs):
    """Exact ``paddle._C_ops.einsum`` (same signature)."""
    operands = list(x)
    if all(o.stop_gradient for o in operands) or not paddle.is_grad_enabled():
        return original("einsum")(operands, equation)
    parsed = _einsum_terms(equation, operands)
    if parsed is None:
        from paddlefsl.metaopt.autodiff.scope import current_layer
        from paddlefsl.metaopt.errors import SecondOrderError
        raise SecondOrderError("einsum", current_layer(), f"uses the equation {equation!r} (a subscript repeated "
                               "within one operand), which has no exact higher-order rule")
    terms, rhs = parsed
    result = apply_rule(operands, lambda: original("einsum")(operands, equation)[0],
                          [_einsum_grad(operands, terms, rhs, i) for i in range(len(operands))])
    return result, [], []


@exact("log1p", "tensor")
def log1p(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.log1p`` (same signature)."""
    return pointwise("log1p", x, (), lambda t: paddle.reciprocal(1.0 + t))


@exact("expm1", "tensor")
def expm1(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.expm1`` (same signature)."""
    return pointwise("expm1", x, (), paddle.exp)


@exact("floor", "tensor", "zero gradient")
def floor(x, out=None, **kwargs):
    """Exact ``paddle._C_ops.floor`` (same signature)."""
    return pointwise("floor", x, (), paddle.zeros_like)


@exact("round", "tensor", "zero gradient")
def round(x, decimals=0, out=None, **kwargs):
    """Exact ``paddle._C_ops.round`` (same signature)."""
    return pointwise("round", x, (decimals,), paddle.zeros_like)


@exact("atan2", "tensor")
def atan2(x, y, out=None, **kwargs):
    """Exact ``paddle._C_ops.atan2`` (same signature)."""
    def inv_r2():
        return paddle.reciprocal(x * x + y * y)

    return apply_rule([x, y], lambda: original("atan2")(x, y), [
        lambda g: _sum_to_public(g * y * inv_r2(), x.shape),
        lambda g: _sum_to_public(-g * x * inv_r2(), y.shape),
    ])


@exact("diagonal", "tensor", "adjoint: Paddle's diagonal_grad kernel")
def diagonal(x, offset=0, axis1=0, axis2=1, out=None, **kwargs):
    """Exact ``paddle._C_ops.diagonal`` (same signature)."""
    like = x.detach()
    return _linear(x, lambda t: original("diagonal")(t, offset, axis1, axis2),
                   lambda g: original("diagonal_grad")(like, g, offset, axis1, axis2))


@exact("addmm", "linalg", "composite: beta * input + alpha * x @ y")
def addmm(input, x, y, beta=1.0, alpha=1.0, out=None, **kwargs):
    """Exact ``paddle._C_ops.addmm`` (same signature)."""
    return beta * input + alpha * paddle.matmul(x, y)


@exact("lerp", "tensor", "composite: x + weight * (y - x)")
def lerp(x, y, weight, out=None, **kwargs):
    """Exact ``paddle._C_ops.lerp`` (same signature)."""
    return x + weight * (y - x)


@exact("kron", "linalg", "composite of reshape and multiply")
def kron(x, y, out=None, **kwargs):
    """Exact ``paddle._C_ops.kron`` (same signature)."""
    nd = max(len(x.shape), len(y.shape))
    xs = [1] * (nd - len(x.shape)) + list(x.shape)
    ys = [1] * (nd - len(y.shape)) + list(y.shape)
    xe = paddle.reshape(x, [d for a in xs for d in (a, 1)])
    ye = paddle.reshape(y, [d for b in ys for d in (1, b)])
    return paddle.reshape(xe * ye, [a * b for a, b in zip(xs, ys)])
