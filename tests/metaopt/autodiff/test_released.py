"""A backward over an already back-propagated graph raises a clear error instead of crashing the process.

Paddle 3.x frees a PyLayer node's context once ``backward()`` has run it (even with ``retain_graph=True``) and a
second run segfaults. Every scenario runs in a subprocess, so a crash fails the test instead of killing pytest.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# Each scenario builds a fresh task learner and query loss, does a first pass that must work, then a second that
# must raise; the script prints one line per scenario: "<name> ok <error type>: <message start>".
SCRIPT = r'''
import sys
import paddle
import paddle.nn.functional as F
from paddle import nn
from paddlefsl.metaopt import MAML
from paddlefsl.metaopt.autodiff.released import GraphReleasedError

paddle.set_default_dtype("float64")
paddle.seed(0)
kind, first_order = sys.argv[1], sys.argv[2] == "first"
if kind == "linear":
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
else:
    model = nn.Sequential(nn.Conv2D(1, 4, 3, padding=1), nn.BatchNorm2D(4), nn.ReLU(), nn.MaxPool2D(2),
                          nn.Flatten(), nn.Linear(64, 5))
maml = MAML(model, inner_lr=0.1, first_order=first_order)
x, y = paddle.randn([10, 1, 8, 8]), paddle.arange(10) % 5


def query():
    task = maml.clone()
    task.adapt(F.cross_entropy(task(x), y))
    return task, task(x)


def twice():
    task, out = query(); loss = F.cross_entropy(out, y)
    loss.backward()
    loss.backward()


def retained():
    task, out = query(); loss = F.cross_entropy(out, y)
    loss.backward(retain_graph=True)
    loss.backward()


def after_step():
    task, out = query(); loss = F.cross_entropy(out, y)
    maml.step(loss)
    loss.backward()


def fresh_root():
    task, out = query()
    h = F.softmax(out)                    # a PyLayer output (an exact rule at first order too), used again below
    assert h.grad_fn.name().startswith("GradNodePyLayer")
    F.cross_entropy(h, y).backward()
    (h * h).mean().backward()


def adapt_after_step():
    task, out = query()
    maml.step(F.cross_entropy(out, y))
    task.adapt(F.cross_entropy(task(x), y))


def other_task_back_propagated():    # must work: only task b's graph was released
    a, _ = query()
    b, out = query()
    F.cross_entropy(out, y).backward()
    a.adapt(F.cross_entropy(a(x), y))
    F.cross_entropy(a(x), y).backward()


for name, scenario in [("twice", twice), ("retained", retained), ("after_step", after_step),
                       ("fresh_root", fresh_root), ("adapt_after_step", adapt_after_step),
                       ("other_task_back_propagated", other_task_back_propagated)]:
    try:
        scenario()
        print(name, "no error", flush=True)
    except Exception as err:
        print(name, "ok", type(err).__name__ + ":", str(err).replace("\n", " ")[:300], flush=True)
    for p in maml.parameters():
        p.clear_gradient()
print("end .", flush=True)
'''


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("first_order", ["first", "second"])
@pytest.mark.parametrize("kind", ["linear", "cnn"])
def test_second_backward_raises_clearly_instead_of_crashing(kind, first_order):
    run = _run(kind, first_order)
    assert run.returncode == 0, f"the process died (rc {run.returncode}):\n{run.stdout}\n{run.stderr[-3000:]}"
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line)
    assert "end" in lines
    assert lines["other_task_back_propagated"] == "no error"
    scenarios = ["twice", "retained", "after_step", "fresh_root"]
    if first_order == "second":
        scenarios.append("adapt_after_step")  # first order: the new loss never reaches the released graph
    else:
        assert lines["adapt_after_step"] == "no error"
    for name in scenarios:
        assert lines[name].startswith("ok"), (name, lines[name])
        assert "back-propagated" in lines[name], (name, lines[name])
        assert "Compute the loss again" in lines[name] or "clone a new task learner" in lines[name], lines[name]


def test_a_plain_guarded_pylayer_returning_a_scalar():
    code = textwrap.dedent('''
        import paddle
        from paddlefsl.metaopt.autodiff.released import GuardedPyLayer

        class Total(GuardedPyLayer):
            @staticmethod
            def forward(ctx, x):
                return x.sum()

            @staticmethod
            def backward(ctx, grad):
                return grad * paddle.ones([3])

        x = paddle.ones([3]); x.stop_gradient = False
        y = Total.apply(x)
        g, = paddle.grad(y, x, retain_graph=True)   # paddle.grad runs copies: the node stays usable
        y.backward()
        assert x.grad.numpy().tolist() == [1.0, 1.0, 1.0] and g.numpy().tolist() == [1.0, 1.0, 1.0]
        try:
            y.backward()
        except Exception as err:
            print("raised", "back-propagated" in str(err))
    ''')
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "raised True"


@pytest.mark.parametrize("loss_expr", ["F.cross_entropy(task(x), y)", "F.cross_entropy(task(x), y) + 0.1 * task(x).sum()"])
@pytest.mark.parametrize("call", ["paddle.grad", "paddle.autograd.grad"])
def test_users_paddle_grad_after_backward_does_not_crash(loss_expr, call):
    code = textwrap.dedent(f'''
        import paddle
        import paddle.nn.functional as F
        from paddle import nn
        from paddlefsl.metaopt import MAML, GraphReleasedError
        maml = MAML(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), inner_lr=0.1)
        x, y = paddle.randn([10, 1, 8, 8]), paddle.arange(10) % 5
        task = maml.clone()
        task.adapt(F.cross_entropy(task(x), y))
        loss = {loss_expr}
        loss.backward()
        try:
            {call}(loss, list(maml.parameters()))
        except GraphReleasedError as err:
            print("raised", "backward() already ran" in str(err))
    ''')
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "raised True"


def test_paddle_grad_after_backward_of_a_stock_graph_is_left_to_paddle():
    """A root whose backward released no op-layer node is not refused (stock Paddle decides, retain_graph works)."""
    import paddle

    from paddlefsl.metaopt import MAML

    maml = MAML(paddle.nn.Linear(3, 2), inner_lr=0.1)
    task = maml.clone()  # the scope is active while the task learner lives
    w = paddle.ones([3]); w.stop_gradient = False
    loss = (w * w).sum()
    loss.backward(retain_graph=True)
    g, = paddle.grad(loss, [w])
    assert g.numpy().tolist() == [2.0, 2.0, 2.0] and task is not None


def test_the_guards_keep_no_graph_alive():
    """Contexts of nodes that only paddle.grad ran (the support losses) must die with their graph."""
    import gc

    import paddle
    import paddle.nn.functional as F
    from paddle import nn

    from paddlefsl.metaopt import MAML

    model = nn.Sequential(nn.Conv2D(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2D(2), nn.Flatten(), nn.Linear(32, 3))
    maml = MAML(model, inner_lr=0.1)
    x, y = paddle.randn([6, 1, 8, 8]), paddle.arange(6) % 3

    def contexts():
        gc.collect()
        return sum(type(o).__name__.endswith("_backward") for o in gc.get_objects())

    def iteration():
        task = maml.clone()
        task.adapt(F.cross_entropy(task(x), y))
        maml.step(F.cross_entropy(task(x), y))

    iteration()  # the graph audit walks (and so keeps, Paddle 3.3) the first graph of each key, once
    before = contexts()
    for _ in range(3):
        iteration()
    assert contexts() == before
