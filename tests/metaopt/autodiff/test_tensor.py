"""Second-order checks of the tensor / linalg family: every stock entry and every exact rule against finite
differences, with a check that each case really runs the kernel it is named after."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import _C_ops

from paddlefsl.metaopt.autodiff import exact_ops, registry
from paddlefsl.metaopt.errors import SecondOrderError
from tests.opcheck import check_second_order, check_third_order, hvp_autograd

paddle.set_default_dtype("float64")
_rng = np.random.default_rng(7)


def _r(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape)


def _pos(*shape: int) -> np.ndarray:
    return 0.5 + _rng.random(shape)


_I = np.array([[2, 0], [1, 1]], dtype=np.int64)
_TIES = paddle.to_tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]], dtype="float64")
_ROW = paddle.to_tensor([[1.0], [0.0]], dtype="float64")
_LERP_W = paddle.to_tensor([[0.2, 0.7, -0.4], [1.3, 0.5, 0.0]], dtype="float64")
_MASK = np.array([[True, False, True], [False, True, False]])

# name -> (kernel names the case must reach, f, arrays). Each f applies a nonlinearity after the op.
CASES: dict[str, tuple[tuple[str, ...], Callable, list[np.ndarray]]] = {
    # elementwise
    "add": (("add",), lambda x, y: (paddle.add(x, y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "add_broadcast": (("add",), lambda x, y: (paddle.add(x, y) ** 3).sum(), [_r(2, 3), _r(3)]),
    "add_channel": (("add",), lambda x, y: (paddle.add(x, y) ** 3).sum(), [_r(2, 3, 2, 2), _r(1, 3, 1, 1)]),
    "multiply_channel_first": (("multiply",), lambda x, y: (paddle.multiply(y, x) ** 3).sum(),
                               [_r(2, 3, 2, 2), _r(1, 3, 1, 2)]),
    "divide_channel": (("divide",), lambda x, y: paddle.tanh(paddle.divide(x, y)).sum(), [_r(2, 3, 2), _pos(1, 3, 1)]),
    "subtract": (("subtract",), lambda x, y: (paddle.subtract(x, y) ** 3).sum(), [_r(2, 3), _r(3)]),
    "multiply": (("multiply",), lambda x, y: (paddle.multiply(x, y) ** 3).sum(), [_r(2, 3), _r(2, 1)]),
    "divide": (("divide",), lambda x, y: paddle.tanh(paddle.divide(x, y)).sum(), [_r(2, 3), _pos(3)]),
    "scale": (("scale",), lambda x, y: (paddle.scale(x * y, 2.0, 0.5) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "pow": (("pow",), lambda x, y: paddle.tanh(paddle.pow(x * y, 3.0)).sum(), [_pos(2, 3), _pos(2, 3)]),
    "square": (("square",), lambda x, y: paddle.tanh(paddle.square(x * y)).sum(), [_r(2, 3), _r(2, 3)]),
    "sqrt": (("sqrt",), lambda x, y: (paddle.sqrt(x * y) ** 3).sum(), [_pos(2, 3), _pos(2, 3)]),
    "log": (("log",), lambda x, y: (paddle.log(x * y) ** 3).sum(), [_pos(2, 3), _pos(2, 3)]),
    "abs": (("abs",), lambda x, y: (paddle.abs(x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "maximum": (("maximum",), lambda x, y: (paddle.maximum(x * y, y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "minimum": (("minimum",), lambda x, y: (paddle.minimum(x * y, y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "clip": (("clip",), lambda x, y: (paddle.clip(x * y, -0.3, 0.4) ** 3).sum() + (x * y).sum() ** 2,
             [_r(2, 3), _r(2, 3)]),
    "where": (("where",), lambda x, y, m: (paddle.where(m, x * y, y) ** 3).sum(), [_r(2, 3), _r(2, 3), _MASK]),
    "cast": (("cast",), lambda x, y: (paddle.cast(x * y, "float64") ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "assign": (("assign",), lambda x, y: (paddle.assign(x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "sign": (("sign",), lambda x, y: (paddle.sign(x) * (x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "sin": (("sin",), lambda x, y: (paddle.sin(x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "cos": (("cos",), lambda x, y: (paddle.cos(x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "rsqrt": (("rsqrt",), lambda x, y: (paddle.rsqrt(x * y) ** 3).sum(), [_pos(2, 3), _pos(2, 3)]),
    "reciprocal": (("reciprocal",), lambda x, y: (paddle.reciprocal(x * y) ** 3).sum(), [_pos(2, 3), _pos(2, 3)]),
    "elementwise_pow": (("elementwise_pow",), lambda x, y: paddle.tanh(paddle.pow(x, y)).sum(),
                        [_pos(2, 3), _r(2, 3)]),
    # reductions
    "sum": (("sum",), lambda x, y: (paddle.sum(x * y, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "mean": (("mean",), lambda x, y: (paddle.mean(x * y, axis=0) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "mean_all": (("mean_all",), lambda x, y: _C_ops.mean_all(x * y) ** 3, [_r(2, 3), _r(2, 3)]),
    "max": (("max",), lambda x, y: (paddle.max(x * y, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "max_all": (("max",), lambda x, y: paddle.max(x * y) ** 3, [_r(2, 3), _r(2, 3)]),
    "min": (("min",), lambda x, y: (paddle.min(x * y, axis=0) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "amax": (("amax",), lambda x, y: (paddle.amax(x * y, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "amin": (("amin",), lambda x, y: (paddle.amin(x * y, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "cumsum": (("cumsum",), lambda x, y: (paddle.cumsum(x * y, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "cumsum_flat": (("cumsum",), lambda x, y: (paddle.cumsum(x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    # shape and indexing
    "reshape": (("reshape",), lambda x, y: (paddle.reshape(x * y, [3, 2]) ** 3 * paddle.arange(6.0).reshape([3, 2])).sum(),
                [_r(2, 3), _r(2, 3)]),
    "transpose": (("transpose",), lambda x, y: (paddle.transpose(x * y, [1, 0]) ** 3 * paddle.arange(6.0).reshape([3, 2])).sum(),
                  [_r(2, 3), _r(2, 3)]),
    "squeeze": (("squeeze",), lambda x, y: (paddle.squeeze(x * y, axis=1) ** 3).sum(), [_r(2, 1, 3), _r(2, 1, 3)]),
    "unsqueeze": (("unsqueeze",), lambda x, y: (paddle.unsqueeze(x * y, axis=0) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "flatten": (("flatten",), lambda x, y: (paddle.flatten(x * y, 1, 2) ** 3 * paddle.arange(12.0).reshape([2, 6])).sum(),
                [_r(2, 2, 3), _r(2, 2, 3)]),
    "concat": (("concat",), lambda x, y: (paddle.concat([x * y, y], axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "stack": (("stack",), lambda x, y: (paddle.stack([x * y, y], axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "split": (("split",), lambda x, y: sum(((i + 1) * p ** 3).sum() for i, p in enumerate(paddle.split(x * y, [1, 2], axis=1))),
              [_r(2, 3), _r(2, 3)]),
    "split_with_num": (("split_with_num",),
                       lambda x, y: sum(((i + 1) * p ** 3).sum() for i, p in enumerate(paddle.split(x * y, 3, axis=1))),
                       [_r(2, 3), _r(2, 3)]),
    "slice": (("slice",), lambda x, y: (paddle.slice(x * y, [1], [1], [3]) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "strided_slice": (("strided_slice",),
                      lambda x, y: (paddle.strided_slice(x * y, [1], [0], [3], [2]) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "gather": (("gather",), lambda x, y, i: (paddle.gather(x * y, i[:, 0], axis=1) ** 3).sum(),
               [_r(2, 3), _r(2, 3), _I]),
    "gather_nd": (("gather_nd",), lambda x, y, i: (paddle.gather_nd(x * y, i) ** 3).sum(),
                  [_r(2, 3), _r(2, 3), np.array([[0, 2], [1, 1], [0, 2]], dtype=np.int64)]),
    "index_select": (("index_select",), lambda x, y, i: (paddle.index_select(x * y, i[:, 0], axis=1) ** 3).sum(),
                     [_r(2, 3), _r(2, 3), _I]),
    "expand": (("expand",), lambda x, y: (paddle.expand(x * y, [4, 3]) ** 3 * paddle.arange(12.0).reshape([4, 3])).sum(),
               [_r(1, 3), _r(1, 3)]),
    "expand_as": (("expand_as",),
                  lambda x, y, z: (paddle.expand_as(x * y, z) ** 3 * paddle.arange(12.0).reshape([4, 3])).sum(),
                  [_r(1, 3), _r(1, 3), np.zeros((4, 3), dtype=np.int64)]),
    "tile": (("tile",), lambda x, y: (paddle.tile(x * y, [2, 2]) ** 3 * paddle.arange(24.0).reshape([4, 6])).sum(),
             [_r(2, 3), _r(2, 3)]),
    "full_like": (("full_like",), lambda x, y: ((x * y) ** 3 * paddle.full_like(x, 2.0)).sum(), [_r(2, 3), _r(2, 3)]),
    "zeros_like": (("full_like",), lambda x, y: ((x * y) ** 3 + paddle.zeros_like(x)).sum(), [_r(2, 3), _r(2, 3)]),
    "ones_like": (("full_like",), lambda x, y: ((x * y) ** 3 * paddle.ones_like(y)).sum(), [_r(2, 3), _r(2, 3)]),
    "broadcast_tensors": (("broadcast_tensors",),
                          lambda x, y: sum((p ** 3).sum() for p in paddle.broadcast_tensors([x * x, y])),
                          [_r(1, 3), _r(2, 1)]),
    "take_along_axis": (("take_along_axis",),
                        lambda x, y, i: (paddle.take_along_axis(x * y, i, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3), _I]),
    "roll": (("roll",), lambda x, y: (paddle.roll(x * y, 1, axis=1) ** 3 * paddle.arange(6.0).reshape([2, 3])).sum(),
             [_r(2, 3), _r(2, 3)]),
    "flip": (("flip",), lambda x, y: (paddle.flip(x * y, [1]) ** 3 * paddle.arange(6.0).reshape([2, 3])).sum(),
             [_r(2, 3), _r(2, 3)]),
    "unbind": (("unbind",), lambda x, y: sum(((i + 1) * p ** 3).sum() for i, p in enumerate(paddle.unbind(x * y, 1))),
               [_r(2, 3), _r(2, 3)]),
    "unstack": (("unstack",), lambda x, y: sum(((i + 1) * p ** 3).sum() for i, p in enumerate(paddle.unstack(x * y, 0))),
                [_r(2, 3), _r(2, 3)]),
    "tril": (("tril",), lambda x, y: (paddle.tril(x * y, 0) ** 3).sum(), [_r(3, 3), _r(3, 3)]),
    "triu": (("triu",), lambda x, y: (paddle.triu(x * y, 1) ** 3).sum(), [_r(3, 3), _r(3, 3)]),
    "pad": (("pad",), lambda x, y: (F.pad(x * y, [1, 0, 0, 2], value=0.5) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "pad3d": (("pad3d",), lambda x, y: (F.pad(x * y, [1, 2], mode="constant", value=0.5, data_format="NCL") ** 3).sum(),
              [_r(1, 2, 3), _r(1, 2, 3)]),
    "pad3d_reflect": (("pad3d",), lambda x, y: (F.pad(x * y, [1, 1, 1, 0], mode="reflect") ** 3).sum(),
                      [_r(1, 1, 3, 3), _r(1, 1, 3, 3)]),
    "pad3d_replicate": (("pad3d",), lambda x, y: (F.pad(x * y, [1, 1, 2, 0], mode="replicate") ** 3).sum(),
                        [_r(1, 1, 2, 3), _r(1, 1, 2, 3)]),
    "masked_fill": (("masked_fill",), lambda x, y, m: (paddle.masked_fill(x * y, m, 0.3) ** 3).sum(),
                    [_r(2, 3), _r(2, 3), _MASK]),
    # norms
    "p_norm": (("p_norm",), lambda x, y: (paddle.norm(x * y, p=2, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "p_norm_p3": (("p_norm",), lambda x, y: (paddle.norm(x * y, p=3, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "p_norm_p1": (("p_norm",), lambda x, y: (paddle.norm(x * y, p=1, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "normalize": (("p_norm",), lambda x, y: (F.normalize(x * y, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "max_ties": (("max",), lambda x, y: (paddle.max(x * y + _TIES, axis=1) ** 3).sum(), [_r(2, 3) * 1e-3, _r(2, 3)]),
    "p_norm_inf": (("p_norm",), lambda x, y: (paddle.norm(x * y, p=float("inf"), axis=1) ** 3).sum(),
                   [_r(2, 3), _r(2, 3)]),
    "p_norm_keepdim": (("p_norm",), lambda x, y: (paddle.norm(x * y, p=2, axis=0, keepdim=True) ** 3).sum(),
                       [_r(2, 3), _r(2, 3)]),
    "p_norm_zero_row": (("p_norm",), lambda x, y: (paddle.norm(x * y * _ROW, p=2, axis=1) ** 3).sum()
                        + ((x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "normalize_zero_row": (("p_norm",), lambda x, y: (F.normalize(x * y * _ROW, axis=1) ** 3).sum()
                           + ((x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "log1p": (("log1p",), lambda x, y: (paddle.log1p(x * y) ** 3).sum(), [_pos(2, 3), _pos(2, 3)]),
    "expm1": (("expm1",), lambda x, y: (paddle.expm1(x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "addmm": (("addmm",), lambda b, x, y: (paddle.addmm(b, x, y, 0.5, 2.0) ** 3).sum(), [_r(2, 2), _r(2, 3), _r(3, 2)]),
    # stock lerp gives the weight no gradient (the rule does); here the weight is a constant
    "lerp": (("lerp",), lambda x, y: (paddle.lerp(x, y, _LERP_W) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "repeat_interleave": (("repeat_interleave",),
                          lambda x, y: (paddle.repeat_interleave(x * y, 2, axis=1) ** 3 * paddle.arange(12.0).reshape([2, 6])).sum(),
                          [_r(2, 3), _r(2, 3)]),
    "index_add": (("index_add",), lambda x, y, i: (paddle.index_add(x * y, i[:, 0], 0, y[:2] ** 2) ** 3).sum(),
                  [_r(3, 3), _r(3, 3), np.array([[2], [0]], dtype=np.int64)]),
    "masked_select": (("masked_select",), lambda x, y, m: (paddle.masked_select(x * y, m) ** 3 * paddle.arange(3.0)).sum(),
                      [_r(2, 3), _r(2, 3), _MASK]),
    "kron": (("kron",), lambda x, y: (paddle.kron(x, y) ** 3).sum(), [_r(2, 2), _r(2, 1)]),
    "kron_3d": (("kron",), lambda x, y: (paddle.kron(x, y) ** 3).sum(), [_r(2, 1, 2), _r(3, 2)]),
    "diagonal_offset": (("diagonal",), lambda x, y: (paddle.diagonal(x * y, 1, 1, 2) ** 3).sum(), [_r(2, 3, 3), _r(2, 3, 3)]),
    "diagonal": (("diagonal",), lambda x, y: (paddle.diagonal(x * y) ** 3).sum(), [_r(3, 3), _r(3, 3)]),
    "atan2": (("atan2",), lambda x, y: (paddle.atan2(x, y) ** 3).sum(), [_r(2, 3), _pos(2, 3)]),
    "floor": (("floor",), lambda x, y: (paddle.floor(x * 3) * (x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "round": (("round",), lambda x, y: (paddle.round(x * 3) * (x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "zeros_like_kernel": (("zeros_like",), lambda x, y: ((x * y) ** 3 + _C_ops.zeros_like(x, paddle.float64, x.place)).sum(),
                          [_r(2, 3), _r(2, 3)]),
    "ones_like_kernel": (("ones_like",), lambda x, y: ((x * y) ** 3 * _C_ops.ones_like(x, paddle.float64, x.place)).sum(),
                         [_r(2, 3), _r(2, 3)]),
    # linalg
    "matmul": (("matmul",), lambda x, y: (paddle.matmul(x, y) ** 3).sum(), [_r(2, 3), _r(3, 2)]),
    "matmul_tx": (("matmul",), lambda x, y: (paddle.matmul(x, y, transpose_x=True) ** 3).sum(), [_r(3, 2), _r(3, 2)]),
    "matmul_ty": (("matmul",), lambda x, y: (paddle.matmul(x, y, transpose_y=True) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "matmul_txy": (("matmul",), lambda x, y: (paddle.matmul(x, y, True, True) ** 3).sum(), [_r(3, 2), _r(2, 3)]),
    "matmul_batch": (("matmul",), lambda x, y: (paddle.matmul(x, y) ** 3).sum(), [_r(2, 2, 3), _r(3, 2)]),
    "matmul_vec": (("matmul",), lambda x, y: (paddle.matmul(x, y) ** 3).sum(), [_r(2, 3), _r(3)]),
    "bmm": (("bmm",), lambda x, y: (paddle.bmm(x, y) ** 3).sum(), [_r(2, 2, 3), _r(2, 3, 2)]),
    "dot": (("dot",), lambda x, y: paddle.dot(x, y) ** 3, [_r(3), _r(3)]),
    "linear": (("linear", "matmul"), lambda x, w, b: (F.linear(x, w, b) ** 3).sum(), [_r(2, 3), _r(3, 2), _r(2)]),
    "linear_nobias": (("linear", "matmul"), lambda x, w: (F.linear(x, w) ** 3).sum(), [_r(2, 3), _r(3, 2)]),
    "einsum": (("einsum",), lambda x, y: (paddle.einsum("ij,jk->ik", x, y) ** 3).sum(), [_r(2, 3), _r(3, 2)]),
    "einsum_lonely": (("einsum",), lambda x, y: (paddle.einsum("ij,kl->ik", x, y) ** 3).sum(), [_r(2, 3), _r(2, 2)]),
    "einsum_ellipsis": (("einsum",), lambda x, y: (paddle.einsum("...ij,...jk->...ik", x, y) ** 3).sum(),
                        [_r(2, 2, 3), _r(1, 3, 2)]),
    "einsum_attention": (("einsum",), lambda q, k: paddle.tanh(paddle.einsum("bhqd,bhkd->bhqk", q, k)).sum(),
                         [_r(1, 2, 2, 3), _r(1, 2, 3, 3)]),
    "einsum_single": (("einsum",), lambda x, y: (paddle.einsum("ij->j", x * y) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "bilinear": (("bilinear",), lambda x1, x2, w, b: (F.bilinear(x1, x2, w, b) ** 3).sum(),
                 [_r(2, 3), _r(2, 2), _r(2, 3, 2), _r(1, 2)]),
}

# Kernels left guarded (no exact rule): differentiating them twice must raise SecondOrderError.
GUARDED: dict[str, tuple[tuple[str, ...], Callable, list[np.ndarray]]] = {
    "logit": (("logit",), lambda x, y: (paddle.logit(x * y) ** 3).sum(), [_pos(2, 3) / 2, _pos(2, 3) / 2]),
    "scatter": (("scatter",), lambda x, y, i: (paddle.scatter(x * y, i[:, 0], y[:2] ** 2) ** 3).sum(),
                [_r(3, 3), _r(3, 3), np.array([[2], [0]], dtype=np.int64)]),
    "prod": (("prod",), lambda x, y: (paddle.prod(x * y, axis=1) ** 3).sum(), [_r(2, 3), _r(2, 3)]),
    "einsum_diagonal": (("einsum",), lambda x, y: (paddle.einsum("ii,ij->j", x, y) ** 3).sum(), [_r(3, 3), _r(3, 2)]),
    "put_along_axis": (("put_along_axis",),
                       lambda x, y, i: (paddle.put_along_axis(x * y, i[:, :1], y[:, :1] ** 2, axis=1) ** 3).sum(),
                       [_r(2, 3), _r(2, 3), _I]),
}


@contextlib.contextmanager
def _counting(names: tuple[str, ...]) -> Iterator[dict[str, int]]:
    counts = {n: 0 for n in names}
    saved = {n: getattr(_C_ops, n) for n in names}

    def wrap(n, fn):
        def counted(*args, **kwargs):
            counts[n] += 1
            return fn(*args, **kwargs)
        return counted

    for n in names:
        setattr(_C_ops, n, wrap(n, saved[n]))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(_C_ops, n, fn)


@pytest.mark.parametrize("case", sorted(CASES))
def test_second_order_matches_finite_differences(case: str) -> None:
    kernels, f, arrays = CASES[case]
    with exact_ops(), _counting(kernels) as counts:
        f(*[paddle.to_tensor(a) for a in arrays])
    assert any(counts.values()), f"case {case} never reached kernels {kernels}"
    check_second_order(f, arrays)


def _exact_cases() -> list[str]:
    rules = registry.rules()
    return sorted(c for c, (kernels, _, _) in CASES.items()
                  if any(rules.get(k) is not None and rules[k].status == registry.EXACT for k in kernels))


def _loss_and_grads(f: Callable, arrays: list[np.ndarray]) -> tuple[float, list[np.ndarray]]:
    ts = [paddle.to_tensor(a) for a in arrays]
    wrt = [t for t, a in zip(ts, arrays) if np.issubdtype(a.dtype, np.floating)]
    for t in wrt:
        t.stop_gradient = False
    loss = f(*ts)
    grads = paddle.grad(loss, wrt)
    return float(loss), [g.numpy() for g in grads]


@pytest.mark.parametrize("case", _exact_cases())
def test_exact_rule_forward_and_first_order_equal_stock(case: str) -> None:
    _, f, arrays = CASES[case]
    want_loss, want_grads = _loss_and_grads(f, arrays)
    with exact_ops():
        got_loss, got_grads = _loss_and_grads(f, arrays)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", _exact_cases())
def test_stock_paddle_fails_where_a_rule_is_registered(case: str) -> None:
    kernels, f, arrays = CASES[case]
    floats = [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]
    vs = [np.random.default_rng(1).standard_normal(arrays[i].shape) for i in floats]
    try:
        stock_hvp = hvp_autograd(f, arrays, floats, vs, exact=False)
    except (RuntimeError, OSError, ValueError):
        return
    exact_hvp = hvp_autograd(f, arrays, floats, vs, exact=True)
    differs = any(not np.allclose(s, e, rtol=1e-6, atol=1e-8) for s, e in zip(stock_hvp, exact_hvp))
    composite = all(registry.rules()[k].note.startswith("composite") for k in kernels if k in registry.rules())
    assert differs or composite, (
        f"stock Paddle gets {case} right at second order: declare it stock instead")


@pytest.mark.parametrize("case", sorted(GUARDED))
def test_guarded_kernels_raise(case: str) -> None:
    kernels, f, arrays = GUARDED[case]
    assert all(k not in registry.rules() or k == "einsum" for k in kernels)
    floats = [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]
    vs = [np.ones(arrays[i].shape) for i in floats]
    with pytest.raises((OSError, SecondOrderError), match="SecondOrderError|einsum"):
        hvp_autograd(f, arrays, floats, vs, exact=True)


def test_every_tensor_and_linalg_rule_has_a_case() -> None:
    covered = {k for kernels, _, _ in CASES.values() for k in kernels}
    mine = {n for n, r in registry.rules().items() if r.family in ("tensor", "linalg")}
    assert mine - covered == set()


def test_lerp_weight_gradient_is_exact_too() -> None:
    check_second_order(lambda x, y, w: (paddle.lerp(x, y, w) ** 3).sum(), [_r(2, 3), _r(2, 3), _r(2, 3)], wrt=[0, 1])
    with exact_ops():
        x, y, w = (paddle.to_tensor(_r(2, 3), stop_gradient=False) for _ in range(3))
        (gw,) = paddle.grad((paddle.lerp(x, y, w) ** 2).sum(), [w])
    want = (2 * (x + w * (y - x)) * (y - x)).numpy()
    np.testing.assert_allclose(gw.numpy(), want, rtol=1e-12)


@pytest.mark.parametrize("case", ["cumsum", "max", "p_norm", "p_norm_p3", "p_norm_zero_row", "einsum_attention", "dot",
                                  "elementwise_pow", "reciprocal", "bilinear", "masked_fill", "tril", "flatten",
                                  "atan2", "log1p", "mean_all", "strided_slice", "unstack", "broadcast_tensors"])
def test_exact_rules_are_exact_at_third_order(case: str) -> None:
    _, f, arrays = CASES[case]
    check_third_order(f, arrays)


def _multi_input_cases() -> list[str]:
    return [c for c in _exact_cases() if sum(np.issubdtype(a.dtype, np.floating) for a in CASES[c][2]) >= 2]


@pytest.mark.parametrize("case", _multi_input_cases())
def test_partial_grad_with_other_inputs_differentiable(case: str) -> None:
    """paddle.grad w.r.t. one input while the others also need gradients (Paddle prunes PyLayer input slots)."""
    _, f, arrays = CASES[case]
    check_second_order(f, arrays, wrt=[0])


@pytest.mark.parametrize("x_needs", [True, False])
@pytest.mark.parametrize("shape,bias_first", [((3, 4, 70, 80), False), ((3, 4, 70, 80), True), ((6, 8, 2000), False)])
def test_a_large_per_channel_bias_add_has_its_own_exact_rule(shape, bias_first, x_needs):
    """``_C_ops.add(x, b)`` with ``b`` of shape ``[1, C, 1, ...]`` (a conv bias, as ``F.conv2d`` adds it) on a
    large ``x``: a rule whose
    bias gradient is a matrix product, not Paddle's ``AddGradNode`` (a copy and a slow reduce); values and first,
    second and third derivatives equal stock Paddle's (float64)."""
    rng = np.random.default_rng(4)
    xa, ba = rng.standard_normal(shape), rng.standard_normal([1, shape[1]] + [1] * (len(shape) - 2))

    def derivatives(scope):
        with scope:
            x = paddle.to_tensor(xa, stop_gradient=not x_needs)
            b = paddle.to_tensor(ba, stop_gradient=False)
            y = _C_ops.add(b, x) if bias_first else _C_ops.add(x, b)
            node = y.grad_fn.name()
            wrt = [x, b] if x_needs else [b]
            first = paddle.grad((y * y * y).sum() * 1e-3, wrt, create_graph=True)
            second = paddle.grad(sum((g * g).sum() for g in first), wrt, create_graph=True)
            third = paddle.grad(sum((g * g * g).sum() for g in second), wrt)
            return node, [y.numpy()] + [t.numpy() for t in (*first, *second, *third)]

    node, ours = derivatives(exact_ops())
    stock_node, stock = derivatives(contextlib.nullcontext())
    assert stock_node == "AddGradNode"
    assert node == ("GradNodePyLayer__Join" if x_needs else "GradNodePyLayer__Slot")
    for got, want in zip(ours, stock):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10 * max(1.0, float(np.abs(want).max())))


def test_a_small_bias_add_keeps_paddles_add():
    with exact_ops():
        x = paddle.to_tensor(_r(2, 3, 4, 4), stop_gradient=False)
        b = paddle.to_tensor(_r(1, 3, 1, 1), stop_gradient=False)
        assert _C_ops.add(x, b).grad_fn.name() == "AddGradNode"


def test_the_bias_rule_hands_the_output_gradient_on_without_a_copy(monkeypatch):
    made = []
    clone = paddle.Tensor.clone
    monkeypatch.setattr(paddle.Tensor, "clone", lambda t: made.append(1) or clone(t))
    with exact_ops():
        x = paddle.to_tensor(_r(3, 4, 70, 80), stop_gradient=False)
        b = paddle.to_tensor(_r(1, 4, 1, 1), stop_gradient=False)
        gx, gb = paddle.grad(_C_ops.add(x, b).sum(), [x, b])
    assert made == []
    np.testing.assert_array_equal(gx.numpy(), np.ones([3, 4, 70, 80]))
    np.testing.assert_allclose(gb.numpy(), np.full([1, 4, 1, 1], 3 * 70 * 80.0))
