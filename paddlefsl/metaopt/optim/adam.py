"""Differentiable twin of ``paddle.optimizer.Adam`` (incl. AMSGrad)."""
from __future__ import annotations

from typing import Any

import paddle

from paddlefsl.metaopt.optim.base import Hyper, OptimizerTwin, as_dtype_of, regularize, safe_sqrt

__all__ = ["AdamTwin", "adam_direction"]


def adam_direction(grad: paddle.Tensor, state: dict[str, Any], param: paddle.Tensor, hyper: Hyper,
                   lr: Any, amsgrad: bool) -> tuple[paddle.Tensor, dict[str, Any]]:
    """Paddle's ``adam`` kernel, out of place: returns ``(new_param, new_state)``.

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps sqrt(1 - b2^t))``; the powers ``b^t`` are state
    (Paddle's ``beta1_pow`` accumulators, which start at ``b``).
    """
    beta1 = as_dtype_of(hyper["beta1"], param)
    beta2 = as_dtype_of(hyper["beta2"], param)
    eps = as_dtype_of(hyper["epsilon"], param)
    beta1_pow = beta1 if state["beta1_pow"] is None else state["beta1_pow"]
    beta2_pow = beta2 if state["beta2_pow"] is None else state["beta2_pow"]
    m = beta1 * state["moment1"] + (1 - beta1) * grad
    v = beta2 * state["moment2"] + (1 - beta2) * grad * grad
    new_state = {"moment1": m, "moment2": v}
    if amsgrad:
        v_hat = paddle.maximum(v, state["moment2_max"])
        new_state["moment2_max"] = v_hat
    else:
        v_hat = v
    correction2 = 1 - beta2_pow
    if isinstance(correction2, paddle.Tensor):
        root2 = safe_sqrt(correction2)
    else:
        root2 = correction2 ** 0.5
    lr_t = lr * root2 / (1 - beta1_pow)
    new = param - lr_t * (m / (safe_sqrt(v_hat) + eps * root2))
    new_state["beta1_pow"] = beta1_pow * beta1
    new_state["beta2_pow"] = beta2_pow * beta2
    return new, new_state


def adam_state(param: paddle.Tensor, hyper: Hyper) -> dict[str, Any]:
    """The initial Adam/AdamW state of one parameter (moments, bias-correction powers, AMSGrad maximum)."""
    state = {"moment1": paddle.zeros_like(param), "moment2": paddle.zeros_like(param),
             "beta1_pow": None, "beta2_pow": None}
    if hyper.get("amsgrad"):
        state["moment2_max"] = paddle.zeros_like(param)
    return state


class AdamTwin(OptimizerTwin):
    """Twin of ``paddle.optimizer.Adam``: regularizers are added to the gradient, then Paddle's ``adam`` kernel."""

    paddle_type = paddle.optimizer.Adam
    group_keys = ("beta1", "beta2", "epsilon")
    hyper_names = ("learning_rate", "beta1", "beta2", "epsilon", "weight_decay")

    def settings(self, optimizer, group, param):
        hyper = super().settings(optimizer, group, param)
        hyper["amsgrad"] = bool(optimizer._amsgrad)
        return hyper

    def init_one(self, param: paddle.Tensor, hyper: Hyper) -> dict[str, Any]:
        return adam_state(param, hyper)

    def update_one(self, grad, state, param, hyper):
        grad = regularize(grad, param, hyper)
        return adam_direction(grad, state, param, hyper, self.lr(param, hyper), hyper.get("amsgrad", False))
