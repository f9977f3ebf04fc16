import gc
import math

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import _C_ops, nn

from paddlefsl.metaopt import ANIL, MAML, BaseLearner, MetaSGD, SecondOrderError
from paddlefsl.metaopt.autodiff import is_active, registry
from tests.metaopt.models import mlp, regression_task


def _stock_kernels():
    return {name: getattr(_C_ops, name) for name in registry.kernel_names()}


def test_base_learner_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        BaseLearner(mlp())


@pytest.mark.parametrize("lr", [0, -0.1, math.nan, math.inf])
def test_inner_lr_must_be_positive_and_finite(lr):
    with pytest.raises(ValueError, match="inner_lr must be a positive finite number"):
        MAML(mlp(), inner_lr=lr)


@pytest.mark.parametrize("lr", ["0.1", None, True])
def test_inner_lr_must_be_a_number(lr):
    with pytest.raises(TypeError, match="inner_lr must be a positive finite number"):
        MAML(mlp(), inner_lr=lr)


LEARNERS = {
    "MAML": lambda **kw: MAML(mlp(), **kw),
    "MetaSGD": lambda **kw: MetaSGD(mlp(), **kw),
    "ANIL": lambda **kw: ANIL(mlp((1, 8)), nn.Linear(8, 1), **kw),
}


@pytest.mark.parametrize("learner", sorted(LEARNERS))
@pytest.mark.parametrize("alias", ["lr", "fast_lr", "step_size"])
def test_other_libraries_name_for_the_inner_rate_points_to_inner_lr(learner, alias):
    with pytest.raises(TypeError, match=rf"{learner}\(\): unexpected keyword argument '{alias}': the inner-loop "
                                        rf"learning rate is called inner_lr here"):
        LEARNERS[learner](**{alias: 0.4})


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_a_misspelt_argument_gets_a_suggestion_and_the_accepted_list(learner):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'firstorder'; did you mean 'first_order'\?"
                                        r" \(it takes: .*inner_lr, first_order"):
        LEARNERS[learner](inner_lr=0.1, firstorder=True)


def test_a_missing_inner_lr_is_named():
    with pytest.raises(TypeError, match=r"MAML\(\): missing a required argument: 'inner_lr'"):
        MAML(mlp())


def test_model_must_be_a_layer():
    with pytest.raises(TypeError, match="model must be a paddle.nn.Layer"):
        MAML(lambda x: x, inner_lr=0.1)


def test_batch_norm_mode_is_checked():
    with pytest.raises(ValueError, match="batch_norm must be one of"):
        MAML(mlp(), 0.1, batch_norm="transductive")


def test_non_scalar_loss():
    task = MAML(mlp(), 0.1).clone()
    with pytest.raises(ValueError, match="adapt step 1: loss must be a scalar"):
        task.adapt(task(paddle.randn([4, 1])))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_names_the_step(bad):
    xs, ys, _, _ = regression_task()
    task = MAML(mlp(), 0.1).clone()
    task.adapt(F.mse_loss(task(xs), ys))
    with pytest.raises(FloatingPointError, match=r"adapt step 2: loss is (nan|inf)"):
        task.adapt(F.mse_loss(task(xs), ys) * bad)


def test_non_finite_gradient_names_the_step_and_parameter():
    xs, _, _, _ = regression_task()
    task = MAML(mlp(), 0.1).clone()
    out = task(xs)
    loss = paddle.sqrt(out.abs() * 0).sum()  # finite loss, infinite gradient
    with pytest.raises(FloatingPointError, match=r"adapt step 1: the gradient of \['0.weight'"):
        task.adapt(loss)


def test_finite_gradients_whose_sum_overflows_are_not_reported():
    """The check reads one sum of all gradient entries; an overflowing sum of finite gradients (float32) must not
    raise: each gradient is then checked on its own."""
    model = nn.Linear(2, 2, bias_attr=False)
    model.weight.set_value(paddle.full([2, 2], 1e-10, dtype=model.weight.dtype))
    task = MAML(model, 1e-45).clone()
    w = task.model.weight
    big = 3e38 if w.dtype == paddle.float32 else 1.7e308
    task.adapt((w * big).sum())   # every gradient entry is `big`: finite, their sum is not
    assert task.model.weight is not w and bool(paddle.isfinite(task.model.weight).all())


def test_loss_not_connected_to_the_task_model():
    maml = MAML(mlp(), 0.1)
    task = maml.clone()
    with pytest.raises(ValueError, match="not connected"):
        task.adapt(paddle.to_tensor(1.0))
    other = paddle.randn([3])
    other.stop_gradient = False
    with pytest.raises(ValueError, match="not connected to the task model"):
        task.adapt((other * 2).sum())
    with pytest.raises(ValueError, match="not connected to the task model"):
        task.adapt(F.mse_loss(maml(paddle.randn([2, 1])), paddle.zeros([2, 1])))


def test_unused_parameter_is_named_or_gets_a_zero_update():
    class TwoHeads(nn.Layer):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(1, 1)
            self.unused = nn.Linear(1, 1)

        def forward(self, x):
            return self.used(x)

    x = paddle.randn([3, 1])
    task = MAML(TwoHeads(), 0.1).clone()
    with pytest.raises(ValueError, match=r"does not use the parameters \['unused.weight', 'unused.bias'\]"):
        task.adapt(task(x).sum())
    model = TwoHeads()
    task = MAML(model, 0.1, allow_unused=True).clone()
    task.adapt(task(x).sum())
    np.testing.assert_array_equal(task.model.unused.weight.numpy(), model.unused.weight.numpy())


def test_frozen_parameters_need_allow_nograd():
    model = mlp()
    model[2].bias.stop_gradient = True
    with pytest.raises(ValueError, match=r"frozen parameters \['2.bias'\].*allow_nograd=True"):
        MAML(model, 0.1)


def test_adapt_on_the_meta_learner_is_refused():
    maml = MAML(mlp(), 0.1)
    with pytest.raises(RuntimeError, match="call learner.clone"):
        maml.adapt(maml(paddle.randn([2, 1])).sum())


def test_step_with_no_clone_and_on_a_clone():
    model = mlp()
    maml = MAML(model, 0.1, meta_optimizer=paddle.optimizer.SGD(0.1, parameters=model.parameters()))
    with pytest.raises(RuntimeError, match="no task learner was cloned"):
        maml.step(maml(paddle.randn([2, 1])).sum())
    task = maml.clone()
    with pytest.raises(RuntimeError, match="call it on the learner you built"):
        task.step(task(paddle.randn([2, 1])).sum())


def test_step_loss_not_reaching_the_meta_model():
    maml = MAML(mlp(), 0.1)
    maml.clone()
    other = paddle.randn([3])
    other.stop_gradient = False
    with pytest.raises(ValueError, match="reaches none of the meta-model's parameters"):
        maml.step((other * 2).sum())


def test_meta_optimizer_must_hold_the_parameters():
    model = mlp()
    with pytest.raises(ValueError, match=r"does not hold the learner's parameters \['model.0.weight'"):
        MAML(model, 0.1, meta_optimizer=paddle.optimizer.SGD(0.1, parameters=list(model.parameters())[2:]))
    with pytest.raises(TypeError, match="meta_optimizer must be a paddle.optimizer.Optimizer"):
        MAML(model, 0.1, meta_optimizer="adam")


def test_dtype_mismatch_between_model_and_data():
    maml = MAML(mlp(), 0.1)
    with pytest.raises(TypeError, match="input 0 has dtype paddle.float32 but the model's parameters are"):
        maml(paddle.randn([2, 1]).astype("float32"))


def _bn_model():
    paddle.seed(2)
    return nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1D(4), nn.Tanh(), nn.Linear(4, 1))


def test_batch_norm_batch_mode_keeps_meta_statistics():
    model = _bn_model()
    maml = MAML(model, 0.1)
    x = paddle.randn([8, 2]) * 2 + 1
    mean = model[1]._mean.numpy().copy()
    task = maml.clone()
    task.adapt(task(x).square().mean())
    task(x)
    np.testing.assert_array_equal(model[1]._mean.numpy(), mean)
    assert not np.allclose(task.model[1]._mean.numpy(), mean)


def test_batch_norm_running_mode_uses_the_meta_running_statistics():
    model = _bn_model()
    model[1]._mean.set_value(paddle.to_tensor([0.5, -0.5, 1.0, 0.0]))
    maml = MAML(model, 0.1, batch_norm="running")
    x = paddle.randn([8, 2])
    task = maml.clone()
    model.eval()
    expected = model(x).numpy()
    model.train()
    np.testing.assert_allclose(task(x).numpy(), expected, rtol=1e-12)
    np.testing.assert_array_equal(task.model[1]._mean.numpy(), model[1]._mean.numpy())


def test_batch_norm_shared_mode_updates_the_meta_statistics():
    model = _bn_model()
    maml = MAML(model, 0.1, batch_norm="shared")
    mean = model[1]._mean.numpy().copy()
    maml.clone()(paddle.randn([8, 2]) * 2 + 1)
    assert not np.allclose(model[1]._mean.numpy(), mean)


def test_scope_is_active_while_a_second_order_task_learner_lives():
    stock = _stock_kernels()
    maml = MAML(mlp(), 0.1)
    task = maml.clone()
    assert is_active() and _C_ops.softmax is not stock["softmax"]
    other = maml.clone()
    del task
    gc.collect()
    assert is_active()
    del other
    gc.collect()
    assert not is_active() and _stock_kernels() == stock


def test_first_order_learners_use_the_exact_layer_too_and_leave_paddle_stock():
    stock = _stock_kernels()
    task = MAML(mlp(), 0.1, first_order=True).clone()
    assert is_active()
    task.adapt(task(paddle.randn([4, 1])).square().mean())
    del task
    gc.collect()
    assert not is_active() and _stock_kernels() == stock


def test_scope_covers_the_users_own_loss_between_clone_and_backward():
    xs, ys, xq, yq = regression_task()

    def loss_fn(learner, _):
        task = learner.clone()
        logits = task(xs)
        task.adapt(-(F.log_softmax(paddle.concat([logits, -logits], 1), axis=1)[:, 0]).mean())
        return F.softmax(paddle.concat([task(xq), yq], 1), axis=1)[:, 0].square().mean()

    from paddlefsl.metaopt import check_meta_gradients
    report = check_meta_gradients(lambda: MAML(mlp(), 0.3), loss_fn, None, coordinates=4)
    assert report.ok, str(report)


class _Lgamma(nn.Layer):
    def forward(self, x):
        return paddle.lgamma(x)


def test_an_op_without_exact_rule_raises_naming_op_layer_and_way_out():
    model = nn.Sequential(nn.Linear(1, 3), nn.Sigmoid(), _Lgamma(), nn.Linear(3, 1))
    stock = _stock_kernels()
    maml = MAML(model, 0.1)
    before = [p.numpy().copy() for p in model.parameters()]
    task = maml.clone()
    with pytest.raises(SecondOrderError) as info:
        task.adapt(task(paddle.rand([4, 1]) + 1).square().mean())
    assert info.value.op == "lgamma" and "'2' (_Lgamma)" in info.value.layer
    assert "first_order=True" in str(info.value)
    for p, b in zip(model.parameters(), before):
        np.testing.assert_array_equal(p.numpy(), b)
    first = MAML(model, 0.1, first_order=True).clone()
    first.adapt(first(paddle.rand([4, 1]) + 1).square().mean())
    del task, first, info  # the traceback in info keeps the task learner alive
    gc.collect()
    assert _stock_kernels() == stock


@pytest.mark.parametrize("learner", sorted(LEARNERS))
def test_adapt_under_no_grad_says_so(learner):
    task = LEARNERS[learner](inner_lr=0.1).clone()
    xs, ys, _, _ = regression_task()
    loss = F.mse_loss(task(xs), ys)
    with paddle.no_grad():
        with pytest.raises(RuntimeError, match=r"adapt step 1: gradient recording is off \(inside paddle.no_grad"):
            task.adapt(loss)


def test_a_loss_computed_under_no_grad_hints_at_no_grad():
    task = MAML(mlp(), inner_lr=0.1).clone()
    xs, ys, _, _ = regression_task()
    with paddle.no_grad():
        loss = F.mse_loss(task(xs), ys)
    with pytest.raises(ValueError, match=r"not connected .* was it computed inside paddle.no_grad\(\)"):
        task.adapt(loss)


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint8"])
def test_integer_images_into_a_conv_name_the_input_and_the_cast(dtype):
    model = nn.Sequential(nn.Conv2D(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3))
    task = MAML(model, inner_lr=0.1).clone()
    x = paddle.to_tensor(np.random.randint(0, 255, (4, 1, 8, 8)).astype(dtype))
    with pytest.raises(TypeError, match=rf"input 0 has dtype paddle.{dtype}, but the model's conv2d kernel takes "
                                        r"floating point data only; cast it, e.g. x.astype\(paddle.float64\)"):
        task(x)


class _TwoOutputs(nn.Layer):
    """A model returning (logits, an auxiliary value), as many PaddleNLP and PaddleSpeech models do."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out, out.mean()


TUPLE_LEARNERS = {
    "MAML": lambda: MAML(_TwoOutputs(mlp((1, 8, 3))), inner_lr=0.1),
    "MetaSGD": lambda: MetaSGD(_TwoOutputs(mlp((1, 8, 3))), inner_lr=0.1),
    "ANIL": lambda: ANIL(mlp((1, 8)), _TwoOutputs(nn.Linear(8, 3)), inner_lr=0.1),
}


@pytest.mark.parametrize("learner", sorted(TUPLE_LEARNERS))
def test_a_tuple_output_in_a_loss_names_the_tuple_and_the_fix(learner):
    task = TUPLE_LEARNERS[learner]().clone()
    x, y = paddle.randn([4, 1]), paddle.to_tensor([0, 1, 2, 0])
    with pytest.raises(AttributeError, match=r"the model returned a tuple of 2 values \(Tensor\[4, 3\], Tensor\[\]\), "
                                             r"which has no attribute 'shape': pick the one your loss needs, "
                                             r"e.g. task\(x\)\[0\]"):
        F.cross_entropy(task(x), y)
    out, aux = task(x)  # a tuple in every other respect
    assert isinstance(task(x), tuple) and len(task(x)) == 2 and out.shape == [4, 3] and aux.shape == []
    task.adapt(F.cross_entropy(task(x)[0], y))


def test_integer_inputs_that_the_model_takes_still_work():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 2))
    task = MAML(model, inner_lr=0.1).clone()
    ids = paddle.to_tensor([[1, 2], [3, 4]], dtype="int64")
    task.adapt(F.cross_entropy(task(ids), paddle.to_tensor([0, 1])))
    assert task(ids).shape == [2, 2]


def _conv_bn_model():
    paddle.seed(3)
    return nn.Sequential(nn.Conv2D(1, 3, 3, padding=1), nn.BatchNorm2D(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 2))


def _bn_task_data():
    return paddle.randn([4, 1, 4, 4]), paddle.to_tensor([0, 1, 0, 1])


@pytest.mark.parametrize("policy", ["batch", "shared"])
def test_eval_mode_with_untrained_statistics_warns_once_and_names_the_policy(policy):
    learner = MAML(_conv_bn_model(), inner_lr=0.1, batch_norm=policy)
    learner.eval()
    x, y = _bn_task_data()
    with pytest.warns(UserWarning, match=rf"batch-norm layers \['1'\] of a task learner run in eval mode with "
                                         rf"running statistics that were never updated .* batch_norm='{policy}'"):
        task = learner.clone()
        task.adapt(F.cross_entropy(task(x), y))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task(x)
        learner.clone()(x)


def test_train_mode_or_trained_statistics_do_not_warn():
    import warnings
    x, y = _bn_task_data()
    learner = MAML(_conv_bn_model(), inner_lr=0.1, batch_norm="shared")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", "When training, we now always track")
        task = learner.clone()
        task.adapt(F.cross_entropy(task(x), y))       # train mode: batch statistics, and the shared ones move
        learner.eval()
        learner.clone()(x)                             # eval mode with trained statistics

def _conv_net():
    paddle.seed(3)
    return nn.Sequential(nn.Conv2D(1, 4, 3, padding=1), nn.BatchNorm2D(4), nn.ReLU(), nn.MaxPool2D(2),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 2))


_SYNC_METHODS = ("item", "numpy", "tolist", "__float__", "__int__", "__bool__", "__index__", "__array__")


@pytest.mark.parametrize("tasks", [None, 2])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("model", ["mlp", "conv"])
@pytest.mark.parametrize("learner", ["MAML", "MetaSGD", "ANIL"])
def test_adapt_copies_from_the_device_once(learner, model, first_order, tasks, monkeypatch):
    """One device-to-host synchronisation per adapt call, however many parameters and tasks (so a GPU is not
    stalled)."""
    from paddlefsl.metaopt import ANIL, MetaSGD
    if model == "mlp":
        net, x, y = mlp(), paddle.randn([5, 1], dtype="float64"), paddle.randn([5, 1], dtype="float64")
    else:
        net, x, y = _conv_net(), paddle.randn([3, 1, 6, 6]), paddle.randn([3, 2])
    if learner == "ANIL":
        meta = ANIL(net[:-1], net[-1], 0.1, first_order=first_order)
        if tasks is not None:
            meta.model.features[1].eval()   # a batch norm shared by batched tasks must not mix their statistics
    else:
        meta = {"MAML": MAML, "MetaSGD": MetaSGD}[learner](net, 0.1, first_order=first_order)
    task = meta.clone(tasks=tasks)
    if tasks is None:
        def task_loss():
            return F.mse_loss(task(x), y)
    else:   # each input with the task axis first, one loss per task
        x, y = paddle.stack([x] * tasks), paddle.stack([y] * tasks)

        def task_loss():
            return ((task(x) - y) ** 2).reshape([tasks, -1]).mean(axis=1)
    task.adapt(task_loss())  # warm-up: one-time self-checks may read values
    loss = task_loss()
    calls = []
    for name in _SYNC_METHODS:
        original = getattr(paddle.Tensor, name, None)
        if original is None:
            continue

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(paddle.Tensor, name, counted)
    task.adapt(loss)
    monkeypatch.undo()
    assert len(calls) == 1, calls
    assert len(list(task.parameters())) >= 4
