"""The exact scope leaves Paddle exactly as stock once no task learner is alive."""
import gc

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import _C_ops, _legacy_C_ops, nn
from paddle.base import core

from paddlefsl.metaopt import MAML, exact_ops
from paddlefsl.metaopt.autodiff import is_active, registry


def _public_functions():
    spaces = {"_C_ops": _C_ops, "_legacy_C_ops": _legacy_C_ops, "F": F, "paddle": paddle, "Tensor": paddle.Tensor,
              "autograd": paddle.autograd}
    functions = {(space, name): getattr(obj, name) for space, obj in spaces.items() for name in dir(obj)
                 if not name.startswith("__") and callable(getattr(obj, name, None))}
    operators = {("Tensor", name): getattr(paddle.Tensor, name) for name in dir(paddle.Tensor)
                 if (name.startswith("__") or name == "backward") and callable(getattr(paddle.Tensor, name, None))}
    return {**functions, **operators}


def _flags():
    flags = core.globals()
    values = {}
    for key in flags.keys():
        try:
            values[key] = flags[key]
        except Exception:  # some registered flags are not readable from Python
            continue
    prim = (core._is_eager_prim_enabled(), core._is_fwd_prim_enabled(), core._is_bwd_prim_enabled())
    return values, prim, paddle.is_grad_enabled(), paddle.get_default_dtype()


def _conv_hvp():
    """Stock second derivative through conv2d (which stock Paddle gets silently wrong) as a fingerprint."""
    x = paddle.to_tensor(np.linspace(-1, 1, 36).reshape(1, 1, 6, 6))
    w = paddle.to_tensor(np.linspace(-1, 1, 9).reshape(1, 1, 3, 3), stop_gradient=False)
    g, = paddle.grad(F.conv2d(x, w).tanh().sum(), w, create_graph=True)
    h, = paddle.grad(g.square().sum(), w, allow_unused=True)
    return np.zeros(w.shape) if h is None else h.numpy()


def _conv_model():
    paddle.seed(0)
    return nn.Sequential(nn.Conv2D(1, 2, 3), nn.BatchNorm2D(2), nn.ReLU(), nn.MaxPool2D(2), nn.Dropout(0.3),
                         nn.Flatten(), nn.Linear(8, 3))


def _run_learner(model, first_order=False):
    x, y = paddle.randn([6, 1, 6, 6]), paddle.to_tensor(np.arange(6) % 3)
    task = MAML(model, 0.1, first_order=first_order).clone()
    task.adapt(F.cross_entropy(task(x), y))
    F.cross_entropy(task(x), y).backward()


def test_everything_is_stock_again_after_a_learner_runs():
    functions, flags, hvp = _public_functions(), _flags(), _conv_hvp()
    _run_learner(_conv_model())
    gc.collect()
    assert not is_active()
    assert _public_functions() == functions
    assert _flags() == flags
    np.testing.assert_array_equal(_conv_hvp(), hvp)


def test_the_stock_fingerprint_differs_inside_the_scope():
    stock = _conv_hvp()
    with exact_ops():
        exact = _conv_hvp()
    assert not np.allclose(stock, exact)


def test_stock_again_after_an_error_inside_the_scope():
    functions = _public_functions()
    with pytest.raises(RuntimeError, match="boom"):
        with exact_ops():
            raise RuntimeError("boom")
    assert not is_active() and _public_functions() == functions


def test_every_door_is_patched_inside_the_scope():
    stock = _public_functions()
    with exact_ops():
        inside = _public_functions()
    changed = {key for key in stock if inside[key] is not stock[key]}
    assert {("_C_ops", "conv2d"), ("_legacy_C_ops", "relu"), ("_legacy_C_ops", "elementwise_add"),
            ("paddle", "grad"), ("autograd", "grad"), ("Tensor", "__pow__"), ("Tensor", "__rpow__"),
            ("Tensor", "backward")} <= changed


def test_nested_scopes_release_only_at_the_outermost():
    with exact_ops():
        with exact_ops():
            assert is_active()
        assert is_active() and _C_ops.conv2d is not registry.original("conv2d")
    assert not is_active() and _C_ops.conv2d is registry.original("conv2d")


@pytest.mark.parametrize("first_order", [False, True])
def test_rng_stream_advances_as_in_stock_paddle(first_order):
    x, y = paddle.randn([6, 1, 6, 6]), paddle.to_tensor(np.arange(6) % 3)
    model = _conv_model()
    paddle.seed(123)
    stock_outputs = [model(x).numpy(), model(x).numpy()]  # the same forwards, plain Paddle
    stock_next = paddle.rand([4]).numpy()
    paddle.seed(123)
    task = MAML(model, 0.1, first_order=first_order).clone()
    support = task(x)
    task.adapt(F.cross_entropy(support, y))
    query = task(x)
    F.cross_entropy(query, y).backward()
    np.testing.assert_array_equal(paddle.rand([4]).numpy(), stock_next)
    np.testing.assert_allclose(support.numpy(), stock_outputs[0], rtol=1e-12)


def test_a_lease_collected_after_interpreter_shutdown_cleared_the_module_is_silent(monkeypatch):
    """At exit Python may clear this module's globals before the last task learner goes; __del__ must not raise."""
    from paddlefsl.metaopt.autodiff import scope

    lease = scope.Lease()
    try:
        monkeypatch.setattr(scope, "_lock", None)
        lease.__del__()  # raised TypeError: 'NoneType' object does not support the context manager protocol
        assert lease._held
    finally:
        monkeypatch.undo()
        lease.release()
    assert not scope.is_active()
