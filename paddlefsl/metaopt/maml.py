"""MAML (Finn et al., 2017): every parameter of the model adapts by gradient descent."""
from __future__ import annotations

import paddle
from paddle import nn

from paddlefsl.metaopt.base import BaseLearner, check_inner_lr

__all__ = ["MAML"]


class MAML(BaseLearner):
    """Model-Agnostic Meta-Learning with exact second-order meta-gradients by default.

    Args:
        model: the meta-model, any ``paddle.nn.Layer``.
        inner_lr: the inner-loop learning rate, a positive finite number.
        first_order: use first-order MAML (FOMAML): the meta-gradient is the query gradient at the adapted weights.
        allow_unused: see :class:`~paddlefsl.metaopt.BaseLearner`.
        allow_nograd: see :class:`~paddlefsl.metaopt.BaseLearner`.
        meta_optimizer: see :class:`~paddlefsl.metaopt.BaseLearner`.
        batch_norm: see :class:`~paddlefsl.metaopt.BaseLearner`.

    Example:
        >>> maml = MAML(model, inner_lr=0.4,
        ...             meta_optimizer=paddle.optimizer.Adam(1e-3, parameters=model.parameters()))
        >>> task = maml.clone()
        >>> task.adapt(F.cross_entropy(task(x_support), y_support))
        >>> maml.step(F.cross_entropy(task(x_query), y_query))
    """

    def __init__(self, model: nn.Layer, inner_lr: float, first_order: bool = False,
                 allow_unused: bool | None = None, allow_nograd: bool = False,
                 meta_optimizer: paddle.optimizer.Optimizer | None = None, batch_norm: str = "batch") -> None:
        super().__init__(model, first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd,
                         meta_optimizer=meta_optimizer, batch_norm=batch_norm)
        self.inner_lr = check_inner_lr(inner_lr)

    def clone(self) -> "MAML":
        """Return a task learner whose model is a graph-connected copy of this learner's model."""
        return self._spawn(model=self._clone_layer(self.model))

    def adapt(self, loss: paddle.Tensor, first_order: bool | None = None) -> None:
        """One gradient step on every trainable parameter of the task model: ``w <- w - inner_lr * dloss/dw``.

        Args:
            loss: a scalar loss computed with this task learner.
            first_order: override the learner's ``first_order`` for this step.

        Raises:
            RuntimeError: if called on the meta-learner instead of a clone.
            ValueError: if ``loss`` is not a scalar connected to the task model, or misses parameters.
            FloatingPointError: if ``loss`` or a gradient is not finite (the message gives the step).
            SecondOrderError: if an op met on the way has no exact second-order gradient.
        """
        self._gradient_step(self.model, loss, self.inner_lr, first_order)
