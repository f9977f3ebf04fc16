import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from paddlefsl.metaopt import MAML, ParameterSlots, clone_model, functional_call
from tests.metaopt.models import mlp


class Tied(nn.Layer):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.out = nn.Linear(3, 5, bias_attr=False)
        self.out.weight = self.embed.weight  # [5, 3] used as a [3, 5]-shaped map below

    def forward(self, ids):
        h = F.embedding(ids, self.embed.weight)
        return paddle.matmul(h, self.out.weight, transpose_y=True)


def test_clone_is_connected_and_never_changes_the_original():
    model = mlp()
    clone = clone_model(model)
    for p, c in zip(model.parameters(), clone.parameters()):
        assert c is not p and not c.stop_gradient
        np.testing.assert_array_equal(c.numpy(), p.numpy())
    x = paddle.randn([4, 1])
    clone(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tied_parameters_stay_tied():
    model = Tied()
    clone = clone_model(model)
    assert clone.out.weight is clone.embed.weight
    slots = ParameterSlots(clone)
    assert len(slots) == 1 and slots.names == ["embed.weight"]
    slots.write([clone.embed.weight * 2])
    assert clone.out.weight is clone.embed.weight


def test_buffers_and_running_statistics_are_copied():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1D(4))
    model[1].register_buffer("counter", paddle.zeros([1]))
    clone = clone_model(model)
    mean_before = model[1]._mean.numpy().copy()
    clone(paddle.randn([8, 3]) * 3 + 1)
    assert clone[1]._mean is not model[1]._mean and clone[1].counter is not model[1].counter
    assert not np.allclose(clone[1]._mean.numpy(), mean_before)
    np.testing.assert_array_equal(model[1]._mean.numpy(), mean_before)


def test_share_stats_shares_running_statistics():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1D(4))
    clone = clone_model(model, share_stats=True)
    assert clone[1]._mean is model[1]._mean


def test_frozen_parameters_stay_frozen():
    model = mlp()
    model[0].weight.stop_gradient = True
    maml = MAML(model, 0.1, allow_nograd=True)
    task = maml.clone()
    frozen = task.model[0].weight
    assert frozen.stop_gradient
    x = paddle.randn([4, 1])
    task.adapt(F.mse_loss(task(x), x))
    assert task.model[0].weight is frozen
    np.testing.assert_array_equal(frozen.numpy(), model[0].weight.numpy())
    F.mse_loss(task(x), x).backward()
    assert model[0].weight.grad is None and model[2].weight.grad is not None


@pytest.mark.parametrize("kind", ["SimpleRNN", "LSTM", "GRU"])
def test_recurrent_clone_computes_with_its_own_weights(kind):
    paddle.seed(0)
    model = getattr(nn, kind)(2, 3)
    maml = MAML(model, 0.5, first_order=True)
    x = paddle.randn([2, 4, 2])
    task = maml.clone()
    task.adapt(task(x)[0].square().mean())
    manual = getattr(nn, kind)(2, 3)
    for p, adapted in zip(manual.parameters(), task.model.parameters()):
        paddle.assign(adapted.detach(), output=p)
    out_task, out_meta, out_manual = task(x)[0], model(x)[0], manual(x)[0]
    assert not np.allclose(out_task.numpy(), out_meta.numpy())
    np.testing.assert_allclose(out_task.numpy(), out_manual.numpy(), rtol=1e-12)


def test_functional_call_with_names_and_sequence_and_restores_on_error():
    model = mlp()
    x = paddle.randn([3, 1])
    doubled = [p * 2 for p in model.parameters()]
    manual = mlp()
    for p, d in zip(manual.parameters(), doubled):
        paddle.assign(d, output=p)
    np.testing.assert_allclose(functional_call(model, doubled, x).numpy(), manual(x).numpy(), rtol=1e-12)
    by_name = dict(zip([n for n, _ in model.named_parameters()], doubled))
    np.testing.assert_allclose(functional_call(model, by_name, x).numpy(), manual(x).numpy(), rtol=1e-12)
    originals = list(model.parameters())
    with pytest.raises(ValueError):
        functional_call(model, doubled, paddle.randn([3, 7]))
    assert all(a is b for a, b in zip(model.parameters(), originals))
    with pytest.raises(KeyError, match="not parameters"):
        functional_call(model, {"nope": doubled[0]}, x)
    with pytest.raises(ValueError, match="expected 6 parameters"):
        functional_call(model, doubled[:2], x)


def test_not_a_layer():
    with pytest.raises(TypeError, match="layer must be a paddle.nn.Layer"):
        clone_model("model")
