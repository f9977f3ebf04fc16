import argparse
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from episodic import make_learner  # noqa: E402
from lake import LAKE_STEPS, head_predictor, lake_steps, nearest_predictor, wide_head_learner  # noqa: E402

from paddlefsl.backbones import Conv4  # noqa: E402


def _args(algorithm="maml", learn_inner_lr=None, inner_steps=1):
    return argparse.Namespace(algorithm=algorithm, inner_lr=0.4, learn_inner_lr=learn_inner_lr,
                              inner_steps=inner_steps)


@pytest.mark.parametrize("algorithm, learn_inner_lr", [("maml", None), ("anil", None), ("maml", "per_layer")])
def test_wide_head_rows_start_at_the_mean_row_and_leave_the_meta_model_alone(algorithm, learn_inner_lr):
    paddle.seed(0)
    args = _args(algorithm, learn_inner_lr)
    meta_learner = make_learner(args, Conv4.omniglot(5))
    if learn_inner_lr:
        paddle.assign(paddle.full_like(meta_learner.inner_lrs[0], 0.7), output=meta_learner.inner_lrs[0])
    before = {k: v.numpy().copy() for k, v in meta_learner.model.state_dict().items()}
    wide = wide_head_learner(args, meta_learner)
    weight, bias = wide.model.head.weight.numpy(), wide.model.head.bias.numpy()
    assert weight.shape[-1] == 20 and bias.shape == (20,)
    meta_weight, meta_bias = meta_learner.model.head.weight.numpy(), meta_learner.model.head.bias.numpy()
    np.testing.assert_allclose(weight, np.repeat(meta_weight.mean(-1, keepdims=True), 20, -1), rtol=1e-6)
    np.testing.assert_allclose(bias, np.full(20, meta_bias.mean()), rtol=1e-6)
    for (key, a), b in zip(wide.model.features.state_dict().items(), meta_learner.model.features.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=key)
    if learn_inner_lr:
        np.testing.assert_allclose(wide.inner_lrs[0].numpy(), 0.7)
    paddle.assign(paddle.zeros_like(wide.model.features.parameters()[0]), output=wide.model.features.parameters()[0])
    for key, value in meta_learner.model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), before[key], err_msg=key)


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_predictors_find_each_training_image_among_the_twenty(algorithm):
    paddle.seed(1)
    args = _args(algorithm)
    meta_learner = make_learner(args, Conv4.omniglot(5))
    support = np.random.default_rng(0).random((20, 1, 28, 28))  # float64, like the models in these tests
    order = np.random.default_rng(1).permutation(20)
    head = head_predictor(wide_head_learner(args, meta_learner), LAKE_STEPS)
    np.testing.assert_array_equal(head(support, support[order]), order)
    np.testing.assert_array_equal(nearest_predictor(meta_learner)(support, support[order]), order)


def test_per_step_rates_bound_the_lake_steps():
    assert lake_steps(_args()) == LAKE_STEPS
    assert lake_steps(_args(learn_inner_lr="per_step_per_layer", inner_steps=2)) == 2
