import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from paddlefsl.metaopt import ANIL, check_meta_gradients
from tests.metaopt.models import adapted_query_loss, mlp, regression_task


def _anil(first_order=False):
    features = mlp((2, 8, 8), seed=3)
    paddle.seed(4)
    return ANIL(nn.Sequential(features, nn.Tanh()), nn.Linear(8, 1), inner_lr=0.4, first_order=first_order)


@pytest.mark.parametrize("steps", [1, 3])
def test_features_and_head_get_the_exact_meta_gradient(steps):
    report = check_meta_gradients(_anil, adapted_query_loss(steps), regression_task(dim=2), coordinates=None)
    assert report.ok, str(report)
    assert any(name.startswith("model.features") for name in report.errors)


def test_first_order_answer_fails():
    report = check_meta_gradients(lambda: _anil(True), adapted_query_loss(2), regression_task(dim=2),
                                  coordinates=None)
    assert not report.ok


def test_only_the_head_adapts_and_features_are_shared():
    anil = _anil()
    xs, ys, _, _ = regression_task(dim=2)
    task = anil.clone()
    assert task.features is anil.features and task.head is not anil.head
    head_before = [p.numpy().copy() for p in anil.head.parameters()]
    task.adapt(F.mse_loss(task(xs), ys))
    assert all(p is q for p, q in zip(task.features.parameters(), anil.features.parameters()))
    assert not np.allclose(task.head.weight.numpy(), head_before[0])
    for p, b in zip(anil.head.parameters(), head_before):
        np.testing.assert_array_equal(p.numpy(), b)


def test_bad_features_or_head():
    with pytest.raises(TypeError, match="features must be a paddle.nn.Layer"):
        ANIL(lambda x: x, nn.Linear(2, 1), 0.1)
    with pytest.raises(TypeError, match="head must be a paddle.nn.Layer"):
        ANIL(nn.Linear(2, 2), "head", 0.1)
