"""BaseLearner: the model / clone / adapt / step interface every meta-learner implements."""
from __future__ import annotations

import abc
import difflib
import functools
import inspect
import math
import re
import warnings
from typing import Any, Sequence

import numpy as np
import paddle
from paddle import nn

from paddlefsl.metaopt import distributed, taskbatch
from paddlefsl.metaopt.autodiff import released, scope
from paddlefsl.metaopt.functional import ParameterSlots, clone_model

BATCH_NORM_MODES = ("batch", "running", "shared")

__all__ = ["BaseLearner", "BATCH_NORM_MODES", "batch_norms", "check_grad_enabled", "check_inner_lr",
           "check_scalar_loss"]


def check_inner_lr(inner_lr: object) -> float:
    """Return ``inner_lr`` as a float, or raise ``ValueError`` unless it is a positive finite number."""
    if isinstance(inner_lr, bool) or not isinstance(inner_lr, (int, float)):
        raise TypeError(f"inner_lr must be a positive finite number, got {type(inner_lr).__name__} {inner_lr!r}")
    if not (math.isfinite(inner_lr) and inner_lr > 0):
        raise ValueError(f"inner_lr must be a positive finite number, got {inner_lr!r}")
    return float(inner_lr)


def check_grad_enabled(where: str) -> None:
    """Raise a clear error (prefixed by ``where``) if gradient recording is off (``paddle.no_grad()``)."""
    if not paddle.is_grad_enabled():
        raise RuntimeError(f"{where}: gradient recording is off (inside paddle.no_grad() or "
                           "paddle.set_grad_enabled(False)), so the update cannot be differentiated; adapt outside "
                           "no_grad (for evaluation, adapt normally and wrap only the query forward in "
                           "paddle.no_grad())")


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
        raise ValueError(f"{where}: loss is not connected to any parameter (stop_gradient=True); was it computed "
                         "inside paddle.no_grad() or from detached outputs?")


# Names other libraries give the inner learning rate (learn2learn: lr; higher / torchmeta: step_size, fast_lr).
_INNER_LR_ALIASES = ("lr", "fast_lr", "step_size", "alpha", "inner_rate", "adaptation_lr")


def _explain_arguments(cls: type, signature: inspect.Signature, kwargs: dict, err: TypeError) -> str:
    """The message for a learner built with arguments its ``__init__`` does not take."""
    accepted = [name for name in signature.parameters if name != "self"]
    hints = []
    for name in kwargs:
        if name in signature.parameters:
            continue
        if name in _INNER_LR_ALIASES and "inner_lr" in signature.parameters:
            hints.append(f"unexpected keyword argument {name!r}: the inner-loop learning rate is called inner_lr "
                         f"here, e.g. {cls.__name__}(..., inner_lr=0.4)")
        else:
            close = difflib.get_close_matches(name, accepted, n=1)
            hints.append(f"unexpected keyword argument {name!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    detail = "; ".join(hints) if hints else str(err)
    return f"{cls.__name__}(): {detail} (it takes: {', '.join(accepted)})"


def batch_norms(layer: nn.Layer) -> list[nn.Layer]:
    """The batch-norm sublayers of ``layer`` in ``named_sublayers`` order."""
    return [sub for _, sub in layer.named_sublayers(include_self=True)
            if isinstance(sub, (nn.layer.norm._BatchNormBase, nn.BatchNorm))]


def _running_statistics(layer: nn.Layer) -> set[int]:
    """Ids of the running-statistics tensors Paddle stores as frozen parameters of batch-norm layers."""
    return {id(sub._parameters[key]) for sub in batch_norms(layer) for key in ("_mean", "_variance")
            if sub._parameters.get(key) is not None}


def _statistics(layer: nn.Layer) -> list[paddle.Tensor]:
    """The tensors task learners may update in place (``batch_norm="shared"``, ANIL's shared features): batch-norm
    running statistics and buffers."""
    stats = _running_statistics(layer)
    tensors = [t for _, sub in layer.named_sublayers(include_self=True) for t in sub._parameters.values()
               if t is not None and id(t) in stats] + [t for t in layer.buffers() if t is not None]
    return list({id(t): t for t in tensors}.values())


class ModelOutputs(tuple):
    """The tuple a model returned, passed on by a learner unchanged except for one thing: an attribute a tuple
    lacks (``out.shape`` inside ``F.cross_entropy(task(x), y)``, say) raises an `AttributeError` that says the
    model returned a tuple and how to pick the tensor you meant, instead of ``'tuple' object has no attribute``.

    Example:
        ```python
        out = ModelOutputs((paddle.ones([2, 3]), paddle.zeros([2])))
        logits, extra = out           # a tuple in every other respect
        ```
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        kinds = ", ".join(f"Tensor{list(v.shape)}" if isinstance(v, paddle.Tensor) else type(v).__name__
                          for v in self)
        raise AttributeError(f"the model returned a tuple of {len(self)} values ({kinds}), which has no attribute "
                             f"{name!r}: pick the one your loss needs, e.g. task(x)[0], or wrap the model in a layer "
                             "whose forward returns that tensor")


class BaseLearner(nn.Layer, metaclass=abc.ABCMeta):
    """A meta-learner: a meta-model, task learners cloned from it, inner updates and the meta update.

    The learner you build holds the meta-model. `clone()` returns a task learner whose parameters are
    differentiable functions of the meta-model's; `adapt()` updates a task learner out of place; `step()`
    back-propagates a query loss into the meta-model and applies the meta-optimizer.

    While a task learner exists, Paddle kernels run through the exact op layer (`paddlefsl.metaopt.autodiff`),
    for first-order learners too (Paddle's own first-order gradients are wrong for some kernels; a first-order
    learner's task learners ask only for those rules, `paddlefsl.metaopt.autodiff.first_order`); once every task
    learner is released (``del task`` or rebinding the name), ``paddle._C_ops`` is stock again.

    Args:
        model: the meta-model, any ``paddle.nn.Layer``.
        first_order: use the first-order approximation (no second derivatives).
        allow_unused: give parameters that the adaptation loss does not use a zero update instead of raising.
            ``None`` means the value of ``allow_nograd``.
        allow_nograd: leave frozen (``stop_gradient=True``) parameters frozen instead of raising. Batch-norm running
            statistics are never adapted and need no flag.
        meta_optimizer: a ``paddle.optimizer.Optimizer`` over the learner's parameters, applied by `step()`.
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
        self._graph_tokens: tuple[object, ...] = ()
        self._eval_norms_checked = False
        self._tasks: int | None = None
        if not self.allow_nograd:
            stats = _running_statistics(model)
            frozen = [name for name, p in ParameterSlots(model).named() if p.stop_gradient and id(p) not in stats]
            if frozen:
                raise ValueError(f"model has frozen parameters {frozen} (stop_gradient=True); pass "
                                 "allow_nograd=True to keep them frozen during adaptation")
        if meta_optimizer is not None:
            self._check_meta_optimizer(meta_optimizer)
            self.meta_optimizer = meta_optimizer

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Make a subclass's ``__init__`` name the argument it expected when called with a wrong one (``lr=``)."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def checked_init(self, *args: Any, **kw: Any) -> None:
            try:
                signature.bind(self, *args, **kw)
            except TypeError as err:
                raise TypeError(_explain_arguments(cls, signature, kw, err)) from None
            init(self, *args, **kw)

        cls.__init__ = checked_init

    # ----------------------------------------------------------------------------------------------- interface
    @abc.abstractmethod
    def clone(self) -> "BaseLearner":
        """Return a new task learner whose parameters are differentiable functions of this learner's."""

    @abc.abstractmethod
    def adapt(self, loss: paddle.Tensor) -> None:
        """Make one inner update of this task learner's model from ``loss`` (out of place)."""

    @property
    def tasks(self) -> int | None:
        """The number of tasks a task learner from ``clone(tasks=T)`` adapts at once (``None``: one task)."""
        return self._tasks

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``self.model`` on the inputs (after checking that floating inputs match the model's dtype).

        A task learner cloned for ``T`` tasks (``clone(tasks=T)``) takes every tensor input with the task axis first,
        ``[T, N, ...]``, and returns outputs the same way, ``[T, N, ...]`` (see `paddlefsl.metaopt.taskbatch`).
        """
        if self._tasks is not None:
            tasks = self._tasks
            args = tuple(taskbatch.to_samples(v, tasks, f"input {i}") if isinstance(v, paddle.Tensor) else v
                         for i, v in enumerate(args))
            kwargs = {k: taskbatch.to_samples(v, tasks, f"input {k!r}") if isinstance(v, paddle.Tensor) else v
                      for k, v in kwargs.items()}
            with taskbatch.batched_forward(self.model, tasks):
                return taskbatch.to_tasks(self._run_model(args, kwargs), tasks)
        return self._run_model(args, kwargs)

    def _run_model(self, args: tuple, kwargs: dict) -> Any:
        dtype = self._param_dtype()
        for i, value in enumerate(args):
            if isinstance(value, paddle.Tensor) and value.is_floating_point() and dtype is not None \
                    and value.dtype != dtype:
                raise TypeError(f"input {i} has dtype {value.dtype} but the model's parameters are {dtype}; "
                                f"cast the data with .astype({dtype})")
        if self._meta is not None and not self._meta._eval_norms_checked:
            self._warn_untrained_eval_norms()
        try:
            with released.owner(self._graph_tokens[-1] if self._graph_tokens else None):
                out = self.model(*args, **kwargs)
            return ModelOutputs(out) if type(out) is tuple else out
        except RuntimeError as err:
            integers = [i for i, value in enumerate(args) if isinstance(value, paddle.Tensor)
                        and not value.is_floating_point() and value.dtype != paddle.bool]
            if not integers or "Selected wrong DataType" not in str(err):
                raise
            kernel = re.search(r"kernel `(\w+)`", str(err))
            raise TypeError(f"input {integers[0]} has dtype {args[integers[0]].dtype}, but the model's "
                            f"{kernel.group(1) if kernel else 'first'} kernel takes floating point data only; cast "
                            f"it, e.g. x.astype({dtype or 'float32'}) (and scale images to [0, 1])") from None

    def step(self, loss: paddle.Tensor | None, num_tasks: int | None = None) -> None:
        """Meta update: back-propagate ``loss`` into the meta-model, apply ``meta_optimizer``, clear gradients.

        Without a ``meta_optimizer`` the gradients are left in ``parameter.grad`` for you to use. When several
        processes run (``paddle.distributed``), ``loss`` is the mean query loss over this process's ``num_tasks``
        tasks, and the meta-gradients are all-reduced into the gradient of the mean over all processes' tasks
        before the meta-optimizer runs, so every process takes the same step (see `paddlefsl.metaopt.distributed`).
        If your loss is a sum over tasks, pass ``loss / num_tasks``.

        Args:
            loss: a scalar built from task learners' outputs, usually the mean query loss of a meta-batch; None on
                a process whose shard of the meta-batch is empty (``num_tasks=0``).
            num_tasks: how many tasks ``loss`` averages; required when several processes run.

        Raises:
            RuntimeError: if called on a task learner, or if no task learner was cloned since the last step.
            ValueError: if ``loss`` is not a connected scalar, or reaches no meta-model parameter, or ``num_tasks``
                is missing or negative where it must be given.
            FloatingPointError: if ``loss`` is not finite.
            CollectiveError: if another process failed.
        """
        if self._meta is not None:
            raise RuntimeError("step() is the meta update: call it on the learner you built, not on a task "
                               "learner from clone()")
        tasks = distributed.check_num_tasks(num_tasks)
        trainable = [p for p in self.parameters() if not p.stop_gradient]
        if tasks == 0:
            if loss is not None:
                raise ValueError("step(loss, num_tasks=0): a process with no tasks has no loss; pass loss=None")
        else:
            check_scalar_loss(loss, "step")
            if self._clones_since_step == 0:
                raise RuntimeError("step(loss): no task learner was cloned since the last step; build loss from "
                                   "task learners (task = learner.clone(); task.adapt(...); loss = f(task(x)))")
            loss.backward()
            if all(p.grad is None for p in trainable):
                raise ValueError("step(loss): loss reaches none of the meta-model's parameters")
        if distributed.is_parallel():
            total = distributed.all_reduce_meta_gradients(trainable, tasks)
            if total == 0:
                raise ValueError("step(loss, num_tasks=0) on every process: the meta-batch has no tasks")
            distributed.average_statistics(_statistics(self), tasks)
        self._clones_since_step = 0
        if self.meta_optimizer is not None:
            self.meta_optimizer.step()
            self.meta_optimizer.clear_grad()

    # ----------------------------------------------------------------------------------------------- helpers
    def _warn_untrained_eval_norms(self) -> None:
        """Warn (once per learner) when a batch-norm layer of this task learner runs in eval mode with running
        statistics still at their initial values (mean 0, variance 1): it would normalise with untrained
        statistics. Checked at the first forward pass that has a batch-norm layer in eval mode."""
        if self.__dict__.get("_named_norms") is None:
            self._named_norms = [(name, sub) for name, sub in self.model.named_sublayers(include_self=True)
                                 if isinstance(sub, (nn.layer.norm._BatchNormBase, nn.BatchNorm))]
        norms = [(name, sub) for name, sub in self._named_norms
                 if not sub.training and not getattr(sub, "_use_global_stats", False)]
        if not norms:
            return
        self._meta._eval_norms_checked = True
        with paddle.no_grad():
            untrained = [name for name, sub in norms if sub._mean is not None
                         and bool((sub._mean == 0).all().item()) and bool((sub._variance == 1).all().item())]
        if untrained:
            warnings.warn(
                f"batch-norm layers {untrained} of a task learner run in eval mode with running statistics that "
                f"were never updated (mean 0, variance 1), so they normalise with untrained statistics. With "
                f"batch_norm={self.batch_norm!r} the meta-model's running statistics are not trained. Keep the "
                "model in train mode for adaptation and evaluation (batch statistics, as MAML does), or build the "
                "learner with batch_norm='shared' (task learners update the meta-model's statistics) and then use "
                "eval mode", UserWarning, stacklevel=3)

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

    def _spawn(self, *, tasks: int | None = None, **layers: nn.Layer) -> "BaseLearner":
        """Make a task learner of this class around the given (already cloned) layers, batched over ``tasks`` tasks
        if given (else as this learner is)."""
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
        task._lease = scope.Lease(first_order=self.first_order)
        task._graph_tokens = self._graph_tokens + (object(),)
        task._tasks = self._tasks if tasks is None else tasks
        for name, layer in layers.items():
            setattr(task, name, layer)
        return task

    def _clone_layer(self, layer: nn.Layer, tasks: int | None = None) -> nn.Layer:
        """A graph-connected copy of ``layer`` for a task learner; with ``tasks``, one copy of its state per task
        (`paddlefsl.metaopt.taskbatch.stack_parameters`)."""
        cloned = clone_model(layer, share_stats=self.batch_norm == "shared")
        if self.batch_norm == "running":
            for sub in batch_norms(cloned):
                sub._use_global_stats = True
        if tasks is not None:
            taskbatch.stack_parameters(cloned, tasks, _running_statistics(cloned))
        scope.track_layers(cloned)
        return cloned

    def _new_tasks(self, tasks: object, layer: nn.Layer) -> int | None:
        """Check ``clone(tasks=...)``: the number of tasks whose parameters the clone must stack now (``None`` for a
        one-task clone, and for a clone of a learner that is batched already, which keeps its batch)."""
        if tasks is None:
            return None
        tasks = taskbatch.check_tasks(tasks)
        if self._tasks is not None:
            raise ValueError(f"clone(tasks={tasks}) on a task learner already cloned for {self._tasks} tasks; call "
                             f"clone() on it (the copy keeps its {self._tasks} tasks)")
        if self.batch_norm == "shared" and batch_norms(layer):
            raise ValueError("clone(tasks=...) with batch_norm='shared': the tasks of a batch would update the "
                             "meta-model's running statistics in one call, not one task after another as separate "
                             "clones do; build the learner with batch_norm='batch' or 'running', or clone one "
                             "learner per task")
        return tasks

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
        if self._tasks is not None:
            loss = taskbatch.task_losses_total(loss, self._tasks, f"adapt step {self._adapt_steps + 1}")
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
        check_grad_enabled(where)
        _check_loss_shape(loss, where)
        if loss.stop_gradient:  # a detached loss: report it as check_scalar_loss would, non-finite first
            check_scalar_loss(loss, where)
        if not first_order:
            if self._lease is not None and self._lease.first_order:
                raise ValueError(f"{where}: first_order=False on a task learner of a first-order learner: its forward "
                                 "passes ran on Paddle's first-order kernels, which are not differentiated twice; "
                                 "build the learner with first_order=False and pass first_order=True to the steps "
                                 "that should be first order")
            released.check_released(self._graph_tokens, where)
        with released.owner(self._graph_tokens[-1]):
            grads = scope.grad(loss, list(params), create_graph=not first_order, model=self, step=self._adapt_steps)
        if all(g is None for g in grads):
            raise ValueError(f"{where}: loss is not connected to the task model's parameters {list(names)}")
        unused = [name for name, g in zip(names, grads) if g is None]
        if unused and not allow_unused:
            raise ValueError(f"{where}: loss does not use the parameters {unused}; pass allow_unused=True to give "
                             "them a zero update")
        # One device-to-host copy for every check: the loss and the sum of all gradient entries (one sum per dtype),
        # read back together. A non-finite sum flags a possibly non-finite gradient; each gradient is then checked
        # on its own, so an overflowing sum of finite gradients raises nothing.
        with paddle.no_grad():
            by_dtype: dict = {}
            for g in grads:
                if g is not None:
                    by_dtype.setdefault(g.dtype, []).append(g.reshape([-1]))
            sums = [loss.reshape([1]).astype("float64")]
            sums += [paddle.concat(flat).sum().reshape([1]).astype("float64") for flat in by_dtype.values()]
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

