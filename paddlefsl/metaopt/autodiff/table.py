"""The coverage table of the op layer, generated from the registry.

    python -m paddlefsl.metaopt.autodiff.table > docs/ops.md
"""
from __future__ import annotations

from paddlefsl.metaopt import autodiff
from paddlefsl.metaopt.autodiff.registry import EXACT, STOCK, operator_node_notes, verified_orders

__all__ = ["markdown_table"]

_MEANING = {
    EXACT: "exact rule in paddlefsl (backward written in differentiable ops; exact at every order)",
    STOCK: "Paddle's own double gradient, verified exact against finite differences",
}


def markdown_table() -> str:
    """Return the Markdown page listing every registered op, its family, status and verified order."""
    rules = sorted(autodiff.rules().values(), key=lambda r: (r.family, r.name))
    orders = verified_orders()
    lines = [
        "# Op coverage",
        "",
        "Generated from the registry by `python -m paddlefsl.metaopt.autodiff.table > docs/ops.md`; a test keeps it",
        "current. Every other `paddle._C_ops` kernel, and every `paddle._legacy_C_ops` kernel that is not routed to",
        "its `paddle._C_ops` twin, is **guarded**: its forward and first-order gradient are Paddle's, and",
        "differentiating it twice raises `SecondOrderError` naming the op and the layer. Behind the guards, the graph",
        "audit checks every grad node a `create_graph=True` gradient will differentiate: a node of a stock kernel is",
        "accepted only below the kernel's verified order (column *order*: the highest order of derivative checked",
        "against finite differences; a node of order k is differentiated to order k + 1); exact rules are exact at",
        "every order (their backward is written in differentiable ops, which the audit checks in turn).",
        "",
        "| status | meaning |",
        "|---|---|",
    ]
    lines += [f"| {status} | {meaning} |" for status, meaning in _MEANING.items()]
    lines += ["", "| family | op (`paddle._C_ops`) | status | order | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.family} | `{r.name}` | {r.status} | {_order(r, orders)} | {r.note} |" for r in rules]
    lines += ["", "Kernels that exact rules call and whose own derivatives the audit accepts:", "",
              "| kernel (`paddle._C_ops`) | verified order |", "|---|---|"]
    used = sorted(name for name in orders if name not in autodiff.rules() or autodiff.rules()[name].status == EXACT)
    lines += [f"| `{name}` | {orders[name]} |" for name in used]
    lines += ["", "Grad nodes recorded by Tensor operators bound in C++ (no `paddle._C_ops` kernel of that name):", "",
              "| grad node | note |", "|---|---|"]
    lines += [f"| `{node}` | {note} |" for node, note in sorted(operator_node_notes().items())]
    return "\n".join(lines) + "\n"


def _order(rule, orders: dict[str, int]) -> str:
    if rule.name in orders:
        return str(orders[rule.name])
    if rule.status == EXACT:
        return "its kernels'" if rule.note.startswith("composite") else "every"
    return str(rule.order or "")


if __name__ == "__main__":
    print(markdown_table(), end="")
