"""Finite-difference checks of higher-order gradients through single ops (float64)."""
from __future__ import annotations

import collections
import contextlib
from typing import Callable, Iterator, Sequence

import numpy as np
import paddle

from paddlefsl.metaopt.autodiff import exact_ops


def _tensors(arrays: Sequence[np.ndarray]) -> list[paddle.Tensor]:
    out = []
    for a in arrays:
        t = paddle.to_tensor(a)
        t.stop_gradient = not np.issubdtype(a.dtype, np.floating)
        out.append(t)
    return out


def _first_grads(f, arrays, wrt):
    ts = _tensors(arrays)
    loss = f(*ts)
    grads = paddle.grad(loss, [ts[i] for i in wrt], allow_unused=True)
    return [np.zeros_like(arrays[i]) if g is None else g.numpy() for i, g in zip(wrt, grads)]


def hvp_autograd(f: Callable, arrays: Sequence[np.ndarray], wrt: Sequence[int], vs: Sequence[np.ndarray],
                 exact: bool = True) -> list[np.ndarray]:
    """Gradient of sum_i <v_i, d f / d x_i> with respect to every input in ``wrt`` (a Hessian-vector product)."""
    ctx = exact_ops() if exact else _null()
    with ctx:
        ts = _tensors(arrays)
        loss = f(*ts)
        grads = paddle.grad(loss, [ts[i] for i in wrt], create_graph=True, allow_unused=True)
        inner = sum((g * paddle.to_tensor(v)).sum() for g, v in zip(grads, vs) if g is not None)
        out = paddle.grad(inner, [ts[i] for i in wrt], allow_unused=True)
    return [np.zeros_like(arrays[i]) if g is None else g.numpy() for i, g in zip(wrt, out)]


def hvp_numeric(f: Callable, arrays: Sequence[np.ndarray], wrt: Sequence[int], vs: Sequence[np.ndarray],
                eps: float = 1e-6) -> list[np.ndarray]:
    """Central finite differences of the first-order gradients (which stock Paddle computes exactly)."""
    result = []
    for i in wrt:
        hi = np.zeros_like(arrays[i])
        for idx in np.ndindex(arrays[i].shape):
            vals = []
            for sign in (1.0, -1.0):
                shifted = [a.copy() for a in arrays]
                shifted[i][idx] += sign * eps
                grads = _first_grads(f, shifted, wrt)
                vals.append(sum(float((g * v).sum()) for g, v in zip(grads, vs)))
            hi[idx] = (vals[0] - vals[1]) / (2 * eps)
        result.append(hi)
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_second_order(f: Callable, arrays: Sequence[np.ndarray], wrt: Sequence[int] | None = None,
                       seed: int = 0, rtol: float = 1e-6, atol: float = 1e-8) -> None:
    """Assert that the exact scope's Hessian-vector products through ``f`` match finite differences.

    ``f`` maps paddle tensors (made from ``arrays``, float64 ones differentiable) to a scalar. The check also asserts
    that the true answer is not zero, so the first-order answer (which drops the second derivative) would fail.
    """
    arrays = [np.asarray(a) for a in arrays]
    if wrt is None:
        wrt = [i for i, a in enumerate(arrays) if np.issubdtype(a.dtype, np.floating)]
    rng = np.random.default_rng(seed)
    vs = [rng.standard_normal(arrays[i].shape) for i in wrt]
    got = hvp_autograd(f, arrays, wrt, vs)
    want = hvp_numeric(f, arrays, wrt, vs)
    scale = max(float(np.abs(w).max()) for w in want)
    assert scale > 1e-6, "the second derivative is zero here: this check could not tell first order from exact"
    for i, g, w in zip(wrt, got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * max(1.0, scale),
                                   err_msg=f"second-order gradient of input {i} differs from finite differences")


def check_third_order(f: Callable, arrays: list[np.ndarray], i: int = 0, eps: float = 1e-5) -> None:
    """Assert d/dx_i <v, H(x) v> (third order, through the scope) matches finite differences of the scope's
    Hessian-vector products, which the second-order tests validate."""
    v = np.random.default_rng(2).standard_normal(arrays[i].shape)
    with exact_ops():
        ts = [paddle.to_tensor(a) for a in arrays]
        ts[i].stop_gradient = False
        (g,) = paddle.grad(f(*ts), [ts[i]], create_graph=True)
        (h,) = paddle.grad((g * paddle.to_tensor(v)).sum(), [ts[i]], create_graph=True)
        (t,) = paddle.grad((h * paddle.to_tensor(v)).sum(), [ts[i]])
    want = np.zeros_like(arrays[i])
    for idx in np.ndindex(arrays[i].shape):
        vals = []
        for sign in (1.0, -1.0):
            shifted = [a.copy() for a in arrays]
            shifted[i][idx] += sign * eps
            (hv,) = hvp_autograd(f, shifted, [i], [v])
            vals.append(float((hv * v).sum()))
        want[idx] = (vals[0] - vals[1]) / (2 * eps)
    assert np.abs(want).max() > 1e-4
    np.testing.assert_allclose(t.numpy(), want, rtol=1e-5, atol=1e-7 * max(1.0, np.abs(want).max()))


@contextlib.contextmanager
def kernel_calls() -> Iterator[collections.Counter]:
    """Count the stock kernels the exact rules call (through ``registry.original``) inside the block, by name."""
    from paddlefsl.metaopt.autodiff import registry
    counts: collections.Counter = collections.Counter()
    saved = dict(registry._ORIGINALS)

    def counted(name, kernel):
        def call(*args, **kwargs):
            counts[name] += 1
            return kernel(*args, **kwargs)
        return call

    registry._ORIGINALS.update({name: counted(name, kernel) for name, kernel in saved.items()})
    try:
        yield counts
    finally:
        registry._ORIGINALS.update(saved)
