"""MAML (Finn et al., 2017): every parameter of the model adapts by gradient descent.

Optional MAML++ features (Antoniou et al., 2019, "How to train your MAML"), all off by default: learned per-layer
(per-step) inner learning rates (LSLR), derivative-order annealing (DA), per-step batch-norm running statistics
(BNRS) and affine weights (BNWB). The multi-step loss (MSL) and cosine annealing of the meta learning rate are in
`paddlefsl.metaopt.schedules`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import paddle
from paddle import nn

from paddlefsl.metaopt.base import BaseLearner, batch_norms, check_inner_lr
from paddlefsl.metaopt.functional import ParameterSlots, clone_model
from paddlefsl.metaopt.recompute import check_step_count, recomputed_step

__all__ = ["LEARN_INNER_LR_MODES", "MAML", "PerStepBatchNorm"]

LEARN_INNER_LR_MODES = (None, "per_layer", "per_step_per_layer")


def _flag(value: object, argument: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be True or False, got {type(value).__name__} {value!r}")
    return value


def _count(value: object, argument: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be an integer >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{argument} must be an integer >= {minimum}, got {value}")
    return value


class PerStepBatchNorm(nn.Layer):
    """Per-step state of one batch-norm layer: running statistics and/or affine weights for steps ``0..S``.

    Set ``k`` is used by a task learner's forward passes after ``k`` adapt calls. Statistics are buffers
    (``mean_k``, ``variance_k``), initialised from the layer's running statistics; weights are parameters
    (``weight[k]``, ``bias[k]``), initialised from the layer's weight and bias.

    Args:
        norm: the batch-norm layer (not modified).
        sets: the number of sets, ``inner_steps + 1``.
        statistics: keep per-step running statistics.
        weights: keep per-step weight and bias (only where the layer has them).
    """

    def __init__(self, norm: nn.Layer, sets: int, statistics: bool, weights: bool) -> None:
        super().__init__()
        self.sets = sets
        self.statistics = statistics
        if statistics:
            for k in range(sets):
                self.register_buffer(f"mean_{k}", norm._mean.detach().clone())
                self.register_buffer(f"variance_{k}", norm._variance.detach().clone())
        self.weights = weights and norm.weight is not None
        if self.weights:
            for name in ("weight", "bias"):
                source = getattr(norm, name)
                setattr(self, name, nn.ParameterList([
                    self.create_parameter(shape=list(source.shape), dtype=source.dtype,
                                          default_initializer=nn.initializer.Assign(source.numpy()))
                    for _ in range(sets)]))

    def swap(self, norm: nn.Layer, k: int) -> dict[str, Any]:
        """Put set ``k`` into ``norm`` and return what it replaced (for `restore()`)."""
        new = {}
        if self.statistics:
            new["_mean"] = self._buffers[f"mean_{k}"]
            new["_variance"] = self._buffers[f"variance_{k}"]
        if self.weights:
            new["weight"] = ParameterSlots(self.weight).tensors[k]
            new["bias"] = ParameterSlots(self.bias).tensors[k]
        previous = {key: norm._parameters[key] for key in new}
        norm._parameters.update(new)
        return previous

    @staticmethod
    def restore(norm: nn.Layer, previous: dict[str, Any]) -> None:
        """Undo `swap()`."""
        norm._parameters.update(previous)


class MAML(BaseLearner):
    """Model-Agnostic Meta-Learning with exact second-order meta-gradients by default, and MAML++ options.

    Plain MAML: ``MAML(model, inner_lr)``. The MAML++ options (Antoniou et al., 2019) are keyword-only and off by
    default:

    * ``learn_inner_lr="per_step_per_layer"`` (LSLR): one learned scalar rate per trainable parameter tensor and per
      inner step, ``learner.inner_lrs[i][k]`` (``inner_lrs[i]`` has shape ``[inner_steps]``), initialised to
      ``inner_lr``. The ``k``-th `adapt()` of a task learner uses step ``k``'s rates. ``"per_layer"``: one learned
      rate per parameter tensor shared by all steps (shape ``[1]``). The rates are parameters of the learner, so a
      meta-optimizer over ``learner.parameters()`` trains them.
    * ``first_order_until=N`` (DA): task learners cloned while ``learner.iteration < N`` are first order, later ones
      second order. `step()` counts iterations; `set_iteration()` sets the count (for loops that call
      ``loss.backward()`` and the optimizer themselves).
    * ``per_step_bn_stats=True`` (BNRS) / ``per_step_bn_weights=True`` (BNWB): every batch-norm layer keeps
      ``inner_steps + 1`` sets of running statistics / of weight and bias in ``learner.bn_steps``; a forward pass of
      a task learner after ``k`` adapt calls uses set ``k`` (set 0: before adapting; the reference implementation of
      MAML++ instead shares one set between the support pass before step ``k + 1`` and the query pass after it).
      The ``batch_norm`` policy decides the per-step statistics as it does the layers' own: ``"batch"``: task
      learners update their own copies (the learner's stay unchanged); ``"running"``: task learners normalise with
      the learner's step-``k`` statistics, frozen; ``"shared"``: task learners update the learner's step-``k``
      statistics (as in the paper). With per-step weights, the layers' own weight and bias are unused and are frozen
      (``stop_gradient=True``); the per-step weights are meta-learned and not adapted in the inner loop.
    * Multi-step loss (MSL): `paddlefsl.metaopt.schedules.multi_step_loss_weights()`; you weigh the query loss
      after each inner step (see its example).
    * Cosine annealing of the meta learning rate: pass ``paddle.optimizer.lr.CosineAnnealingDecay`` as the learning
      rate of the meta-optimizer and call its ``step()`` after each ``learner.step(loss)``.

    ``inner_steps`` (needed by per-step rates and per-step batch norm, optional otherwise) bounds the adapt calls
    per task learner. A clone of a task learner continues at the step its parent reached.

    Args:
        model: the meta-model, any ``paddle.nn.Layer``.
        inner_lr: the inner-loop learning rate (the initial value of learned rates), a positive finite number.
        first_order: use first-order MAML (FOMAML): the meta-gradient is the query gradient at the adapted weights.
        allow_unused: see `BaseLearner`.
        allow_nograd: see `BaseLearner`.
        meta_optimizer: see `BaseLearner`; with learned rates or per-step batch-norm
            weights it must hold them too (build it over ``learner.parameters()`` and assign
            ``learner.meta_optimizer``).
        batch_norm: see `BaseLearner`.
        inner_steps: the number of adapt calls per task learner, a positive integer, or ``None`` (unbounded).
        learn_inner_lr: ``None``, ``"per_layer"`` or ``"per_step_per_layer"``.
        first_order_until: the number of meta-iterations to run first order before switching to second order.
        per_step_bn_stats: per-step batch-norm running statistics (BNRS).
        per_step_bn_weights: per-step batch-norm weight and bias (BNWB).
        truncate: keep second-order terms in the last ``truncate`` inner steps only; earlier steps are first order
            (their Jacobian ``dw_{i+1}/dw_i = I - lr * H_i`` is replaced by ``I``, as FOMAML does for all steps), so
            only ``truncate`` steps' graphs are stored. An approximation: ``truncate=inner_steps`` is exact MAML.
            A positive integer ``<= inner_steps`` (needs ``inner_steps``).
        recompute: keep an inner-step boundary every ``recompute`` steps and replay the steps in between during the
            meta-backward (`paddlefsl.metaopt.recompute`): the same meta-gradient as the stored loop, with
            memory that does not grow with the number of steps, for about one more forward and backward of the
            support loss per step. ``adapt`` then takes the support loss as a function of a learner. A positive
            integer ``<= inner_steps`` (needs ``inner_steps``); ``1`` uses the least memory.

    Raises:
        TypeError, ValueError: as `BaseLearner`, and for bad option values (the message
            names the argument and what it expects).

    Example:
        Memory that does not grow with the inner steps (exact), or truncated second order (approximate):

        >>> learner = MAML(model, 0.01, inner_steps=20, recompute=1)
        >>> task = learner.clone()
        >>> for _ in range(20):
        ...     task.adapt(lambda l: F.cross_entropy(l(x_support), y_support))
        >>> learner.step(F.cross_entropy(task(x_query), y_query))
        >>> MAML(model, 0.01, inner_steps=20, truncate=2)

        >>> maml = MAML(model, inner_lr=0.4,
        ...             meta_optimizer=paddle.optimizer.Adam(1e-3, parameters=model.parameters()))
        >>> task = maml.clone()
        >>> task.adapt(F.cross_entropy(task(x_support), y_support))
        >>> maml.step(F.cross_entropy(task(x_query), y_query))

        MAML++ (all options):

        >>> learner = MAML(model, 0.1, inner_steps=5, learn_inner_lr="per_step_per_layer", first_order_until=50,
        ...                per_step_bn_stats=True, per_step_bn_weights=True, batch_norm="shared")
        >>> schedule = paddle.optimizer.lr.CosineAnnealingDecay(1e-3, T_max=iterations)
        >>> learner.meta_optimizer = paddle.optimizer.Adam(schedule, parameters=learner.parameters())
        >>> for it in range(iterations):
        ...     weights = multi_step_loss_weights(5, epoch=it // per_epoch, anneal_epochs=10)
        ...     task = learner.clone()
        ...     losses = []
        ...     for k in range(5):
        ...         task.adapt(F.cross_entropy(task(x_support), y_support))
        ...         losses.append(F.cross_entropy(task(x_query), y_query))
        ...     learner.step(sum(w * q for w, q in zip(weights, losses)))
        ...     schedule.step()
    """

    def __init__(self, model: nn.Layer, inner_lr: float, first_order: bool = False,
                 allow_unused: bool | None = None, allow_nograd: bool = False,
                 meta_optimizer: paddle.optimizer.Optimizer | None = None, batch_norm: str = "batch", *,
                 inner_steps: int | None = None, learn_inner_lr: str | None = None, first_order_until: int = 0,
                 per_step_bn_stats: bool = False, per_step_bn_weights: bool = False, truncate: int | None = None,
                 recompute: int | None = None) -> None:
        if inner_steps is not None:
            inner_steps = _count(inner_steps, "inner_steps", 1)
        if truncate is not None:
            truncate = check_step_count(truncate, "truncate", inner_steps)
            if first_order:
                raise ValueError(f"truncate={truncate} keeps second-order terms in the last steps; first_order=True "
                                 "has none (drop one of the two)")
        if recompute is not None:
            recompute = check_step_count(recompute, "recompute", inner_steps)
        if learn_inner_lr not in LEARN_INNER_LR_MODES or isinstance(learn_inner_lr, bool):
            raise ValueError(f"learn_inner_lr must be one of {LEARN_INNER_LR_MODES}, got {learn_inner_lr!r}")
        first_order_until = _count(first_order_until, "first_order_until", 0)
        if first_order_until and first_order:
            raise ValueError(f"first_order_until={first_order_until} anneals from first to second order; it needs "
                             "first_order=False")
        per_step_bn_stats = _flag(per_step_bn_stats, "per_step_bn_stats")
        per_step_bn_weights = _flag(per_step_bn_weights, "per_step_bn_weights")
        for argument, on in (("learn_inner_lr='per_step_per_layer'", learn_inner_lr == "per_step_per_layer"),
                             ("per_step_bn_stats=True", per_step_bn_stats),
                             ("per_step_bn_weights=True", per_step_bn_weights)):
            if on and inner_steps is None:
                raise ValueError(f"{argument} needs inner_steps (the number of adapt calls per task learner), "
                                 "a positive integer")
        super().__init__(model, first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd,
                         meta_optimizer=None, batch_norm=batch_norm)
        self.inner_lr = check_inner_lr(inner_lr)
        self.inner_steps = inner_steps
        self.learn_inner_lr = learn_inner_lr
        self.first_order_until = first_order_until
        self.per_step_bn_stats = per_step_bn_stats
        self.per_step_bn_weights = per_step_bn_weights
        self.truncate = truncate
        self.recompute = recompute
        self._iteration = 0
        self._step_index = 0
        if per_step_bn_stats or per_step_bn_weights:
            norms = batch_norms(model)
            if not norms:
                raise ValueError("per_step_bn_stats / per_step_bn_weights need batch-norm layers, and the model "
                                 "has none")
            self.bn_steps = nn.LayerList([PerStepBatchNorm(norm, inner_steps + 1, per_step_bn_stats,
                                                           per_step_bn_weights) for norm in norms])
            if per_step_bn_weights:
                for norm in norms:
                    for p in (norm.weight, norm.bias):
                        if p is not None:
                            p.stop_gradient = True
        if learn_inner_lr is not None:
            length = inner_steps if learn_inner_lr == "per_step_per_layer" else 1
            rates = [self.create_parameter(shape=[length], dtype=p.dtype,
                                           default_initializer=nn.initializer.Constant(self.inner_lr))
                     for p in ParameterSlots(model).tensors if not p.stop_gradient]
            self.inner_lrs = nn.ParameterList(rates)
        if meta_optimizer is not None:
            self._check_meta_optimizer(meta_optimizer)
            self.meta_optimizer = meta_optimizer

    # ----------------------------------------------------------------------------------------------- MAML++ state
    @property
    def iteration(self) -> int:
        """The meta-iteration count of the learner you built (task learners report their learner's)."""
        return self._root()._iteration

    @property
    def inner_step(self) -> int:
        """How many inner steps this learner's model has taken (0 for the learner you built)."""
        return self._step_index

    def set_iteration(self, iteration: int) -> None:
        """Set the meta-iteration count that ``first_order_until`` compares against (``step()`` adds one).

        Raises:
            RuntimeError: if called on a task learner.
            TypeError, ValueError: unless ``iteration`` is an integer ``>= 0``.
        """
        if self._meta is not None:
            raise RuntimeError("set_iteration() sets the meta-iteration of the learner you built, not of a task "
                               "learner from clone()")
        self._iteration = _count(iteration, "iteration", 0)

    def learning_rates(self) -> list[tuple[str, paddle.Tensor]]:
        """``(parameter name, rates)`` for the trainable parameters of ``self.model``: the learned rates (shape
        ``[inner_steps]`` or ``[1]``) or, without ``learn_inner_lr``, ``inner_lr`` as a constant tensor of shape
        ``[1]`` in the parameter's dtype."""
        trainable = [(n, p) for n, p in ParameterSlots(self.model).named() if not p.stop_gradient]
        rates = self._sub_layers.get("inner_lrs")
        if rates is None:
            return [(n, paddle.full([1], self.inner_lr, dtype=p.dtype)) for n, p in trainable]
        return list(zip([n for n, _ in trainable], ParameterSlots(rates).tensors))

    def is_first_order(self) -> bool:
        """Whether a task learner cloned now from this learner would be first order (``first_order`` or DA)."""
        return self.first_order or self.iteration < self.first_order_until

    def _root(self) -> "MAML":
        return self if self._meta is None else self._meta

    # ----------------------------------------------------------------------------------------------- interface
    def clone(self, tasks: int | None = None) -> "MAML":
        """Return a task learner whose model is a graph-connected copy of this learner's model.

        Learned rates and per-step batch-norm weights are graph-connected copies too; per-step statistics are copied
        or shared as ``batch_norm`` says. With ``first_order_until``, the task learner's order is fixed here.

        Args:
            tasks: adapt this many tasks at once (`paddlefsl.metaopt.taskbatch`): the task learner holds one copy of
                each parameter per task, takes inputs ``[tasks, N, ...]``, returns ``[tasks, N, ...]``, and its
                `adapt()` takes one loss per task (shape ``[tasks]``). Each task's update and meta-gradient are
                those of a separate clone; small per-task shapes run several times faster.

        Raises:
            TypeError, ValueError: for a bad ``tasks``, or ``tasks`` with per-step batch norm, ``recompute``,
                ``batch_norm="shared"`` or a layer a batched learner cannot run per task (the message says which).

        Example:
            >>> task = maml.clone(tasks=32)
            >>> task.adapt(F.cross_entropy(task(x_support), y_support, reduction="none").mean(axis=1))
            >>> maml.step(F.cross_entropy(task(x_query), y_query))
        """
        new_tasks = self._new_tasks(tasks, self.model)
        if new_tasks is not None:
            for argument, on in (("per_step_bn_stats", self.per_step_bn_stats),
                                 ("per_step_bn_weights", self.per_step_bn_weights), ("recompute", self.recompute)):
                if on:
                    raise ValueError(f"clone(tasks={new_tasks}): a learner built with {argument}={on!r} clones one "
                                     "task at a time; call clone() once per task")
        layers = {"model": self._clone_layer(self.model, new_tasks)}
        if "inner_lrs" in self._sub_layers:
            layers["inner_lrs"] = clone_model(self.inner_lrs)
        if "bn_steps" in self._sub_layers:
            layers["bn_steps"] = clone_model(self.bn_steps, share_stats=self.batch_norm == "shared")
        first = self.is_first_order()
        task = self._spawn(tasks=new_tasks, **layers)
        task.first_order = first
        task._step_index = self._step_index
        return task

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model on the inputs; with per-step batch norm, with the set of this learner's inner step."""
        with self._per_step_norms():
            return super().forward(*args, **kwargs)

    def step(self, loss: paddle.Tensor | None, num_tasks: int | None = None) -> None:
        """Meta update as `BaseLearner.step()`, then count one meta-iteration (see ``first_order_until``)."""
        super().step(loss, num_tasks)
        self._iteration += 1

    def adapt(self, loss: paddle.Tensor | Callable[["MAML"], paddle.Tensor], first_order: bool | None = None) -> None:
        """One gradient step on every trainable parameter of the task model: ``w <- w - lr * dloss/dw``.

        ``lr`` is ``inner_lr``, or the learned rate of ``w`` (for this step, with ``"per_step_per_layer"``).
        With ``truncate=k``, steps before the last ``k`` are first order. With ``recompute``, ``loss`` must be a
        function of a learner (see `paddlefsl.metaopt.recompute`).

        Args:
            loss: a scalar loss computed with this task learner, or a function that computes it from the learner
                it is given: ``lambda learner: F.cross_entropy(learner(x), y)`` (needed by ``recompute``). A task
                learner from ``clone(tasks=T)`` takes one loss per task, shape ``[T]``.
            first_order: override the task learner's order for this step.

        Raises:
            RuntimeError: if called on the meta-learner instead of a clone, or more than ``inner_steps`` times.
            ValueError: if ``loss`` is not a scalar connected to the task model, or misses parameters.
            FloatingPointError: if ``loss`` or a gradient is not finite (the message gives the step).
            SecondOrderError: if an op met on the way has no exact second-order gradient.
            TypeError: if ``recompute`` is set and ``loss`` is a tensor (a tensor cannot be recomputed).
        """
        if self._meta is not None and self.inner_steps is not None and self._step_index >= self.inner_steps:
            raise RuntimeError(f"adapt call {self._step_index + 1} on a task learner built with "
                               f"inner_steps={self.inner_steps}; clone again from the learner for a new task, or "
                               "build the learner with a larger inner_steps")
        if first_order is None and self.truncate is not None \
                and self._step_index < self.inner_steps - self.truncate:
            first_order = True
        first = self.first_order if first_order is None else bool(first_order)
        recompute = self.recompute
        if isinstance(loss, paddle.Tensor):
            if recompute is not None and self._meta is not None:
                raise TypeError(f"adapt: the learner was built with recompute={recompute}, which replays the "
                                "support loss during the meta-backward, so give it as a function of the learner: "
                                "task.adapt(lambda learner: F.cross_entropy(learner(x), y)); a tensor cannot be "
                                "recomputed")
        elif callable(loss):
            if recompute is not None and not first:
                self._require_task("adapt")
                recomputed_step(self, loss, False, recompute)
                self._step_index += 1
                return
            loss = loss(self)
        self._gradient_step(self.model, loss, self._rates(), first_order)
        self._step_index += 1

    # ----------------------------------------------------------------------------------------------- helpers
    def _rates(self) -> float | list[paddle.Tensor]:
        rates = self._sub_layers.get("inner_lrs")
        if rates is None:
            return self.inner_lr
        k = self._step_index if self.learn_inner_lr == "per_step_per_layer" else 0
        return [r[k] for r in ParameterSlots(rates).tensors]

    @contextlib.contextmanager
    def _per_step_norms(self) -> Iterator[None]:
        steps = self._sub_layers.get("bn_steps")
        if steps is None:
            yield
            return
        norms = batch_norms(self.model)
        swapped = []
        try:
            for norm, state in zip(norms, steps):
                swapped.append((norm, state.swap(norm, self._step_index)))
            yield
        finally:
            for norm, previous in reversed(swapped):
                PerStepBatchNorm.restore(norm, previous)
