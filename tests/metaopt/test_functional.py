import copy

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


def test_frozen_parameters_are_copied_as_deepcopy_copies_them():
    """Frozen parameters (running statistics, weights with ``stop_gradient=True``) are copied the way Paddle's own
    ``EagerParamBase.__deepcopy__`` copies them (a parameter of the same attributes under a fresh name, holding a
    copy of the values), without its generic deep copy of the attributes (half the time)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1D(4))
    model[0].weight.stop_gradient = True
    model[0].weight.optimize_attr = {"learning_rate": 0.5}
    model[0].weight.need_clip = False
    clone = clone_model(model)
    for original, copied in [(model[0].weight, clone[0].weight), (model[1]._mean, clone[1]._mean),
                             (model[1]._variance, clone[1]._variance)]:
        reference = copy.deepcopy(original)
        assert type(copied) is type(reference) is type(original)
        assert copied.name != original.name and copied.name.startswith(original.name + "_deepcopy")
        assert copied.stop_gradient and copied.shape == original.shape and copied.dtype == original.dtype
        assert {k: v for k, v in vars(copied).items()} == {k: v for k, v in vars(reference).items()}
        assert copied.optimize_attr is not original.optimize_attr
        np.testing.assert_array_equal(copied.numpy(), original.numpy())
        assert copied.data_ptr() != original.data_ptr()


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


# ------------------------------------------------------------------------------------------------ _tree_copy
class _Odd(nn.Layer):
    """Attributes of every kind a user layer may hold: containers, a cycle, an object with its own deepcopy, a
    class, a bound method, a frozen tensor outside _parameters, a forward hook."""

    class Note:
        def __init__(self, text):
            self.text, self.seen = text, {"count": 1}

    class Custom:
        copies = 0

        def __deepcopy__(self, memo):
            type(self).copies += 1
            return type(self)()

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.shared = [1, (2, "x"), {"k": [3.0]}]
        self.also = self.shared  # the same list twice
        self.cycle = {"name": "c"}
        self.cycle["self"] = self.cycle
        self.note = _Odd.Note("hello")
        self.custom = _Odd.Custom()
        self.kinds = (nn.Linear, int, {1, 2}, frozenset({3}))
        self.method = self.fc.forward
        self.table = paddle.to_tensor([1.0, 2.0])
        self.register_forward_post_hook(lambda layer, inputs, outputs: outputs * 2)

    def forward(self, x):
        return self.fc(x) * self.table.sum()


_SEEDED: set[int] = set()  # ids of the tensors both copies take from the memo (clone_model's trainable copies)


def _isomorphic(o, a, b, pairs):
    """``a`` (copy.deepcopy of ``o``) and ``b`` (_tree_copy of ``o``) have the same structure, values and sharing,
    and each is a new object exactly where the other is."""
    assert type(a) is type(b), (type(a), type(b))
    assert (a is o) == (b is o), (type(o), o)
    if isinstance(a, (str, int, float, bool, type(None), type)):
        assert a == b
        return
    if id(a) in pairs:
        assert pairs[id(a)] is b
        return
    pairs[id(a)] = b
    if isinstance(a, paddle.Tensor):
        assert a.stop_gradient == b.stop_gradient and a.dtype == b.dtype and (a is b) == (id(a) in _SEEDED)
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    elif isinstance(a, dict):
        assert list(a) == list(b) == list(o)
        for key in a:
            _isomorphic(o[key], a[key], b[key], pairs)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b) == len(o)
        for x, y, z in zip(o, a, b):
            _isomorphic(x, y, z, pairs)
    elif isinstance(a, (set, frozenset)):
        assert a == b
    elif hasattr(a, "__self__") and hasattr(a, "__func__"):  # a bound method: bound to the copy's object
        assert a.__func__ is b.__func__
        _isomorphic(o.__self__, a.__self__, b.__self__, pairs)
    elif hasattr(a, "__dict__") and (isinstance(a, nn.Layer) or not callable(a)):
        _isomorphic(vars(o), vars(a), vars(b), pairs)
    else:
        assert a is b or a == b, (a, b)


def _models():
    paddle.seed(0)
    return {"mlp": mlp(), "tied": Tied(), "odd": _Odd(),
            "conv_bn": nn.Sequential(nn.Conv2D(1, 4, 3), nn.BatchNorm2D(4), nn.ReLU(), nn.MaxPool2D(2)),
            "lstm": nn.LSTM(3, 4, num_layers=2, direction="bidirect"), "gru": nn.GRU(3, 4),
            "transformer": nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1),
            "layer_list": nn.LayerList([nn.Linear(2, 2), nn.LayerNorm(2)])}


@pytest.mark.parametrize("name", sorted(_models()))
def test_tree_copy_copies_as_deepcopy_does(name):
    """The fast copy behind clone_model gives the same tree as copy.deepcopy (types, values, what is shared,
    what is a new object), with the same memo; a clone of it computes what the deepcopy-based clone computes."""
    import copy

    from paddlefsl.metaopt.functional import _tree_copy
    model = _models()[name]

    seeded = {id(p): p.clone() for p in model.parameters() if not p.stop_gradient}
    _SEEDED.clear()
    _SEEDED.update(id(t) for t in seeded.values())
    expected, got = copy.deepcopy(model, dict(seeded)), _tree_copy(model, dict(seeded))
    _isomorphic(model, expected, got, {})
    if name == "odd":
        assert got.also is got.shared and got.cycle["self"] is got.cycle and got.note is not model.note
        assert got.method.__self__ is got.fc and got.kinds[0] is nn.Linear and got.table is not model.table
        clone = clone_model(model)
        np.testing.assert_array_equal(clone(paddle.ones([1, 3])).numpy(), model(paddle.ones([1, 3])).numpy())
