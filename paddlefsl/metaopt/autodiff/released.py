"""A PyLayer base class that turns a backward over an already back-propagated graph into a clear error.

Paddle 3.3 releases a PyLayer node's context (and sets its pointer to null) once ``Tensor.backward()`` has run the
node, with or without ``retain_graph=True``; running the node again dereferences the null pointer and the process
dies with a segmentation fault (C++ frames in ``egr::GradNodePyLayer``). Stock kernels raise "... backward twice for
the same subgraph ..." instead. The op layer puts PyLayer nodes throughout the graph (a loss rule at the root of
every loss), so ``loss.backward()`` twice, or ``loss.backward()`` after ``learner.step(loss)``, would kill a notebook
kernel.

`GuardedPyLayer` keeps a weak reference to each node's context and registers a gradient hook on the node's outputs.
Paddle runs a node's hooks before it touches the context, so the hook sees the context gone and raises
`GraphReleasedError` (Paddle re-raises it as ``OSError: (External) GraphReleasedError: ...``) instead of letting the
node crash. ``paddle.grad`` runs copies of the nodes and leaves the context alive, so it may be called any number of
times before a ``backward()``.

One way in cannot be caught by a hook: ``paddle.grad`` over a graph that ``backward()`` has already run copies every
node before any hook runs, and copying a released PyLayer node crashes inside Paddle. Two checks run before such a
copy instead. The learners attribute the nodes that their forward passes and inner steps build to the task learner
(`owner`) and call `check_released` before their own ``paddle.grad`` (an ``adapt`` after ``step``). While the exact
scope is active, ``Tensor.backward`` is `recording_backward`, which remembers each root whose backward released a
guarded node, and ``paddle.grad`` calls `check_not_backpropagated` on its outputs first, so ``loss.backward()``
followed by ``paddle.grad(loss, ...)`` raises `GraphReleasedError`. Still uncaught (a Paddle bug): a ``paddle.grad``
of your own over a *new* output computed from tensors whose graph an earlier ``backward()`` ran, e.g.
``h.sum().backward()`` then ``paddle.grad(h.mean(), w)``.
"""
from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Any, Callable, Iterator, Sequence

import paddle
from paddle.autograd import PyLayer

__all__ = ["GraphReleasedError", "GuardedPyLayer", "RELEASED_MESSAGE", "check_not_backpropagated", "check_released",
           "owner", "recording_backward"]

RELEASED_MESSAGE = (
    "backward through a graph that was already back-propagated: Paddle frees the state of the exact op layer's "
    "PyLayer nodes after backward() runs them (even with retain_graph=True), and running them again would crash the "
    "process. Compute the loss again (run the forward pass again) before the second backward; to take several "
    "gradients of one graph, use paddle.grad(...) for all but the last, then backward() once.")


class GraphReleasedError(RuntimeError):
    """A backward reached a PyLayer node of the op layer that an earlier ``backward()`` already ran."""


_contexts: list[Any] = []
_owners: list[object] = []
_released: list[weakref.ref] = []
_release_count = [0]  # guarded contexts released so far (by backward())
_roots: dict[int, weakref.ref] = {}  # id -> root tensor whose backward() released guarded nodes


class _Guard:
    """The gradient hook of one PyLayer node: raises once the node's context is gone.

    Only the node (through its hooks) holds the guard, so the guard lives exactly as long as the node. When the
    context goes while the guard lives (a ``backward()`` ran the node), the guard is listed in ``_released``.
    ``owner`` is the token of the task learner whose forward or adapt built the node (a plain object, so no cycle
    runs through Paddle's C++ graph).
    """

    __slots__ = ("context", "owner", "__weakref__")

    def __init__(self, context: Any, owner: object) -> None:
        self.context = weakref.ref(context, _context_gone(weakref.ref(self)))
        self.owner = owner

    def __call__(self, grad: paddle.Tensor) -> None:
        if self.context() is None:
            raise GraphReleasedError(RELEASED_MESSAGE)


def _context_gone(guard: weakref.ref):
    def gone(_: weakref.ref) -> None:
        _release_count[0] += 1
        if guard() is not None:
            _released.append(guard)
            if len(_released) > 4096:
                _released[:] = [g for g in _released if g() is not None]
    return gone


@contextlib.contextmanager
def owner(token: object) -> Iterator[None]:
    """Attribute the PyLayer nodes built inside the block to ``token`` (a task learner's graph token).

    Args:
        token: any object; `check_released` looks for it.
    """
    _owners.append(token)
    try:
        yield
    finally:
        _owners.pop()


def check_released(tokens: Sequence[object], where: str) -> None:
    """Raise `GraphReleasedError` if a live node built under one of ``tokens`` was already run by ``backward()``.

    Call it before ``paddle.grad`` over a task learner's graph: Paddle copies the whole graph before running any
    hook, and copying a released PyLayer node crashes the process. It scans the released nodes that are still alive
    (usually none, or those of the last meta-batch), not the graph. (Reading ``Tensor.grad_fn`` to walk the graph is
    no option: in Paddle 3.3 every grad-node wrapper it returns keeps its node, and all that node saved, alive.)

    Args:
        tokens: the graph tokens of the task learner (its own and its parents').
        where: the call, for the message (e.g. ``"adapt step 2"``).

    Raises:
        GraphReleasedError: if such a node exists.
    """
    _released[:] = [g for g in _released if g() is not None]
    for ref in _released:
        guard = ref()
        if guard is not None and any(guard.owner is t for t in tokens):
            raise GraphReleasedError(f"{where}: this task learner's graph was back-propagated by backward() or "
                                     "step(), and Paddle cannot differentiate it again (it would crash the process); "
                                     "clone a new task learner from the meta-learner for the next task")


def recording_backward(stock: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``Tensor.backward`` so that roots whose backward released guarded nodes are remembered.

    Args:
        stock: the ``Tensor.backward`` to call.

    Returns:
        A ``Tensor.backward`` with the same signature and results.
    """
    @functools.wraps(stock)
    def backward(self: paddle.Tensor, *args: Any, **kwargs: Any) -> Any:
        before = _release_count[0]
        try:
            return stock(self, *args, **kwargs)
        finally:
            if _release_count[0] != before:
                key = id(self)
                _roots[key] = weakref.ref(self, lambda _, key=key: _roots.pop(key, None))
    return backward


def check_not_backpropagated(outputs: Any, where: str) -> None:
    """Raise `GraphReleasedError` if ``backward()`` already ran through one of ``outputs``' graphs.

    Only the roots that `recording_backward` saw are known: an output computed afresh from an already
    back-propagated graph is not caught.

    Args:
        outputs: a tensor or a sequence of tensors (the first argument of ``paddle.grad``).
        where: the call, for the message (e.g. ``"paddle.grad"``).

    Raises:
        GraphReleasedError: if ``backward()`` ran from one of ``outputs`` and released op-layer nodes.
    """
    if not _roots:
        return
    for t in outputs if isinstance(outputs, (list, tuple)) else (outputs,):
        ref = _roots.get(id(t))
        if ref is not None and ref() is t:
            raise GraphReleasedError(f"{where}: backward() already ran through this output's graph. " + RELEASED_MESSAGE)


class GuardedPyLayer(PyLayer):
    """A ``paddle.autograd.PyLayer`` whose nodes raise `GraphReleasedError` instead of crashing when run twice.

    Subclass it exactly like ``PyLayer``; ``forward`` and ``backward`` are unchanged.

    Example:
        ```python
        class Square(GuardedPyLayer):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x * x

            @staticmethod
            def backward(ctx, grad):
                (x,) = ctx.saved_tensor()
                return 2 * x * grad
        ```
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is None:
            return
        function = forward.__func__ if isinstance(forward, staticmethod) else forward

        def recording_forward(ctx, *args, **kw):
            _contexts.append(weakref.ref(ctx))
            return function(ctx, *args, **kw)

        cls.forward = staticmethod(recording_forward)

    @classmethod
    def apply(cls, *args: Any, **kwargs: Any) -> Any:
        depth = len(_contexts)
        try:
            out = super().apply(*args, **kwargs)
        finally:
            context = _contexts[depth] if len(_contexts) > depth else None
            del _contexts[depth:]
        if context is not None:
            guard = None
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, paddle.Tensor) and not t.stop_gradient:
                    if guard is None:
                        alive = context()
                        if alive is None:
                            break
                        guard = _Guard(alive, _owners[-1] if _owners else None)
                    t._register_grad_hook(guard)
        return out
