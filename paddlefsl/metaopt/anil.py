"""ANIL (Raghu et al., 2020): only the head adapts; the features learn through the head's adaptation."""
from __future__ import annotations

from typing import Any

import paddle
from paddle import nn

from paddlefsl.metaopt.base import BaseLearner, check_inner_lr

__all__ = ["ANIL"]


class FeaturesHead(nn.Layer):
    """``head(features(x))``: the model an ANIL learner computes with."""

    def __init__(self, features: nn.Layer, head: nn.Layer) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.head(self.features(*args, **kwargs))


class ANIL(BaseLearner):
    """Almost No Inner Loop: the head adapts, the feature extractor is shared by every task learner.

    The features still receive the exact meta-gradient through the head's adaptation (second order by default).

    Args:
        features: the feature extractor, any ``paddle.nn.Layer``.
        head: the classifier or regressor applied to the features, any ``paddle.nn.Layer``.
        inner_lr: the inner-loop learning rate, a positive finite number.
        first_order: use the first-order approximation.
        allow_unused: see `BaseLearner`.
        allow_nograd: see `BaseLearner`.
        meta_optimizer: see `BaseLearner`.
        batch_norm: see `BaseLearner` (applies to the head).

    Example:
        >>> anil = ANIL(features, nn.Linear(64, 5), inner_lr=0.1)
        >>> task = anil.clone()
        >>> task.adapt(F.cross_entropy(task(x_support), y_support))
        >>> F.cross_entropy(task(x_query), y_query).backward()
    """

    def __init__(self, features: nn.Layer, head: nn.Layer, inner_lr: float, first_order: bool = False,
                 allow_unused: bool | None = None, allow_nograd: bool = False,
                 meta_optimizer: paddle.optimizer.Optimizer | None = None, batch_norm: str = "batch") -> None:
        for name, layer in (("features", features), ("head", head)):
            if not isinstance(layer, nn.Layer):
                raise TypeError(f"{name} must be a paddle.nn.Layer, got {type(layer).__name__}")
        super().__init__(FeaturesHead(features, head), first_order=first_order, allow_unused=allow_unused,
                         allow_nograd=allow_nograd, meta_optimizer=meta_optimizer, batch_norm=batch_norm)
        self.inner_lr = check_inner_lr(inner_lr)

    @property
    def features(self) -> nn.Layer:
        """The shared feature extractor."""
        return self.model.features

    @property
    def head(self) -> nn.Layer:
        """The head (a clone's own adapted copy in a task learner)."""
        return self.model.head

    def clone(self, tasks: int | None = None) -> "ANIL":
        """Return a task learner sharing the features and holding a graph-connected copy of the head.

        Args:
            tasks: adapt this many tasks at once, as `paddlefsl.metaopt.MAML.clone`: one copy of the head per task;
                the shared features run once over all tasks' samples (their batch-norm layers must then be in eval
                mode, since batch statistics would mix the tasks).
        """
        new_tasks = self._new_tasks(tasks, self.model.head)
        return self._spawn(model=FeaturesHead(self.model.features, self._clone_layer(self.model.head, new_tasks)),
                           tasks=new_tasks)

    def adapt(self, loss: paddle.Tensor, first_order: bool | None = None) -> None:
        """One gradient step on the head's trainable parameters.

        Args:
            loss: a scalar loss computed with this task learner (one loss per task, shape ``[T]``, for a task
                learner from ``clone(tasks=T)``).
            first_order: override the learner's ``first_order`` for this step.

        Raises:
            RuntimeError: if called on the meta-learner instead of a clone.
            ValueError: if ``loss`` is not a scalar connected to the head, or misses head parameters.
            FloatingPointError: if ``loss`` or a gradient is not finite.
            SecondOrderError: if an op met on the way has no exact second-order gradient.
        """
        self._gradient_step(self.model.head, loss, self.inner_lr, first_order, prefix="head.")
