"""Differentiable twin of ``paddle.optimizer.Adadelta``."""
from __future__ import annotations

from typing import Any

import paddle

from paddlefsl.metaopt.optim.base import Hyper, OptimizerTwin, as_dtype_of, regularize, safe_sqrt

__all__ = ["AdadeltaTwin"]


class AdadeltaTwin(OptimizerTwin):
    """Twin of ``paddle.optimizer.Adadelta``, following Paddle's ``adadelta`` kernel::

        E[g^2] <- rho E[g^2] + (1 - rho) g^2
        u = -sqrt((E[dx^2] + eps) / (E[g^2] + eps)) g
        E[dx^2] <- rho E[dx^2] + (1 - rho) u^2
        p <- p + lr u
    """

    paddle_type = paddle.optimizer.Adadelta
    group_keys = ("epsilon", "rho")
    hyper_names = ("learning_rate", "rho", "epsilon", "weight_decay")
    float32_keys = ("rho", "epsilon")

    def init_one(self, param: paddle.Tensor, hyper: Hyper) -> dict[str, Any]:
        return {"avg_squared_grad": paddle.zeros_like(param), "avg_squared_update": paddle.zeros_like(param)}

    def update_one(self, grad, state, param, hyper):
        grad = regularize(grad, param, hyper)
        rho = as_dtype_of(hyper["rho"], param)
        eps = as_dtype_of(hyper["epsilon"], param)
        sq_grad = rho * state["avg_squared_grad"] + (1 - rho) * grad * grad
        update = -safe_sqrt((state["avg_squared_update"] + eps) / (sq_grad + eps)) * grad
        sq_update = rho * state["avg_squared_update"] + (1 - rho) * update * update
        new = param + self.lr(param, hyper) * update
        return new, {"avg_squared_grad": sq_grad, "avg_squared_update": sq_update}
