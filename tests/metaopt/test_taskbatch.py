"""Task batching (``clone(tasks=T)``): each task's update and meta-gradient equal a separate clone's, exact to second
order (finite differences), on oneDNN's grouped kernels in float32; bad input gets a clear error; layers restored."""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from paddlefsl.metaopt import ANIL, MAML, MetaSGD, ParameterSlots, check_meta_gradients, kernels, set_fast_kernels
from paddlefsl.metaopt.kernels import onednn

TASKS = 3


def _conv_bn() -> nn.Layer:
    return nn.Sequential(nn.Conv2D(2, 4, 3, stride=2, padding=1), nn.BatchNorm2D(4), nn.ReLU(),
                         nn.Conv2D(4, 4, 3, padding=1), nn.BatchNorm2D(4), nn.ReLU(), nn.MaxPool2D(2),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def _grouped() -> nn.Layer:
    return nn.Sequential(nn.Conv2D(2, 4, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
                         nn.Conv2D(4, 4, 3, groups=2), nn.BatchNorm2D(4, weight_attr=False, bias_attr=False),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _conv1d() -> nn.Layer:
    return nn.Sequential(nn.Conv1D(2, 4, 3, padding=1, padding_mode="circular"), nn.BatchNorm1D(4), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 8, 3))


def _conv3d() -> nn.Layer:
    return nn.Sequential(nn.Conv3D(1, 2, 3, padding=1), nn.BatchNorm3D(2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 4 * 4 * 4, 3))


class _Tokens(nn.Layer):
    """A linear layer over every token of ``[N, L, F]`` samples, then a custom forward pooling the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 6)
        self.norm = nn.BatchNorm1D(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = paddle.tanh(self.embed(x))                              # [N, L, 6]
        h = self.norm(h.transpose([0, 2, 1])).transpose([0, 2, 1])   # batch norm over channels 6
        return self.out(h.mean(axis=1))


class _Words(nn.Layer):
    """Token ids (0 is padding) through an embedding and a layer norm over ``[N, L, D]``, pooled, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6, padding_idx=0)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, ids):
        return self.out(paddle.tanh(self.norm(self.embed(ids))).mean(axis=1))


class _Norms(nn.Layer):
    """Layer norms over the last one and two axes (one without a bias) of ``[N, L, F]`` samples."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 6)
        self.norm = nn.LayerNorm(6, bias_attr=False)
        self.norm2 = nn.LayerNorm([4, 6])
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(paddle.tanh(self.norm2(self.norm(self.inner(x)))).mean(axis=1))


MODELS = {
    "conv_bn": (_conv_bn, [2, 8, 8]),
    "grouped": (_grouped, [2, 8, 8]),
    "conv1d": (_conv1d, [2, 8]),
    "conv3d": (_conv3d, [1, 4, 4, 4]),
    "tokens": (_Tokens, [4, 5]),
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), [6]),
    "layer_norm": (_Norms, [4, 5]),
    "words": (_Words, "ids"),
}

LEARNERS = {
    "maml": lambda m: MAML(m, 0.3),
    "maml_first_order": lambda m: MAML(m, 0.3, first_order=True),
    "maml_learned_rates": lambda m: MAML(m, 0.3, inner_steps=2, learn_inner_lr="per_step_per_layer"),
    "maml_running_norms": lambda m: MAML(m, 0.3, batch_norm="running"),
    "meta_sgd": lambda m: MetaSGD(m, 0.3),
}


def _data(shape, n=4, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    if shape == "ids":   # token ids of 5 positions, about one in four the padding id 0
        xs, xq = (paddle.to_tensor(rng.integers(0, 11, [TASKS, n, 5]) * (rng.random([TASKS, n, 5]) > 0.25))
                  for _ in range(2))
    else:
        xs = paddle.to_tensor(rng.standard_normal([TASKS, n, *shape]), dtype=dtype)
        xq = paddle.to_tensor(rng.standard_normal([TASKS, n, *shape]), dtype=dtype)
    ys = paddle.to_tensor(rng.integers(0, 3, [TASKS, n]))
    yq = paddle.to_tensor(rng.integers(0, 3, [TASKS, n]))
    return xs, ys, xq, yq


def _make(model_name, learner_name, dtype="float64", seed=3):
    paddle.seed(seed)
    model = MODELS[model_name][0]()
    if dtype == "float64":
        model = model.to(dtype="float64")
    learner = LEARNERS[learner_name](model)
    if dtype == "float64":
        learner.to(dtype="float64")
    return learner


def _batched_loss(learner, data, steps=2):
    xs, ys, xq, yq = data
    task = learner.clone(tasks=xs.shape[0])
    for _ in range(steps):
        task.adapt(F.cross_entropy(task(xs), ys, reduction="none").mean(axis=1))
    return F.cross_entropy(task(xq), yq), task


def _loop_loss(learner, data, steps=2):
    xs, ys, xq, yq = data
    losses, tasks = [], []
    for t in range(xs.shape[0]):
        task = learner.clone()
        for _ in range(steps):
            task.adapt(F.cross_entropy(task(xs[t]), ys[t]))
        losses.append(F.cross_entropy(task(xq[t]), yq[t]))
        tasks.append(task)
    return paddle.stack(losses).mean(), tasks


def _meta_gradient(learner, loss):
    params = [p for p in learner.parameters() if not p.stop_gradient]
    return [g.numpy() for g in paddle.grad(loss, params)]


@pytest.mark.parametrize("learner_name", list(LEARNERS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_each_task_adapts_and_meta_learns_as_a_separate_clone(model_name, learner_name):
    learner = _make(model_name, learner_name)
    data = _data(MODELS[model_name][1])
    batched, task = _batched_loss(learner, data)
    loop, clones = _loop_loss(learner, data)
    np.testing.assert_allclose(float(batched), float(loop), rtol=1e-10)
    for t, clone in enumerate(clones):   # task t's adapted parameters are row t of the batched learner's
        for a, b in zip(ParameterSlots(task.model).tensors, ParameterSlots(clone.model).tensors):
            if not b.stop_gradient:
                np.testing.assert_allclose(a[t].numpy(), b.numpy(), rtol=0, atol=1e-10)
    got, want = _meta_gradient(learner, batched), _meta_gradient(learner, loop)
    scale = max(float(np.abs(w).max()) for w in want)
    assert scale > 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-10 * scale)


def test_running_statistics_are_each_tasks_own():
    learner = _make("conv_bn", "maml")
    xs, ys, _, _ = _data([2, 8, 8])
    task = learner.clone(tasks=TASKS)
    task(xs)
    for t in range(TASKS):
        clone = learner.clone()
        clone(xs[t])
        for batched, single in zip([task.model[1], task.model[4]], [clone.model[1], clone.model[4]]):
            for key in ("_mean", "_variance"):
                np.testing.assert_allclose(batched._parameters[key].numpy().reshape(TASKS, -1)[t],
                                           single._parameters[key].numpy(), rtol=1e-12)
    np.testing.assert_array_equal(learner.model[1]._mean.numpy(), np.zeros(4))   # the meta-model's unchanged


def test_anil_features_run_once_for_all_tasks():
    paddle.seed(0)
    features = nn.Sequential(nn.Conv2D(2, 4, 3, padding=1), nn.BatchNorm2D(4), nn.ReLU(), nn.Flatten())
    anil = ANIL(features, nn.Linear(4 * 8 * 8, 3), 0.3)
    anil.to(dtype="float64")
    features[1].eval()   # shared batch norm: running statistics, the same for every task
    paddle.assign(paddle.full([4], 2.0, dtype="float64"), output=features[1]._variance)
    data = _data([2, 8, 8])
    batched, _ = _batched_loss(anil, data)
    loop, _ = _loop_loss(anil, data)
    got, want = _meta_gradient(anil, batched), _meta_gradient(anil, loop)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-10 * max(float(np.abs(v).max()) for v in want))
    features[1].train()
    with pytest.raises(ValueError, match=r"batch-norm layer 'features.1' is shared by the tasks"):
        anil.clone(tasks=TASKS)(data[0])


def test_second_order_is_exact_and_first_order_fails_the_same_check():
    data = _data([2, 8, 8], n=5)

    def loss_fn(learner, batch):
        return _batched_loss(learner, batch, steps=2)[0]

    report = check_meta_gradients(lambda: _make("conv_bn", "maml"), loss_fn, data, coordinates=3)
    assert report.ok, str(report)
    first = check_meta_gradients(lambda: _make("conv_bn", "maml_first_order"), loss_fn, data, coordinates=3)
    assert not first.ok


@pytest.mark.skipif(not onednn.available(), reason="oneDNN not loadable")
@pytest.mark.parametrize("first_order", [False, True])
def test_float32_batches_run_grouped_onednn_convolutions(first_order, monkeypatch):
    """W1's shapes for 4 tasks: the convolutions of all tasks are one grouped oneDNN call each, and the
    meta-gradient equals the loop's (per-task clones, ungrouped kernels) to float32 rounding."""
    calls = []
    for name in ("conv2d_forward", "conv2d_backward_data", "conv2d_backward_weights"):
        original = getattr(onednn, name)
        # (the arguments end with groups and the dispatcher's accelerated_only flag)
        monkeypatch.setattr(onednn, name, lambda *a, _f=original, _n=name: calls.append((_n, a[-2])) or _f(*a))
    monkeypatch.setattr(kernels, "_checked", {})
    previous, dtype = set_fast_kernels(True), paddle.get_default_dtype()
    try:
        paddle.set_default_dtype("float32")
        paddle.seed(0)
        model = nn.Sequential(nn.Conv2D(1, 64, 3, stride=2, padding=1), nn.BatchNorm2D(64), nn.ReLU(),
                              nn.Conv2D(64, 64, 3, stride=2, padding=1), nn.BatchNorm2D(64), nn.ReLU(),
                              nn.Flatten(), nn.Linear(64 * 7 * 7, 5))
        learner = MAML(model, 0.4, first_order=first_order)
        rng = np.random.default_rng(0)
        xs = paddle.to_tensor(rng.standard_normal([4, 5, 1, 28, 28]), dtype="float32")
        ys = paddle.to_tensor(np.tile(np.arange(5), (4, 1)))
        data = (xs, ys, xs * 0.5, ys)
        got = _meta_gradient(learner, _batched_loss(learner, data, steps=1)[0])
        assert any(name == "conv2d_backward_data" and groups == 4 for name, groups in calls)
        assert any(name == "conv2d_forward" and groups == 4 for name, groups in calls)
        want = _meta_gradient(learner, _loop_loss(learner, data, steps=1)[0])
    finally:
        set_fast_kernels(previous)
        paddle.set_default_dtype(dtype)
    assert kernels.self_check_failures() == []
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-4 * max(float(np.abs(v).max()) for v in want))


def test_the_step_counts_one_clone_and_trains_the_meta_model():
    learner = _make("mlp", "maml")
    learner.meta_optimizer = paddle.optimizer.SGD(0.1, parameters=learner.parameters())
    before = [p.numpy().copy() for p in learner.parameters()]
    task = learner.clone(tasks=TASKS)
    assert task.tasks == TASKS and learner.tasks is None
    task.adapt(F.cross_entropy(task(_data([6])[0]), _data([6])[1], reduction="none").mean(axis=1))
    learner.step(F.cross_entropy(task(_data([6])[2]), _data([6])[3]))
    assert any(not np.array_equal(b, p.numpy()) for b, p in zip(before, learner.parameters()))
    again = task.clone()       # a clone of a batched task learner keeps its batch
    assert again.tasks == TASKS and list(again.model[0].weight.shape) == [TASKS, 6, 8]


def test_layers_are_restored_after_a_forward_and_after_an_error():
    learner = _make("conv_bn", "maml")
    task = learner.clone(tasks=TASKS)
    conv = task.model[0]
    weight, groups = conv.weight, conv._groups
    task(_data([2, 8, 8])[0])
    with pytest.raises((ValueError, RuntimeError)):
        task(paddle.randn([TASKS, 4, 2, 12, 12], dtype="float64"))   # the linear layer gets 36 features, not 16
    for sub in task.model.sublayers():
        assert "forward" not in sub.__dict__
    assert conv.weight is weight and conv._groups == groups and list(weight.shape) == [TASKS, 4, 2, 3, 3]


@pytest.mark.parametrize("tasks,error,match", [
    (0, ValueError, "tasks must be a positive integer"),
    (2.0, TypeError, "tasks must be a positive integer"),
    (True, TypeError, "tasks must be a positive integer"),
])
def test_bad_task_counts(tasks, error, match):
    with pytest.raises(error, match=match):
        _make("mlp", "maml").clone(tasks=tasks)


def test_a_loss_per_task_is_required():
    learner = _make("mlp", "maml")
    xs, ys, _, _ = _data([6])
    task = learner.clone(tasks=TASKS)
    with pytest.raises(ValueError, match=r"loss must have shape \[3\] \(one per task\), got \[\]"):
        task.adapt(F.cross_entropy(task(xs), ys))
    with pytest.raises(ValueError, match=r"loss must have shape \[3\] \(one per task\), got \[3, 4\]"):
        task.adapt(F.cross_entropy(task(xs), ys, reduction="none"))


def test_inputs_need_the_task_axis_first():
    task = _make("mlp", "maml").clone(tasks=TASKS)
    with pytest.raises(ValueError, match=r"input 0 has shape \[4, 6\]; a learner cloned for 3 tasks takes each "
                                         r"input with the task axis first, \[3, N, \.\.\.\]"):
        task(paddle.randn([4, 6], dtype="float64"))


@pytest.mark.parametrize("make,match", [
    (lambda: MAML(nn.Sequential(nn.Conv2D(2, 4, 3), nn.GroupNorm(2, 4)), 0.1), r"\['1 \(GroupNorm\)'\] hold trainable"),
    (lambda: MAML(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm(3, param_attr=paddle.ParamAttr(trainable=False),
                                                               bias_attr=paddle.ParamAttr(trainable=False))),
                  0.1, allow_nograd=True), r"\['1 \(BatchNorm\)'\] hold trainable parameters or batch statistics"),
    (lambda: MAML(nn.Embedding(5, 3, sparse=True), 0.1), r"Embedding with sparse, max_norm or scale_grad_by_freq"),
    (lambda: MAML(nn.Sequential(nn.Conv2D(2, 2, 3, data_format="NHWC")), 0.1), "channel-last layout"),
    (lambda: MAML(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1D(4)), 0.1, batch_norm="shared"),
     "batch_norm='shared'"),
    (lambda: MAML(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1D(4)), 0.1, inner_steps=2, per_step_bn_stats=True),
     "per_step_bn_stats=True clones one task at a time"),
    (lambda: MAML(nn.Linear(4, 4), 0.1, inner_steps=2, recompute=1), "recompute=1 clones one task at a time"),
])
def test_what_cannot_be_batched_is_named(make, match):
    with pytest.raises(ValueError, match=match):
        make().clone(tasks=2)


class _Doubled(nn.Linear):
    """A linear layer with a forward of its own, as PaddleNLP's LoRA layers subclass ``nn.Linear``."""

    def forward(self, x):
        return super().forward(x) * 2.0


class _OwnNorm(nn.BatchNorm1D):
    def forward(self, x):
        return super().forward(x) + 1.0


def _own_instance_forward() -> nn.Layer:
    layer = nn.Linear(6, 3)
    stock = layer.forward
    layer.forward = lambda x: stock(x) * 2.0      # defined on the instance, shadowing Linear.forward
    return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), layer)


@pytest.mark.parametrize("make,name", [
    (lambda: nn.Sequential(nn.Linear(6, 6), nn.Tanh(), _Doubled(6, 3)), r"2 \(_Doubled with a forward of its own\)"),
    (_own_instance_forward, r"2 \(Linear with a forward of its own\)"),
    (lambda: nn.Sequential(nn.Linear(6, 6), _OwnNorm(6, weight_attr=False, bias_attr=False), nn.Linear(6, 3)),
     r"1 \(_OwnNorm with a forward of its own\)"),   # no trainable parameters, but per-task batch statistics
    (lambda: nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.utils.weight_norm(nn.Linear(6, 3))),
     r"2 \(Linear with parameters \['weight_g', 'weight_v'\]\)"),
])
def test_a_layer_that_computes_otherwise_than_paddles_forward_is_refused(make, name):
    # The batched learner computes each layer type with Paddle's forward; it ran the first three models silently
    # without the override (a doubled output, a shifted normalisation) and failed deep inside on weight_norm's
    # parameters (KeyError 'weight') before the check.
    with pytest.raises(ValueError, match=name + r" compute otherwise than Paddle's forward .* clone one learner"):
        MAML(make(), 0.3).clone(tasks=2)


def test_a_frozen_layer_with_a_forward_of_its_own_runs_as_it_is():
    paddle.seed(1)
    frozen = _Doubled(8, 3)
    for p in frozen.parameters():
        p.stop_gradient = True
    learner = MAML(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), frozen), 0.3, allow_nograd=True)
    learner.to(dtype="float64")
    data = _data([6])
    batched, _ = _batched_loss(learner, data)
    loop, _ = _loop_loss(learner, data)
    np.testing.assert_allclose(float(batched), float(loop), rtol=1e-10)
    for g, w in zip(_meta_gradient(learner, batched), _meta_gradient(learner, loop)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


def test_a_batched_task_learner_is_not_batched_again():
    task = _make("mlp", "maml").clone(tasks=TASKS)
    with pytest.raises(ValueError, match="already cloned for 3 tasks"):
        task.clone(tasks=2)


def test_the_module_example_runs_as_printed():
    import re

    from paddlefsl.metaopt import taskbatch
    (block,) = re.findall(r"```python\n(.*?)```", taskbatch.__doc__, re.S)
    dtype = paddle.get_default_dtype()
    paddle.set_default_dtype("float32")       # a fresh interpreter's default
    try:
        namespace: dict = {}
        exec(compile(__import__("textwrap").dedent(block), "taskbatch example", "exec"), namespace)
    finally:
        paddle.set_default_dtype(dtype)
    assert namespace["task"].tasks == 16
    assert all(p.grad is not None for p in namespace["model"].parameters())
