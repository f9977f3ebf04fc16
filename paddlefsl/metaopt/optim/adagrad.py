"""Differentiable twin of ``paddle.optimizer.Adagrad``."""
from __future__ import annotations

from typing import Any

import paddle

from paddlefsl.metaopt.optim.base import Hyper, OptimizerTwin, as_dtype_of, regularize, safe_sqrt

__all__ = ["AdagradTwin"]


class AdagradTwin(OptimizerTwin):
    """Twin of ``paddle.optimizer.Adagrad``: ``moment += g^2; p -= lr g / (sqrt(moment) + eps)``.

    The moment starts at the group's (or optimizer's) ``initial_accumulator_value``.
    """

    paddle_type = paddle.optimizer.Adagrad
    group_keys = ("epsilon", "initial_accumulator_value")
    hyper_names = ("learning_rate", "epsilon", "weight_decay")
    float32_keys = ("epsilon",)

    def init_one(self, param: paddle.Tensor, hyper: Hyper) -> dict[str, Any]:
        return {"moment": paddle.full_like(param, float(hyper.get("initial_accumulator_value", 0.0)))}

    def update_one(self, grad, state, param, hyper):
        grad = regularize(grad, param, hyper)
        eps = as_dtype_of(hyper["epsilon"], param)
        moment = state["moment"] + grad * grad
        new = param - self.lr(param, hyper) * grad / (safe_sqrt(moment) + eps)
        return new, {"moment": moment}
