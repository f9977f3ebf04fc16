"""The exact ``rnn`` rule: forward parity with Paddle's fused kernel, Hessian-vector products against finite
differences, clones computing with their fast weights, and full MAML meta-gradients of recurrent models."""
from __future__ import annotations

import contextlib

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import _C_ops, nn

from paddlefsl.metaopt import MAML, ParameterSlots, SecondOrderError, check_meta_gradients
from paddlefsl.metaopt.autodiff import exact_ops, registry, rnn as rnn_rule
from tests.opcheck import check_second_order, hvp_autograd

paddle.set_default_dtype("float64")

KINDS = ["SimpleRNN", "SimpleRNN_relu", "LSTM", "GRU"]
MODE_OF = {"SimpleRNN": "RNN_TANH", "SimpleRNN_relu": "RNN_RELU", "LSTM": "LSTM", "GRU": "GRU"}
GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}
T, B, I, H = 4, 3, 3, 4
LENGTHS = [4, 2, 3]


def _layer(kind: str, layers: int = 1, bidirect: bool = False, time_major: bool = False, dropout: float = 0.0,
           seed: int = 3) -> nn.Layer:
    paddle.seed(seed)
    kwargs = dict(num_layers=layers, direction="bidirect" if bidirect else "forward", time_major=time_major,
                  dropout=dropout)
    if kind == "SimpleRNN_relu":
        return nn.SimpleRNN(I, H, activation="relu", **kwargs)
    return getattr(nn, kind)(I, H, **kwargs)


def _states(kind: str, layers: int, bidirect: bool, seed: int = 5):
    rng = np.random.default_rng(seed)
    shape = (layers * (2 if bidirect else 1), B, H)
    h0 = paddle.to_tensor(rng.standard_normal(shape))
    if kind == "LSTM":
        return h0, paddle.to_tensor(rng.standard_normal(shape))
    return h0


def _as_tuple(state):
    return state if isinstance(state, tuple) else (state,)


def _max_diff(a, b) -> float:
    (oa, sa), (ob, sb) = a, b
    diffs = [np.abs(oa.numpy() - ob.numpy()).max()]
    diffs += [np.abs(x.numpy() - y.numpy()).max() for x, y in zip(_as_tuple(sa), _as_tuple(sb))]
    return float(max(diffs))


def test_rnn_is_registered_exact():
    rule = registry.rules()["rnn"]
    assert rule.status == registry.EXACT and rule.family == "rnn"


# ------------------------------------------------------------------------------------------------ forward parity
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirect", [False, True])
@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("lengths", [False, True])
def test_forward_equals_stock(kind, layers, bidirect, time_major, initial, lengths):
    layer = _layer(kind, layers, bidirect, time_major)
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((T, B, I) if time_major else (B, T, I)))
    states = _states(kind, layers, bidirect) if initial else None
    seq = paddle.to_tensor(LENGTHS, dtype="int64") if lengths else None
    want = layer(x, states, seq)
    for mode in (layer.train, layer.eval):
        mode()
        with exact_ops():
            got = layer(x, states, seq)
        assert not got[0].stop_gradient, "the unrolled path must run (parameters need gradients)"
        assert _max_diff(want, got) <= 1e-12
    if lengths:
        out = got[0].numpy() if time_major else got[0].numpy().transpose(1, 0, 2)
        for b, n in enumerate(LENGTHS):
            assert np.all(out[n:, b] == 0.0), "outputs past a sequence's length are zero"


@pytest.mark.parametrize("kind", ["SimpleRNN", "LSTM", "GRU"])
@pytest.mark.parametrize("layers,bidirect", [(2, False), (2, True), (3, True)])
@pytest.mark.parametrize("p", [0.4, 1.0])
def test_dropout_matches_stock_values_and_random_stream(kind, layers, bidirect, p):
    layer = _layer(kind, layers, bidirect, dropout=p)
    layer.train()
    x = paddle.to_tensor(np.random.default_rng(1).standard_normal((B, T, I)))
    seq = paddle.to_tensor(LENGTHS, dtype="int64")
    paddle.seed(7)
    want = layer(x, None, seq)
    after_stock = paddle.rand([4]).numpy()
    paddle.seed(7)
    no_dropout = _layer(kind, layers, bidirect)(x, None, seq)
    assert _max_diff(want, no_dropout) > 1e-6, "dropout must change the output in this setting"
    x.stop_gradient = False
    with exact_ops():
        paddle.seed(7)
        got = layer(x, None, seq)
        after_exact = paddle.rand([4]).numpy()
    assert _max_diff(want, got) <= 1e-12
    np.testing.assert_array_equal(after_stock, after_exact)


def test_without_gradients_the_fused_kernel_runs():
    layer = _layer("LSTM", 2, True)
    x = paddle.to_tensor(np.random.default_rng(2).standard_normal((B, T, I)))
    calls = []
    unrolled = rnn_rule.unrolled_rnn
    rnn_rule.unrolled_rnn = lambda *a, **k: calls.append(1) or unrolled(*a, **k)
    try:
        with exact_ops(), paddle.no_grad():
            got = layer(x)
        with exact_ops():
            layer(x)
    finally:
        rnn_rule.unrolled_rnn = unrolled
    assert calls == [1]
    assert _max_diff(layer(x), got) == 0.0


# ------------------------------------------------------------------------------------------------ second order
def _kernel_case(mode: str, layers: int, bidirect: bool, lengths: bool, dropout: float, seed: int = 0,
                 scoped: bool = False):
    """Arrays (x, weights..., states...) and f calling the fused kernel on them, as the layers do.

    With ``scoped`` the kernel call itself runs inside the exact scope, so even first-order gradients come from
    the rule (needed where Paddle's own first-order gradient is wrong, see test_stock_first_order_bug).
    """
    rng = np.random.default_rng(seed)
    d = 2 if bidirect else 1
    g = GATES[mode] * H
    x = [rng.standard_normal((T, B, I))]
    w, b = [], []
    for layer in range(layers):
        for _ in range(d):
            w += [0.6 * rng.standard_normal((g, I if layer == 0 else d * H)), 0.6 * rng.standard_normal((g, H))]
            b += [0.3 * rng.standard_normal(g), 0.3 * rng.standard_normal(g)]
    n_states = 2 if mode == "LSTM" else 1
    states = [0.5 * rng.standard_normal((layers * d, B, H)) for _ in range(n_states)]
    arrays = x + w + b + states
    nw = len(w) + len(b)

    def f(x, *rest):
        weights, pre = list(rest[:nw]), list(rest[nw:])
        seq = paddle.to_tensor(LENGTHS, dtype="int64") if lengths else None
        if dropout:
            paddle.seed(11)
        with exact_ops() if scoped else contextlib.nullcontext():
            out, _, st = _C_ops.rnn(x, pre, weights, seq, paddle.to_tensor([], dtype="uint8"), dropout,
                                    bidirect, I, H, layers, mode, 0, False)
        return (out ** 3).sum() + sum((s ** 3).sum() for s in st)

    return f, arrays


def _fd_gradient(f, arrays, eps: float = 1e-6) -> list[np.ndarray]:
    """Central finite differences of the forward value (stock Paddle's forward is correct)."""
    out = []
    for i, a in enumerate(arrays):
        g = np.zeros_like(a)
        for idx in np.ndindex(a.shape):
            vals = []
            for sign in (1.0, -1.0):
                shifted = [b.copy() for b in arrays]
                shifted[i][idx] += sign * eps
                vals.append(float(f(*[paddle.to_tensor(b) for b in shifted])))
            g[idx] = (vals[0] - vals[1]) / (2 * eps)
        out.append(g)
    return out


def _autograd_gradient(f, arrays, scope: bool) -> list[np.ndarray]:
    with exact_ops() if scope else contextlib.nullcontext():
        ts = [paddle.to_tensor(a, stop_gradient=False) for a in arrays]
        return [g.numpy() for g in paddle.grad(f(*ts), ts)]


@pytest.mark.parametrize("mode", list(GATES))
@pytest.mark.parametrize("layers,bidirect,lengths", [(1, False, True), (1, True, True), (2, True, False)])
def test_first_order_matches_finite_differences(mode, layers, bidirect, lengths):
    f, arrays = _kernel_case(mode, layers, bidirect, lengths, 0.0)
    want = _fd_gradient(f, arrays)
    for got, w in zip(_autograd_gradient(f, arrays, scope=True), want):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-7 * max(1.0, float(np.abs(w).max())))


@pytest.mark.parametrize("mode", ["RNN_TANH", "GRU"])
def test_stock_first_order_bug(mode):
    """Paddle 3.3.1's own rnn gradient is wrong for bidirectional layers with sequence_length and non-zero
    initial states (CPU); the rule's gradient matches finite differences there."""
    f, arrays = _kernel_case(mode, 1, True, True, 0.0)
    want = _fd_gradient(f, arrays)
    stock_err = max(float(np.abs(g - w).max()) for g, w in zip(_autograd_gradient(f, arrays, False), want))
    exact_err = max(float(np.abs(g - w).max()) for g, w in zip(_autograd_gradient(f, arrays, True), want))
    assert exact_err < 1e-6 < 1e-3 < stock_err


HVP_CASES = [(m, 1, False, False, 0.0) for m in GATES] + [(m, 2, True, False, 0.0) for m in GATES] + [
    ("LSTM", 2, False, True, 0.5), ("GRU", 2, True, False, 0.5)]


@pytest.mark.parametrize("mode,layers,bidirect,lengths,dropout", HVP_CASES)
def test_second_order_matches_finite_differences(mode, layers, bidirect, lengths, dropout):
    f, arrays = _kernel_case(mode, layers, bidirect, lengths, dropout)
    check_second_order(f, arrays)


@pytest.mark.parametrize("mode", list(GATES))
def test_second_order_bidirectional_with_lengths(mode):
    """Bidirectional with sequence_length and initial states, where stock's first-order gradient is wrong: the
    finite differences are taken of the rule's own first-order gradients (checked against the forward above),
    on the input, the reverse direction's b_hh and the initial states (where padding meets the reverse pass)."""
    f, arrays = _kernel_case(mode, 1, True, True, 0.0, scoped=True)
    states = 2 if mode == "LSTM" else 1
    wrt = [0, len(arrays) - states - 1] + list(range(len(arrays) - states, len(arrays)))
    check_second_order(f, arrays, wrt=wrt)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_stock_rnn_has_no_double_gradient(mode):
    f, arrays = _kernel_case(mode, 1, False, False, 0.0)
    vs = [np.ones_like(a) for a in arrays]
    with pytest.raises(RuntimeError, match="rnn_grad"):
        hvp_autograd(f, arrays, list(range(len(arrays))), vs, exact=False)


def test_third_order_is_exact():
    """A third derivative through the rule matches finite differences of the (exact) second derivative."""
    f, arrays = _kernel_case("GRU", 1, False, True, 0.0)
    rng = np.random.default_rng(4)
    v = [rng.standard_normal(a.shape) for a in arrays]

    def third(arrs):
        with exact_ops():
            ts = [paddle.to_tensor(a, stop_gradient=False) for a in arrs]
            grads = paddle.grad(f(*ts), ts, create_graph=True)
            gv = sum((g * paddle.to_tensor(u)).sum() for g, u in zip(grads, v))
            hv = paddle.grad(gv, ts, create_graph=True)
            hvv = sum((h * paddle.to_tensor(u)).sum() for h, u in zip(hv, v))
            return float(hvv), [g.numpy() for g in paddle.grad(hvv, [ts[1]])]

    _, (got,) = third(arrays)
    eps, idx = 1e-5, (2, 1)
    vals = []
    for sign in (1, -1):
        shifted = [a.copy() for a in arrays]
        shifted[1][idx] += sign * eps
        vals.append(third(shifted)[0])
    want = (vals[0] - vals[1]) / (2 * eps)
    assert abs(want) > 1e-4
    np.testing.assert_allclose(got[idx], want, rtol=1e-6)


# ------------------------------------------------------------------------------------------------ fast weights
@pytest.mark.parametrize("kind", ["SimpleRNN", "LSTM", "GRU"])
@pytest.mark.parametrize("first_order", [False, True])
def test_clone_computes_with_fast_weights(kind, first_order):
    layer = _layer(kind, 2, True)
    rng = np.random.default_rng(6)
    x, y = paddle.to_tensor(rng.standard_normal((B, T, I))), paddle.to_tensor(rng.standard_normal((B, T, 2 * H)))
    maml = MAML(layer, 0.5, first_order=first_order)
    task = maml.clone()
    task.adapt(F.mse_loss(task(x)[0], y))
    fast = ParameterSlots(task.model).tensors
    meta = ParameterSlots(maml.model).tensors
    assert all(id(a) != id(b) for a, b in zip(fast, meta))
    assert all(any(w is f for f in fast) for w in task.model._all_weights), "the fused list holds the fast weights"
    assert all(any(w is m for m in meta) for w in maml.model._all_weights), "the meta-model keeps its own"
    out = task(x)[0]
    assert np.abs(out.numpy() - maml(x)[0].numpy()).max() > 1e-4
    manual = _layer(kind, 2, True)
    for p, w in zip(manual.parameters(), fast):
        p.set_value(w.numpy())
    np.testing.assert_allclose(out.numpy(), manual(x)[0].numpy(), rtol=0, atol=1e-12)
    maml.step(F.mse_loss(out, y))
    assert all(p.grad is not None and float(paddle.abs(p.grad).sum()) > 0 for p in layer.parameters())


# ------------------------------------------------------------------------------------------------ MAML
class TextLSTM(nn.Layer):
    """A text-classifier-like model on float token vectors: bi-LSTM over padded sequences, linear head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        paddle.seed(2)
        self.rnn = nn.LSTM(I, H, num_layers=2, direction="bidirect")
        self.head = nn.Linear(2 * H, classes)

    def forward(self, x, lengths):
        _, (h, _) = self.rnn(x, sequence_length=lengths)
        return self.head(paddle.concat([h[-2], h[-1]], axis=-1))


def _nll(logits, onehot):
    return -(F.log_softmax(logits, axis=-1) * onehot).sum(axis=-1).mean()


def _text_task(seed: int = 0):
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(2):
        x = paddle.to_tensor(rng.standard_normal((B, T, I)))
        onehot = paddle.to_tensor(np.eye(3)[rng.integers(0, 3, B)])
        sets.append((x, paddle.to_tensor(LENGTHS, dtype="int64"), onehot))
    return sets


def _text_loss(learner, task):
    (xs, ls, ys), (xq, lq, yq) = task
    clone = learner.clone()
    clone.adapt(_nll(clone(xs, ls), ys))
    return _nll(clone(xq, lq), yq)


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_lstm_classifier(first_order):
    report = check_meta_gradients(lambda: MAML(TextLSTM(), 0.8, first_order=first_order), _text_loss,
                                  _text_task(), coordinates=2, eps=1e-5)
    if first_order:
        assert not report.ok and report.max_error > 1e-3, str(report)
    else:
        assert report.ok, str(report)


@pytest.mark.parametrize("kind", ["SimpleRNN", "GRU"])
def test_maml_meta_gradient_two_steps_batch_first(kind):
    rng = np.random.default_rng(9)
    xs, xq = (paddle.to_tensor(rng.standard_normal((B, T, I))) for _ in range(2))
    ys, yq = (paddle.to_tensor(rng.standard_normal((B, T, H))) for _ in range(2))

    def loss_fn(learner, _):
        clone = learner.clone()
        for _ in range(2):
            clone.adapt(F.mse_loss(clone(xs)[0], ys))
        return F.mse_loss(clone(xq)[0], yq)

    report = check_meta_gradients(lambda: MAML(_layer(kind), 0.5), loss_fn, None, coordinates=3)
    assert report.ok, str(report)


def test_dropout_second_order_maml_is_exact():
    """Dropout between layers in train mode: each call reseeds, so finite differences see the same mask."""
    rng = np.random.default_rng(3)
    xs, xq = (paddle.to_tensor(rng.standard_normal((B, T, I))) for _ in range(2))
    ys, yq = (paddle.to_tensor(rng.standard_normal((B, T, H))) for _ in range(2))

    def loss_fn(learner, _):
        paddle.seed(21)
        clone = learner.clone()
        clone.adapt(F.mse_loss(clone(xs)[0], ys))
        return F.mse_loss(clone(xq)[0], yq)

    report = check_meta_gradients(lambda: MAML(_layer("LSTM", 2, dropout=0.5), 0.5), loss_fn, None,
                                  coordinates=2)
    assert report.ok, str(report)


def test_unknown_mode_and_bad_weights_raise():
    x = paddle.zeros([T, B, I])
    with pytest.raises(ValueError, match="mode"):
        rnn_rule.unrolled_rnn(x, [paddle.zeros([1, B, H])], [], None, "LSTM_PEEPHOLE", 1, False)
    with pytest.raises(ValueError, match="weights"):
        rnn_rule.unrolled_rnn(x, [paddle.zeros([1, B, H])], [x], None, "GRU", 1, False)


def test_second_order_error_is_gone_for_recurrent_layers():
    layer = _layer("LSTM")
    x = paddle.to_tensor(np.random.default_rng(8).standard_normal((B, T, I)))
    task = MAML(layer, 0.5).clone()
    try:
        task.adapt(task(x)[0].pow(2).mean())
    except SecondOrderError as err:  # pragma: no cover - the failure this file guards against
        pytest.fail(f"second-order adaptation of an LSTM raised {err}")
    assert all(not p.stop_gradient for p in ParameterSlots(task.model).tensors)


class ConvGRU(nn.Layer):
    """Conv1D feature extractor over time followed by a GRU and a linear head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        paddle.seed(4)
        self.conv = nn.Conv1D(I, H, kernel_size=2, padding=1)
        self.rnn = nn.GRU(H, H)
        self.head = nn.Linear(H, classes)

    def forward(self, x, lengths):
        feats = paddle.tanh(self.conv(x.transpose([0, 2, 1]))).transpose([0, 2, 1])
        _, h = self.rnn(feats, sequence_length=lengths)
        return self.head(h[-1])


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_meta_gradient_conv1d_gru(first_order):
    report = check_meta_gradients(lambda: MAML(ConvGRU(), 0.8, first_order=first_order), _text_loss,
                                  _text_task(1), coordinates=2, eps=1e-5)
    if first_order:
        assert not report.ok and report.max_error > 1e-3, str(report)
    else:
        assert report.ok, str(report)
