"""Dropout in the exact scope: second order vs finite differences, forward and RNG-stream parity with stock."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlefsl.metaopt.autodiff import exact_ops
from tests.opcheck import check_second_order, hvp_autograd

paddle.set_default_dtype("float64")
_rng = np.random.default_rng(5)
_X = _rng.standard_normal((3, 5))
_Y = _rng.standard_normal((3, 5))

MODES = ["upscale_in_train", "downscale_in_infer"]


def _loss(p: float, training: bool, mode: str, axis=None):
    def f(x, y):
        paddle.seed(1234)  # the same mask at every evaluation, so finite differences are meaningful
        return (F.dropout(x * y, p, axis=axis, training=training, mode=mode) ** 3).sum()
    return f


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p", [0.3, 0.7])
def test_dropout_second_order_matches_finite_differences(mode, training, p) -> None:
    check_second_order(_loss(p, training, mode), [_X, _Y])


@pytest.mark.parametrize("mode", MODES)
def test_dropout_along_an_axis_second_order(mode) -> None:
    check_second_order(_loss(0.5, True, mode, axis=1), [_X, _Y])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("p", [0.1, 0.5, 1.0])
def test_dropout_output_and_rng_stream_equal_stock(mode, training, p) -> None:
    def run():
        x = paddle.to_tensor(_X, stop_gradient=False)
        paddle.seed(77)
        out = F.dropout(x, p, training=training, mode=mode)
        after = paddle.rand([4])
        (g,) = paddle.grad(out.sum() * 2.0, [x])
        return out.numpy(), after.numpy(), g.numpy()

    want = run()
    with exact_ops():
        got = run()
    np.testing.assert_allclose(got[0], want[0], rtol=1e-14, atol=0)  # the same mask (x * factor may round by 1 ulp)
    np.testing.assert_array_equal(got[0] == 0, want[0] == 0)
    np.testing.assert_array_equal(got[1], want[1])  # the random stream advanced exactly as in stock Paddle
    np.testing.assert_allclose(got[2], want[2], rtol=1e-14, atol=0)


def test_dropout_layer_in_train_mode_repeats_under_a_seed_and_differs_across_calls() -> None:
    layer = paddle.nn.Dropout(0.5)
    layer.train()
    x = paddle.to_tensor(np.ones((4, 6)), stop_gradient=False)
    with exact_ops():
        paddle.seed(3)
        a, b = layer(x).numpy(), layer(x).numpy()
        paddle.seed(3)
        c = layer(x).numpy()
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a, b)
    assert set(np.unique(a)) <= {0.0, 2.0}


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_call_records_an_op_in_scope(training) -> None:
    with exact_ops():
        x = paddle.to_tensor(_X, stop_gradient=False)
        out = F.dropout(x, 0.4, training=training, mode="downscale_in_infer")
        assert not out.stop_gradient
        (g,) = paddle.grad((out ** 2).sum(), [x], create_graph=True)
        (h,) = paddle.grad(g.sum(), [x])
    factor = np.float32(1.0 - np.float32(0.4)) if not training else None
    if factor is not None:
        np.testing.assert_allclose(h.numpy(), np.full(_X.shape, 2.0 * float(factor) ** 2), rtol=1e-12)
    else:
        assert np.abs(h.numpy()).max() > 0


def test_stock_dropout_has_no_double_gradient() -> None:
    vs = [np.ones_like(_X), np.ones_like(_Y)]
    with pytest.raises((RuntimeError, OSError)):
        hvp_autograd(_loss(0.3, True, "upscale_in_train"), [_X, _Y], [0, 1], vs, exact=False)
