"""The registry: one record per Paddle kernel saying how it is differentiated at higher orders.

Every kernel that ``paddle.nn.functional`` and ``paddle`` reach through ``paddle._C_ops`` has one of three
statuses while the exact scope is active (see `paddlefsl.metaopt.autodiff.scope`):

* ``exact``: a replacement registered here with `exact`; its backward is written in differentiable
  Paddle ops, so its gradients are exact at every order.
* ``stock``: Paddle's own double gradient was checked against finite differences and is exact; the kernel is
  left untouched.
* ``guarded`` (everything else): forward and first-order gradients are Paddle's own, but differentiating it
  twice raises `SecondOrderError` naming the op and the layer.

Each stock kernel also records the highest order whose derivatives were checked against finite differences
(`verified_order`); the graph audit (`paddlefsl.metaopt.autodiff.audit`) derives from it which of Paddle's grad
nodes may be differentiated again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from paddle import _C_ops

EXACT = "exact"
STOCK = "stock"
GUARDED = "guarded"

_ORIGINALS: dict[str, Callable] = {
    name: getattr(_C_ops, name)
    for name in dir(_C_ops)
    if not name.startswith("_") and callable(getattr(_C_ops, name))
}


@dataclass(frozen=True)
class OpRule:
    """How one ``paddle._C_ops`` kernel is differentiated inside the exact scope.

    Attributes:
        name: the kernel's name in ``paddle._C_ops``.
        family: the op family (the module of this package that owns the rule).
        status: ``"exact"`` or ``"stock"``.
        replacement: the function installed in ``paddle._C_ops`` (``None`` for stock kernels).
        note: a short remark shown in the coverage table.
        order: for stock kernels, the highest order of derivative verified exact (``None``: every order, for exact
            rules whose backward is written in differentiable ops).
    """

    name: str
    family: str
    status: str
    replacement: Callable | None = None
    note: str = ""
    order: int | None = None


_RULES: dict[str, OpRule] = {}
_VERIFIED: dict[str, int] = {}
_OPERATOR_NODES: dict[str, str] = {}


def original(name: str) -> Callable:
    """Return Paddle's own kernel ``paddle._C_ops.<name>``, whatever is installed at the moment.

    Raises:
        KeyError: if Paddle has no kernel of that name.
    """
    try:
        return _ORIGINALS[name]
    except KeyError:
        raise KeyError(f"paddle._C_ops has no kernel named {name!r}") from None


def _add(rule: OpRule) -> None:
    original(rule.name)
    if rule.name in _RULES:
        raise ValueError(f"op {rule.name!r} is already registered by family {_RULES[rule.name].family!r}")
    _RULES[rule.name] = rule


def exact(name: str, family: str, note: str = "") -> Callable[[Callable], Callable]:
    """Register ``fn`` as the exact replacement of ``paddle._C_ops.<name>`` (same signature).

    Args:
        name: the kernel's name in ``paddle._C_ops``.
        family: the op family, e.g. ``"conv"``.
        note: a short remark for the coverage table.

    Returns:
        A decorator that registers the function and returns it unchanged.

    Example:
        ```python
        @exact("tanh", "activation")
        def tanh(x, out=None, **kwargs):
            return _Tanh.apply(x)  # a PyLayer whose backward is written in differentiable ops
        ```
    """

    def decorate(fn: Callable) -> Callable:
        _add(OpRule(name, family, EXACT, fn, note))
        return fn

    return decorate


def stock(names: Iterable[str], family: str, note: str = "", order: int = 2) -> None:
    """Declare kernels whose stock Paddle higher derivatives are exact up to ``order`` (each order needs a
    finite-difference test).

    Args:
        names: kernel names in ``paddle._C_ops``.
        family: the op family.
        note: a short remark for the coverage table.
        order: the highest order of derivative checked against finite differences (2: second order).
    """
    names = list(names)
    for name in names:
        _add(OpRule(name, family, STOCK, None, note, order))
    verified(names, order)


def verified(names: Iterable[str], order: int) -> None:
    """Record that Paddle's own derivatives of the kernels ``names`` are exact up to ``order``.

    Exact rules that end in a stock kernel (a composite, or a faster layout around the stock kernel) call this
    for the kernels they use, so the graph audit accepts those kernels' grad nodes.

    Args:
        names: kernel names in ``paddle._C_ops``.
        order: the highest order of derivative checked against finite differences.

    Raises:
        ValueError: if ``order`` is below 1.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    for name in names:
        original(name)
        _VERIFIED[name] = max(order, _VERIFIED.get(name, 0))


def verified_operator_node(node: str, note: str) -> None:
    """Record that a grad node which Tensor operators bound in C++ record (no ``paddle._C_ops`` kernel of that
    name), e.g. ``DivScaleGradNode`` for ``x / 2``, may be differentiated again exactly (checked against finite
    differences).

    Args:
        node: the grad node's name, as ``Tensor.grad_fn.name()`` gives it.
        note: what records it, for the coverage table.
    """
    _OPERATOR_NODES[node] = note


def verified_operator_nodes() -> tuple[str, ...]:
    """Return the names recorded with `verified_operator_node`, sorted."""
    return tuple(sorted(_OPERATOR_NODES))


def operator_node_notes() -> dict[str, str]:
    """Return the notes of the nodes recorded with `verified_operator_node`."""
    return dict(_OPERATOR_NODES)


def verified_orders() -> dict[str, int]:
    """Return a copy of the verified orders of Paddle's own kernels, keyed by kernel name."""
    return dict(_VERIFIED)


def rules() -> dict[str, OpRule]:
    """Return a copy of the registered rules, keyed by kernel name."""
    return dict(_RULES)


def kernel_names() -> list[str]:
    """Return the names of all public kernels in ``paddle._C_ops``."""
    return sorted(_ORIGINALS)
