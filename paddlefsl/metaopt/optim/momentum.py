"""Differentiable twin of ``paddle.optimizer.Momentum`` (heavy ball and Nesterov)."""
from __future__ import annotations

from typing import Any

import paddle
from paddle.regularizer import L2Decay

from paddlefsl.metaopt.optim.base import Hyper, OptimizerTwin, as_dtype_of, as_float32, regularize

__all__ = ["MomentumTwin"]


def _on_cpu() -> bool:
    return paddle.device.get_device().startswith("cpu")


class MomentumTwin(OptimizerTwin):
    """Twin of ``paddle.optimizer.Momentum``, following Paddle's ``momentum`` kernel::

        g' = rescale_grad * g + c * p                 (L2 decay, fused in the kernel)
        velocity <- momentum * velocity + g'
        p <- p - lr * velocity                        (use_nesterov=False)
        p <- p - lr * (g' + momentum * velocity)      (use_nesterov=True)

    This is PyTorch's convention too (``buf = m * buf + g; w -= lr * buf``). Other regularizers (L1) are added to
    the gradient before the kernel, as Paddle does. ``momentum`` and the fused L2 coefficient are float32 kernel
    attributes (rounded to float32 as Paddle does); ``rescale_grad`` is ignored on CPU, as Paddle's CPU kernel
    ignores it.
    """

    paddle_type = paddle.optimizer.Momentum
    group_keys = ("momentum", "use_nesterov", "rescale_grad")
    hyper_names = ("learning_rate", "momentum", "weight_decay")
    float32_keys = ("momentum",)

    def settings(self, optimizer, group, param):
        hyper = super().settings(optimizer, group, param)
        # Momentum fuses L2 decay into its kernel: an L2Decay / float weight_decay never reaches the generic
        # regularizer path; the group's (or optimizer's) regularization_method decides, unless the parameter has
        # its own regularizer.
        source = group if group is not None else {}
        method = source.get("regularization_method", optimizer._default_dict["regularization_method"])
        coeff = source.get("regularization_coeff", optimizer._default_dict["regularization_coeff"])
        reg = getattr(param, "regularizer", None)
        if isinstance(reg, L2Decay):
            method, coeff = "l2_decay", float(reg._coeff)
        elif reg is not None:
            method = ""
        if method == "l2_decay":
            # the fused coefficient is a float attribute of the kernel
            hyper["decay_kind"], hyper["weight_decay"] = "l2", as_float32(float(coeff))
        # Paddle's CPU momentum kernel ignores rescale_grad for dense gradients; other devices apply it
        hyper["rescale_grad"] = 1.0 if _on_cpu() else as_float32(hyper["rescale_grad"])
        return hyper

    def init_one(self, param: paddle.Tensor, hyper: Hyper) -> dict[str, Any]:
        return {"velocity": paddle.zeros_like(param)}

    def update_one(self, grad, state, param, hyper):
        rescale = hyper.get("rescale_grad", 1.0)
        if hyper.get("decay_kind") == "l2":
            if rescale != 1.0:
                grad = grad * rescale
            grad = regularize(grad, param, hyper)
        else:
            grad = regularize(grad, param, hyper)
            if rescale != 1.0:
                grad = grad * rescale
        mu = as_dtype_of(hyper["momentum"], param)
        velocity = state["velocity"] * mu + grad
        lr = self.lr(param, hyper)
        if hyper.get("use_nesterov"):
            new = param - (grad + velocity * mu) * lr
        else:
            new = param - lr * velocity
        return new, {"velocity": velocity}
