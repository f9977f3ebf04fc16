"""Differentiable twin of ``paddle.optimizer.RMSProp`` (plain and centered, with momentum)."""
from __future__ import annotations

from typing import Any

import paddle

from paddlefsl.metaopt.optim.base import Hyper, OptimizerTwin, as_dtype_of, regularize, safe_sqrt

__all__ = ["RMSPropTwin"]


class RMSPropTwin(OptimizerTwin):
    """Twin of ``paddle.optimizer.RMSProp``, following Paddle's ``rmsprop`` kernel::

        ms <- rho ms + (1 - rho) g^2
        mg <- rho mg + (1 - rho) g                                  (centered)
        mom <- momentum mom + lr g / sqrt(ms - mg^2 + eps)          (centered; else sqrt(ms + eps))
        p <- p - mom
    """

    paddle_type = paddle.optimizer.RMSProp
    group_keys = ("rho", "epsilon", "momentum", "centered")
    hyper_names = ("learning_rate", "rho", "epsilon", "momentum", "weight_decay")
    float32_keys = ("rho", "epsilon", "momentum")

    def init_one(self, param: paddle.Tensor, hyper: Hyper) -> dict[str, Any]:
        return {"mean_square": paddle.zeros_like(param), "mean_grad": paddle.zeros_like(param),
                "moment": paddle.zeros_like(param)}

    def update_one(self, grad, state, param, hyper):
        grad = regularize(grad, param, hyper)
        rho = as_dtype_of(hyper["rho"], param)
        eps = as_dtype_of(hyper["epsilon"], param)
        mu = as_dtype_of(hyper["momentum"], param)
        ms = rho * state["mean_square"] + (1 - rho) * grad * grad
        mg = state["mean_grad"]
        if hyper.get("centered"):
            mg = rho * mg + (1 - rho) * grad
            denom = ms - mg * mg + eps
        else:
            denom = ms + eps
        moment = mu * state["moment"] + self.lr(param, hyper) * grad / safe_sqrt(denom)
        return param - moment, {"mean_square": ms, "mean_grad": mg, "moment": moment}
