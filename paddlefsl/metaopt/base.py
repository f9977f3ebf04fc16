"""BaseLearner: the model / clone / adapt / step interface every meta-learner implements."""
from __future__ import annotations

import abc
import math
from typing import Any, Sequence

import numpy as np
import paddle
from paddle import nn

from paddlefsl.metaopt.autodiff import scope
from paddlefsl.metaopt.functional import ParameterSlots, clone_model

BATCH_NORM_MODES = ("batch", "running", "shared")

__all__ = ["BaseLearner", "BATCH_NORM_MODES", "batch_norms", "check_inner_lr", "check_scalar_loss"]


def check_inner_lr(inner_lr: object) -> float:
    """Return ``inner_lr`` as a float, or raise ``ValueError`` unless it is a positive finite number."""
    if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)):
        raise TypeError(f"inner_lr must be a positive finite number, got {type(inner_lr).__name__} {inner_lr!r}")
    if not (math.isfinite(inner_lr) and inner_lr > 0):
        raise ValueError(f"inner_lr must be a positive finite number, got {inner_lr!r}")
    return float(inner_lr)


def check_scalar_loss(loss: object, where: str) -> None:
    """Raise a clear error (prefixed by ``where``) unless ``loss`` is a finite scalar tensor with a graph."""
    _check_loss_shape(loss, where)
    value = float(loss.item())
    if not math.isfinite(value):
        raise FloatingPointError(f"{where}: loss is {value}")
    _check_loss_connected(loss, where)


def _check_loss_shape(loss: object, where: str) -> None:
    """The host-side half of `check_scalar_loss` (no device-to-host copy): a one-element tensor."""
    if not isinstance(loss, paddle.Tensor):
        raise TypeError(f"{where}: loss must be a paddle.Tensor, got {type(loss).__name__}")
    if loss.size != 1:
        raise ValueError(f"{where}: loss must be a scalar (one element), got shape {list(loss.shape)}; "
                         "reduce it first, e.g. loss.mean()")


def _check_loss_connected(loss: paddle.Tensor, where: str) -> None:
    if loss.stop_gradient:
        raise ValueError(f"{where}: loss is not connected to any parameter (stop_gradient=True)")


def batch_norms(layer: nn.Layer) -> list[nn.Layer]:
    """The batch-norm sublayers of ``layer`` in ``named_sublayers`` order."""
    return [sub for _, sub in layer.named_sublayers(include_self=True)
            if isinstance(sub, (nn.layer.norm._BatchNormBase, nn.BatchNorm))]


def _running_statistics(layer: nn.Layer) -> set[int]:
    """Ids of the running-statistics tensors Paddle stores as frozen parameters of batch-norm layers."""
    return {id(sub._parameters[key]) for sub in batch_norms(layer) for key in ("_mean", "_variance")
            if sub._parameters.get(key) is not None}


class BaseLearner(nn.Layer, metaclass=abc.ABCMeta):
    """A meta-learner: a meta-model, task learners cloned from it, inner updates and the meta update.

    The learner you build holds the meta-model. :meth:`clone` returns a task learner whose parameters are
    differentiable functions of the meta-model's; :meth:`adapt` updates a task learner out of place; :meth:`step`
    back-propagates a query loss into the meta-model and applies the meta-optimizer.

    While a task learner exists, Paddle kernels run through the exact op layer (:mod:`paddlefsl.metaopt.autodiff`),
    for first-order learners too (Paddle's own first-order gradients are wrong for some kernels); once every task
    learner is released (``del task`` or rebinding the name), ``paddle._C_ops`` is stock again.

    Args:
        model: the meta-model, any ``paddle.nn.Layer``.
        first_order: use the first-order approximation (no second derivatives).
        allow_unused: give parameters that the adaptation loss does not use a zero update instead of raising.
            ``None`` means the value of ``allow_nograd``.
        allow_nograd: leave frozen (``stop_gradient=True``) parameters frozen instead of raising. Batch-norm running
            statistics are never adapted and need no flag.
        meta_optimizer: a ``paddle.optimizer.Optimizer`` over the learner's parameters, applied by :meth:`step`.
        batch_norm: how task learners treat batch-norm layers: ``"batch"`` (normalize with batch statistics in
            train mode; running statistics go to the task learner's own copy), ``"running"`` (normalize with the
            meta-model's running statistics, frozen), or ``"shared"`` (as ``"batch"``, but task learners update the
            meta-model's running statistics).

    Raises:
        TypeError: if ``model`` is not a Layer or ``meta_optimizer`` not an Optimizer.
        ValueError: for a bad ``batch_norm``, a frozen parameter without ``allow_nograd``, or a meta-optimizer
            that does not hold the learner's parameters.
    """

    def __init__(self, model: nn.Layer, *, first_order: bool = False, allow_unused: bool | None = None,
                 allow_nograd: bool = False, meta_optimizer: paddle.optimizer.Optimizer | None = None,
                 batch_norm: str = "batch") -> None:
        if not isinstance(model, nn.Layer):
            raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES}, got {batch_norm!r}")
        super().__init__()
        self.model = model
        self.first_order = bool(first_order)
        self.allow_nograd = bool(allow_nograd)
        self.allow_unused = self.allow_nograd if allow_unused is None else bool(allow_unused)
        self.batch_norm = batch_norm
        self.meta_optimizer = None
        self._meta: BaseLearner | None = None
        self._lease: scope.Lease | None = None
        self._adapt_steps = 0
        self._clones_since_step = 0
        if not self.allow_nograd:
            stats = _running_statistics(model)
            frozen = [name for name, p in ParameterSlots(model).named() if p.stop_gradient and id(p) not in stats]
            if frozen:
                raise ValueError(f"model has frozen parameters {frozen} (stop_gradient=True); pass "
                                 "allow_nograd=True to keep them frozen during adaptation")
        if meta_optimizer is not None:
            self._check_meta_optimizer(meta_optimizer)
            self.meta_optimizer = meta_optimizer

    # ----------------------------------------------------------------------------------------------- interface
    @abc.abstractmethod
    def clone(self) -> "BaseLearner":
        """Return a new task learner whose parameters are differentiable functions of this learner's."""

    @abc.abstractmethod
    def adapt(self, loss: paddle.Tensor) -> None:
        """Make one inner update of this task learner's model from ``loss`` (out of place)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``self.model`` on the inputs (after checking that floating inputs match the model's dtype)."""
        dtype = self._param_dtype()
        for i, value in enumerate(args):
            if isinstance(value, paddle.Tensor) and value.is_floating_point() and dtype is not None \
                    and value.dtype != dtype:
                raise TypeError(f"input {i} has dtype {value.dtype} but the model's parameters are {dtype}; "
                                f"cast the data with .astype({dtype})")
        return self.model(*args, **kwargs)

    def step(self, loss: paddle.Tensor) -> None:
        """Meta update: back-propagate ``loss`` into the meta-model, apply ``meta_optimizer``, clear gradients.

        Without a ``meta_optimizer`` the gradients are left in ``parameter.grad`` for you to use.

        Args:
            loss: a scalar built from task learners' outputs, usually the mean query loss of a meta-batch.

        Raises:
            RuntimeError: if called on a task learner, or if no task learner was cloned since the last step.
            ValueError: if ``loss`` is not a connected scalar, or reaches no meta-model parameter.
            FloatingPointError: if ``loss`` is not finite.
        """
        if self._meta is not None:
            raise RuntimeError("step() is the meta update: call it on the learner you built, not on a task "
                               "learner from clone()")
        check_scalar_loss(loss, "step")
        if self._clones_since_step == 0:
            raise RuntimeError("step(loss): no task learner was cloned since the last step; build loss from "
                               "task learners (task = learner.clone(); task.adapt(...); loss = f(task(x)))")
        loss.backward()
        trainable = [p for p in self.parameters() if not p.stop_gradient]
        if all(p.grad is None for p in trainable):
            raise ValueError("step(loss): loss reaches none of the meta-model's parameters")
        self._clones_since_step = 0
        if self.meta_optimizer is not None:
            self.meta_optimizer.step()
            self.meta_optimizer.clear_grad()

    # ----------------------------------------------------------------------------------------------- helpers
    def _param_dtype(self):
        for p in self.model.parameters():
            if p.is_floating_point() and not p.stop_gradient:
                return p.dtype
        return None

    def _check_meta_optimizer(self, optimizer: object) -> None:
        if not isinstance(optimizer, paddle.optimizer.Optimizer):
            raise TypeError(f"meta_optimizer must be a paddle.optimizer.Optimizer, got {type(optimizer).__name__}")
        held: set[int] = set()
        for entry in optimizer._parameter_list or []:
            for p in (entry["params"] if isinstance(entry, dict) else [entry]):
                held.add(id(p))
        missing = [name for name, p in self.named_parameters() if not p.stop_gradient and id(p) not in held]
        if missing:
            raise ValueError(f"meta_optimizer does not hold the learner's parameters {missing}; build it with "
                             "parameters=learner.parameters()")

    def _spawn(self, **layers: nn.Layer) -> "BaseLearner":
        """Make a task learner of this class around the given (already cloned) layers."""
        task = type(self).__new__(type(self))
        nn.Layer.__init__(task)
        for name, value in vars(self).items():
            if not name.startswith("_") and not isinstance(value, nn.Layer) and name != "meta_optimizer":
                setattr(task, name, value)
        task.meta_optimizer = None
        task._meta = self._meta if self._meta is not None else self
        task._meta._clones_since_step += 1
        task._adapt_steps = 0
        task._clones_since_step = 0
        task._lease = scope.Lease()
        for name, layer in layers.items():
            setattr(task, name, layer)
        return task

    def _clone_layer(self, layer: nn.Layer) -> nn.Layer:
        cloned = clone_model(layer, share_stats=self.batch_norm == "shared")
        if self.batch_norm == "running":
            for sub in batch_norms(cloned):
                sub._use_global_stats = True
        scope.track_layers(cloned)
        return cloned

    def _require_task(self, method: str) -> None:
        if self._meta is None:
            raise RuntimeError(f"{method}() updates a task learner; call learner.clone() first and adapt the clone, "
                               "so the meta-model stays unchanged")

    def _gradient_step(self, layer: nn.Layer, loss: paddle.Tensor, lr: float | Sequence[paddle.Tensor],
                       first_order: bool | None, prefix: str = "") -> None:
        """Replace each trainable parameter ``w`` of ``layer`` (a clone's) by ``w - lr * dloss/dw``.

        ``lr`` is one number, or one tensor per trainable parameter (broadcast against it).
        """
        self._require_task("adapt")
        first = self.first_order if first_order is None else bool(first_order)
        slots = ParameterSlots(layer)
        names = [prefix + n for n, p in slots.named() if not p.stop_gradient]
        params = [p for p in slots.tensors if not p.stop_gradient]
        rates = [lr] * len(params) if isinstance(lr, float) else list(lr)
        if len(rates) != len(params):
            raise RuntimeError(f"{len(rates)} learning rates for {len(params)} trainable parameters {names}; do "
                               "not freeze or unfreeze parameters after building the learner")
        grads = self._gradients(loss, names, params, first, self.allow_unused)
        updates = iter(p if g is None else p - rate * g for p, g, rate in zip(params, grads, rates))
        slots.write([None if p.stop_gradient else next(updates) for p in slots.tensors])
        self._adapt_steps += 1

    def _gradients(self, loss: paddle.Tensor, names: Sequence[str], params: Sequence[paddle.Tensor],
                   first_order: bool, allow_unused: bool) -> list[paddle.Tensor | None]:
        """Gradients of ``loss`` w.r.t. ``params`` with every check the inner loop needs."""
        where = f"adapt step {self._adapt_steps + 1}"
        _check_loss_shape(loss, where)
        if loss.stop_gradient:  # a detached loss: report it as check_scalar_loss would, non-finite first
            check_scalar_loss(loss, where)
        grads = scope.grad(loss, list(params), create_graph=not first_order)
        if all(g is None for g in grads):
            raise ValueError(f"{where}: loss is not connected to the task model's parameters {list(names)}")
        unused = [name for name, g in zip(names, grads) if g is None]
        if unused and not allow_unused:
            raise ValueError(f"{where}: loss does not use the parameters {unused}; pass allow_unused=True to give "
                             "them a zero update")
        # One device-to-host copy for every check: the loss and each gradient's sum, read back together
        # (a non-finite sum flags a non-finite gradient; the names are computed only on that failure path).
        with paddle.no_grad():
            sums = [loss.reshape([1]).astype("float64")]
            sums += [g.sum().reshape([1]).astype("float64") for g in grads if g is not None]
            values = paddle.concat(sums).numpy()
        if not math.isfinite(float(values[0])):
            raise FloatingPointError(f"{where}: loss is {float(values[0])}")
        if not np.isfinite(values[1:]).all():
            with paddle.no_grad():
                bad = [name for name, g in zip(names, grads)
                       if g is not None and not bool(paddle.isfinite(g).all().item())]
            if bad:
                raise FloatingPointError(f"{where}: the gradient of {bad} is not finite")
        return list(grads)

