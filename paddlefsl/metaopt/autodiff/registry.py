"""The registry: one record per Paddle kernel saying how it is differentiated at higher orders.

Every kernel that ``paddle.nn.functional`` and ``paddle`` reach through ``paddle._C_ops`` has one of three
statuses while the exact scope is active (see :mod:`paddlefsl.metaopt.autodiff.scope`):

* ``exact``: a replacement registered here with :func:`exact`; its backward is written in differentiable
  Paddle ops, so its gradients are exact at every order.
* ``stock``: Paddle's own double gradient was checked against finite differences and is exact; the kernel is
  left untouched.
* ``guarded`` (everything else): forward and first-order gradients are Paddle's own, but differentiating it
  twice raises :class:`~paddlefsl.metaopt.errors.SecondOrderError` naming the op and the layer.
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
    """

    name: str
    family: str
    status: str
    replacement: Callable | None = None
    note: str = ""


_RULES: dict[str, OpRule] = {}


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
        >>> @exact("tanh", "activation")          # doctest: +SKIP
        ... def tanh(x): return _Tanh.apply(x)
    """

    def decorate(fn: Callable) -> Callable:
        _add(OpRule(name, family, EXACT, fn, note))
        return fn

    return decorate


def stock(names: Iterable[str], family: str, note: str = "") -> None:
    """Declare kernels whose stock Paddle double gradient is exact (each one must have a finite-difference test).

    Args:
        names: kernel names in ``paddle._C_ops``.
        family: the op family.
        note: a short remark for the coverage table.
    """
    for name in names:
        _add(OpRule(name, family, STOCK, None, note))


def rules() -> dict[str, OpRule]:
    """Return a copy of the registered rules, keyed by kernel name."""
    return dict(_RULES)


def kernel_names() -> list[str]:
    """Return the names of all public kernels in ``paddle._C_ops``."""
    return sorted(_ORIGINALS)
