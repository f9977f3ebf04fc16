"""MAML(recompute=r): the meta-gradient equals the stored inner loop's, with BN, dropout and learned rates."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

import paddlefsl.metaopt.recompute as recompute_module
from paddlefsl.metaopt.autodiff import audit
from paddlefsl.metaopt import MAML, SecondOrderError, check_meta_gradients
from tests.metaopt.models import mlp, regression_task

STEPS = 3


def conv_bn(dropout: float = 0.0) -> nn.Layer:
    paddle.seed(1)
    layers = [nn.Conv2D(1, 4, 3, padding=1), nn.BatchNorm2D(4), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.MaxPool2D(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers)


def image_task():
    rng = np.random.default_rng(3)
    xs, xq = paddle.to_tensor(rng.normal(size=(6, 1, 8, 8))), paddle.to_tensor(rng.normal(size=(9, 1, 8, 8)))
    return xs, paddle.to_tensor([0, 1, 2] * 2), xq, paddle.to_tensor([0, 1, 2] * 3)


CASES = {
    "mlp": (lambda: mlp(), dict(), "regression"),
    "conv_bn": (lambda: conv_bn(), dict(), "image"),
    "conv_bn_dropout": (lambda: conv_bn(0.3), dict(), "image"),
    "learned_rates": (lambda: conv_bn(0.3), dict(learn_inner_lr="per_step_per_layer"), "image"),
    "per_step_bn": (lambda: conv_bn(), dict(per_step_bn_stats=True, per_step_bn_weights=True,
                                            learn_inner_lr="per_layer", batch_norm="shared"), "image"),
    "running_bn": (lambda: conv_bn(), dict(batch_norm="running"), "image"),
}


def _loss(kind):
    return F.mse_loss if kind == "regression" else F.cross_entropy


def _task(kind):
    return regression_task() if kind == "regression" else image_task()


def meta_run(case, multi_step=False, **options):
    """One meta-gradient: returns the gradients, the query loss, the next random number and the BN statistics."""
    factory, extra, kind = CASES[case]
    loss_fn = _loss(kind)
    xs, ys, xq, yq = _task(kind)
    learner = MAML(factory(), 0.1, inner_steps=STEPS, **extra, **options)
    paddle.seed(7)
    task = learner.clone()
    losses = []
    for _ in range(STEPS):
        task.adapt(lambda l: loss_fn(l(xs), ys))
        losses.append(loss_fn(task(xq), yq))
    query = sum((k + 1) * q for k, q in enumerate(losses)) if multi_step else losses[-1]
    learner.step(query)
    stats = [b.numpy().copy() for sub in task.sublayers() for b in recompute_module._stat_tensors(sub)]
    meta_stats = [b.numpy().copy() for sub in learner.model.sublayers() for b in recompute_module._stat_tensors(sub)]
    grads = {n: p.grad.numpy().copy() for n, p in learner.named_parameters() if not p.stop_gradient}
    return grads, float(query), float(paddle.rand([1]).item()), stats + meta_stats


def assert_same(stored, recomputed):
    grads_a, loss_a, rand_a, stats_a = stored
    grads_b, loss_b, rand_b, stats_b = recomputed
    assert loss_a == pytest.approx(loss_b, rel=1e-12)
    assert rand_a == rand_b, "the random stream after the meta-step differs (dropout masks redrawn?)"
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        np.testing.assert_allclose(grads_b[name], grads_a[name], rtol=1e-10, atol=1e-12, err_msg=name)
    assert len(stats_a) == len(stats_b)
    for a, b in zip(stats_a, stats_b):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("interval", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_meta_gradient_equals_the_stored_one(case, interval):
    assert_same(meta_run(case), meta_run(case, recompute=interval))


@pytest.mark.parametrize("steps, interval", [(2, 1), (3, 1), (3, 2)])
def test_adapt_then_step_with_several_segments(steps, interval, monkeypatch):
    """The plain loop in a fresh process: adapt K times, then one query loss, recomputed before any stored run.
    The first replay's graph is audited (once per key and process), and walking it keeps it alive; the next
    segment's replay then found its back-propagated nodes under the twin's graph token, took them for its own and
    raised GraphReleasedError (merged main, 2026-12-01). Every replay now has a graph token of its own."""
    monkeypatch.setattr(audit, "_audited", set())  # as in a fresh process: no key audited yet
    xs, ys, xq, yq = image_task()
    grads = []
    for recompute in (interval, None):
        learner = MAML(conv_bn(), 0.1, inner_steps=steps, recompute=recompute)
        task = learner.clone()
        for _ in range(steps):
            task.adapt(lambda l: F.cross_entropy(l(xs), ys))
        learner.step(F.cross_entropy(task(xq), yq))
        grads.append([p.grad.numpy().copy() for p in learner.parameters() if not p.stop_gradient])
    for a, b in zip(*grads):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", ["conv_bn_dropout", "learned_rates"])
def test_multi_step_loss_through_open_segments(case):
    """Query losses after every step read weights from inside a segment; each replays from the kept boundary."""
    assert_same(meta_run(case, multi_step=True), meta_run(case, multi_step=True, recompute=3))


def test_truncated_and_recomputed_together_equal_truncated_stored():
    assert_same(meta_run("conv_bn_dropout", truncate=2), meta_run("conv_bn_dropout", truncate=2, recompute=2))


def test_the_replay_runs_in_the_meta_backward(monkeypatch):
    """Segments hold the steps since the last kept boundary: with 3 steps and interval 2, segments of 2 and 1."""
    replayed = []
    original = recompute_module._Replay.vjp

    def spy(self, inputs, grads):
        replayed.append([r.index for r in self.records])
        return original(self, inputs, grads)

    monkeypatch.setattr(recompute_module._Replay, "vjp", spy)
    meta_run("conv_bn", recompute=2)
    assert replayed == [[2], [0, 1]]


def test_recomputed_meta_gradient_matches_finite_differences():
    def loss_fn(learner, task):
        xs, ys, xq, yq = task
        clone = learner.clone()
        for _ in range(STEPS):
            clone.adapt(lambda l: F.mse_loss(l(xs), ys))
        return F.mse_loss(clone(xq), yq)

    report = check_meta_gradients(lambda: MAML(mlp(), 0.3, inner_steps=STEPS, recompute=1), loss_fn,
                                  regression_task(), coordinates=None, rtol=1e-6)
    assert report.ok, str(report)
    first = check_meta_gradients(lambda: MAML(mlp(), 0.3, inner_steps=STEPS, first_order=True, recompute=1),
                                 loss_fn, regression_task(), coordinates=None, rtol=1e-6)
    assert not first.ok and first.max_error > 1e-3


def test_differentiating_the_meta_gradient_again_raises():
    xs, ys, xq, yq = regression_task()
    learner = MAML(mlp(), 0.3, inner_steps=2, recompute=2)
    task = learner.clone()
    for _ in range(2):
        task.adapt(lambda l: F.mse_loss(l(xs), ys))
    query = F.mse_loss(task(xq), yq)
    with pytest.raises(Exception) as info:
        paddle.grad(query, list(learner.parameters()), create_graph=True)
    assert "SecondOrderError" in repr(info.value) or isinstance(info.value, SecondOrderError)
    assert "recompute" in str(info.value)


def test_a_tensor_loss_is_refused_with_recompute():
    xs, ys, _, _ = regression_task()
    task = MAML(mlp(), 0.3, inner_steps=2, recompute=1).clone()
    with pytest.raises(TypeError, match="function of the learner"):
        task.adapt(F.mse_loss(task(xs), ys))


def test_a_loss_function_reading_the_task_learner_is_refused():
    xs, ys, _, _ = regression_task()
    task = MAML(mlp(), 0.3, inner_steps=2, recompute=1).clone()
    with pytest.raises(ValueError, match="computed from that learner only"):
        task.adapt(lambda l: F.mse_loss(task(xs), ys))


def test_first_order_steps_take_the_plain_path(monkeypatch):
    calls = []
    monkeypatch.setattr(recompute_module._Replay, "vjp", lambda *a: calls.append(1))
    xs, ys, xq, yq = regression_task()
    learner = MAML(mlp(), 0.3, inner_steps=2, recompute=1, first_order=True)
    task = learner.clone()
    for _ in range(2):
        task.adapt(lambda l: F.mse_loss(l(xs), ys))
    learner.step(F.mse_loss(task(xq), yq))
    assert calls == []


@pytest.mark.parametrize("value, error, match", [
    (0, ValueError, "positive integer"), (-2, ValueError, "positive integer"), (1.5, TypeError, "positive integer"),
    (True, TypeError, "positive integer"), ("2", TypeError, "positive integer"),
    (4, ValueError, "larger than inner_steps=3")])
@pytest.mark.parametrize("option", ["recompute", "truncate"])
def test_bad_step_counts_are_refused(option, value, error, match):
    with pytest.raises(error, match=match) as info:
        MAML(mlp(), 0.3, inner_steps=3, **{option: value})
    assert option in str(info.value)


@pytest.mark.parametrize("option", ["recompute", "truncate"])
def test_step_counts_need_inner_steps(option):
    with pytest.raises(ValueError, match="needs inner_steps"):
        MAML(mlp(), 0.3, **{option: 2})


def test_meta_iterations_with_a_meta_optimizer():
    """The replay twin copies the task learner's own layers, never its meta-learner (whose optimizer holds state
    that cannot be copied after a step)."""
    xs, ys, xq, yq = image_task()
    model = conv_bn()
    learner = MAML(model, 0.1, inner_steps=2, recompute=1,
                   meta_optimizer=paddle.optimizer.Adam(1e-3, parameters=model.parameters()))
    before = [p.numpy().copy() for p in model.parameters()]
    for _ in range(2):
        task = learner.clone()
        for _ in range(2):
            task.adapt(lambda l: F.cross_entropy(l(xs), ys))
        learner.step(F.cross_entropy(task(xq), yq))
    assert any(np.abs(a - p.numpy()).max() > 0 for a, p in zip(before, model.parameters()))
    twin = task._recompute_open.twin
    assert [name for name, _ in twin.learner.named_children() if not name.startswith("_")] == ["model"]


def test_the_graph_walk_runs_once_per_meta_learner(monkeypatch):
    """Walking grad nodes from Python keeps the walked graph alive in Paddle 3.3.1 (one support step's activations
    per walk, measured on W2 shapes), so the loss-function check walks only the first step of a meta-learner."""
    walks = []
    original = recompute_module._check_leaves
    monkeypatch.setattr(recompute_module, "_check_leaves", lambda *a: walks.append(1) or original(*a))
    xs, ys, xq, yq = regression_task()
    learner = MAML(mlp(), 0.3, inner_steps=3, recompute=1)
    for _ in range(2):
        task = learner.clone()
        for _ in range(3):
            task.adapt(lambda l: F.mse_loss(l(xs), ys))
        learner.step(F.mse_loss(task(xq), yq))
    assert walks == [1]


def test_the_replay_takes_its_vector_jacobian_product_with_backward(monkeypatch):
    """``paddle.grad`` inside the segment's backward kept each replayed graph alive (memory grew with the steps);
    the replay must not call it for the vector-Jacobian product."""
    calls = []
    original = paddle.grad

    def spy(outputs, inputs, grad_outputs=None, **kwargs):
        calls.append(grad_outputs is not None)
        return original(outputs, inputs, grad_outputs=grad_outputs, **kwargs)

    monkeypatch.setattr(paddle, "grad", spy)
    meta_run("mlp", recompute=1)
    assert calls and not any(calls)


TWICE = r'''
import sys
import paddle
import paddle.nn.functional as F
from paddlefsl.metaopt import MAML, innerloop_ctx
from tests.metaopt.models import mlp, regression_task

paddle.set_default_dtype("float64")
xs, ys, xq, yq = regression_task()
model = mlp()
if sys.argv[1] == "innerloop_ctx":
    loop = innerloop_ctx(model, paddle.optimizer.SGD(0.1, parameters=model.parameters()), copy_initial_weights=False,
                         inner_steps=2, recompute=1)
    fmodel, diffopt = loop.__enter__()
    for _ in range(2):
        diffopt.step(lambda f: F.mse_loss(f(xs), ys))
else:
    fmodel = MAML(model, 0.1, inner_steps=2, recompute=1).clone()
    for _ in range(2):
        fmodel.adapt(lambda learner: F.mse_loss(learner(xs), ys))
query, support = F.mse_loss(fmodel(xq), yq), F.mse_loss(fmodel(xs), ys)
query.backward()
print("first ok", flush=True)
try:
    support.backward()
    print("no error", flush=True)
except Exception as err:
    print("raised", type(err).__name__, str(err).replace("\n", " ")[:300], flush=True)
'''


@pytest.mark.parametrize("where", ["MAML", "innerloop_ctx"])
def test_a_second_backward_through_a_segment_raises_instead_of_crashing(where):
    """Two losses sharing a recomputed inner loop, back-propagated one after the other: the second reaches segment
    nodes the first released. It killed the process (segmentation fault) before the segment became guarded."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", TWICE, where], capture_output=True, text=True, env=env, timeout=300,
                         cwd=root)
    assert run.returncode == 0, f"the process died (rc {run.returncode}):\n{run.stdout}\n{run.stderr[-2000:]}"
    lines = run.stdout.splitlines()
    assert lines[0] == "first ok"
    assert lines[1].startswith("raised") and "back-propagated" in lines[1], lines[1]
