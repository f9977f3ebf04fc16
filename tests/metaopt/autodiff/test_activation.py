"""Second-order checks of the activation family: stock entries and exact rules against finite differences."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import _C_ops

from paddlefsl.metaopt.autodiff import exact_ops, registry
from tests.opcheck import check_second_order, hvp_autograd

paddle.set_default_dtype("float64")
_rng = np.random.default_rng(3)


def _r(*shape: int) -> np.ndarray:
    return 1.5 * _rng.standard_normal(shape)


def _wide(*shape: int) -> np.ndarray:
    """Values spread over the kinks of piecewise activations (relu6 at 6, hardswish at +-3), none near a kink."""
    base = np.array([-4.1, -2.2, -0.7, 0.4, 1.3, 2.6, 3.7, 5.2, 6.9])
    return np.resize(base, shape) + 0.05 * _rng.standard_normal(shape)


# name -> (kernel, f, arrays); each f is nonlinear after the activation and feeds it x * y so both are inputs.
CASES: dict[str, tuple[str, Callable, list[np.ndarray]]] = {
    "relu": ("relu", lambda x, y: (F.relu(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "tanh": ("tanh", lambda x, y: (paddle.tanh(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "sigmoid": ("sigmoid", lambda x, y: (F.sigmoid(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "exp": ("exp", lambda x, y: (paddle.exp(x * y) ** 2).sum(), [_r(2, 4) / 2, _r(2, 4) / 2]),
    "leaky_relu": ("leaky_relu", lambda x, y: (F.leaky_relu(x * y, 0.1) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "elu": ("elu", lambda x, y: (F.elu(x * y, 0.7) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "celu": ("celu", lambda x, y: (F.celu(x * y, 0.7) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "selu": ("selu", lambda x, y: (F.selu(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "silu": ("silu", lambda x, y: (F.silu(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "swish": ("swish", lambda x, y: (F.swish(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "softplus": ("softplus", lambda x, y: (F.softplus(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "softplus_beta": ("softplus", lambda x, y: (F.softplus(x * y, beta=2.0, threshold=3.0) ** 3).sum(),
                      [_r(2, 4), _r(2, 4)]),
    "logsigmoid": ("logsigmoid", lambda x, y: (F.log_sigmoid(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "hardswish": ("hardswish", lambda x, y: (F.hardswish(x * y) ** 3).sum(), [_wide(2, 9), np.ones((2, 9))]),
    "hardsigmoid": ("hardsigmoid", lambda x, y: (F.hardsigmoid(x * y) ** 3).sum(), [_wide(2, 9), np.ones((2, 9))]),
    "hardtanh": ("hardtanh", lambda x, y: (F.hardtanh(x * y) ** 3).sum(), [_wide(2, 9) / 3, np.ones((2, 9))]),
    "relu6": ("relu6", lambda x, y: (F.relu6(x * y) ** 3).sum(), [_wide(2, 9), np.ones((2, 9))]),
    "mish": ("mish", lambda x, y: (F.mish(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "tanh_shrink": ("tanh_shrink", lambda x, y: (F.tanhshrink(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "erf": ("erf", lambda x, y: (paddle.erf(x * y) ** 3).sum(), [_r(2, 4) / 2, _r(2, 4) / 2]),
    "gelu": ("gelu", lambda x, y: (F.gelu(x * y) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "gelu_tanh": ("gelu", lambda x, y: (F.gelu(x * y, approximate=True) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "softmax": ("softmax", lambda x, y: (F.softmax(x * y, axis=-1) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
    "softmax_axis0": ("softmax", lambda x, y: (F.softmax(x * y, axis=0) ** 3 * paddle.arange(8.0).reshape([2, 4])).sum(),
                      [_r(2, 4), _r(2, 4)]),
    "log_softmax": ("log_softmax", lambda x, y: (F.log_softmax(x * y, axis=-1) ** 3).sum(), [_r(2, 4), _r(2, 4)]),
}


@contextlib.contextmanager
def _counting(name: str) -> Iterator[list[int]]:
    count = [0]
    saved = getattr(_C_ops, name)

    def counted(*args, **kwargs):
        count[0] += 1
        return saved(*args, **kwargs)

    setattr(_C_ops, name, counted)
    try:
        yield count
    finally:
        setattr(_C_ops, name, saved)


@pytest.mark.parametrize("case", sorted(CASES))
def test_second_order_matches_finite_differences(case: str) -> None:
    kernel, f, arrays = CASES[case]
    assert kernel in registry.rules(), f"{kernel} is neither stock nor exact"
    with exact_ops(), _counting(kernel) as count:
        f(*[paddle.to_tensor(a) for a in arrays])
    assert count[0] > 0, f"case {case} never reached kernel {kernel}"
    check_second_order(f, arrays, wrt=[0])


def _exact_cases() -> list[str]:
    rules = registry.rules()
    return sorted(c for c, (k, _, _) in CASES.items() if rules[k].status == registry.EXACT)


def _loss_and_grad(f: Callable, arrays: list[np.ndarray]) -> tuple[float, np.ndarray]:
    ts = [paddle.to_tensor(a) for a in arrays]
    ts[0].stop_gradient = False
    loss = f(*ts)
    (g,) = paddle.grad(loss, [ts[0]])
    return float(loss), g.numpy()


@pytest.mark.parametrize("case", _exact_cases())
def test_exact_rule_forward_and_first_order_equal_stock(case: str) -> None:
    _, f, arrays = CASES[case]
    want = _loss_and_grad(f, arrays)
    with exact_ops():
        got = _loss_and_grad(f, arrays)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", [c for c in _exact_cases() if c != "relu"])
def test_stock_paddle_fails_where_a_rule_is_registered(case: str) -> None:
    _, f, arrays = CASES[case]
    v = [np.ones(arrays[0].shape)]
    try:
        stock_hvp = hvp_autograd(f, arrays, [0], v, exact=False)
    except (RuntimeError, OSError):
        return
    exact_hvp = hvp_autograd(f, arrays, [0], v, exact=True)
    assert not np.allclose(stock_hvp[0], exact_hvp[0], rtol=1e-6), f"stock {case} is right: declare it stock"


@pytest.mark.parametrize("approximate", [False, True, "tanh", "none"])
def test_gelu_approximate_spellings(approximate) -> None:
    x = paddle.to_tensor(_r(3, 4))
    want = _C_ops.gelu(x, approximate)
    with exact_ops():
        got = _C_ops.gelu(x, approximate)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-15)


def test_every_activation_rule_has_a_case() -> None:
    covered = {k for k, _, _ in CASES.values()}
    mine = {n for n, r in registry.rules().items() if r.family == "activation"}
    assert mine - covered == set()


def test_stock_relu_raises_at_third_order() -> None:
    x = paddle.to_tensor(_r(2, 4), stop_gradient=False)
    (g,) = paddle.grad((F.relu(x) ** 3).sum(), [x], create_graph=True)
    with pytest.raises((RuntimeError, OSError), match="relu_double_grad"):
        (h,) = paddle.grad(g.sum(), [x], create_graph=True)
        paddle.grad(h.sum(), [x])


@pytest.mark.parametrize("case", ["relu", "gelu", "gelu_tanh", "softmax", "log_softmax", "swish", "selu", "mish", "erf",
                                  "logsigmoid", "tanh_shrink", "hardswish"])
def test_exact_rules_are_exact_at_third_order(case: str) -> None:
    from tests.metaopt.autodiff.test_tensor import check_third_order

    _, f, arrays = CASES[case]
    check_third_order(f, arrays)


def test_relu_backward_is_one_kernel_at_every_order() -> None:
    """relu's gradient (and the gradient of that) is one stock relu_grad kernel, not a mask built from
    comparisons, a logical and and a cast, then multiplied."""
    from tests.opcheck import kernel_calls
    x = paddle.to_tensor(_r(3, 4), stop_gradient=False)
    with exact_ops():
        y = F.relu(x)
        with kernel_calls() as calls:
            (g,) = paddle.grad((y ** 3).sum(), [x], create_graph=True)
            (gg,) = paddle.grad((g * g).sum(), [x])
    assert calls == {"relu_grad": 3}, calls  # first backward, and its own backward taken twice (g * g)
    mask = (x.numpy() > 0).astype(np.float64)
    np.testing.assert_allclose(g.numpy(), 3 * np.maximum(x.numpy(), 0) ** 2 * mask, rtol=1e-12)
    np.testing.assert_allclose(gg.numpy(), 36 * np.maximum(x.numpy(), 0) ** 3 * mask, rtol=1e-12)


@pytest.mark.parametrize("op", ["softmax", "log_softmax", "reciprocal", "p_norm"])
def test_a_rule_output_is_freed_when_dropped(op):
    """A PyLayer that saved its own output kept it alive forever (a cycle through Paddle's C++ graph): the FewRel
    example's test loop grew by about 27 MB per episode through softmax."""
    import gc
    import weakref

    calls = {"softmax": lambda x: F.softmax(x, axis=-1), "log_softmax": lambda x: F.log_softmax(x, axis=-1),
             "reciprocal": paddle.reciprocal, "p_norm": lambda x: paddle.linalg.norm(x, p=3, axis=-1)}
    x = paddle.to_tensor(np.random.default_rng(0).uniform(0.5, 1.5, (4, 5)))
    x.stop_gradient = False
    with exact_ops():
        y = calls[op](x)
        ref = weakref.ref(y)
        del y
        gc.collect()
        assert ref() is None
