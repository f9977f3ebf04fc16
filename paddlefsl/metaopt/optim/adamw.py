"""Differentiable twin of ``paddle.optimizer.AdamW`` (decoupled weight decay)."""
from __future__ import annotations

from typing import Any

import paddle

from paddlefsl.metaopt.optim.adam import adam_direction, adam_state
from paddlefsl.metaopt.optim.base import Hyper, OptimizerTwin, as_dtype_of, as_float32

__all__ = ["AdamWTwin"]


class AdamWTwin(OptimizerTwin):
    """Twin of ``paddle.optimizer.AdamW``, following Paddle's ``adamw`` kernel::

        lr' = lr * lr_ratio(p)
        p <- p * (1 - lr' * weight_decay)          (only if apply_decay_param_fun(p.name) is true or unset)
        p <- adam(p, g, lr')

    ``weight_decay`` here is the decoupled coefficient (group value or the optimizer's), never an L2 gradient term.
    """

    paddle_type = paddle.optimizer.AdamW
    group_keys = ("beta1", "beta2", "epsilon", "weight_decay")
    hyper_names = ("learning_rate", "beta1", "beta2", "epsilon", "weight_decay")
    float32_keys = ("weight_decay",)

    def settings(self, optimizer, group, param):
        if getattr(param, "regularizer", None) is not None:
            raise TypeError(f"parameter {param.name} has its own regularizer {param.regularizer} under AdamW; "
                            "the AdamW twin only supports AdamW's decoupled weight decay")
        hyper = super().settings(optimizer, group, param)
        del hyper["decay_kind"]
        decay = optimizer._default_dict["weight_decay"]
        if group is not None:
            decay = group.get("weight_decay", decay)
        hyper["weight_decay"] = as_float32(float(decay))  # the kernel's float attribute ``coeff``
        fun = optimizer._apply_decay_param_fun
        hyper["with_decay"] = fun is None or bool(fun(param.name))
        hyper["lr_ratio"] = 1.0 if optimizer._lr_ratio is None else as_float32(float(optimizer._lr_ratio(param)))
        hyper["amsgrad"] = bool(optimizer._amsgrad)
        return hyper

    def override_weight_decay(self, hyper: Hyper) -> None:
        """The decoupled decay needs no regularizer kind."""

    def init_one(self, param: paddle.Tensor, hyper: Hyper) -> dict[str, Any]:
        return adam_state(param, hyper)

    def update_one(self, grad, state, param, hyper):
        lr = self.lr(param, hyper)
        ratio = hyper.get("lr_ratio", 1.0)
        if ratio != 1.0:
            lr = lr * ratio
        if hyper.get("with_decay", True):
            coeff = as_dtype_of(hyper["weight_decay"], param)
            param = param * (1 - lr * coeff)
        return adam_direction(grad, state, param, hyper, lr, hyper.get("amsgrad", False))
