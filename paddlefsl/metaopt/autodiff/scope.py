"""The exact scope: while it is active, ``paddle._C_ops`` routes every kernel through the registry.

Kernels registered as exact are replaced, stock-verified kernels are left alone, and every other kernel is
guarded: their outputs carry an identity tripwire whose backward raises
:class:`~paddlefsl.metaopt.errors.SecondOrderError` when it is itself being differentiated (that is, when Paddle
runs it with ``create_graph=True``). In-place kernels on non-leaf tensors of the differentiated graph raise at once (writes into leaves,
such as initializers and optimizer updates, pass).

The scope is reference counted. Learners hold a :class:`Lease` for each second-order task learner; when the last
lease is released every ``paddle._C_ops`` attribute is the stock function again.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import paddle
from paddle import _C_ops
from paddle.autograd import PyLayer

from paddlefsl.metaopt.errors import SecondOrderError
from paddlefsl.metaopt.autodiff import registry

OUTSIDE = "<outside the model>"

_lock = threading.RLock()
_count = 0
_patches: dict[str, Callable] | None = None
_layer_stack: list[str] = []
_pending: list[SecondOrderError] = []


def current_layer() -> str:
    """Return the path of the innermost tracked layer now running forward, or ``"<outside the model>"``."""
    return _layer_stack[-1] if _layer_stack else OUTSIDE


def take_error() -> SecondOrderError | None:
    """Return and forget the last :class:`SecondOrderError` raised inside Paddle's backward, if any."""
    with _lock:
        err = _pending[-1] if _pending else None
        _pending.clear()
    return err


def _raise(err: SecondOrderError) -> None:
    with _lock:
        _pending.append(err)
    raise err


class _Tripwire(PyLayer):
    @staticmethod
    def forward(ctx, x, op, layer):
        ctx.op = op
        ctx.layer = layer
        return x

    @staticmethod
    def backward(ctx, grad):
        if paddle.is_grad_enabled():
            _raise(SecondOrderError(ctx.op, ctx.layer))
        return grad


def _in_graph(value: Any) -> bool:
    """True for a tensor (or list of tensors) computed by differentiable ops, i.e. not a leaf."""
    if isinstance(value, paddle.Tensor):
        return not value.stop_gradient and not value.is_leaf
    if isinstance(value, (list, tuple)):
        return any(_in_graph(v) for v in value)
    return False


def _trip(value: Any, op: str, layer: str) -> Any:
    if isinstance(value, paddle.Tensor):
        if value.stop_gradient or not value._is_initialized() or not value.is_floating_point():
            return value
        return _Tripwire.apply(value, op, layer)
    if isinstance(value, (list, tuple)):
        return type(value)(_trip(v, op, layer) for v in value)
    return value


def _guard(name: str, fn: Callable) -> Callable:
    inplace = name.endswith("_")

    def guarded(*args, **kwargs):
        if not paddle.is_grad_enabled():
            return fn(*args, **kwargs)
        if inplace:
            if _in_graph(args) or _in_graph(kwargs):
                _raise(SecondOrderError(name, current_layer(), "is an in-place op on a tensor inside the "
                                        "differentiated graph"))
            return fn(*args, **kwargs)
        return _trip(fn(*args, **kwargs), name, current_layer())

    guarded.__name__ = name
    guarded.__qualname__ = f"guarded.{name}"
    return guarded


def _build_patches() -> dict[str, Callable]:
    rules = registry.rules()
    patches: dict[str, Callable] = {}
    for name in registry.kernel_names():
        rule = rules.get(name)
        if rule is None:
            if not (name.endswith("_grad") or name.endswith("_grad_")):
                patches[name] = _guard(name, registry.original(name))
        elif rule.status == registry.EXACT:
            patches[name] = rule.replacement
    return patches


def _install() -> None:
    global _patches
    if _patches is None:
        _patches = _build_patches()
    for name, fn in _patches.items():
        setattr(_C_ops, name, fn)


def _uninstall() -> None:
    for name in _patches or ():
        setattr(_C_ops, name, registry.original(name))


def is_active() -> bool:
    """Return True while at least one lease on the exact scope is held."""
    return _count > 0


class Lease:
    """A hold on the exact scope. Releasing the last lease makes Paddle stock again.

    A lease is released by :meth:`release` or when it is garbage-collected, whichever comes first.
    """

    def __init__(self) -> None:
        global _count
        with _lock:
            if _count == 0:
                _install()
            _count += 1
        self._held = True

    def release(self) -> None:
        """Give the hold back (idempotent)."""
        global _count
        with _lock:
            if not self._held:
                return
            self._held = False
            _count -= 1
            if _count == 0:
                _uninstall()

    def __del__(self) -> None:
        self.release()


@contextlib.contextmanager
def exact_ops() -> Iterator[None]:
    """Activate the exact scope for the body of a ``with`` block.

    Example:
        >>> with exact_ops():                       # doctest: +SKIP
        ...     g, = paddle.grad(loss, w, create_graph=True)
    """
    lease = Lease()
    try:
        yield
    finally:
        lease.release()


def track_layers(model: paddle.nn.Layer) -> list[Any]:
    """Record the path of each sublayer of ``model`` while it runs, so errors can name the layer.

    Args:
        model: the layer to track; hooks are added to it and to all of its sublayers.

    Returns:
        The hook handles; call ``handle.remove()`` on each to stop tracking.
    """
    handles = []
    for path, layer in model.named_sublayers(include_self=True):
        label = f"'{path or '<root>'}' ({type(layer).__name__})"
        handles.append(layer.register_forward_pre_hook(_push(label)))
        handles.append(layer.register_forward_post_hook(_pop))
    return handles


def grad(output: paddle.Tensor, inputs: list[paddle.Tensor], create_graph: bool) -> list[paddle.Tensor | None]:
    """``paddle.grad(output, inputs, allow_unused=True)`` that re-raises a :class:`SecondOrderError` met inside
    Paddle's backward as itself (Paddle wraps exceptions raised in a backward).

    Raises:
        SecondOrderError: if a guarded op was differentiated with ``create_graph=True``.
    """
    take_error()
    try:
        return list(paddle.grad(output, inputs, create_graph=create_graph, allow_unused=True))
    except SecondOrderError:
        raise
    except Exception:
        error = take_error()
        if error is not None:
            raise error from None
        raise


def _push(label: str) -> Callable:
    def hook(layer, inputs):
        _layer_stack.append(label)

    return hook


def _pop(layer, inputs, outputs):
    if _layer_stack:
        _layer_stack.pop()
