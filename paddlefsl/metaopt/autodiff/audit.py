"""The graph audit: before a gradient is taken with ``create_graph=True``, check the graph that will be differentiated.

Guards on ``paddle._C_ops`` and ``paddle._legacy_C_ops`` close the doors we know of; the audit makes "never silently
wrong" hold whatever door a kernel came through. Paddle records one grad node per op (`Tensor.grad_fn`, each node's
`name()` and `next_functions`). A gradient taken with ``create_graph=True`` runs the backward of every node on a
path from the output to the inputs and records that backward as a new graph; the meta-gradient is exact only if
each of those backwards is itself differentiated exactly. So every node on such a path must be one the registry
knows to be *differentiable*:

* a PyLayer node of an exact rule (``GradNodePyLayer_<Class>``: a PyLayer defined in the op layer, or one
  registered with `exact_pylayer`), whose backward is written in differentiable ops;
* a node of a stock kernel whose derivatives were verified one order beyond the node's own (``SquareGradNode`` for a
  kernel verified at second order, ``SquareDoubleGradNode`` only at third order, and so on);
* a leaf's ``GradNodeAccumulation``.

Any other node raises `SecondOrderError` naming the node and the op it comes from. Nodes under an identity
tripwire (a guarded kernel's output) are left to the tripwire, which raises with the op and the layer.

The walk visits each node once and stops at the inputs, so it costs a few microseconds per node of the graph
between the loss and the parameters of one inner step (measured figures are in `docs/exactness.md`).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import paddle
from paddle.autograd import PyLayer

from paddlefsl.metaopt.autodiff import registry
from paddlefsl.metaopt.errors import SecondOrderError

__all__ = ["audit", "audit_once", "differentiable_nodes", "exact_pylayer", "first_order_pylayer", "node_op",
           "signature"]

_LEVELS = ("", "Double", "Triple")
_TRUSTED_MODULES = ("paddlefsl.metaopt.autodiff", "paddlefsl.metaopt.kernels")
_TRIPWIRE = "GradNodePyLayer__Tripwire"
_ACCUMULATION = "GradNodeAccumulation"
_PYLAYER = "GradNodePyLayer_"

_extra_pylayers: set[str] = set()
_first_order_pylayers: dict[str, tuple[str, str]] = {}
_cache: tuple[int, frozenset[str]] | None = None


def exact_pylayer(cls: type) -> type:
    """Declare a PyLayer defined outside the op layer exact at every order (its backward is written in
    differentiable ops), so the audit accepts its nodes.

    Args:
        cls: a `paddle.autograd.PyLayer` subclass.

    Returns:
        ``cls`` unchanged (use it as a class decorator).

    Raises:
        TypeError: if ``cls`` is not a PyLayer subclass.

    Example:
        ```python
        @exact_pylayer
        class Cube(PyLayer):
            @staticmethod
            def forward(ctx, x):
                ctx.save_for_backward(x)
                return x * x * x

            @staticmethod
            def backward(ctx, grad):
                (x,) = ctx.saved_tensor()
                return 3 * x * x * grad
        ```
    """
    if not (isinstance(cls, type) and issubclass(cls, PyLayer)):
        raise TypeError(f"exact_pylayer expects a paddle.autograd.PyLayer subclass, got {cls!r}")
    global _cache
    _extra_pylayers.add(cls.__name__)
    _cache = None
    return cls


def first_order_pylayer(op: str, reason: str):
    """Declare a PyLayer whose backward is exact but cannot itself be differentiated: the audit refuses a
    ``create_graph=True`` gradient through it with `SecondOrderError` naming ``op`` and giving ``reason``.

    Args:
        op: what the error calls the node, e.g. ``"recompute (inner steps 1..5)"``.
        reason: why, and what to do instead.

    Returns:
        A class decorator that returns the class unchanged.
    """

    def declare(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, PyLayer)):
            raise TypeError(f"first_order_pylayer expects a paddle.autograd.PyLayer subclass, got {cls!r}")
        _first_order_pylayers[f"{_PYLAYER}{cls.__name__}"] = (op, reason)
        return cls

    return declare


def _camel(kernel: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in kernel.split("_"))


def _pylayers(base: type = PyLayer) -> Iterable[type]:
    for sub in base.__subclasses__():
        yield sub
        yield from _pylayers(sub)


def differentiable_nodes() -> frozenset[str]:
    """Return the names of the grad nodes whose backward may be differentiated again exactly.

    Derived from the registry's verified orders (a kernel verified at order ``k`` contributes its first ``k - 1``
    levels of grad node) and from the PyLayers of the op layer.
    """
    global _cache
    orders = registry.verified_orders()
    key = hash((tuple(sorted(orders.items())), tuple(sorted(_extra_pylayers)), len(list(_pylayers())),
                registry.verified_operator_nodes()))
    if _cache is not None and _cache[0] == key:
        return _cache[1]
    names = {_ACCUMULATION, *registry.verified_operator_nodes()}
    for kernel, order in orders.items():
        for level in _LEVELS[:max(0, order - 1)]:
            names.add(f"{_camel(kernel)}{level}GradNode")
    for cls in _pylayers():
        if cls.__module__.startswith(_TRUSTED_MODULES) and f"{_PYLAYER}{cls.__name__}" != _TRIPWIRE:
            names.add(f"{_PYLAYER}{cls.__name__}")
    names.update(f"{_PYLAYER}{name}" for name in _extra_pylayers)
    _cache = (key, frozenset(names))
    return _cache[1]


_NODE = re.compile(r"^(?P<op>.+?)(?P<level>Double|Triple)?GradNode(?P<compat>Compat)?(?:Final)?$")


def node_op(name: str) -> tuple[str, int, str]:
    """Split a grad node's name into the op it comes from, its derivative order and its door.

    Args:
        name: e.g. ``"SquareDoubleGradNode"``, ``"reluGradNodeCompat"``, ``"Conv2dGradNodeFinal"`` or
            ``"GradNodePyLayer_Cube"``.

    Returns:
        ``(op, order, door)``: e.g. ``("square", 2, "paddle._C_ops")``, ``("relu", 1, "paddle._legacy_C_ops")``,
        ``("Cube", 1, "PyLayer")``.
    """
    if name.startswith(_PYLAYER):
        return name[len(_PYLAYER):], 1, "PyLayer"
    match = _NODE.match(name)
    if match is None:
        return name, 1, "unknown"
    op = re.sub(r"(?<!^)(?=[A-Z])", "_", match["op"]).lower()
    order = 1 + _LEVELS.index(match["level"] or "")
    return op, order, "paddle._legacy_C_ops" if match["compat"] else "paddle._C_ops"


def _refuse(name: str, where: str) -> SecondOrderError:
    if name in _first_order_pylayers:
        return SecondOrderError(*_first_order_pylayers[name][:1], where, _first_order_pylayers[name][1])
    op, order, door = node_op(name)
    if door == "PyLayer":
        reason = (f"is a PyLayer that paddlefsl does not know (grad node {name!r}); if its backward is written in "
                  "differentiable Paddle ops, declare it with paddlefsl.metaopt.autodiff.audit.exact_pylayer")
        return SecondOrderError(op, where, reason)
    nth = {2: "second", 3: "third", 4: "fourth"}.get(order + 1, f"order-{order + 1}")
    reason = (f"reached through {door} has no {nth}-order gradient verified exact in paddlefsl (grad node "
              f"{name!r} would be differentiated again)")
    return SecondOrderError(op, where, reason)


def _node(tensor: paddle.Tensor):
    """The grad node that produced ``tensor`` (a leaf's accumulation node), read through a throw-away consumer.

    ``tensor.grad_fn`` caches its wrapper on the tensor, and the wrapper keeps the node alive: when the node (a
    PyLayer's context, say) holds the tensor in turn, that cycle is never freed. The consumer (``scale``, whose grad
    node saves no tensor) goes away with its wrapper.
    """
    probe = paddle._C_ops.scale(tensor, 1.0, 0.0, True)  # stock in the scope too (a verified kernel)
    node = probe.grad_fn
    return node.next_functions[0] if node is not None else None


def signature(outputs: paddle.Tensor | Sequence[paddle.Tensor], inputs: Sequence[paddle.Tensor],
              caller: object) -> tuple:
    """The key under which `audit_once` remembers a graph: the calling code, the inputs' and outputs' shapes and
    dtypes."""
    outputs = [outputs] if isinstance(outputs, paddle.Tensor) else list(outputs)
    return caller, tuple((tuple(t.shape), str(t.dtype)) for t in [*outputs, *inputs] if isinstance(t, paddle.Tensor))


_audited: set[tuple] = set()


def audit_once(outputs: paddle.Tensor | Sequence[paddle.Tensor], inputs: Sequence[paddle.Tensor], key: tuple,
               where: str = "<outside the model>") -> int:
    """`audit`, once per ``key`` (see `signature`) in this process: later graphs of the same key are not walked.

    Paddle 3.3 never frees a grad node once Python has seen it (`Tensor.grad_fn` and `next_functions` return
    wrappers that keep their node, and what it saved, alive for good), so walking every graph of a training loop
    would leak a little memory at every inner step. A training loop builds the same graph for the same code and
    shapes, so the first one of each key is audited; the doors' guards (which leak nothing) check every call.

    Returns:
        The number of grad nodes checked (0 when ``key`` was audited before).
    """
    if key in _audited:
        return 0
    nodes = audit(outputs, inputs, where)
    _audited.add(key)
    return nodes


def audit(outputs: paddle.Tensor | Sequence[paddle.Tensor], inputs: Sequence[paddle.Tensor],
          where: str = "<outside the model>") -> int:
    """Check that a gradient of ``outputs`` with respect to ``inputs`` may be taken with ``create_graph=True``.

    Args:
        outputs: the tensor(s) to differentiate.
        inputs: the tensors to differentiate with respect to; the walk stops at them.
        where: the layer named in the error (the doors' guards name layers; a node reached through no guarded
            door carries no layer).

    Returns:
        The number of grad nodes checked.

    Raises:
        SecondOrderError: naming the first node on a path to ``inputs`` whose backward cannot be differentiated
            exactly.
    """
    outputs = [outputs] if isinstance(outputs, paddle.Tensor) else list(outputs)
    allowed = differentiable_nodes()
    with paddle.set_grad_enabled(True):
        stops = {node.node_ptr() for node in (_node(t) for t in inputs
                                               if isinstance(t, paddle.Tensor) and not t.stop_gradient)
                 if node is not None}
        roots = [_node(t) for t in outputs if isinstance(t, paddle.Tensor) and not t.stop_gradient]
    reaches: dict[int, bool] = {}
    names: dict[int, str] = {}
    children: dict[int, list] = {}
    stack = [(node, False) for node in roots if node is not None]
    while stack:
        node, expanded = stack.pop()
        ptr = node.node_ptr()
        if expanded:
            reaches[ptr] = any(reaches.get(c.node_ptr(), False) for c in children[ptr])
            continue
        if ptr in reaches or ptr in children:
            continue
        if ptr in stops:
            reaches[ptr] = True
            continue
        kids = [c for c in node.next_functions if c is not None]
        names[ptr] = node.name()
        if not kids:
            reaches[ptr] = False
            continue
        children[ptr] = kids
        stack.append((node, True))
        stack.extend((c, False) for c in kids)
    guarded = {c.node_ptr() for ptr, name in names.items() if name == _TRIPWIRE for c in children.get(ptr, ())}
    for ptr, name in names.items():
        if reaches.get(ptr) and name not in allowed and name != _TRIPWIRE and ptr not in guarded:
            if node_op(name)[1] > 1:  # recorded by an earlier gradient: no forward layer ran it
                raise _refuse(name, "<the graph recorded by an earlier create_graph=True gradient>")
            raise _refuse(name, where)
    return len(names)
