"""Second-order checks of the embedding family against finite differences and stock Paddle."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlefsl.metaopt.autodiff import exact_ops, registry
from tests.opcheck import check_second_order, hvp_autograd

paddle.set_default_dtype("float64")
_rng = np.random.default_rng(11)
_IDS = np.array([[0, 2, 2], [4, 1, 0]], dtype=np.int64)
_TABLE = _rng.standard_normal((5, 3))
_SCALE = _rng.standard_normal((2, 3, 3))


def _loss(padding_idx, sparse=False):
    def f(w, s, ids):
        return paddle.tanh(F.embedding(ids, w, padding_idx=padding_idx, sparse=sparse) * s).sum()
    return f


@pytest.mark.parametrize("padding_idx", [None, 2, -1, 0])
def test_embedding_second_order_matches_finite_differences(padding_idx) -> None:
    check_second_order(_loss(padding_idx), [_TABLE, _SCALE, _IDS])


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_sparse_embedding_gives_the_dense_answer_in_scope(padding_idx) -> None:
    vs = [_rng.standard_normal(_TABLE.shape), _rng.standard_normal(_SCALE.shape)]
    arrays = [_TABLE, _SCALE, _IDS]
    dense = hvp_autograd(_loss(padding_idx, False), arrays, [0, 1], vs)
    sparse = hvp_autograd(_loss(padding_idx, True), arrays, [0, 1], vs)
    for d, s in zip(dense, sparse):
        np.testing.assert_allclose(s, d, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding_forward_and_first_order_equal_stock(padding_idx) -> None:
    def run():
        w = paddle.to_tensor(_TABLE, stop_gradient=False)
        s = paddle.to_tensor(_SCALE)
        loss = _loss(padding_idx)(w, s, paddle.to_tensor(_IDS))
        (g,) = paddle.grad(loss, [w])
        return float(loss), g.numpy()

    want = run()
    with exact_ops():
        got = run()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("padding_idx", [2, 4])
def test_padding_row_gets_zero_gradient_at_first_and_second_order(padding_idx) -> None:
    vs = [_rng.standard_normal(_TABLE.shape), np.zeros_like(_SCALE)]
    with exact_ops():
        w = paddle.to_tensor(_TABLE, stop_gradient=False)
        loss = _loss(padding_idx)(w, paddle.to_tensor(_SCALE), paddle.to_tensor(_IDS))
        (g,) = paddle.grad(loss, [w], create_graph=True)
        (h,) = paddle.grad((g * paddle.to_tensor(vs[0])).sum(), [w])
    assert np.all(g.numpy()[padding_idx] == 0.0)
    assert np.all(h.numpy()[padding_idx] == 0.0)
    assert np.abs(h.numpy()).max() > 1e-6


def test_stock_embedding_has_no_double_gradient() -> None:
    vs = [np.ones_like(_TABLE), np.ones_like(_SCALE)]
    with pytest.raises((RuntimeError, OSError)):
        hvp_autograd(_loss(None), [_TABLE, _SCALE, _IDS], [0, 1], vs, exact=False)


@pytest.mark.parametrize("num_classes", [3, 5])
def test_one_hot_needs_no_gradient(num_classes) -> None:
    assert registry.rules()["one_hot"].status == registry.STOCK

    def f(x, labels):
        return (paddle.tanh(x) ** 2 * F.one_hot(labels, num_classes)).sum()

    labels = np.array([0, 2, 1, 2], dtype=np.int64)
    with exact_ops():
        assert F.one_hot(paddle.to_tensor(labels), num_classes).stop_gradient
    check_second_order(f, [_rng.standard_normal((4, num_classes)), labels])
