"""The first-order table: first-order learners run the listed kernels as Paddle's own, and stay exact as first order.

Each kernel of `STOCK_AT_FIRST_ORDER` is checked here against the exact rules (whose gradients the op tests check
against finite differences), in float64, with respect to every input; the exact rules themselves are checked in
the op tests. A first-order learner's query-loss graph is checked to hold no exact-rule PyLayer for them.
"""
from __future__ import annotations

import gc

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import _C_ops, nn

from paddlefsl.metaopt import MAML, SecondOrderError, exact_ops
from paddlefsl.metaopt.autodiff import audit, registry, scope
from paddlefsl.metaopt.autodiff.first_order import STOCK_AT_FIRST_ORDER

paddle.set_default_dtype("float64")
_rng = np.random.default_rng(3)


def _r(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape)


def _bn(training: bool, fmt: str = "NCHW", ugs=None, channels: int = 2):
    def f(x, w, b):
        mean, var = paddle.to_tensor(_RUNNING[0][:channels]), paddle.to_tensor(_RUNNING[1][:channels])
        return F.batch_norm(x, mean, var, w, b, training=training, data_format=fmt, use_global_stats=ugs)
    return f


_RUNNING = (_r(3), np.abs(_r(3)) + 0.5)

# name -> (kernel, f, arrays); each f's output is weighted by a fixed random tensor and summed.
CASES = {
    "conv2d": ("conv2d", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [_r(2, 3, 7, 7), _r(4, 3, 3, 3), _r(4)]),
    "conv2d_dilated_grouped": ("conv2d", lambda x, w: F.conv2d(x, w, dilation=2, groups=2, padding=[1, 2]),
                               [_r(2, 4, 8, 8), _r(4, 2, 3, 3)]),
    "conv2d_nhwc": ("conv2d", lambda x, w: F.conv2d(x, w, padding="SAME", data_format="NHWC"),
                    [_r(2, 5, 5, 3), _r(2, 3, 3, 3)]),
    "conv1d": ("conv2d", lambda x, w: F.conv1d(x, w, padding=1), [_r(2, 3, 9), _r(4, 3, 3)]),
    "depthwise_conv2d": ("depthwise_conv2d", lambda x, w: F.conv2d(x, w, groups=3, padding=1),
                         [_r(2, 3, 6, 6), _r(3, 1, 3, 3)]),
    "conv3d": ("conv3d", lambda x, w: F.conv3d(x, w, stride=[1, 2, 1]), [_r(1, 2, 4, 5, 4), _r(3, 2, 2, 3, 2)]),
    "conv2d_transpose": ("conv2d_transpose", lambda x, w: F.conv2d_transpose(x, w, stride=2, padding=1,
                                                                              output_padding=1),
                         [_r(2, 3, 4, 4), _r(3, 2, 3, 3)]),
    "depthwise_conv2d_transpose": ("depthwise_conv2d_transpose",
                                   lambda x, w: F.conv2d_transpose(x, w, stride=2, groups=2),
                                   [_r(1, 2, 3, 3), _r(2, 1, 3, 3)]),
    "conv3d_transpose": ("conv3d_transpose", lambda x, w: F.conv3d_transpose(x, w, stride=2),
                         [_r(1, 2, 2, 3, 2), _r(2, 3, 2, 2, 2)]),
    "relu": ("relu", F.relu, [_r(3, 4, 5)]),
    "max_pool": ("pool2d", lambda x: F.max_pool2d(x, 2), [_r(2, 3, 6, 6)]),
    "max_pool_padded_ceil": ("pool2d", lambda x: F.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True),
                             [_r(2, 2, 7, 6)]),
    "avg_pool_exclusive": ("pool2d", lambda x: F.avg_pool2d(x, 3, stride=2, padding=1), [_r(2, 2, 7, 7)]),
    "adaptive_avg_pool": ("pool2d", lambda x: F.adaptive_avg_pool2d(x, [2, 3]), [_r(2, 2, 5, 7)]),
    "max_pool_with_index": ("max_pool2d_with_index", lambda x: F.max_pool2d(x, 2, return_mask=True)[0],
                            [_r(2, 3, 6, 6)]),
    "adaptive_max_pool": ("max_pool2d_with_index", lambda x: F.adaptive_max_pool2d(x, [2, 2]), [_r(2, 2, 5, 5)]),
    "flatten": ("flatten", lambda x: paddle.flatten(x, 1, 2), [_r(2, 3, 4, 5)]),
    "batch_norm_train": ("batch_norm", _bn(True), [_r(4, 2, 3, 3), _r(2), _r(2)]),
    "batch_norm_train_nhwc": ("batch_norm", _bn(True, "NHWC", channels=3), [_r(3, 2, 2, 3), _r(3), _r(3)]),
    "batch_norm_train_global_stats": ("batch_norm", _bn(True, ugs=True), [_r(4, 2, 3, 3), _r(2), _r(2)]),
    "batch_norm_train_nc": ("batch_norm", _bn(True, "NC", channels=3), [_r(5, 3), _r(3), _r(3)]),
}


def _gradients(f, arrays, weights):
    ts = [paddle.to_tensor(a, stop_gradient=False) for a in arrays]
    out = f(*ts)
    return [g.numpy() for g in paddle.grad((out * paddle.to_tensor(weights)).sum(), ts)], out.numpy()


def test_every_listed_kernel_is_checked_here():
    assert {kernel for kernel, _, _ in CASES.values()} == set(STOCK_AT_FIRST_ORDER)


@pytest.mark.parametrize("case", sorted(CASES))
def test_stock_first_order_gradient_equals_the_exact_rule(case):
    kernel, f, arrays = CASES[case]
    weights = _r(*f(*[paddle.to_tensor(a) for a in arrays]).shape)
    with exact_ops():
        exact, _ = _gradients(f, arrays, weights)
        assert getattr(_C_ops, kernel) is not registry.original(kernel)
    lease = scope.Lease(first_order=True)
    try:
        if STOCK_AT_FIRST_ORDER[kernel] is None:
            assert getattr(_C_ops, kernel) is registry.original(kernel)
        else:  # float64 here: not a call the fast kernels take, so the stock kernel runs
            assert STOCK_AT_FIRST_ORDER[kernel](*_captured_args(f, arrays, kernel))
        stock, _ = _gradients(f, arrays, weights)
    finally:
        lease.release()
    for e, s in zip(exact, stock):
        np.testing.assert_allclose(s, e, rtol=1e-10, atol=1e-12)


def _captured_args(f, arrays, kernel):
    """The arguments ``f`` passes to ``paddle._C_ops.<kernel>`` (the first call)."""
    seen = []
    stock = registry.original(kernel)

    def spy(*args, **kwargs):
        seen.append(args)
        return stock(*args, **kwargs)

    saved = getattr(_C_ops, kernel)
    setattr(_C_ops, kernel, spy)
    try:
        f(*[paddle.to_tensor(a) for a in arrays])
    finally:
        setattr(_C_ops, kernel, saved)
    return seen[0]


def test_a_convolution_the_fast_kernels_take_keeps_its_rule_at_first_order():
    """With the fast kernels on, a float32 convolution of at least FIRST_ORDER_MIN_MACS multiply-adds goes through the
    rule (and oneDNN) at first order too; with them off, or below that (even above the kernels' own MIN_MACS, where
    the PyLayer costs more than oneDNN saves), through Paddle's own kernel."""
    from paddlefsl.metaopt import kernels
    from paddlefsl.metaopt.autodiff import first_order
    from paddlefsl.metaopt.kernels import onednn
    if not onednn.available():
        pytest.skip("oneDNN not loadable here")
    x = paddle.to_tensor(_r(8, 32, 32, 32).astype("float32"))        # 75 million multiply-adds
    w = paddle.to_tensor(_r(32, 32, 3, 3).astype("float32"), stop_gradient=False)
    middle = paddle.to_tensor(_r(1, 32, 32, 32).astype("float32"))   # 9.4 million: above MIN_MACS, below the other
    small = paddle.to_tensor(_r(1, 32, 4, 4).astype("float32"))
    assert kernels.MIN_MACS < 1 * 32 * 32 * 32 * 32 * 9 < first_order.FIRST_ORDER_MIN_MACS < 8 * 32 * 32 * 32 * 32 * 9
    previous = kernels.set_fast_kernels(True)
    lease = scope.Lease(first_order=True)
    try:
        big_node = audit._node(F.conv2d(x, w, padding=1)).name()
        middle_node = audit._node(F.conv2d(middle, w, padding=1)).name()
        small_node = audit._node(F.conv2d(small, w, padding=1)).name()
        kernels.set_fast_kernels(False)
        off_node = audit._node(F.conv2d(x, w, padding=1)).name()
    finally:
        lease.release()
        kernels.set_fast_kernels(previous)
    assert big_node.startswith("GradNodePyLayer"), big_node
    assert middle_node == small_node == off_node == "Conv2dGradNodeFinal", (middle_node, small_node, off_node)


@pytest.mark.parametrize("pool", [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1)])
def test_a_max_pooling_the_fast_kernels_take_keeps_its_rule_at_first_order(pool):
    """With the fast kernels on, a float32 NCHW max pooling of at least MIN_POOL_NUMEL elements goes through the rule
    (oneDNN) at first order, and its gradient equals Paddle's; float64, small, channel-last, ceil_mode and average
    pooling, or the fast kernels off, run Paddle's own kernel."""
    from paddlefsl.metaopt import kernels
    from paddlefsl.metaopt.kernels import onednn
    if not onednn.available():
        pytest.skip("oneDNN not loadable here")
    big = _r(4, 8, 32, 32)
    assert big.size >= kernels.MIN_POOL_NUMEL > 4 * 8 * 8 * 8
    weights = paddle.to_tensor(_r(*F.max_pool2d(paddle.to_tensor(big), **pool).shape).astype("float32"))

    def run(x):
        t = paddle.to_tensor(x, stop_gradient=False)
        y = F.max_pool2d(t, **pool)
        node = audit._node(y).name()
        (y * weights.astype(t.dtype)).sum().backward()
        return node, t.grad.numpy()

    previous = kernels.set_fast_kernels(True)
    lease = scope.Lease(first_order=True)
    try:
        fast_node, fast_grad = run(big.astype("float32"))
        others = [audit._node(f(paddle.to_tensor(x, stop_gradient=False))).name() for f, x in [
            (lambda t: F.max_pool2d(t, **pool), big),                                     # float64
            (lambda t: F.max_pool2d(t, **pool), _r(4, 8, 8, 8).astype("float32")),        # small
            (lambda t: F.max_pool2d(t, **pool, data_format="NHWC"), big.astype("float32")),
            (lambda t: F.max_pool2d(t, **pool, ceil_mode=True), big.astype("float32")),
            (lambda t: F.avg_pool2d(t, **pool), big.astype("float32"))]]
        kernels.set_fast_kernels(False)
        off_node, off_grad = run(big.astype("float32"))
    finally:
        lease.release()
        kernels.set_fast_kernels(previous)
    assert fast_node.startswith("GradNodePyLayer"), fast_node
    assert all(not n.startswith("GradNodePyLayer") for n in others + [off_node]), (others, off_node)
    np.testing.assert_allclose(fast_grad, off_grad, rtol=1e-6, atol=1e-6)  # overlapping windows: sum order


def test_batch_norm_in_eval_mode_with_batch_statistics_keeps_the_rule():
    """Stock Paddle's first-order gradient is wrong here (test_norm.py::test_stock_first_order_is_wrong)."""
    f, arrays = _bn(False, ugs=False), [_r(4, 2, 3, 3), _r(2), _r(2)]
    weights = _r(4, 2, 3, 3)
    stock, _ = _gradients(f, arrays, weights)
    with exact_ops():
        exact, _ = _gradients(f, arrays, weights)
    lease = scope.Lease(first_order=True)
    try:
        first, _ = _gradients(f, arrays, weights)
    finally:
        lease.release()
    assert not np.allclose(stock[0], exact[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(first[0], exact[0], rtol=1e-10, atol=1e-12)


def _conv4(seed: int = 0) -> nn.Layer:
    paddle.seed(seed)
    return nn.Sequential(nn.Conv2D(1, 4, 3, padding=1), nn.BatchNorm2D(4), nn.ReLU(), nn.MaxPool2D(2),
                         nn.Conv2D(4, 4, 3, padding=1), nn.BatchNorm2D(4), nn.ReLU(), nn.MaxPool2D(2),
                         nn.Flatten(), nn.Linear(16, 3))


def _task(seed: int = 1):
    rng = np.random.default_rng(seed)
    return (paddle.to_tensor(rng.standard_normal((6, 1, 8, 8))), paddle.to_tensor(np.arange(6) % 3),
            paddle.to_tensor(rng.standard_normal((6, 1, 8, 8))), paddle.to_tensor((np.arange(6) + 1) % 3))


def _node_names(loss: paddle.Tensor) -> list[str]:
    names, seen, todo = [], set(), [audit._node(loss)]
    while todo:
        node = todo.pop()
        if node is None or node.node_ptr() in seen:
            continue
        seen.add(node.node_ptr())
        names.append(node.name())
        todo.extend(node.next_functions)
    return names


def _query_loss(learner: MAML):
    xs, ys, xq, yq = _task()
    task = learner.clone()
    for _ in range(2):
        task.adapt(F.cross_entropy(task(xs), ys))
    return task, F.cross_entropy(task(xq), yq)


def test_first_order_graph_has_no_rule_for_the_listed_kernels():
    """The query loss of a first-order learner on conv / batch norm / ReLU / max-pool / flatten records Paddle's own
    grad nodes: the only PyLayers left are the loss's (the cross-entropy rule, whose stock gradient is wrong for
    some of its options, and the mean's), at the root of the graph. A
    second-order learner's graph of the same model holds the rules' PyLayers (so this test can tell them apart)."""
    task, loss = _query_loss(MAML(_conv4(), 0.1, first_order=True))
    names = _node_names(loss)
    assert {"Conv2dGradNodeFinal", "BatchNormGradNode", "ReluGradNode", "Pool2dGradNode", "FlattenGradNode"} \
        <= set(names), names
    assert [n for n in names if n.startswith("GradNodePyLayer")] == names[:2] == \
        ["GradNodePyLayer__LinearMap", "GradNodePyLayer__Slot"], names
    del task, loss
    task, loss = _query_loss(MAML(_conv4(), 0.1, first_order=False))
    pylayers = [n for n in _node_names(loss) if n.startswith("GradNodePyLayer")]
    assert len(pylayers) > 10 and "Conv2dGradNodeFinal" not in _node_names(loss)


def _meta_gradient(first_order_scope: bool) -> list[np.ndarray]:
    model = _conv4()
    learner = MAML(model, 0.1, first_order=True)
    if first_order_scope:
        task, loss = _query_loss(learner)
    else:
        with exact_ops():  # every rule installed while the task learner runs
            task, loss = _query_loss(learner)
            assert _C_ops.conv2d is not registry.original("conv2d")
    loss.backward()
    return [p.grad.numpy() for p in model.parameters() if not p.stop_gradient]


def test_first_order_meta_gradient_is_the_one_the_exact_rules_give():
    lean, full = _meta_gradient(True), _meta_gradient(False)
    assert len(lean) == len(full) == 10
    for a, b in zip(lean, full):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_a_second_order_step_on_a_first_order_task_learner_is_refused():
    xs, ys, _, _ = _task()
    task = MAML(_conv4(), 0.1, first_order=True).clone()
    with pytest.raises(ValueError, match=r"adapt step 1: first_order=False on a task learner of a first-order "
                                         r"learner.*build the learner with first_order=False"):
        task.adapt(F.cross_entropy(task(xs), ys), first_order=False)


def test_the_scope_installs_what_the_held_leases_need():
    stock_grad = paddle.grad
    first = scope.Lease(first_order=True)
    try:
        assert scope.is_active()
        assert _C_ops.relu is registry.original("relu")                      # listed: stock
        assert _C_ops.conv2d is not registry.rules()["conv2d"].replacement   # listed with a predicate: chooser
        assert _C_ops.lgamma is registry.original("lgamma")                  # no rule: stock, unguarded
        assert _C_ops.layer_norm is registry.rules()["layer_norm"].replacement  # stock first order wrong: rule
        assert paddle.grad is scope.audited_grad
        second = scope.Lease()
        assert _C_ops.conv2d is registry.rules()["conv2d"].replacement
        assert _C_ops.lgamma is not registry.original("lgamma")              # guarded
        second.release()
        assert _C_ops.relu is registry.original("relu") and paddle.grad is scope.audited_grad
    finally:
        first.release()
    gc.collect()
    if not scope.is_active():
        assert paddle.grad is stock_grad and _C_ops.layer_norm is registry.original("layer_norm")


def test_create_graph_through_a_first_order_graph_is_refused_by_the_audit():
    x = paddle.to_tensor(_r(2, 3, 5, 5), stop_gradient=False)
    w = paddle.to_tensor(_r(2, 3, 3, 3), stop_gradient=False)
    lease = scope.Lease(first_order=True)
    try:
        loss = F.conv2d(x, w).square().sum()
        with pytest.raises(SecondOrderError, match="Conv2dGradNode"):
            paddle.grad(loss, [w], create_graph=True)
    finally:
        lease.release()
