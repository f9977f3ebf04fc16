"""Unchanged models from Paddle's own zoo (`paddle.vision.models`), in float64 at small sizes: second-order MAML's
meta-gradient against finite differences, the first-order answer shown to differ (issue 18)."""
import os

import numpy as np
import paddle
import pytest
from paddle.vision import models

from tests.metaopt.models import assert_meta_gradient_exact

ZOO = {
    "lenet": (lambda: models.LeNet(num_classes=3), (6, 1, 28, 28)),
    "mobilenet_v1": (lambda: models.mobilenet_v1(scale=0.25, num_classes=3), (6, 3, 32, 32)),
    "mobilenet_v2": (lambda: models.mobilenet_v2(scale=0.25, num_classes=3), (6, 3, 32, 32)),
    "mobilenet_v3_small": (lambda: models.mobilenet_v3_small(scale=0.35, num_classes=3), (6, 3, 32, 32)),
    "shufflenet_v2_x0_25": (lambda: models.shufflenet_v2_x0_25(num_classes=3), (6, 3, 32, 32)),
    "resnet18": (lambda: models.resnet18(num_classes=3), (6, 3, 32, 32)),
    "densenet121": (lambda: models.densenet121(num_classes=3), (6, 3, 32, 32)),
}


def _check(build, shape, names=None, lr=0.01):
    paddle.seed(0)
    model = build()
    model.to(dtype="float64")  # some zoo layers create float32 weights whatever the default dtype
    rng = np.random.default_rng(0)
    x, y = paddle.to_tensor(rng.standard_normal(shape)), paddle.to_tensor(np.arange(shape[0]) % 3)
    # The last normalisation weight (its meta-gradient needs batch norm's second derivative) and the head's bias.
    # The first convolutions feed batch norm over few values per channel at these sizes: their meta-gradients are
    # too curved for finite differences to resolve (the estimates move with the step size).
    params = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]
    norms = [n for n, p in params if len(p.shape) == 1 and n.endswith("weight")]
    assert_meta_gradient_exact(model, x, y, lr, names or norms[-1:] + [params[-1][0]])


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_meta_gradient_is_exact(name):
    _check(*ZOO[name])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PADDLEFSL_SLOW") != "1", reason="64x64 densenet121: set PADDLEFSL_SLOW=1")
def test_densenet121_at_the_issue_size():
    """The reported case: densenet121(num_classes=3), 6 images of 3x64x64, inner lr 0.01, one step; these three
    coordinates were silently wrong before the legacy door was closed."""
    _check(ZOO["densenet121"][0], (6, 3, 64, 64),
           ["out.bias", "batch_norm.weight", "db_conv_4.conv4_1.bn_ac_func2._batch_norm.weight"])
