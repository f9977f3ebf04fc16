"""`reduce_sum`: the per-channel sums of the normalization rules as matrix products, equal to Paddle's sum in value
and in every derivative (float64), on both sides of its size threshold."""
from __future__ import annotations

import numpy as np
import paddle
import pytest

from paddlefsl.metaopt.autodiff import common

CASES = [([5, 8, 30, 30], [0, 2, 3]),    # batch norm, NCHW: ones on both sides of the kept axis
         ([5, 30, 30, 8], [0, 1, 2]),    # batch norm, NHWC: ones on the left only
         ([6, 4, 50, 60], [2, 3]),       # instance norm: ones on the right only
         ([70, 1000], [0]),
         ([4, 6, 9, 10], [1, 3]),        # kept axes not adjacent: Paddle's sum
         ([3, 4], [0, 1])]               # nothing kept


@pytest.mark.parametrize("shape,axes", CASES)
@pytest.mark.parametrize("threshold", [0, 1 << 40])
def test_reduce_sum_equals_paddles_sum_with_its_derivatives(shape, axes, threshold, monkeypatch):
    monkeypatch.setattr(common, "MATMUL_SUM_MIN_NUMEL", threshold)
    rng = np.random.default_rng(0)
    a = rng.standard_normal(shape)

    def quantities(fn):
        x = paddle.to_tensor(a, stop_gradient=False)
        s = fn(x)
        weights = paddle.to_tensor(rng.standard_normal(s.shape))
        value = (s * s * weights).sum()   # a square so that the second derivative is not zero
        (g,) = paddle.grad(value, x, create_graph=True)
        (h,) = paddle.grad((g * paddle.to_tensor(a)).sum(), x)
        return s.numpy(), g.numpy(), h.numpy()

    rng = np.random.default_rng(1)
    got = quantities(lambda x: common.reduce_sum(x, axes))
    rng = np.random.default_rng(1)
    want = quantities(lambda x: x.sum(axis=axes, keepdim=True))
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-10)


def test_large_adjacent_reductions_are_matrix_products(monkeypatch):
    seen = []
    real = paddle.matmul
    monkeypatch.setattr(paddle, "matmul", lambda *a, **k: seen.append(1) or real(*a, **k))
    x = paddle.randn([5, 8, 50, 50], dtype="float64")
    assert x.numel() >= common.MATMUL_SUM_MIN_NUMEL
    common.reduce_sum(x, [0, 2, 3])
    assert len(seen) == 2
    seen.clear()
    common.reduce_sum(paddle.randn([2, 3, 4, 5], dtype="float64"), [0, 2, 3])   # small: Paddle's sum
    assert seen == []
