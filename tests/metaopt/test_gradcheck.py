"""check_meta_gradients: several step sizes, kinks reported as such, tolerance on the gradient's scale; a wrong
(first-order) meta-gradient still fails."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from paddlefsl.metaopt import MAML, check_meta_gradients


def _cnn():
    paddle.seed(1)
    return nn.Sequential(nn.Conv2D(1, 2, 3, padding=1), nn.BatchNorm2D(2), nn.ReLU(), nn.MaxPool2D(2),
                         nn.Flatten(), nn.Linear(2 * 3 * 3, 3))


def _cnn_loss(offset=0.0):
    xs, ys = paddle.randn([6, 1, 6, 6]), paddle.arange(6) % 3
    xq, yq = paddle.randn([6, 1, 6, 6]), paddle.arange(6) % 3

    def loss_fn(learner, data):
        task = learner.clone()
        task.adapt(F.cross_entropy(task(xs), ys))
        return F.cross_entropy(task(xq), yq) + offset

    return loss_fn


@pytest.mark.parametrize("first_order", [False, True])
def test_conv_bn_maxpool_cnn_passes_second_order_and_fails_first_order(first_order):
    report = check_meta_gradients(lambda: MAML(_cnn(), 0.5, first_order=first_order), _cnn_loss(), None,
                                  coordinates=2)
    if first_order:
        assert not report.ok and sum(report.wrong.values()) > 0, str(report)
        assert str(report).splitlines()[-1].startswith("MISMATCH")
        assert "WRONG (worst: flat index" in str(report)
    else:
        assert report.ok, str(report)
        assert str(report).splitlines()[-1].startswith("OK")


def test_the_bias_before_batch_norm_is_judged_on_the_gradients_scale():
    """The true gradient of a conv bias feeding batch norm is 0; a large loss value makes finite differences at a
    small step pure rounding noise (the old single-step check reported MISMATCH here)."""
    report = check_meta_gradients(lambda: MAML(_cnn(), 0.5), _cnn_loss(offset=1e5), None, coordinates=2)
    assert report.ok, str(report)
    assert report.errors["model.0.bias"] < 1e-6


def _kink_model():
    model = nn.Linear(1, 1)
    model.bias.set_value(paddle.zeros([1]))            # relu(w * 0 + b) at b = 0: a kink in b
    return model


def test_a_kink_is_reported_as_a_kink_not_as_a_mismatch():
    x = paddle.zeros([1, 1])
    report = check_meta_gradients(lambda: MAML(_kink_model(), 0.1), lambda learner, _: F.relu(learner(x)).sum(),
                                  None, coordinates=None)
    assert report.kinks == {"model.weight": 0, "model.bias": 1} and report.wrong == {"model.weight": 0,
                                                                                     "model.bias": 0}
    assert report.unverified == ["model.bias"] and not report.ok
    assert "UNVERIFIED (model.bias: every checked coordinate sits at a kink)" in str(report)
    assert "1 at kinks (not compared)" in str(report)


def test_a_value_outside_the_one_sided_slopes_at_a_kink_is_wrong():
    x = paddle.zeros([1, 1])

    def loss_fn(learner, _):
        bias = learner.model.bias
        # (bias - bias.detach()) is 0 in value but adds 1.5 to the meta-gradient: 1.5 lies outside the one-sided
        # slopes 0 and 1 of relu at the kink, so the coordinate is wrong, not a kink.
        return F.relu(learner(x)).sum() + 1.5 * (bias - bias.detach()).sum()

    report = check_meta_gradients(lambda: MAML(_kink_model(), 0.1), loss_fn, None, coordinates=None)
    assert report.wrong["model.bias"] == 1 and not report.ok, str(report)
    assert str(report).splitlines()[-1].startswith("MISMATCH")


def test_a_single_step_size_and_bad_steps():
    x = paddle.ones([2, 1])
    loss_fn = lambda learner, _: (learner(x) ** 2).sum()  # noqa: E731
    assert check_meta_gradients(lambda: MAML(nn.Linear(1, 1), 0.1), loss_fn, None, eps=1e-5).ok
    for bad in (0.0, [1e-4, -1e-5], []):
        with pytest.raises(ValueError, match="eps must be positive step sizes"):
            check_meta_gradients(lambda: MAML(nn.Linear(1, 1), 0.1), loss_fn, None, eps=bad)


def test_progress_bar(capsys):
    x = paddle.ones([2, 1])
    report = check_meta_gradients(lambda: MAML(nn.Linear(1, 1), 0.1), lambda learner, _: (learner(x) ** 2).sum(),
                                  None, coordinates=None, progress=True)
    assert report.ok and report.checked == {"model.weight": 1, "model.bias": 1}
    assert "check_meta_gradients" in capsys.readouterr().err
