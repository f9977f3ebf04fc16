"""Tests for paddlefsl.training: checkpoint round-trip, exact resume, JSONL logging, PNG plots."""
import json
import os
import pickle
import random

import numpy as np
import paddle
import pytest
from paddle import nn

from paddlefsl.episodes import EpisodeSampler, make_task
from paddlefsl.training import (JSONLLogger, capture_rng_state, learning_curve_figure, load_checkpoint,
                                plot_learning_curve, read_jsonl, restore_rng_state, save_checkpoint)


class Wrapper(nn.Layer):
    """Stands in for a meta-learner that holds the plain model as ``.module``."""

    def __init__(self, module, value=0.0):
        super().__init__()
        self.module = module
        self.extra_param = self.create_parameter([1], default_initializer=nn.initializer.Constant(value))

    def forward(self, x):
        return self.module(x)


class Learner(nn.Layer):
    """Stands in for a paddlefsl.metaopt learner, which holds the plain model as ``.model``."""

    def __init__(self, model, value=0.0):
        super().__init__()
        self.model = model
        self.lrs = self.create_parameter([2], default_initializer=nn.initializer.Constant(value))


def _net():
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


def _make_optimizer(name, model):
    if name == "adam":
        sched = paddle.optimizer.lr.StepDecay(learning_rate=0.05, step_size=2, gamma=0.5)
        return paddle.optimizer.Adam(learning_rate=sched, parameters=model.parameters()), sched
    return paddle.optimizer.Momentum(learning_rate=0.05, momentum=0.9, parameters=model.parameters()), None


DATA_X = np.random.default_rng(0).normal(size=(60, 4))
DATA_Y = np.repeat(np.arange(6), 10)


def _train(model, opt, sched, sampler, steps):
    for _ in range(steps):
        task = sampler.sample()
        xs, ys, xq, yq = make_task(DATA_X, DATA_Y, task)
        noise = np.random.normal(scale=0.1, size=xs.shape)  # numpy global RNG
        scale = 1.0 + random.random()  # python RNG
        x = paddle.to_tensor(np.concatenate([xs + noise, xq]) * scale, dtype=paddle.get_default_dtype())
        y = paddle.to_tensor(np.concatenate([ys, yq]))
        loss = nn.functional.cross_entropy(model(x), y)  # dropout uses paddle's RNG
        loss.backward()
        opt.step()
        opt.clear_grad()
        if sched is not None:
            sched.step()


@pytest.mark.parametrize("opt_name", ["adam", "momentum"])
@pytest.mark.parametrize("wrapped", [False, True])
def test_exact_resume(tmp_path, opt_name, wrapped):
    def fresh(seed):
        paddle.seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        model = _net()
        opt, sched = _make_optimizer(opt_name, model)
        return model, opt, sched, EpisodeSampler(DATA_Y, 3, 2, 2, seed=11)

    model, opt, sched, sampler = fresh(0)
    _train(model, opt, sched, sampler, 6)
    reference = {k: v.numpy().copy() for k, v in model.state_dict().items()}

    model, opt, sched, sampler = fresh(0)
    _train(model, opt, sched, sampler, 3)
    ckpt = tmp_path / "ckpt" / "run.pkl"
    save_checkpoint(ckpt, Wrapper(model) if wrapped else model, opt, step=3,
                    extra={"sampler": sampler.get_state()})
    _train(model, opt, sched, sampler, 1)  # diverge the live process state before resuming

    model2, opt2, sched2, sampler2 = fresh(123)  # different init, names and RNG state
    payload = load_checkpoint(ckpt, model2, opt2)
    sampler2.set_state(payload["extra"]["sampler"])
    assert payload["step"] == 3
    if sched2 is not None:
        assert sched2.last_epoch == 3
    _train(model2, opt2, sched2, sampler2, 3)
    for key, value in model2.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), reference[key])


@pytest.mark.parametrize("wrap", [Wrapper, Learner])
def test_wrapper_state_restored_into_wrapper(tmp_path, wrap):
    model = _net()
    path = save_checkpoint(tmp_path / "c.pkl", wrap(model, value=0.25), step=1)
    target = wrap(_net(), value=9.0)
    payload = load_checkpoint(path, target, restore_rng=False)
    assert set(payload["model"]) == set(model.state_dict())
    extra = target.extra_param if wrap is Wrapper else target.lrs
    assert np.all(extra.numpy() == 0.25)  # the wrapper's own parameters came back too
    inner = target.module if wrap is Wrapper else target.model
    for k, v in inner.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), model.state_dict()[k].numpy())
    other = Learner(Wrapper(_net())) if wrap is Wrapper else Wrapper(_net())  # different wrapper: plain load
    load_checkpoint(path, other, restore_rng=False)


def test_checkpoint_keys_are_plain_model_keys(tmp_path):
    paddle.seed(0)
    model = _net()
    path = save_checkpoint(tmp_path / "c.pkl", Learner(Wrapper(model)), step=7, extra={"note": "x"})
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert set(raw["model"]) == set(model.state_dict())
    assert all(isinstance(v, np.ndarray) for v in raw["model"].values())
    target = _net()
    payload = load_checkpoint(path, target, restore_rng=False)
    assert payload["extra"] == {"note": "x"} and payload["step"] == 7 and payload["optimizer"] is None
    for k, v in target.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), model.state_dict()[k].numpy())


def test_checkpoint_atomic_and_errors(tmp_path):
    model = _net()
    path = tmp_path / "c.pkl"
    save_checkpoint(path, model, step=1)
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, model, step=2, extra={"bad": lambda: None})  # unpicklable
    assert path.read_bytes() == before  # old checkpoint intact
    assert os.listdir(tmp_path) == ["c.pkl"]  # no temp file left behind
    with pytest.raises(ValueError, match="model keys differ"):
        load_checkpoint(path, nn.Linear(4, 3))
    bogus = tmp_path / "bogus.pkl"
    bogus.write_bytes(pickle.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a paddlefsl checkpoint"):
        load_checkpoint(bogus)


def test_rng_state_roundtrip():
    state = capture_rng_state()
    a = (random.random(), np.random.rand(), paddle.rand([2]).numpy())
    restore_rng_state(state)
    b = (random.random(), np.random.rand(), paddle.rand([2]).numpy())
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])


def test_jsonl_logger(tmp_path):
    path = tmp_path / "logs" / "m.jsonl"
    with JSONLLogger(path, append=False, timestamp=True) as log:
        rec = log.log(step=1, loss=paddle.to_tensor(0.5), acc=np.float32(0.25), vec=np.arange(2), bad=float("nan"))
        log.log(step=2, loss=0.25)
    assert rec["loss"] == 0.5 and rec["acc"] == 0.25 and rec["vec"] == [0, 1] and rec["bad"] == "nan"
    with JSONLLogger(path) as log:  # append (resume)
        log.log(step=3, loss=0.125)
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # truncated last line from a killed run
    rows = read_jsonl(path)
    assert [r["step"] for r in rows] == [1, 2, 3] and "time" in rows[0] and "time" not in rows[2]
    assert all(json.loads(line) for line in open(path).read().splitlines()[:3])
    with JSONLLogger(path, append=False) as log:
        log.log(step=0, loss=1.0)
    assert len(read_jsonl(path)) == 1


@pytest.mark.parametrize("smoothing", [1, 5])
@pytest.mark.parametrize("from_file", [True, False])
def test_plot_learning_curve(tmp_path, smoothing, from_file):
    rows = [{"step": i, "loss": 1.0 / (i + 1), "acc": i / 30, "tag": "a"} for i in range(30)]
    source = rows
    if from_file:
        with JSONLLogger(tmp_path / "m.jsonl") as log:
            for r in rows:
                log.log(**r)
        source = str(tmp_path / "m.jsonl")
    out = plot_learning_curve(source, tmp_path / "fig" / "curve.png", smoothing=smoothing, title="t")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    from PIL import Image
    assert Image.open(out).size[1] > Image.open(out).size[0] * 0.5  # two stacked subplots (loss, acc)
    with pytest.raises(ValueError, match="no numeric"):
        plot_learning_curve(rows, tmp_path / "x.png", keys=["tag"])


def test_plot_learning_curve_smooths_per_key_and_marks_sparse_series(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    rows = [{"step": i, "loss": 1.0 / (i + 1)} for i in range(30)]
    rows += [{"step": 10 * i, "test": i / 3} for i in range(4)]
    drawn, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (drawn.append(fig), savefig(fig, *a, **k))[1])
    plot_learning_curve(rows, tmp_path / "c.png", keys=["loss", "test"], smoothing={"loss": 5})
    loss_axis, test_axis = drawn[0].axes
    assert len(loss_axis.lines) == 2 and loss_axis.lines[1].get_label() == "loss (avg 5)"  # raw, then smoothed
    assert len(test_axis.lines) == 1 and test_axis.lines[0].get_marker() == "o"
    np.testing.assert_array_equal(test_axis.lines[0].get_ydata(), [0, 1 / 3, 2 / 3, 1])


def test_learning_curve_panels_share_the_x_axis_and_say_what_they_show():
    rows = [{"step": i, "loss": 1.0 / (i + 1), "accuracy": i / 30} for i in range(1, 31)] + \
        [{"step": 30, "test_accuracy": 0.9}]
    fig = learning_curve_figure(rows, keys=["loss", "accuracy", "test_accuracy"], title="maml 5-way 1-shot",
                                xlabel="meta-train iteration",
                                labels={"loss": "meta-train loss", "accuracy": "meta-train accuracy"})
    loss_axis, accuracy_axis, test_axis = fig.axes
    assert loss_axis.get_shared_x_axes().joined(loss_axis, test_axis)
    assert loss_axis.get_shared_x_axes().joined(loss_axis, accuracy_axis)
    fig.canvas.draw()
    assert test_axis.get_xlim() == loss_axis.get_xlim()          # the single test point sits under iteration 30
    assert test_axis.get_xlabel() == "meta-train iteration" and loss_axis.get_xlabel() == ""
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["meta-train loss", "meta-train accuracy",
                                                              "test_accuracy"]
    assert fig._suptitle.get_text() == "maml 5-way 1-shot"
    assert learning_curve_figure(rows, keys=["loss"]).axes[0].get_xlabel() == "step"     # default: the x key
