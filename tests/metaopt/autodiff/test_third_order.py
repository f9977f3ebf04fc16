"""Third order through a Linear -> ReLU -> Linear -> cross-entropy stack: d/dw of a Hessian-vector product."""
import numpy as np
import paddle
import paddle.nn.functional as F

from paddlefsl.metaopt import exact_ops

RNG = np.random.default_rng(0)
X = RNG.standard_normal((6, 4))
Y = np.arange(6) % 3
W1, W2 = RNG.standard_normal((4, 5)), RNG.standard_normal((5, 3))
V1, V2 = RNG.standard_normal((4, 5)), RNG.standard_normal((5, 3))
U1 = RNG.standard_normal((4, 5))


def _loss(w1, w2):
    h = F.relu(F.linear(paddle.to_tensor(X), w1))
    return F.cross_entropy(F.linear(h, w2), paddle.to_tensor(Y))


def _hvp_dot(w1_value, create_graph):
    """<u, H v> with H the Hessian of the loss in (w1, w2); differentiable in w1 when create_graph."""
    w1 = paddle.to_tensor(w1_value, stop_gradient=False)
    w2 = paddle.to_tensor(W2, stop_gradient=False)
    g1, g2 = paddle.grad(_loss(w1, w2), [w1, w2], create_graph=True)
    inner = (g1 * paddle.to_tensor(V1)).sum() + (g2 * paddle.to_tensor(V2)).sum()
    h1, = paddle.grad(inner, [w1], create_graph=create_graph)
    return (h1 * paddle.to_tensor(U1)).sum(), w1


def test_third_order_matches_finite_differences_of_the_second_order():
    with exact_ops():
        value, w1 = _hvp_dot(W1, create_graph=True)
        third, = paddle.grad(value, [w1])
        numeric = np.zeros_like(W1)
        eps = 1e-6
        for idx in np.ndindex(W1.shape):
            plus, minus = W1.copy(), W1.copy()
            plus[idx] += eps
            minus[idx] -= eps
            numeric[idx] = (_hvp_dot(plus, False)[0].item() - _hvp_dot(minus, False)[0].item()) / (2 * eps)
    assert np.abs(numeric).max() > 1e-3
    np.testing.assert_allclose(third.numpy(), numeric, rtol=1e-5, atol=1e-8)
