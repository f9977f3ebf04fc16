"""The coverage table of the op layer, generated from the registry.

    python -m paddlefsl.metaopt.autodiff.table > docs/ops.md
"""
from __future__ import annotations

from paddlefsl.metaopt import autodiff
from paddlefsl.metaopt.autodiff.registry import EXACT, STOCK

__all__ = ["markdown_table"]

_MEANING = {
    EXACT: "exact rule in paddlefsl (backward written in differentiable ops; exact at every order)",
    STOCK: "Paddle's own double gradient, verified exact against finite differences",
}


def markdown_table() -> str:
    """Return the Markdown page listing every registered op, its family and status."""
    rules = sorted(autodiff.rules().values(), key=lambda r: (r.family, r.name))
    lines = [
        "# Op coverage",
        "",
        "Generated from the registry by `python -m paddlefsl.metaopt.autodiff.table > docs/ops.md`; a test keeps it",
        "current. Every other `paddle._C_ops` kernel is **guarded**: its forward and first-order gradient are",
        "Paddle's, and differentiating it twice raises `SecondOrderError` naming the op and the layer.",
        "",
        "| status | meaning |",
        "|---|---|",
    ]
    lines += [f"| {status} | {meaning} |" for status, meaning in _MEANING.items()]
    lines += ["", "| family | op (`paddle._C_ops`) | status | note |", "|---|---|---|---|"]
    lines += [f"| {r.family} | `{r.name}` | {r.status} | {r.note} |" for r in rules]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
