"""Embedding lookups: an exact ``embedding`` rule; ``one_hot`` has no gradient and is declared stock.

``embedding(ids, W)`` is linear in ``W``. The rule is a `_LinearMap`
whose adjoint is Paddle's dense ``embedding_grad`` kernel (a scatter-add of the output gradient into the rows of
``W``, skipping ``padding_idx``); the adjoint's own adjoint is the lookup again, so every order is exact.
Gradients are always dense (``sparse=True`` gives the same values as a dense tensor inside the exact scope).
``embedding_with_scaled_gradient`` (``scale_grad_by_freq=True``) and ``max_norm`` (an in-place renorm) stay
guarded: their first-order gradients are not the derivative of the forward.
"""
from __future__ import annotations

import paddle

from paddlefsl.metaopt.autodiff.registry import exact, original, stock
from paddlefsl.metaopt.autodiff.tensor import _LinearMap

stock(["one_hot"], "embedding", "integer output, no gradient")


@exact("embedding", "embedding", "linear in the table; padding_idx rows get zero gradient; dense gradients")
def embedding(x, weight, padding_idx=-1, sparse=False, out=None, **kwargs):
    """Exact ``paddle._C_ops.embedding`` (same signature); differentiable with respect to ``weight``."""
    padding_idx = -1 if padding_idx is None else int(padding_idx)
    if weight.stop_gradient or not paddle.is_grad_enabled():
        return original("embedding")(x, weight, padding_idx, sparse)
    table = weight.detach()

    def lookup(w):
        return original("embedding")(x, w, padding_idx, False)

    def scatter(g):
        return original("embedding_grad")(x, table, g, padding_idx, False)

    return _LinearMap.apply(weight, lookup, scatter)
