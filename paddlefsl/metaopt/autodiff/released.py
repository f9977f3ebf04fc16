"""A PyLayer base class that turns a backward over an already back-propagated graph into a clear error.

Paddle 3.x frees a PyLayer node's context after ``Tensor.backward()`` runs the node, with or without
``retain_graph=True``, and a second run dereferences the freed context: the process dies with a segmentation fault
(C++ frames in ``egr::GradNodePyLayer``). Stock kernels raise "... backward twice for the same subgraph ..." instead.
The op layer puts PyLayer nodes throughout the graph (a loss rule at the root of every loss), so calling
``loss.backward()`` twice, or ``loss.backward()`` after ``learner.step(loss)``, would kill a notebook kernel.

[GuardedPyLayer][paddlefsl.metaopt.autodiff.released.GuardedPyLayer] keeps a weak reference to each node's context
and registers a gradient hook on the node's outputs. Paddle runs a node's hooks before it touches the context, so the
hook sees the context gone and raises [GraphReleasedError][paddlefsl.metaopt.autodiff.released.GraphReleasedError]
(Paddle re-raises it as ``OSError: (External) ...`` with this message) instead of letting the node crash.
``paddle.grad`` runs copies of the nodes, so it leaves the context alive and may be called any number of times
before a ``backward()``.

One way in cannot be caught by a hook: ``paddle.grad`` over a graph that ``backward()`` has already run copies every
node before any hook runs, and copying a released PyLayer node crashes inside Paddle. The learners call
[check_graph][paddlefsl.metaopt.autodiff.released.check_graph] before their own ``paddle.grad`` (an ``adapt`` after
``step``); a ``paddle.grad`` of your own after a ``backward()`` of the same graph still crashes (a Paddle bug).
"""
from __future__ import annotations

import weakref
from typing import Any

import paddle
from paddle.autograd import PyLayer

__all__ = ["GraphReleasedError", "GuardedPyLayer", "RELEASED_MESSAGE", "check_graph", "is_released", "mark"]

RELEASED_MESSAGE = (
    "backward through a graph that was already back-propagated: Paddle frees the state of the exact op layer's "
    "PyLayer nodes after backward() runs them (even with retain_graph=True), and running them again would crash the "
    "process. Compute the loss again (run the forward pass again) before the second backward; to take several "
    "gradients of one graph, use paddle.grad(...) for all but the last, then backward() once.")


class GraphReleasedError(RuntimeError):
    """A backward reached a PyLayer node of the op layer that an earlier ``backward()`` already ran."""


_contexts: list[Any] = []
_guards: "weakref.WeakValueDictionary[int, _Guard]" = weakref.WeakValueDictionary()
_releases = 0
_released: list[tuple[int, weakref.ref]] = []


class _Guard:
    """The gradient hook of one PyLayer node: raises once the node's context is gone.

    Only the node (through its hooks) holds the guard, so the guard lives exactly as long as the node, and the
    ``_guards`` entry of a dead node disappears with it (no stale node addresses). When the context goes while the
    guard lives (a ``backward()`` ran the node), the guard is numbered in ``_released``.
    """

    __slots__ = ("context", "__weakref__")

    def __init__(self, context: Any) -> None:
        self.context = weakref.ref(context, _context_gone(weakref.ref(self)))

    def released(self) -> bool:
        return self.context() is None

    def __call__(self, grad: paddle.Tensor) -> None:
        if self.context() is None:
            raise GraphReleasedError(RELEASED_MESSAGE)


def _context_gone(guard: weakref.ref):
    def gone(_: weakref.ref) -> None:
        global _releases
        if guard() is not None:
            _releases += 1
            _released.append((_releases, guard))
            if len(_released) > 4096:
                _released[:] = [entry for entry in _released if entry[1]() is not None]
    return gone


def mark() -> int:
    """A number to pass as ``since`` to [check_graph][paddlefsl.metaopt.autodiff.released.check_graph]: nodes
    released after this call are checked for."""
    return _releases


def is_released(node_ptr: int) -> bool:
    """Whether the grad node at ``node_ptr`` (``tensor.grad_fn.node_ptr()``) is a guarded PyLayer node that
    ``backward()`` has already run (running or copying it again would crash Paddle)."""
    guard = _guards.get(node_ptr)
    return guard is not None and guard.released()


def check_graph(output: paddle.Tensor, since: int = 0) -> None:
    """Raise `GraphReleasedError` if the graph behind ``output`` holds a node that ``backward()`` already ran.

    Call it before ``paddle.grad(output, ...)``: Paddle copies the whole graph before running any hook, and copying a
    released PyLayer node crashes the process. The graph is walked only when a node released after ``since`` (a
    [mark][paddlefsl.metaopt.autodiff.released.mark]) is still alive, so the usual call costs a list scan; the walk
    costs about 10 microseconds per node.

    Args:
        output: the tensor to be differentiated.
        since: ignore nodes released before this mark (they cannot be in a graph built after it).

    Raises:
        GraphReleasedError: if a released node is reachable from ``output``.
    """
    _released[:] = [entry for entry in _released if entry[1]() is not None]
    if not any(number > since for number, _ in _released):
        return
    if not isinstance(output, paddle.Tensor) or output.grad_fn is None:
        return
    seen: set[int] = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        ptr = node.node_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        if is_released(ptr):
            raise GraphReleasedError(RELEASED_MESSAGE)
        stack.extend(c for c in node.next_functions if c is not None)


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
                        guard = _Guard(alive)
                        _guards[t.grad_fn.node_ptr()] = guard
                    t.register_hook(guard)
        return out
