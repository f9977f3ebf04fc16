"""The exact scope: while it is active, every door into Paddle's kernels routes through the registry.

The doors are `paddle._C_ops` (what `paddle` and `paddle.nn.functional` call), `paddle._legacy_C_ops` (legacy
layers such as `nn.BatchNorm(act="relu")`, `paddle.scale(act=...)`, the legacy bias add and some convolutions) and
the Tensor operators bound in C++ (`x ** y`).

* `paddle._C_ops`: kernels registered as exact are replaced, stock-verified kernels are left alone, and every other
  kernel is guarded: its outputs carry an identity tripwire whose backward raises `SecondOrderError` when it is
  itself being differentiated (when Paddle runs it with ``create_graph=True``). In-place kernels on non-leaf tensors
  of the differentiated graph raise at once (writes into leaves, such as initializers and optimizer updates, pass).
* `paddle._legacy_C_ops`: activations and the bias add are routed to their `paddle._C_ops` kernels (so they are
  exact); every other legacy kernel is guarded as above.
* Tensor operators: ``x ** y`` with a tensor exponent is routed to `paddle._C_ops.elementwise_pow`; the other
  operators record the same grad nodes as their `paddle._C_ops` kernels.

Guards only close the doors we know of. What makes a wrong meta-gradient impossible is the graph audit
(`paddlefsl.metaopt.autodiff.audit`): `grad` below, and `paddle.grad` while the scope is active, check every grad
node that a ``create_graph=True`` gradient will differentiate, whatever door its kernel came through.

The scope is reference counted. Learners hold a `Lease` for each task learner; when the last lease is released
every patched attribute is the stock function again. A first-order learner's lease (``Lease(first_order=True)``)
asks for less: while no other lease is held, the kernels whose stock first-order gradient is right
(`paddlefsl.metaopt.autodiff.first_order.STOCK_AT_FIRST_ORDER`) and every unregistered kernel run stock, with no
guard; the other exact rules stay installed and `paddle.grad` stays audited.
"""
from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable, Iterator

import paddle
import paddle.autograd
from paddle import _C_ops, _legacy_C_ops

from paddlefsl.metaopt.errors import SecondOrderError
from paddlefsl.metaopt.kernels.allocator import apply_memory_reuse
from paddlefsl.metaopt.autodiff import audit, common, first_order, registry, released
from paddlefsl.metaopt.autodiff.released import GuardedPyLayer

OUTSIDE = "<outside the model>"
UNTRACED = "<unknown (a door paddlefsl does not guard)>"

_lock = threading.RLock()
_count = 0
_full = 0  # leases that need every rule and guard (all but first-order learners')
_level = 0  # what is installed: 0 stock, 1 the first-order table, 2 every rule and guard
_patches: dict[str, Callable] | None = None
_first_order_patches: dict[str, Callable] | None = None
_legacy_patches: dict[str, Callable] | None = None
_STOCK_GRAD = paddle.grad
_saved_grads: dict[str, Callable] = {}  # what paddle.grad / paddle.autograd.grad were when the scope was installed
_STOCK_POW = (paddle.Tensor.__pow__, paddle.Tensor.__rpow__)
_STOCK_BACKWARD = paddle.Tensor.backward
_RECORDING_BACKWARD = released.recording_backward(_STOCK_BACKWARD)
_LEGACY = {name: getattr(_legacy_C_ops, name) for name in dir(_legacy_C_ops)
           if not name.startswith("_") and callable(getattr(_legacy_C_ops, name))}
_layer_stack: list[str] = []
_pending: list[SecondOrderError] = []


def current_layer() -> str:
    """Return the path of the innermost tracked layer now running forward, or ``"<outside the model>"``."""
    return _layer_stack[-1] if _layer_stack else OUTSIDE


def take_error() -> SecondOrderError | None:
    """Return and forget the last `SecondOrderError` raised inside Paddle's backward, if any."""
    with _lock:
        err = _pending[-1] if _pending else None
        _pending.clear()
    return err


def _raise(err: SecondOrderError) -> None:
    with _lock:
        _pending.append(err)
    raise err


class _Tripwire(GuardedPyLayer):
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


def _guard(name: str, fn: Callable, door: str = "") -> Callable:
    inplace = name.endswith("_")
    label = f"{name} ({door})" if door else name

    def guarded(*args, **kwargs):
        if not paddle.is_grad_enabled():
            return fn(*args, **kwargs)
        if inplace:
            if _in_graph(args) or _in_graph(kwargs):
                _raise(SecondOrderError(label, current_layer(), "is an in-place op on a tensor inside the "
                                        "differentiated graph"))
            return fn(*args, **kwargs)
        return _trip(fn(*args, **kwargs), label, current_layer())

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


# Legacy kernels with a `paddle._C_ops` twin of one tensor argument (the activations that legacy layers append).
_LEGACY_UNARY = ("relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "abs", "square", "silu", "sin", "cos",
                 "reciprocal", "floor", "relu6")
_LEGACY_FREE_ATTRS = ("use_cudnn", "use_mkldnn")
_LEGACY_BINARY = {"elementwise_add": "add", "elementwise_sub": "subtract", "elementwise_mul": "multiply",
                  "elementwise_div": "divide"}


def _attrs(name: str, attrs: tuple) -> dict[str, Any]:
    if len(attrs) % 2:
        raise TypeError(f"paddle._legacy_C_ops.{name}: attributes must come in name/value pairs, got {attrs!r}")
    return dict(zip(attrs[::2], attrs[1::2]))


def _legacy_unary(name: str) -> Callable:
    guarded = _guard(name, _LEGACY[name], "paddle._legacy_C_ops")  # the stock kernel when recording is off

    def routed(x, *attrs):
        if paddle.is_grad_enabled() and not set(_attrs(name, attrs)) - set(_LEGACY_FREE_ATTRS):
            return getattr(_C_ops, name)(x)
        return guarded(x, *attrs)

    routed.__name__ = name
    return routed


def _legacy_binary(name: str) -> Callable:
    kernel = _LEGACY_BINARY[name]
    guarded = _guard(name, _LEGACY[name], "paddle._legacy_C_ops")  # the stock kernel when recording is off

    def routed(x, y, *attrs):
        settings = _attrs(name, attrs)
        if not paddle.is_grad_enabled() or set(settings) - {"axis", *_LEGACY_FREE_ATTRS}:
            return guarded(x, y, *attrs)
        axis = settings.get("axis", -1)
        if axis != -1 and len(y.shape) < len(x.shape):
            axis %= len(x.shape)
            shape = list(y.shape) + [1] * (len(x.shape) - axis - len(y.shape))
            y = paddle.reshape(y, shape)
        return getattr(_C_ops, kernel)(x, y)

    routed.__name__ = name
    return routed


def _build_legacy_patches() -> dict[str, Callable]:
    patches: dict[str, Callable] = {}
    for name, fn in _LEGACY.items():
        if name in _LEGACY_UNARY and hasattr(_C_ops, name):
            patches[name] = _legacy_unary(name)
        elif name in _LEGACY_BINARY:
            patches[name] = _legacy_binary(name)
        elif not (name.endswith("_grad") or name.endswith("_grad_") or name.startswith("get_core_ops")):
            patches[name] = _guard(name, fn, "paddle._legacy_C_ops")
    return patches


def _pow(x, y):
    if isinstance(y, paddle.Tensor):
        return paddle.pow(x, y) if y.dtype == x.dtype else _STOCK_POW[0](x, y)
    return _STOCK_POW[0](x, y)


def _rpow(x, y):
    if isinstance(y, (int, float)) and not isinstance(y, bool) and x.is_floating_point():
        return paddle.pow(paddle.full([], y, x.dtype), x)
    return _STOCK_POW[1](x, y)


def audited_grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, only_inputs=True,
                 allow_unused=False, no_grad_vars=None, *args, **kwargs):
    """`paddle.grad` as installed while the exact scope is active: with ``create_graph=True`` the graph is audited
    first (`paddlefsl.metaopt.autodiff.audit.audit`), so a gradient that could not be differentiated exactly raises
    `SecondOrderError` instead of returning a wrong higher-order gradient. Same signature and results as
    `paddle.grad`."""
    released.check_not_backpropagated(outputs, "paddle.grad")
    if create_graph:
        inputs_ = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        frame = sys._getframe(1)
        caller = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        audit.audit_once(outputs, inputs_, audit.signature(outputs, inputs_, caller), UNTRACED)
    with common.one_backward_pass():
        return _saved_grads.get("paddle", _STOCK_GRAD)(outputs, inputs, grad_outputs, retain_graph, create_graph,
                                                       only_inputs, allow_unused, no_grad_vars, *args, **kwargs)


def _install(level: int) -> None:
    global _patches, _legacy_patches, _first_order_patches
    if _patches is None:
        _patches = _build_patches()
        _legacy_patches = _build_legacy_patches()
        _first_order_patches = first_order.patches()
    table = _patches if level == 2 else _first_order_patches
    for name in _patches:
        setattr(_C_ops, name, table.get(name) or registry.original(name))
    for name, fn in _legacy_patches.items():
        setattr(_legacy_C_ops, name, fn if level == 2 else _LEGACY[name])
    if _level == 0:
        apply_memory_reuse()
        _saved_grads.update(paddle=paddle.grad, autograd=paddle.autograd.grad)  # stock, or a user's wrapper
        paddle.grad = paddle.autograd.grad = audited_grad
        paddle.Tensor.__pow__, paddle.Tensor.__rpow__ = _pow, _rpow
        paddle.Tensor.backward = _RECORDING_BACKWARD


def _uninstall() -> None:
    for name in _patches or ():
        setattr(_C_ops, name, registry.original(name))
    for name in _legacy_patches or ():
        setattr(_legacy_C_ops, name, _LEGACY[name])
    paddle.grad = _saved_grads.pop("paddle", _STOCK_GRAD)
    paddle.autograd.grad = _saved_grads.pop("autograd", _STOCK_GRAD)
    paddle.Tensor.__pow__, paddle.Tensor.__rpow__ = _STOCK_POW
    paddle.Tensor.backward = _STOCK_BACKWARD


def _settle() -> None:
    """Install what the held leases need (called under ``_lock`` after a lease is taken or released)."""
    global _level
    level = 2 if _full else 1 if _count else 0
    if level != _level:
        if level:
            _install(level)
        else:
            _uninstall()
        _level = level


def is_active() -> bool:
    """Return True while at least one lease on the exact scope is held."""
    return _count > 0


class Lease:
    """A hold on the exact scope. Releasing the last lease makes Paddle stock again.

    A lease is released by `release` or when it is garbage-collected, whichever comes first.

    Args:
        first_order: the holder differentiates its graphs only once (a first-order learner's task learner): while
            every held lease is first order, only the exact rules that first-order gradients need are installed
            (see `paddlefsl.metaopt.autodiff.first_order`).
    """

    def __init__(self, first_order: bool = False) -> None:
        global _count, _full
        self.first_order = bool(first_order)
        with _lock:
            _count += 1
            _full += not self.first_order
            _settle()
        self._held = True

    def release(self) -> None:
        """Give the hold back (idempotent)."""
        global _count, _full
        with _lock:
            if not getattr(self, "_held", False):
                return
            self._held = False
            _count -= 1
            _full -= not self.first_order
            _settle()

    def __del__(self) -> None:
        if _lock is None:  # interpreter shutdown has already cleared this module: nothing is left to restore
            return
        self.release()


@contextlib.contextmanager
def exact_ops() -> Iterator[None]:
    """Activate the exact scope for the body of a ``with`` block.

    Example:
        ```python
        w = paddle.to_tensor([0.5, 1.0], stop_gradient=False)
        with exact_ops():
            g, = paddle.grad(paddle.nn.functional.softmax(w).max(), w, create_graph=True)
            h, = paddle.grad((g * g).sum(), w)  # exact second derivative (stock Paddle raises for softmax)
        ```
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


def grad(output: paddle.Tensor, inputs: list[paddle.Tensor], create_graph: bool,
         model: paddle.nn.Layer | None = None, step: int = 0) -> list[paddle.Tensor | None]:
    """``paddle.grad(output, inputs, allow_unused=True)``, audited first when ``create_graph`` is set, that re-raises
    a `SecondOrderError` met inside Paddle's backward as itself (Paddle wraps exceptions raised in a backward).

    Args:
        output: the scalar to differentiate.
        inputs: the tensors to differentiate with respect to.
        create_graph: record the gradient's graph (and audit the graph first, once per model structure, step and
            shapes: see `paddlefsl.metaopt.autodiff.audit.audit_once`).
        model: the model whose forward built ``output``; its layer types key the audit.
        step: the inner step, also part of the audit's key.

    Raises:
        SecondOrderError: if a node of the graph cannot be differentiated again exactly (the audit), or a guarded
            op was differentiated with ``create_graph=True``.
    """
    take_error()
    if create_graph:
        frame = sys._getframe(1)
        caller = (f"{frame.f_code.co_filename}:{frame.f_lineno}", step,
                  tuple(type(layer).__qualname__ for layer in model.sublayers(include_self=True)) if model else ())
        audit.audit_once(output, inputs, audit.signature(output, inputs, caller), UNTRACED)
    try:
        stock_grad = _saved_grads.get("paddle", _STOCK_GRAD)  # a user's wrapper of paddle.grad is kept, not audited
        with common.one_backward_pass():
            return list(stock_grad(output, inputs, create_graph=create_graph, allow_unused=True))
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
