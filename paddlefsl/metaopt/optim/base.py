"""The functional optimizer protocol (``init`` / ``update``), Paddle settings readers and the twin registry.

A *twin* is a differentiable, out-of-place re-implementation of one ``paddle.optimizer`` class. It never changes a
tensor in place: ``update`` returns new parameters and a new state built with differentiable Paddle ops, so the
whole inner loop stays in the autograd graph. Settings (betas, epsilon, regularizers, per-parameter learning-rate
scales, ...) are read from a Paddle optimizer exactly as Paddle's own ``step()`` reads them.

Per-parameter settings are plain dicts ("hyper" dicts). Every twin understands these keys:

* ``learning_rate``: the base learning rate (Paddle's ``get_lr()``), a float or a tensor.
* ``lr_scale``: the parameter's learning-rate multiplier (a parameter group's ``learning_rate`` or
  ``ParamAttr(learning_rate=...)``), a float.
* ``weight_decay`` and ``decay_kind``: the regularizer coefficient and kind (``"l2"``, ``"l1"`` or ``None``); for
  AdamW, the decoupled decay coefficient.
* ``grad_clip``: the ``paddle.nn.ClipGrad*`` object of the parameter's group, or ``None``.

plus the optimizer's own keys (``momentum``, ``beta1``, ...), listed in `OptimizerTwin.group_keys`.
"""
from __future__ import annotations

import abc
from typing import Any, ClassVar, Sequence

import numpy as np
import paddle
from paddlefsl.metaopt.autodiff.audit import exact_pylayer
from paddlefsl.metaopt.autodiff.released import GuardedPyLayer

__all__ = ["OptimizerTwin", "register_twin", "twin_for", "registered_twins", "safe_sqrt", "clip_gradients",
           "regularize", "as_dtype_of", "as_float32", "param_groups"]

Hyper = dict[str, Any]
State = list[dict[str, Any]]


# ------------------------------------------------------------------------------------------------ numerics
@exact_pylayer
class _SafeSqrt(GuardedPyLayer):
    """``sqrt(x)`` whose derivative at ``x == 0`` is 0 instead of infinity (so ``0 * inf`` never makes NaN)."""

    @staticmethod
    def forward(ctx, x):
        y = paddle.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensor()
        positive = y > 0
        safe = paddle.where(positive, y, paddle.ones_like(y))
        return paddle.where(positive, grad * 0.5 / safe, paddle.zeros_like(grad))


def safe_sqrt(x: paddle.Tensor) -> paddle.Tensor:
    """Square root with Paddle's forward values and a finite derivative (0) at exactly 0.

    The backward is written in differentiable Paddle ops, so it is exact at every order away from 0.

    Args:
        x: a non-negative floating tensor.

    Returns:
        ``sqrt(x)``.
    """
    return _SafeSqrt.apply(x)


def as_dtype_of(value: Any, like: paddle.Tensor) -> Any:
    """Return ``value`` cast (differentiably) to ``like``'s dtype if it is a tensor of another dtype."""
    if isinstance(value, paddle.Tensor) and value.dtype != like.dtype:
        return value.astype(like.dtype)
    return value


def regularize(grad: paddle.Tensor, param: paddle.Tensor, hyper: Hyper) -> paddle.Tensor:
    """Add the regularizer's gradient as Paddle does before the kernel: ``g + c * p`` (L2) or ``g + c * sign(p)``."""
    kind = hyper.get("decay_kind")
    if kind is None:
        return grad
    coeff = as_dtype_of(hyper["weight_decay"], param)
    if kind == "l2":
        return grad + param * coeff
    if kind == "l1":
        return grad + paddle.sign(param) * coeff
    raise ValueError(f"unknown decay_kind {kind!r}")


def _clip_by_norm(grad: paddle.Tensor, clip_norm: float) -> paddle.Tensor:
    norm = safe_sqrt((grad * grad).sum())
    bound = paddle.full([], clip_norm, dtype=grad.dtype)
    return grad * (bound / paddle.maximum(norm, bound))


def clip_gradients(grads: Sequence[paddle.Tensor | None], originals: Sequence[paddle.Tensor],
                   clip: Any) -> list[paddle.Tensor | None]:
    """Apply a Paddle gradient-clipping object differentiably, as its ``_dygraph_clip`` does.

    Args:
        grads: the gradients of one parameter group (``None`` for unused parameters).
        originals: the Paddle parameters they belong to (their ``need_clip`` attribute is honoured).
        clip: ``None``, ``paddle.nn.ClipGradByValue``, ``ClipGradByNorm`` or ``ClipGradByGlobalNorm``.

    Returns:
        The clipped gradients.

    Raises:
        TypeError: for another clipping class.
    """
    if clip is None:
        return list(grads)
    eligible = [g is not None and getattr(p, "need_clip", True) is not False for g, p in zip(grads, originals)]
    if isinstance(clip, paddle.nn.ClipGradByValue):
        return [paddle.clip(g, min=clip.min, max=clip.max) if ok else g for g, ok in zip(grads, eligible)]
    if isinstance(clip, paddle.nn.ClipGradByNorm):
        return [_clip_by_norm(g, clip.clip_norm) if ok else g for g, ok in zip(grads, eligible)]
    if isinstance(clip, paddle.nn.ClipGradByGlobalNorm):
        chosen = [g for g, ok in zip(grads, eligible) if ok]
        if not chosen:
            return list(grads)
        wide = paddle.float64 if any(g.dtype == paddle.float64 for g in chosen) else paddle.float32
        total = paddle.stack([(g * g).sum().astype(wide) for g in chosen]).sum()
        norm = safe_sqrt(total)
        bound = paddle.full([], clip.clip_norm, dtype=wide)
        if clip.auto_skip_clip and not bool(norm > bound):
            return list(grads)
        scale = bound / paddle.maximum(norm, bound)
        return [g * scale.astype(g.dtype) if ok else g for g, ok in zip(grads, eligible)]
    raise TypeError(f"gradient clipping {type(clip).__name__} has no differentiable twin; supported: "
                    "ClipGradByValue, ClipGradByNorm, ClipGradByGlobalNorm")


# ------------------------------------------------------------------------------------------------ settings
def _scalar(value: Any) -> Any:
    """A Paddle hyper-parameter given as a tensor is read as a Python float (as Paddle's dygraph step does)."""
    if isinstance(value, paddle.Tensor):
        return float(value.reshape([-1])[0].item())
    return value


def as_float32(value: Any) -> Any:
    """Round a Python number to float32, as a Paddle kernel does with a ``float`` attribute (tensors unchanged)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return float(np.float32(value))


def param_groups(optimizer: paddle.optimizer.Optimizer) -> list[tuple[dict | None, list[paddle.Tensor]]]:
    """Return the optimizer's parameter groups as ``(group dict or None, parameters)`` pairs."""
    groups = optimizer._param_groups or []
    if groups and isinstance(groups[0], dict):
        return [(group, list(group["params"])) for group in groups]
    return [(None, list(groups))]


def _regularizer_of(optimizer: paddle.optimizer.Optimizer, param: paddle.Tensor) -> tuple[str | None, float]:
    """Which regularizer Paddle's ``_create_regularization_of_grad`` applies to ``param``."""
    reg = getattr(param, "regularizer", None)
    if reg is None:
        reg = optimizer.regularization
    if reg is None:
        return None, 0.0
    if isinstance(reg, (int, float)):
        return "l2", float(reg)
    if isinstance(reg, paddle.regularizer.L2Decay):
        return "l2", float(reg._coeff)
    if isinstance(reg, paddle.regularizer.L1Decay):
        return "l1", float(reg._coeff)
    raise TypeError(f"regularizer {type(reg).__name__} of parameter {param.name} has no differentiable twin; "
                    "supported: L1Decay, L2Decay, a float")


# ------------------------------------------------------------------------------------------------ protocol
class OptimizerTwin(abc.ABC):
    """The differentiable twin of one Paddle optimizer class: functional ``init`` / ``update``.

    Subclasses set `paddle_type`, `group_keys` (settings read from a parameter group or the optimizer's
    defaults, as Paddle's ``_update_param_group`` does) and `hyper_names` (the settings a user may override
    with tensors), and implement `init_one()` and `update_one()` for one parameter.

    Example:
        >>> twin = twin_for(paddle.optimizer.Adam(0.1, parameters=model.parameters()))
        >>> state = twin.init(params, hyper)
        >>> params, state = twin.update(grads, state, params, hyper)
    """

    paddle_type: ClassVar[type] = paddle.optimizer.Optimizer
    group_keys: ClassVar[tuple[str, ...]] = ()
    hyper_names: ClassVar[tuple[str, ...]] = ("learning_rate", "weight_decay")
    #: settings Paddle's kernel receives as 32-bit ``float`` attributes (rounded to float32 even for float64 models)
    float32_keys: ClassVar[tuple[str, ...]] = ()

    # -------------------------------------------------------------- reading Paddle's settings
    def settings(self, optimizer: paddle.optimizer.Optimizer, group: dict | None,
                 param: paddle.Tensor) -> Hyper:
        """Read the settings Paddle's ``step()`` would use for ``param`` (without the base learning rate).

        Args:
            optimizer: the Paddle optimizer.
            group: the parameter group dict holding ``param``, or ``None`` when the optimizer has no groups.
            param: one of the optimizer's parameters.

        Returns:
            A hyper dict (see the module docstring); ``learning_rate`` is filled in per step.
        """
        hyper: Hyper = {}
        for key in self.group_keys:
            default = optimizer._default_dict[key]
            hyper[key] = _scalar(group.get(key, default) if group is not None else default)
        attr = getattr(param, "optimize_attr", None) or {}
        hyper["lr_scale"] = float(attr.get("learning_rate", 1.0))
        hyper["decay_kind"], hyper["weight_decay"] = _regularizer_of(optimizer, param)
        clip = optimizer._grad_clip
        if group is not None:
            clip = group.get("grad_clip", clip)
        hyper["grad_clip"] = clip
        return self._round(hyper)

    def _round(self, hyper: Hyper) -> Hyper:
        for key in self.float32_keys:
            if key in hyper:
                hyper[key] = as_float32(hyper[key])
        return hyper

    def override_weight_decay(self, hyper: Hyper) -> None:
        """Called when ``weight_decay`` is overridden: a parameter without a regularizer gets L2 (Paddle's float)."""
        if hyper.get("decay_kind") is None:
            hyper["decay_kind"] = "l2"

    # -------------------------------------------------------------- functional protocol
    def init(self, params: Sequence[paddle.Tensor], hyper: Sequence[Hyper]) -> State:
        """Return the initial optimizer state, one dict per parameter."""
        return [self.init_one(p, h) for p, h in zip(params, hyper)]

    def update(self, grads: Sequence[paddle.Tensor | None], state: State, params: Sequence[paddle.Tensor],
               hyper: Sequence[Hyper]) -> tuple[list[paddle.Tensor], State]:
        """One optimizer step, out of place.

        Parameters whose gradient is ``None`` keep their value and state (Paddle skips them too).

        Args:
            grads: one gradient per parameter (already clipped, not yet regularized), or ``None``.
            state: the state from `init()` or the previous `update()`.
            params: the current parameters.
            hyper: one hyper dict per parameter, with ``learning_rate`` set.

        Returns:
            ``(new_params, new_state)``.
        """
        new_params, new_state = [], []
        for g, s, p, h in zip(grads, state, params, hyper):
            if g is None:
                new_params.append(p)
                new_state.append(s)
                continue
            q, t = self.update_one(g, s, p, h)
            new_params.append(q)
            new_state.append(t)
        return new_params, new_state

    @staticmethod
    def lr(param: paddle.Tensor, hyper: Hyper) -> Any:
        """The learning rate Paddle's ``_create_param_lr`` gives ``param``: base rate times the parameter's scale."""
        rate = as_dtype_of(hyper["learning_rate"], param)
        scale = hyper.get("lr_scale", 1.0)
        return rate if scale == 1.0 else rate * scale

    @abc.abstractmethod
    def init_one(self, param: paddle.Tensor, hyper: Hyper) -> dict[str, Any]:
        """Return the initial state of one parameter."""

    @abc.abstractmethod
    def update_one(self, grad: paddle.Tensor, state: dict[str, Any], param: paddle.Tensor,
                   hyper: Hyper) -> tuple[paddle.Tensor, dict[str, Any]]:
        """Return ``(new_param, new_state)`` for one parameter (``grad`` not yet regularized)."""


# ------------------------------------------------------------------------------------------------ registry
_TWINS: dict[type, OptimizerTwin] = {}


def register_twin(paddle_type: type, twin: OptimizerTwin | type[OptimizerTwin]) -> None:
    """Register the differentiable twin used for instances of ``paddle_type`` (replacing any previous one).

    Args:
        paddle_type: a ``paddle.optimizer.Optimizer`` subclass, e.g. your own optimizer class.
        twin: an `OptimizerTwin` instance or subclass.

    Raises:
        TypeError: if the arguments have the wrong types.

    Example:
        >>> class MySGDTwin(OptimizerTwin): ...
        >>> register_twin(MySGD, MySGDTwin)
    """
    if not (isinstance(paddle_type, type) and issubclass(paddle_type, paddle.optimizer.Optimizer)):
        raise TypeError(f"paddle_type must be a paddle.optimizer.Optimizer subclass, got {paddle_type!r}")
    if isinstance(twin, type) and issubclass(twin, OptimizerTwin):
        twin = twin()
    if not isinstance(twin, OptimizerTwin):
        raise TypeError(f"twin must be an OptimizerTwin instance or subclass, got {twin!r}")
    _TWINS[paddle_type] = twin


def registered_twins() -> dict[type, OptimizerTwin]:
    """Return a copy of the registry: Paddle optimizer class to twin."""
    return dict(_TWINS)


def twin_for(optimizer: paddle.optimizer.Optimizer) -> OptimizerTwin:
    """Return the twin registered for exactly ``type(optimizer)``.

    Subclasses of a supported optimizer are not matched (their update may differ): register them explicitly.

    Raises:
        TypeError: if ``optimizer`` is not a Paddle optimizer.
        TypeError: if no twin is registered for its class.
    """
    if not isinstance(optimizer, paddle.optimizer.Optimizer):
        raise TypeError(f"optimizer must be a paddle.optimizer.Optimizer, got {type(optimizer).__name__}")
    twin = _TWINS.get(type(optimizer))
    if twin is not None:
        return twin
    names = sorted(cls.__name__ for cls in _TWINS)
    raise TypeError(f"no differentiable twin for {type(optimizer).__name__}; supported: {names}. "
                    "Register one with paddlefsl.metaopt.optim.register_twin")
