"""`apply_rule`: exact gradients for every subset of a rule's inputs, at first, second and third order, with no
full-size tensor besides the outputs; `reduce_sum`: the per-channel sums of the normalization rules as matrix
products, equal to Paddle's sum in value and in every derivative (float64), on both sides of its size threshold."""
from __future__ import annotations

import gc
import itertools
import weakref

import numpy as np
import paddle
import pytest

from paddlefsl.metaopt.autodiff import common, scope


def _product_rule(x, y, z, runs: list):
    """``(x * y * z, x + y)`` as a rule: Paddle's kernels without a graph, gradients written in differentiable ops."""

    def run():
        runs.append(1)
        with paddle.no_grad():
            return x * y * z, x + y

    return common.apply_rule([x, y, z], run, [lambda g, h: g * y * z + h, lambda g, h: g * x * z + h,
                                              lambda g, h: g * x * y])


def _stock(x, y, z, runs: list):
    return x * y * z, x + y


def _inputs(needs: str):
    rng = np.random.default_rng(3)
    return [paddle.to_tensor(rng.standard_normal([2, 3]), stop_gradient=name not in needs) for name in "xyz"]


def _objective(rule, x, y, z):
    runs: list = []
    p, q = rule(x, y, z, runs)
    return (p * p).sum() + (q * p).sum(), runs


@pytest.mark.parametrize("needs", ["xyz", "xy", "yz", "z"])
def test_a_rule_gives_exact_gradients_for_every_subset_asked_for(needs):
    """Paddle prunes the inputs of a node that lead to no tensor asked for and refuses a gradient for them: every
    subset of the inputs that need one, at first, second and third order, equals the stock composite."""
    for wrt in itertools.chain.from_iterable(itertools.combinations(needs, k) for k in range(1, len(needs) + 1)):
        results = []
        for rule in (_product_rule, _stock):
            ts = dict(zip("xyz", _inputs(needs)))
            value, runs = _objective(rule, *ts.values())
            assert runs == ([1] if rule is _product_rule else [])
            first = paddle.grad(value, [ts[n] for n in wrt], create_graph=True)
            second = paddle.grad(sum((g * g).sum() for g in first), [ts[n] for n in wrt], create_graph=True)
            third = paddle.grad(sum((g * g * g).sum() for g in second), [ts[n] for n in wrt])
            results.append([t.numpy() for t in (*first, *second, *third)])
        for got, want in zip(*results):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"needs {needs}, wrt {wrt}")


def test_backward_through_a_rule_fills_every_input_gradient():
    ts = _inputs("xyz")
    _objective(_product_rule, *ts)[0].backward()
    ref = _inputs("xyz")
    _objective(_stock, *ref)[0].backward()
    for t, r in zip(ts, ref):
        np.testing.assert_allclose(t.grad.numpy(), r.grad.numpy(), rtol=1e-12, atol=1e-12)


def _sum_rule(x, y):
    """``x + y`` as a rule whose gradients are the output gradient itself."""
    return common.apply_rule([x, y], lambda: paddle.add(x.detach(), y.detach()), [lambda g: g, lambda g: g])


def test_gradients_returned_as_the_output_gradient_do_not_share_memory():
    """Paddle accumulates in place into the first gradient a tensor receives: two inputs handed the same output
    gradient tensor would share their ``.grad``, and a second ``backward()`` would add to both twice."""
    x = paddle.to_tensor([1.0, 2.0], stop_gradient=False)
    y = paddle.to_tensor([3.0, 4.0], stop_gradient=False)
    gx, gy = paddle.grad(_sum_rule(x, y).sum(), [x, y])
    assert gx.data_ptr() != gy.data_ptr()
    for _ in range(2):
        _sum_rule(x, y).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 2.0])
    np.testing.assert_array_equal(y.grad.numpy(), [2.0, 2.0])
    x.clear_grad(), y.clear_grad()
    a = x * 3.0                       # x reached twice: through the rule and through a
    (_sum_rule(x, a) + a).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [7.0, 7.0])


@pytest.mark.parametrize("wrt,copies", [("xy", 1), ("x", 1), ("y", 1)])
def test_only_gradients_still_shared_with_a_reader_are_copied(wrt, copies, monkeypatch):
    """Of two inputs whose gradient is the output gradient itself, the token that runs last returns it as it is
    (nothing reads it afterwards); the other returns a copy. With one input asked for, the other token never runs,
    so the one that does copies."""
    made = []
    clone = paddle.Tensor.clone
    monkeypatch.setattr(paddle.Tensor, "clone", lambda t: made.append(1) or clone(t))
    ts = {"x": paddle.to_tensor([1.0, 2.0], stop_gradient=False), "y": paddle.to_tensor([3.0, 4.0], stop_gradient=False)}
    grads = paddle.grad(_sum_rule(ts["x"], ts["y"]).sum(), [ts[n] for n in wrt])
    assert len(made) == copies
    for g in grads:
        np.testing.assert_array_equal(g.numpy(), [1.0, 1.0])


def test_a_rule_with_several_inputs_adds_no_full_size_tensor(monkeypatch):
    """Each input that needs a gradient costs a one-element tensor: no zero output per extra input to be added
    to the first (a full-size ``zeros_like``, a full-size ``add`` and two full-size gradient copies in its
    backward, 40 % of a query-sized batch-norm rule)."""
    created = []

    def counted(name, real):
        def call(*args, **kwargs):
            if paddle.is_grad_enabled():   # the kernel itself runs without a graph
                created.append(name)
            return real(*args, **kwargs)
        return call

    for name in ("zeros_like", "zeros", "full_like", "add"):
        monkeypatch.setattr(paddle, name, counted(name, getattr(paddle, name)))
    monkeypatch.setattr(paddle.Tensor, "__add__", counted("+", paddle.Tensor.__add__))
    x, y, z = _inputs("xyz")
    p, _ = _product_rule(x, y, z, [])
    assert created == []   # (the tokens' one-element zeros are made inside their PyLayers, without a graph)
    assert p.shape == [2, 3] and p.grad_fn.name() == "GradNodePyLayer__Join"

def test_only_the_join_of_a_rule_is_guarded(monkeypatch):
    """A token's output goes to its join only, so every backward reaches the token through the join, whose guard
    raises once a ``backward()`` has released the graph (``test_released.py`` runs those scenarios on conv and
    batch-norm rules). Guarding each token as well cost about a fifth of its time: a guard hook on each of the
    join's two outputs, none on the three tokens."""
    hooked = []
    register = paddle.Tensor._register_grad_hook
    monkeypatch.setattr(paddle.Tensor, "_register_grad_hook", lambda t, hook: hooked.append(t.shape) or register(t, hook))
    x, y, z = _inputs("xyz")
    p, q = _product_rule(x, y, z, [])
    assert hooked == [[2, 3], [2, 3]]
    value = (p * p).sum() + (q * p).sum()
    value.backward(retain_graph=True)    # the stock nodes keep their state; the rule's PyLayers do not
    with pytest.raises(OSError, match="GraphReleasedError"):
        value.backward()


class _Watched:
    """A rule's gradient function that the test can watch die (a weak reference to it)."""

    def __init__(self, grad):
        self.grad = grad

    def __call__(self, *gys):
        return self.grad(*gys)


def _watched_product(x, y, z):
    """`_product_rule` with gradient functions behind weak references: they live exactly as long as the graph."""
    fns = [_Watched(lambda g, h: g * y * z + h), _Watched(lambda g, h: g * x * z + h), _Watched(lambda g, h: g * x * y)]

    def run():
        with paddle.no_grad():
            return x * y * z, x + y

    p, q = common.apply_rule([x, y, z], run, fns)
    return (p * p).sum() + (q * p).sum(), [weakref.ref(f) for f in fns]


@pytest.mark.parametrize("wrt", ["xyz", "xy", "z"])
def test_a_graph_differentiated_with_create_graph_is_freed_without_a_backward(wrt):
    """The output gradients a join keeps for its tokens lead back to the rule's own nodes when they are recorded
    (``create_graph=True``): a cycle through Paddle's C++ nodes that Python's collector cannot see. Kept after the
    pass, they kept the whole graph alive: an evaluation loop that adapts each task and drops it without a
    backward grew by the task's whole graph every task (W2: 300 MiB a task). The last token to run releases them;
    when ``paddle.grad`` pruned some tokens (``wrt`` a subset), which then never run, the end of the pass does
    (the exact scope's ``paddle.grad`` runs in `one_backward_pass`)."""
    ts = dict(zip("xyz", _inputs("xyz")))
    value, refs = _watched_product(*ts.values())
    with common.one_backward_pass():
        grads = paddle.grad(value, [ts[n] for n in wrt], create_graph=True)
    assert all(ref() is not None for ref in refs)      # the graph is alive while its value is
    del value, grads
    gc.collect()
    assert [ref() for ref in refs] == [None, None, None]


def test_the_exact_scopes_paddle_grad_releases_what_pruned_tokens_kept():
    """While the exact scope is active (a task learner is alive), ``paddle.grad`` is the audited one, which runs
    each call in `one_backward_pass`: a gradient of ``x`` alone prunes the other two tokens, and the graph is
    still freed once dropped."""
    alive = []
    with scope.exact_ops():
        for _ in range(2):   # the first graph of this line is walked by the audit, which keeps it alive
            ts = _inputs("xyz")
            value, refs = _watched_product(*ts)
            grads = paddle.grad(value, ts[:1], create_graph=True)
            del value, grads
            gc.collect()
            alive.append(sum(ref() is not None for ref in refs))
    assert alive[1] == 0


def test_a_recorded_gradient_still_differentiates_after_its_pass():
    """Releasing what the joins kept at the end of a pass loses nothing: a second ``paddle.grad`` and a
    ``backward()`` over the same graph still give the stock composite's answers."""
    results = []
    for rule in (_product_rule, _stock):
        ts = _inputs("xyz")
        value, _ = _objective(rule, *ts)
        first = paddle.grad(value, ts[:1], create_graph=True)
        again = paddle.grad(value, ts, create_graph=True)
        (sum((g * g).sum() for g in first) + sum((g * g * g).sum() for g in again)).backward()
        results.append([t.numpy() for t in (*first, *again)] + [t.grad.numpy() for t in ts])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


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


def _affine_inputs(needs: str, shape=(3, 4, 5, 6)):
    rng = np.random.default_rng(11)
    c = shape[1]
    return [paddle.to_tensor(rng.standard_normal(s), stop_gradient=name not in needs)
            for name, s in zip("xab", [shape, [c, 1, 1], [c, 1, 1]])]


@pytest.mark.parametrize("needs", ["xab", "x", "ab", "xa", "b"])
@pytest.mark.parametrize("with_shift", [True, False])
def test_channel_affine_equals_the_products_to_third_order(needs, with_shift, monkeypatch):
    """`channel_affine` (one pass of the inference batch-norm kernel, above `AFFINE_MIN_NUMEL`) gives the values and
    the first, second and third derivatives of ``x * a + b`` in float64, for every subset of inputs asked for."""
    monkeypatch.setattr(common, "AFFINE_MIN_NUMEL", 1)
    results = []
    for fused in (True, False):
        x, a, b = _affine_inputs(needs)
        shift = b if with_shift else None
        y = common.channel_affine(x, a, shift) if fused else (x * a + b if with_shift else x * a)
        wrt = [t for t, n in zip((x, a, b), "xab") if n in needs and (with_shift or n != "b")]
        if fused and wrt:
            assert y.grad_fn.name() in ("GradNodePyLayer__Join", "GradNodePyLayer__Slot")
        value = (y * y * x).sum() + (y * a).sum()
        if not wrt:   # nothing to differentiate: the values alone
            results.append([y.numpy()])
            continue
        first = paddle.grad(value, wrt, create_graph=True, allow_unused=True)
        second = paddle.grad(sum((g * g).sum() for g in first if g is not None), wrt, create_graph=True,
                             allow_unused=True)
        third = paddle.grad(sum((g * g * g).sum() for g in second if g is not None), wrt, allow_unused=True)
        results.append([y.numpy()] + [t.numpy() for t in (*first, *second, *third) if t is not None])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11)


def test_channel_affine_is_one_kernel_above_its_threshold_and_plain_below(monkeypatch):
    x, a, b = _affine_inputs("xab", shape=(2, 4, 8, 8))
    monkeypatch.setattr(common, "AFFINE_MIN_NUMEL", x.size + 1)
    assert common.channel_affine(x, a, b).grad_fn.name() != "GradNodePyLayer__Join"
    monkeypatch.setattr(common, "AFFINE_MIN_NUMEL", x.size)
    assert common.channel_affine(x, a, b).grad_fn.name() == "GradNodePyLayer__Join"
    np.testing.assert_allclose(common.channel_affine(x, a, b).numpy(), (x * a + b).numpy(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("shape", [[3, 4, 1, 1], [6], [1, 1, 6], [4, 1, 6]])
def test_channel_affine_broadcasts_other_operands_as_paddle_does(shape, monkeypatch):
    """Only operands of one value per channel (``[C, 1, 1]`` or ``[1, C, 1, 1]``) take the fused kernel; others
    (per-sample statistics, a last-axis vector) are the plain broadcast, values and gradients alike."""
    monkeypatch.setattr(common, "AFFINE_MIN_NUMEL", 1)
    calls = []
    kernel = common.affine_kernel
    monkeypatch.setattr(common, "affine_kernel", lambda *a: calls.append(1) or kernel(*a))
    rng = np.random.default_rng(2)
    x = paddle.to_tensor(rng.standard_normal([3, 4, 5, 6]), stop_gradient=False)
    s = paddle.to_tensor(rng.standard_normal(shape), stop_gradient=False)
    y = common.channel_affine(x, s, s)
    np.testing.assert_array_equal(y.numpy(), (x * s + s).numpy())
    gx, gs = paddle.grad((y * y).sum(), [x, s])
    rx, rs = paddle.grad(((x * s + s) ** 2).sum(), [x, s])
    np.testing.assert_allclose(gx.numpy(), rx.numpy(), rtol=1e-12)
    np.testing.assert_allclose(gs.numpy(), rs.numpy(), rtol=1e-12)
    assert calls == []
    common.channel_affine(x, s.reshape([-1])[:4].reshape([4, 1, 1]), None)
    assert calls == [1]
