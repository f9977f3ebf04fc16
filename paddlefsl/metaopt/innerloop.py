"""A ``higher``-style differentiable inner loop for any Paddle model and (almost) any Paddle optimizer.

``innerloop_ctx(model, optimizer)`` yields a functional model whose fast weights are a list of tensors, and a
differentiable optimizer whose ``step(loss)`` replaces them by an out-of-place update that follows the given Paddle
optimizer's rule exactly (see `paddlefsl.metaopt.optim`). Every step stays in the autograd graph, so a loss
computed after ``k`` steps can be differentiated w.r.t. the initial weights and w.r.t. hyper-parameters given as
tensors (``override``).

With ``innerloop_ctx(..., inner_steps=K, recompute=r)`` the steps keep no activations: ``diffopt.step`` takes the
loss as a function of a functional model, and the meta-backward replays the steps from a boundary kept every ``r``
steps (`paddlefsl.metaopt.recompute`), for the same meta-gradient with memory that does not grow with ``K``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Sequence

import paddle
from paddle import nn

from paddlefsl.metaopt.autodiff import released, scope
from paddlefsl.metaopt.base import check_grad_enabled, check_scalar_loss
from paddlefsl.metaopt.functional import ParameterSlots, functional_call
from paddlefsl.metaopt.optim.base import OptimizerTwin, clip_gradients, param_groups, twin_for
from paddlefsl.metaopt.recompute import check_loop_state, check_step_count, recomputed_loop_step

__all__ = ["innerloop_ctx", "FunctionalModel", "DifferentiableOptimizer"]

_ALIASES = {"lr": "learning_rate"}


class FunctionalModel:
    """A model run with a history of fast weights (the ``fmodel`` of `innerloop_ctx()`).

    ``fmodel(*inputs)`` runs ``module`` with the latest fast weights through
    `functional_call()` (no copy of the module is made); ``fmodel(*inputs, params=ws)`` runs
    it with ``ws`` instead. Frozen parameters (``stop_gradient=True``) and buffers are the module's own.

    Args:
        module: the Paddle layer.
        initial: one tensor per trainable parameter of ``module`` (the weights at time 0).

    Attributes:
        module: the wrapped layer.
        names: the names of the trainable parameters, in the order of every parameter list here.
    """

    def __init__(self, module: nn.Layer, initial: Sequence[paddle.Tensor]) -> None:
        self.module = module
        slots = ParameterSlots(module)
        self._trainable = [i for i, p in enumerate(slots.tensors) if not p.stop_gradient]
        self._slot_count = len(slots)
        self.names = [slots.names[i] for i in self._trainable]
        self.originals = [slots.tensors[i] for i in self._trainable]
        if len(initial) != len(self._trainable):
            raise ValueError(f"expected {len(self._trainable)} initial tensors, got {len(initial)}")
        self._history: list[list[paddle.Tensor]] = [list(initial)]
        self.graph_token = object()

    def __call__(self, *args, params: Sequence[paddle.Tensor] | Mapping[str, paddle.Tensor] | None = None,
                 **kwargs):
        """Run the module with the latest fast weights, or with ``params`` (a list like `parameters()`, or a
        mapping from parameter names to tensors)."""
        if params is None:
            fast = self._history[-1]
        elif isinstance(params, Mapping):
            unknown = [name for name in params if name not in self.names]
            if unknown:
                raise KeyError(f"params names {unknown} are not trainable parameters; known: {self.names}")
            fast = [params.get(name, latest) for name, latest in zip(self.names, self._history[-1])]
        else:
            fast = list(params)
            if len(fast) != len(self._trainable):
                raise ValueError(f"params has {len(fast)} tensors; the model has {len(self._trainable)} trainable "
                                 f"parameters {self.names}")
        full: list[paddle.Tensor | None] = [None] * self._slot_count
        for i, tensor in zip(self._trainable, fast):
            full[i] = tensor
        with released.owner(self.graph_token):
            return functional_call(self.module, full, *args, **kwargs)

    forward = __call__

    @property
    def time(self) -> int:
        """How many differentiable steps have been taken."""
        return len(self._history) - 1

    def parameters(self, time: int | None = None) -> list[paddle.Tensor]:
        """The fast weights after ``time`` steps (``0``: the initial ones; ``None`` or ``-1``: the latest).

        Raises:
            IndexError: if ``time`` is beyond the number of steps taken.
        """
        if time is None:
            return list(self._history[-1])
        if not -len(self._history) <= time < len(self._history):
            raise IndexError(f"time={time}: only {self.time} steps were taken (valid: 0..{self.time} or negative)")
        return list(self._history[time])

    def named_parameters(self, time: int | None = None) -> list[tuple[str, paddle.Tensor]]:
        """``(name, tensor)`` pairs of `parameters()`."""
        return list(zip(self.names, self.parameters(time)))

    def _append(self, params: Sequence[paddle.Tensor]) -> None:
        self._history.append(list(params))


class _StepRule:
    """One optimizer step of a `DifferentiableOptimizer`, apart from the fast weights, state and hyper-parameters.

    A recomputed segment keeps this to replay its steps (see `paddlefsl.metaopt.recompute.LoopProgram`), so it holds
    the module, the twin and the parameter groups, never the functional model or its history.
    """

    def __init__(self, module: nn.Layer, names: list[str], originals: list[paddle.Tensor], twin: OptimizerTwin,
                 twin_name: str, groups: list, group_of: list[int], settings: list[dict[str, Any]]) -> None:
        self.module = module
        self.names = names
        self.originals = originals
        self.twin = twin
        self.twin_name = twin_name
        self.groups = groups
        self.group_of = group_of
        self.settings = settings

    def apply(self, loss: paddle.Tensor, params: list[paddle.Tensor], state: list, hyper: list[dict[str, Any]],
              second: bool, grad_callback: Callable | None, step: int, token: object
              ) -> tuple[list[paddle.Tensor], list]:
        """The new fast weights and state after one step on ``loss`` (``second``: keep the gradient's graph)."""
        with released.owner(token):
            grads = scope.grad(loss, params, create_graph=second, model=self.module, step=step)
        grads = [None if g is None else (g if second else g.detach()) for g in grads]
        if all(g is None for g in grads):
            raise ValueError(f"diffopt.step (step {step}): loss reaches none of the fast weights {self.names}")
        if grad_callback is not None:
            grads = list(grad_callback(list(grads)))
            if len(grads) != len(params):
                raise ValueError(f"grad_callback returned {len(grads)} gradients for {len(params)} parameters")
        for g, (group, members) in enumerate(self.groups):
            idx = [i for i, owner in enumerate(self.group_of) if owner == g]
            clip = self.settings[idx[0]]["grad_clip"] if idx else None
            if clip is None:
                continue
            clipped = clip_gradients([grads[i] for i in idx], [self.originals[i] for i in idx], clip)
            for i, c in zip(idx, clipped):
                grads[i] = c
        new_params, new_state = self.twin.update(grads, state, params, hyper)
        return list(new_params), new_state

    def run(self, closure: Callable[["FunctionalModel"], paddle.Tensor], params: list[paddle.Tensor], state: list,
            hyper: list[dict[str, Any]], create_graph: bool, grad_callback: Callable | None, step: int
            ) -> tuple[list[paddle.Tensor], list, paddle.Tensor]:
        """Run ``closure`` on a functional model of ``params`` (no history) and take the step from its loss."""
        fmodel = FunctionalModel(self.module, params)
        loss = closure(fmodel)
        check_scalar_loss(loss, f"diffopt.step (step {step})")
        new_params, new_state = self.apply(loss, params, state, hyper, create_graph, grad_callback, step,
                                           fmodel.graph_token)
        return new_params, new_state, loss


class DifferentiableOptimizer:
    """The differentiable twin of a Paddle optimizer acting on a `FunctionalModel` (``diffopt``).

    Built by `innerloop_ctx()`; see there for the arguments.

    Attributes:
        optimizer: the Paddle optimizer whose settings are followed (never stepped or modified).
        twin: the `OptimizerTwin` doing the update.
        state: the optimizer state, one dict per fast parameter.
        overrides: for each fast parameter, the overridden hyper-parameters (name to tensor or number).
    """

    def __init__(self, optimizer: paddle.optimizer.Optimizer, fmodel: FunctionalModel,
                 override: Mapping[str, Any] | None = None, track_higher_grads: bool = True,
                 inner_steps: int | None = None, truncate: int | None = None, recompute: int | None = None) -> None:
        if inner_steps is not None:
            inner_steps = check_step_count(inner_steps, "inner_steps", inner_steps if isinstance(inner_steps, int)
                                           else None)
        if truncate is not None:
            truncate = check_step_count(truncate, "truncate", inner_steps, owner="innerloop_ctx")
            if not track_higher_grads:
                raise ValueError(f"truncate={truncate} keeps second-order terms in the last steps; "
                                 "track_higher_grads=False has none (drop one of the two)")
        if recompute is not None:
            recompute = check_step_count(recompute, "recompute", inner_steps, owner="innerloop_ctx")
            if not track_higher_grads:
                raise ValueError(f"recompute={recompute} replays second-order steps in the meta-backward; "
                                 "track_higher_grads=False takes none (drop one of the two)")
        self.inner_steps = inner_steps
        self.truncate = truncate
        self.recompute = recompute
        self.twin: OptimizerTwin = twin_for(optimizer)
        self.optimizer = optimizer
        self.fmodel = fmodel
        self.track_higher_grads = bool(track_higher_grads)
        groups = param_groups(optimizer)
        where: dict[int, int] = {}
        for g, (_, params) in enumerate(groups):
            for p in params:
                where[id(p)] = g
        missing = [n for n, p in zip(fmodel.names, fmodel.originals) if id(p) not in where]
        if missing:
            raise ValueError(f"the model's trainable parameters {missing} are not in the "
                             f"{type(optimizer).__name__} optimizer; build it with parameters=model.parameters()")
        self._group_of = [where[id(p)] for p in fmodel.originals]
        self._groups = groups
        self._settings = [self.twin.settings(optimizer, groups[g][0], p)
                          for g, p in zip(self._group_of, fmodel.originals)]
        self.overrides = self._resolve_override(override or {}, len(groups))
        for settings, extra in zip(self._settings, self.overrides):
            if "weight_decay" in extra:
                self.twin.override_weight_decay(settings)
        self.state = self.twin.init(fmodel.parameters(), self.hyper())
        self._rule = _StepRule(fmodel.module, fmodel.names, fmodel.originals, self.twin, type(optimizer).__name__,
                               groups, self._group_of, self._settings)
        self._boundary = None
        self._context: list[paddle.Tensor] = []  # the override tensors a recomputed segment differentiates
        for extra in self.overrides:
            for value in extra.values():
                if isinstance(value, paddle.Tensor) and not value.stop_gradient \
                        and all(value is not known for known in self._context):
                    self._context.append(value)
        if recompute is not None:
            check_loop_state(self.state, type(optimizer).__name__)

    def _resolve_override(self, override: Mapping[str, Any], n_groups: int) -> list[dict[str, Any]]:
        if not isinstance(override, Mapping):
            raise TypeError(f"override must be a dict of hyper-parameter name to value, got {type(override).__name__}")
        n_params = len(self._group_of)
        per_param: list[dict[str, Any]] = [{} for _ in range(n_params)]
        for key, value in override.items():
            name = _ALIASES.get(key, key)
            if name not in self.twin.hyper_names:
                raise ValueError(f"{type(self.optimizer).__name__} has no overridable hyper-parameter {key!r}; "
                                 f"choose from {list(self.twin.hyper_names)} (alias 'lr' for 'learning_rate')")
            if isinstance(value, (list, tuple)):
                if len(value) == n_groups:
                    values = [value[g] for g in self._group_of]
                elif len(value) == n_params:
                    values = list(value)
                else:
                    raise ValueError(f"override[{key!r}] has {len(value)} values; give one value, one per parameter "
                                     f"group ({n_groups}) or one per trainable parameter ({n_params})")
            else:
                values = [value] * n_params
            for i, v in enumerate(values):
                if not isinstance(v, (paddle.Tensor, int, float)) or isinstance(v, bool):
                    raise TypeError(f"override[{key!r}] values must be tensors or numbers, got {type(v).__name__}")
                per_param[i][name] = v
        return per_param

    def hyper(self) -> list[dict[str, Any]]:
        """The hyper-parameters the next step uses, one dict per fast parameter (learning rate read now, so an
        LR scheduler stepped between inner steps is honoured, as Paddle's ``step()`` does)."""
        base_lr = float(self.optimizer.get_lr())
        out = []
        for settings, extra in zip(self._settings, self.overrides):
            h = dict(settings)
            h["learning_rate"] = base_lr
            h.update(extra)
            out.append(h)
        return out

    def step(self, loss: paddle.Tensor | Callable[[FunctionalModel], paddle.Tensor],
             grad_callback: Callable[[list[paddle.Tensor | None]], Sequence[paddle.Tensor | None]] | None = None
             ) -> list[paddle.Tensor]:
        """Take one differentiable optimizer step on the fast weights from ``loss``.

        Args:
            loss: a scalar computed with ``fmodel``, or a function of a functional model that computes it, e.g.
                ``lambda fmodel: F.cross_entropy(fmodel(x), y)`` (needed with ``recompute``, where the function
                is given a functional model of the current weights only and is run again in the meta-backward).
            grad_callback: maps the list of gradients (``None`` for parameters the loss does not use) to a new
                list, with differentiable ops (e.g. ``lambda gs: [g * mask for g in gs]``); applied before Paddle's
                gradient clipping and regularization, as a hook on ``param.grad`` would be.

        Returns:
            The new fast weights (also ``fmodel.parameters()``).

        Raises:
            ValueError: if ``loss`` is not a connected scalar or reaches no fast weight, or the callback returns a
                list of the wrong length, or (with ``recompute``) the loss function or callback reads tensors that
                need gradients other than the weights it is given and the overrides.
            TypeError: with ``recompute``, if ``loss`` is a tensor rather than a function.
            FloatingPointError: if ``loss`` is not finite.
            SecondOrderError: if an op in the model has no exact higher-order gradient.
        """
        step = self.fmodel.time + 1
        if self.inner_steps is not None and step > self.inner_steps:
            raise RuntimeError(f"diffopt.step call {step} with inner_steps={self.inner_steps}; open a new "
                               "innerloop_ctx for a new inner loop, or give a larger inner_steps")
        check_grad_enabled(f"diffopt.step (step {step})")
        params = self.fmodel.parameters()
        second = self.track_higher_grads and (self.truncate is None or step > self.inner_steps - self.truncate)
        function = not isinstance(loss, paddle.Tensor) and callable(loss)
        if self.recompute is not None:
            if not function:
                raise TypeError(f"diffopt.step (step {step}): the loop was opened with recompute={self.recompute}, "
                                "which runs each step again in the meta-backward, so the loss must be a function of "
                                "a functional model: diffopt.step(lambda fmodel: F.cross_entropy(fmodel(x), y)); a "
                                f"tensor cannot be recomputed (got {type(loss).__name__})")
            if second:
                new_params, self.state, self._boundary = recomputed_loop_step(
                    self._rule, self._boundary, loss, grad_callback, params, self.state, self.hyper(),
                    self._context, self.recompute, step - 1)
                self.fmodel._append(new_params)
                return list(new_params)
        if function:
            loss = loss(self.fmodel)
        check_scalar_loss(loss, f"diffopt.step (step {step})")
        if second:
            released.check_released([self.fmodel.graph_token], f"diffopt.step (step {step})")
        new_params, self.state = self._rule.apply(loss, params, self.state, self.hyper(), second, grad_callback,
                                                  step, self.fmodel.graph_token)
        self.fmodel._append(new_params)
        return list(new_params)


@contextlib.contextmanager
def innerloop_ctx(model: nn.Layer, optimizer: paddle.optimizer.Optimizer, copy_initial_weights: bool = True,
                  override: Mapping[str, Any] | None = None,
                  track_higher_grads: bool = True, inner_steps: int | None = None,
                  truncate: int | None = None, recompute: int | None = None
                  ) -> Iterator[tuple[FunctionalModel, DifferentiableOptimizer]]:
    """A differentiable inner loop: ``with innerloop_ctx(model, opt) as (fmodel, diffopt): ...``.

    ``fmodel(x)`` runs ``model`` with the current fast weights; ``diffopt.step(loss)`` makes one update of them that
    follows ``optimizer``'s rule exactly (learning rate incl. schedulers and parameter-group scales, momentum,
    betas, epsilon, L1/L2 regularizers, AdamW's decoupled decay, gradient clipping) but out of place, so the loss
    after ``k`` steps is differentiable w.r.t. everything before. ``optimizer`` itself is never stepped.
    While the block runs (with ``track_higher_grads=True``) Paddle kernels are exact at higher order
    (`exact_ops()`), or raise `SecondOrderError`; with ``track_higher_grads=False`` the kernels whose stock
    first-order gradient is wrong (see `paddlefsl.metaopt.autodiff.first_order`) still get their exact rules.

    ``copy_initial_weights`` decides where the meta-gradient of the initial weights goes:

    * ``True`` (default): the initial fast weights are detached copies of ``model``'s parameters. A meta-loss
      does not reach ``model``: after ``meta_loss.backward()``, ``model.weight.grad`` is ``None`` and
      ``fmodel.parameters(time=0)[k].grad`` holds the gradient w.r.t. the initial weights. Use this when the
      inner loop starts from weights you do not meta-learn (hyper-parameter optimization, test-time fine-tuning).
    * ``False``: the initial fast weights ARE ``model``'s parameters, so ``meta_loss.backward()`` accumulates the
      meta-gradient into ``model``'s ``.grad`` and a meta-optimizer over ``model.parameters()`` can step. This is
      MAML. Worked example (a 1-weight model ``y = w x``, SGD with lr 0.1, one step on loss ``(w x - y)^2``)::

          model = nn.Linear(1, 1, bias_attr=False)                        # w0
          opt = paddle.optimizer.SGD(0.1, parameters=model.parameters())
          with innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
              diffopt.step(((fmodel(x) - y) ** 2).mean())                 # w1 = w0 - 0.1 * dL/dw0
              ((fmodel(x_q) - y_q) ** 2).mean().backward()                # reaches w0 through w1
          model.weight.grad        # d meta-loss / d w0 = dL_q/dw1 * (1 - 0.1 * d2L/dw0^2)

      With ``copy_initial_weights=True`` the same code leaves ``model.weight.grad`` as ``None`` and puts that value
      in ``fmodel.parameters(time=0)[0].grad``.

    Args:
        model: any ``paddle.nn.Layer``; its trainable parameters are the fast weights (frozen ones stay fixed).
        optimizer: a Paddle optimizer holding all of ``model``'s trainable parameters; its type must have a twin
            (SGD, Momentum, Adam, AdamW, RMSProp, Adagrad, Adadelta, or one added with
            `register_twin()`).
        copy_initial_weights: see above.
        override: hyper-parameters given as tensors (or numbers) instead of the optimizer's values, e.g.
            ``{"learning_rate": lr, "momentum": m}`` (``"lr"`` is an alias). A value is one tensor for all
            parameters, or a list with one per parameter group (checked first) or one per trainable parameter.
            ``learning_rate`` replaces the base rate; parameter-group scales still multiply it. Their gradients
            are read after ``backward()`` as usual. Keys: ``diffopt.twin.hyper_names``.
        track_higher_grads: ``False`` takes gradients without ``create_graph`` (first-order cost): the
            meta-gradient of the initial weights becomes the first-order one (FOMAML: the gradient at the final
            weights), and hyper-parameter gradients ignore their effect on later inner gradients.
        inner_steps: the number of ``diffopt.step`` calls this loop makes (a positive integer); more raise.
        truncate: with ``inner_steps``, only the last ``truncate`` steps take gradients with ``create_graph`` (second
            order); earlier ones are first order (their gradients are constants, as with
            ``track_higher_grads=False``), so only ``truncate`` steps' graphs are stored. An approximation of the
            full meta-gradient; ``truncate=inner_steps`` is exact. A positive integer ``<= inner_steps``.
        recompute: with ``inner_steps``, keep a boundary every ``recompute`` steps and no step's activations; the
            meta-backward replays the steps since the boundary (`paddlefsl.metaopt.recompute`). The meta-gradient
            is the stored one (weights, overrides such as a learned rate; batch-norm statistics updated once,
            dropout masks the same), and it cannot be differentiated again. ``diffopt.step`` then takes the loss as
            a function of a functional model. A positive integer ``<= inner_steps``; the optimizer's twin state
            must be dicts of tensors and numbers (all built-in twins).

    Yields:
        ``(fmodel, diffopt)``: a `FunctionalModel` and a `DifferentiableOptimizer`.

    Raises:
        TypeError: if ``model`` is not a Layer or ``optimizer`` not a Paddle optimizer.
        TypeError: if the optimizer type has no registered twin.
        ValueError: if a trainable parameter of ``model`` is not in ``optimizer``, or ``override`` names a
            hyper-parameter the optimizer does not have or has the wrong number of values, or ``inner_steps`` /
            ``truncate`` / ``recompute`` are not positive integers no larger than ``inner_steps``, or
            ``recompute`` is given with ``track_higher_grads=False``.
        TypeError: if ``inner_steps`` / ``truncate`` / ``recompute`` is not an integer, or (with ``recompute``) the
            twin's state is not dicts of tensors and numbers.

    Example:
        >>> opt = paddle.optimizer.Momentum(0.3, momentum=0.5, parameters=model.parameters())
        >>> lr = paddle.to_tensor(0.3, stop_gradient=False)
        >>> with innerloop_ctx(model, opt, override={"lr": lr}) as (fmodel, diffopt):
        ...     for _ in range(5):
        ...         diffopt.step(F.mse_loss(fmodel(x), y))
        ...     F.mse_loss(fmodel(x_val), y_val).backward()
        >>> lr.grad                                            # d validation loss / d learning rate

        Memory that does not grow with the steps (the same meta-gradient):

        >>> with innerloop_ctx(model, opt, inner_steps=20, recompute=1) as (fmodel, diffopt):
        ...     for _ in range(20):
        ...         diffopt.step(lambda f: F.mse_loss(f(x), y))
        ...     F.mse_loss(fmodel(x_val), y_val).backward()
    """
    if not isinstance(model, nn.Layer):
        raise TypeError(f"model must be a paddle.nn.Layer, got {type(model).__name__}")
    if not isinstance(optimizer, paddle.optimizer.Optimizer):
        raise TypeError(f"optimizer must be a paddle.optimizer.Optimizer, got {type(optimizer).__name__}")
    twin_for(optimizer)
    trainable = [p for p in ParameterSlots(model).tensors if not p.stop_gradient]
    if copy_initial_weights:
        initial = []
        for p in trainable:
            copy = p.detach().clone()
            copy.stop_gradient = False
            initial.append(copy)
    else:
        initial = list(trainable)
    fmodel = FunctionalModel(model, initial)
    diffopt = DifferentiableOptimizer(optimizer, fmodel, override=override, track_higher_grads=track_higher_grads,
                                      inner_steps=inner_steps, truncate=truncate, recompute=recompute)
    # Without higher gradients a first-order lease still brings the rules whose stock first-order gradient is wrong.
    lease = scope.Lease(first_order=not track_higher_grads)
    handles = scope.track_layers(model)
    try:
        yield fmodel, diffopt
    finally:
        for handle in handles:
            handle.remove()
        lease.release()
