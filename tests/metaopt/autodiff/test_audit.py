"""The graph audit and the doors into Paddle's kernels (issue 18): every kernel reached while a task learner is alive is
exact, verified stock, or refused, whichever door it came through; third order through stock kernels is exact or
refused."""
from __future__ import annotations

import gc

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import _legacy_C_ops, nn
from paddle.autograd import PyLayer

from paddlefsl.metaopt import MAML, exact_ops
from paddlefsl.metaopt.autodiff import audit, registry, scope
from paddlefsl.metaopt.errors import SecondOrderError
from tests.metaopt.models import assert_meta_gradient_exact, maml_query_loss
from tests.opcheck import check_third_order


def _task(shape, seed=0):
    rng = np.random.default_rng(seed)
    return paddle.to_tensor(rng.standard_normal(shape)), paddle.to_tensor(np.arange(shape[0]) % 3)


def _meta_loss(model, x, y, first_order=False):
    return maml_query_loss(model, x, y, first_order, lr=0.3)


# ------------------------------------------------------------------------------------ legacy door: _legacy_C_ops
class LegacyBatchNormNet(nn.Layer):
    """Conv -> legacy nn.BatchNorm(act="relu") (activation through paddle._legacy_C_ops) -> Linear."""

    def __init__(self, act="relu"):
        super().__init__()
        self.conv = nn.Conv2D(1, 4, 3)
        self.norm = nn.BatchNorm(4, act=act)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).flatten(1))


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_legacy_batch_norm_activation_is_exact(act):
    paddle.seed(0)
    model = LegacyBatchNormNet(act)
    model.to(dtype="float64")  # legacy BatchNorm makes float32 statistics whatever the default dtype
    x, y = _task((12, 1, 6, 6))
    assert_meta_gradient_exact(model, x, y, 0.3, ["head.bias", "norm.weight", "conv.weight"])


class ScaleActNet(nn.Layer):
    """paddle.scale(..., act=...) appends its activation through paddle._legacy_C_ops."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(paddle.scale(self.fc1(x), 1.5, 0.1, act="tanh"))


class LegacyBiasNet(nn.Layer):
    """The legacy bias add (paddle._legacy_C_ops.elementwise_add with an axis)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5, bias_attr=False), nn.Linear(5, 3)
        self.bias = self.create_parameter([5], is_bias=True)

    def forward(self, x):
        from paddle.nn.utils.dygraph_utils import _append_bias_in_dygraph
        return self.fc2(paddle.tanh(_append_bias_in_dygraph(self.fc1(x), self.bias, axis=1)))


@pytest.mark.parametrize("build", [ScaleActNet, LegacyBiasNet], ids=["scale_act", "legacy_bias"])
def test_legacy_entrances_are_exact(build):
    paddle.seed(0)
    model = build()
    x, y = _task((6, 4))
    names = [n for n, _ in model.named_parameters()][:2]
    assert_meta_gradient_exact(model, x, y, 0.3, names)


class LegacyMaxNet(nn.Layer):
    """A legacy kernel with no exact rule: guarded, so a second-order adapt refuses it by name and layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return _legacy_C_ops.elementwise_max(h, paddle.zeros_like(h), "axis", -1)


def test_guarded_legacy_kernel_is_refused_by_name_and_layer():
    paddle.seed(0)
    x, y = _task((6, 4))
    with pytest.raises(SecondOrderError, match=r"elementwise_max \(paddle._legacy_C_ops\).*'fc'|"
                                               r"elementwise_max \(paddle._legacy_C_ops\).*LegacyMaxNet"):
        _meta_loss(LegacyMaxNet(), x, y)
    _meta_loss(LegacyMaxNet(), x, y, first_order=True).backward()  # first order is Paddle's own, and allowed


# ---------------------------------------------------------------------------------- what no guard knows: the audit
class UnguardedLegacyRelu(nn.Layer):
    """Calls the stock legacy relu object directly, as a door paddlefsl does not patch would."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(scope._LEGACY["relu"](self.fc1(x)))


def test_audit_refuses_a_node_no_door_guards():
    paddle.seed(0)
    x, y = _task((6, 4))
    with pytest.raises(SecondOrderError) as info:
        _meta_loss(UnguardedLegacyRelu(), x, y)
    message = str(info.value)
    assert "'relu'" in message and "reluGradNodeCompat" in message and "paddle._legacy_C_ops" in message
    assert "'fc2'" not in message and "first_order=True" in message


class _Twice(PyLayer):
    """A user PyLayer whose backward uses no differentiable op: its second derivative would be silently lost."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensor()
        with paddle.no_grad():
            return 2 * x * grad


class UserPyLayerNet(nn.Layer):
    def __init__(self, layer):
        super().__init__()
        self.fc1, self.fc2, self.layer = nn.Linear(4, 5), nn.Linear(5, 3), layer

    def forward(self, x):
        return self.fc2(self.layer.apply(self.fc1(x)))


def test_audit_refuses_an_unknown_pylayer_and_accepts_a_declared_one():
    paddle.seed(0)
    x, y = _task((6, 4))
    with pytest.raises(SecondOrderError, match="GradNodePyLayer__Twice.*exact_pylayer"):
        _meta_loss(UserPyLayerNet(_Twice), x, y)

    class Square(PyLayer):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensor()
            return 2 * x * grad

    audit.exact_pylayer(Square)
    paddle.seed(0)
    assert_meta_gradient_exact(UserPyLayerNet(Square), x, y, 0.3, ["fc1.weight", "fc1.bias"])


def test_exact_pylayer_rejects_what_is_not_a_pylayer():
    with pytest.raises(TypeError, match="PyLayer subclass"):
        audit.exact_pylayer(nn.Linear)


def test_audit_only_checks_paths_to_the_inputs():
    """A node that does not lead to the inputs is never differentiated, so it does not matter."""
    w = paddle.to_tensor(np.ones(3), stop_gradient=False)
    other = paddle.to_tensor(np.ones(3), stop_gradient=False)
    with exact_ops():
        loss = (w * w).sum() + scope._LEGACY["relu"](other).sum()
        (g,) = paddle.grad(loss, [w], create_graph=True)
        with pytest.raises(SecondOrderError, match="reluGradNodeCompat"):
            paddle.grad(loss, [w, other], create_graph=True)
    np.testing.assert_allclose(g.numpy(), 2 * np.ones(3))


def test_node_op_parses_the_doors():
    assert audit.node_op("SquareDoubleGradNode") == ("square", 2, "paddle._C_ops")
    assert audit.node_op("reluGradNodeCompat") == ("relu", 1, "paddle._legacy_C_ops")
    assert audit.node_op("GradNodePyLayer_Cube") == ("Cube", 1, "PyLayer")
    assert audit.node_op("BatchNormGradNode") == ("batch_norm", 1, "paddle._C_ops")
    assert audit.node_op("Conv2dGradNodeFinal") == ("conv2d", 1, "paddle._C_ops")


def test_differentiable_nodes_follow_the_verified_orders():
    nodes = audit.differentiable_nodes()
    assert "MatmulGradNode" in nodes and "MatmulDoubleGradNode" in nodes and "MatmulTripleGradNode" not in nodes
    assert "SqrtGradNode" in nodes and "SqrtDoubleGradNode" not in nodes
    assert "Conv2dGradNode" not in nodes and "BatchNormGradNode" not in nodes  # stock: silently first order
    assert "GradNodePyLayer__Tripwire" not in nodes
    assert all(registry.verified_orders()[k] >= 2 for k in ("add", "multiply", "matmul"))


# ------------------------------------------------------------------------------------ door: C++ Tensor operators
class OperatorNet(nn.Layer):
    """``x ** y`` with a tensor exponent, ``c ** x`` and ``x / c``: Tensor operators bound in C++."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = F.sigmoid(self.fc1(x)) + 0.5
        return self.fc2(h ** (h / 2) + 2.0 ** (h / 3))


def test_tensor_operators_are_exact():
    paddle.seed(0)
    x, y = _task((6, 4))
    assert_meta_gradient_exact(OperatorNet(), x, y, 0.3, ["fc1.weight", "fc1.bias"])


def test_stock_tensor_power_is_restored():
    gc.collect()  # task learners of earlier tests, kept alive by their tracebacks, release their leases
    assert not scope.is_active()
    stock = paddle.Tensor.__pow__, paddle.Tensor.__rpow__, paddle.grad, _legacy_C_ops.relu
    with exact_ops():
        assert paddle.Tensor.__pow__ is not stock[0] and _legacy_C_ops.relu is not stock[3]
        assert paddle.grad is scope.audited_grad and paddle.autograd.grad is scope.audited_grad
    assert (paddle.Tensor.__pow__, paddle.Tensor.__rpow__, paddle.grad, _legacy_C_ops.relu) == stock


# ------------------------------------------------------------------------------------------------ third order
_THIRD = {
    "pow": lambda x: (x ** 3).sum(),
    "multiply": lambda x: (x * x * x).sum(),
    "add_subtract": lambda x: ((x + 0.5) * (x - 0.25) * x).sum(),
    "sum": lambda x: (x.sum(axis=0) ** 3).sum(),
    "reshape": lambda x: (paddle.reshape(x, [-1]) ** 3).sum(),
    "squeeze": lambda x: (paddle.squeeze(paddle.reshape(x, [1, 2, 3])) ** 3).sum(),
    "stack": lambda x: (paddle.stack([x, 2 * x]) ** 3).sum(),
    "slice": lambda x: (x[1:] ** 3).sum(),
    "gather_nd": lambda x: (paddle.gather_nd(x, paddle.to_tensor([[0, 1], [1, 2]])) ** 3).sum(),
    "where": lambda x: paddle.where(x > 0, x ** 3, x ** 4).sum(),
    "matmul": lambda x: (paddle.matmul(x, x, transpose_y=True) ** 2).sum(),
    "tanh": lambda x: paddle.tanh(x).sum(),
    "sigmoid": lambda x: F.sigmoid(x).sum(),
    "square": lambda x: paddle.square(x * x).sum(),
    "mse_loss": lambda x: F.mse_loss(x * x, paddle.zeros_like(x)),
}


@pytest.mark.parametrize("case", list(_THIRD))
def test_stock_kernels_verified_at_third_order(case):
    check_third_order(_THIRD[case], [np.random.default_rng(1).uniform(0.3, 1.2, (2, 3))])


@pytest.mark.parametrize("name", ["sqrt", "log", "rsqrt", "transpose"])
def test_third_order_through_a_kernel_verified_at_second_order_raises(name):
    op = {"transpose": lambda t: paddle.transpose(t, [1, 0]) ** 3}.get(name, getattr(paddle, name))
    x = paddle.to_tensor(np.random.default_rng(0).uniform(0.5, 1.5, (2, 3)), stop_gradient=False)
    with exact_ops():
        (g,) = paddle.grad(op(x).sum(), [x], create_graph=True)
        (h,) = paddle.grad((g * g).sum(), [x])  # second order: verified
        assert np.abs(h.numpy()).max() > 0
        with pytest.raises(SecondOrderError, match=rf"'{name}'.*third-order"):
            paddle.grad((g * g).sum(), [x], create_graph=True)


def _mlp():
    paddle.seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))


def test_maml_third_order_with_mse_matches_finite_differences():
    """The issue's case: MAML on an MLP with F.mse_loss, then the gradient of the meta-gradient (third order)."""
    rng = np.random.default_rng(0)
    xs, xq = paddle.to_tensor(rng.standard_normal((8, 3))), paddle.to_tensor(rng.standard_normal((8, 3)))
    ys, yq = paddle.to_tensor(rng.standard_normal((8, 2))), paddle.to_tensor(rng.standard_normal((8, 2)))
    model = _mlp()
    params = list(model.parameters())
    vs = [paddle.to_tensor(rng.standard_normal(p.shape)) for p in params]

    def directional(create_graph):
        task = MAML(model, 0.1).clone()
        task.adapt(F.mse_loss(task(xs), ys))
        grads = paddle.grad(F.mse_loss(task(xq), yq), params, create_graph=create_graph)
        return sum((g * v).sum() for g, v in zip(grads, vs))

    value = directional(True)
    third = paddle.grad(value, [params[0]])[0].numpy()
    p, base = params[0], params[0].numpy().copy()
    for index in [(0, 0), (1, 2), (2, 5)]:
        estimates = []
        for eps in (1e-5, 1e-6):
            vals = []
            for sign in (1.0, -1.0):
                shifted = base.copy()
                shifted[index] += sign * eps
                p.set_value(shifted)
                vals.append(float(directional(False)))
            p.set_value(base)
            estimates.append((vals[0] - vals[1]) / (2 * eps))
        scale = max(abs(e) for e in estimates) + 1e-9
        assert any(abs(third[index] - e) <= 1e-5 * scale for e in estimates), (index, third[index], estimates)


def test_maml_third_order_through_an_unverified_kernel_raises_our_error():
    """Third order through a kernel verified only at second order: SecondOrderError, not Paddle's raw error."""
    rng = np.random.default_rng(0)
    x, y = paddle.to_tensor(rng.uniform(0.5, 1.5, (8, 3))), paddle.to_tensor(rng.standard_normal((8, 2)))
    paddle.seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Softplus(), nn.Linear(6, 2))
    task = MAML(model, 0.1).clone()
    task.adapt(F.mse_loss(task(x), y))
    query = F.mse_loss(task(x), y)
    paddle.grad(query, list(model.parameters()), retain_graph=True)  # the meta-gradient (second order): fine
    with pytest.raises(SecondOrderError, match="'softplus'.*earlier create_graph=True gradient.*third-order"):
        paddle.grad(query, list(model.parameters()), create_graph=True)


# ------------------------------------------------------------------------------------------- once per graph key
def test_the_audit_walks_each_graph_key_once_and_then_leaks_nothing(monkeypatch):
    """Paddle 3.3 keeps every grad node Python has seen alive: the audit walks the first graph of each key (model
    structure, step, shapes) and no later one, so a training loop's memory stays flat."""
    walked = []
    real = audit.audit
    monkeypatch.setattr(audit, "audit", lambda *a, **k: walked.append(1) or real(*a, **k))
    monkeypatch.setattr(audit, "_audited", set())
    paddle.seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = _task((6, 4))
    learner = MAML(model, 0.1)
    for _ in range(3):
        task = learner.clone()
        for _ in range(2):
            task.adapt(F.cross_entropy(task(x), y))
        F.cross_entropy(task(x), y).backward()
    assert len(walked) == 2  # one per inner step, then never again
    other = MAML(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)), 0.1).clone()
    other.adapt(F.cross_entropy(other(x), y))  # another structure: audited
    assert len(walked) == 3


def test_a_refused_graph_is_refused_again():
    paddle.seed(0)
    x, y = _task((6, 4))
    for _ in range(2):
        with pytest.raises(SecondOrderError, match="reluGradNodeCompat"):
            _meta_loss(UnguardedLegacyRelu(), x, y)
