"""Meta-SGD (Li et al., 2017): MAML with a learned learning rate for every coordinate of every parameter."""
from __future__ import annotations

import paddle
from paddle import nn

from paddlefsl.metaopt.base import BaseLearner, check_inner_lr
from paddlefsl.metaopt.functional import ParameterSlots, clone_model

__all__ = ["MetaSGD"]


class MetaSGD(BaseLearner):
    """Meta-SGD: the inner update is ``w <- w - alpha_w * dloss/dw`` with ``alpha_w`` a learned tensor of ``w``'s shape.

    The learning rates are parameters of the learner (``learner.lrs``, one per trainable parameter of the model, in
    ``named_parameters`` order, initialised to ``inner_lr``), so ``learner.parameters()`` includes them and a
    meta-optimizer over ``learner.parameters()`` trains them with the model. Meta-gradients are exact second order
    by default.

    Args:
        model: the meta-model, any ``paddle.nn.Layer``.
        inner_lr: the initial value of every learning rate, a positive finite number.
        first_order: use the first-order approximation (inner gradients treated as constants; the learning rates
            still receive gradients through ``w - alpha * g``).
        allow_unused: see `BaseLearner`.
        allow_nograd: see `BaseLearner` (frozen parameters get no learning rate).
        meta_optimizer: a ``paddle.optimizer.Optimizer`` over ``learner.parameters()`` (model and learning rates).
        batch_norm: see `BaseLearner`.

    Raises:
        TypeError, ValueError: as `BaseLearner`; also if ``meta_optimizer`` does not hold
            the learning rates.

    Example:
        >>> learner = MetaSGD(model, inner_lr=0.1)
        >>> learner.meta_optimizer = None
        >>> opt = paddle.optimizer.Adam(1e-3, parameters=learner.parameters())
        >>> task = learner.clone()
        >>> task.adapt(F.cross_entropy(task(x_support), y_support))
        >>> F.cross_entropy(task(x_query), y_query).backward(); opt.step(); opt.clear_grad()
    """

    def __init__(self, model: nn.Layer, inner_lr: float, first_order: bool = False,
                 allow_unused: bool | None = None, allow_nograd: bool = False,
                 meta_optimizer: paddle.optimizer.Optimizer | None = None, batch_norm: str = "batch") -> None:
        super().__init__(model, first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd,
                         meta_optimizer=None, batch_norm=batch_norm)
        self.inner_lr = check_inner_lr(inner_lr)
        rates = []
        for p in ParameterSlots(model).tensors:
            if p.stop_gradient:
                continue
            rates.append(self.create_parameter(shape=list(p.shape), dtype=p.dtype,
                                               default_initializer=nn.initializer.Constant(self.inner_lr)))
        self.lrs = nn.ParameterList(rates)
        if meta_optimizer is not None:
            self._check_meta_optimizer(meta_optimizer)
            self.meta_optimizer = meta_optimizer

    def learning_rates(self) -> list[tuple[str, paddle.Tensor]]:
        """``(parameter name, learning-rate tensor)`` pairs for the trainable parameters of ``self.model``."""
        names = [n for n, p in ParameterSlots(self.model).named() if not p.stop_gradient]
        return list(zip(names, self._rates()))

    def _rates(self) -> list[paddle.Tensor]:
        return ParameterSlots(self.lrs).tensors

    def clone(self, tasks: int | None = None) -> "MetaSGD":
        """Return a task learner: graph-connected copies of the model and of the learning rates.

        Args:
            tasks: adapt this many tasks at once, as `MAML.clone` (one copy of each parameter per task; the
                learned rates are shared by the tasks).
        """
        new_tasks = self._new_tasks(tasks, self.model)
        return self._spawn(model=self._clone_layer(self.model, new_tasks), lrs=clone_model(self.lrs), tasks=new_tasks)

    def adapt(self, loss: paddle.Tensor, first_order: bool | None = None) -> None:
        """One Meta-SGD step on every trainable parameter: ``w <- w - alpha_w * dloss/dw`` (elementwise).

        Args:
            loss: a scalar loss computed with this task learner (one loss per task, shape ``[T]``, for a task
                learner from ``clone(tasks=T)``).
            first_order: override the learner's ``first_order`` for this step.

        Raises:
            RuntimeError: if called on the meta-learner instead of a clone.
            ValueError: if ``loss`` is not a scalar connected to the task model, or misses parameters.
            FloatingPointError: if ``loss`` or a gradient is not finite.
            SecondOrderError: if an op met on the way has no exact second-order gradient.
        """
        self._gradient_step(self.model, loss, self._rates(), first_order)
