"""Dropout: an exact ``dropout`` rule.

Dropout is linear in its input for a fixed mask. The rule calls Paddle's own ``dropout`` kernel once per forward,
on a tensor of ones shaped like the input, which yields ``mask * factor`` with Paddle's exact factor and draws the
random numbers from Paddle's generator exactly as the stock call on the input would (same shape, dtype, ``p`` and
seed arguments), so ``paddle.seed`` makes runs repeatable and the random stream advances as in stock Paddle. The
output is ``x * (mask * factor)``: a product with a constant, so its gradients are exact at every order and the
backward multiplies by the saved mask. Both modes (``upscale_in_train``, ``downscale_in_infer``) and evaluation
mode (``is_test``, which draws nothing) are covered. The in-place ``dropout_`` stays guarded.
"""
from __future__ import annotations

import paddle

from paddlefsl.metaopt.autodiff.registry import exact, original


@exact("dropout", "dropout", "x * (mask * factor); the mask is drawn once per forward by Paddle's kernel")
def dropout(x, seed_tensor=None, p=0.5, is_test=False, mode="upscale_in_train", seed=0, fix_seed=False,
            out=None, **kwargs):
    """Exact ``paddle._C_ops.dropout`` (same signature)."""
    if x.stop_gradient or not paddle.is_grad_enabled():
        return original("dropout")(x, seed_tensor, p, is_test, mode, seed, fix_seed)
    ones = original("full_like")(x, 1.0, x.dtype, x.place)
    keep = original("dropout")(ones, seed_tensor, p, is_test, mode, seed, fix_seed)
    return paddle.multiply(x, keep)
