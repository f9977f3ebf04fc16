"""Losses: exact rules for the loss kernels that ``paddle.nn.functional`` calls.

Every rule runs Paddle's own kernel in forward (stock values) and writes the backward with differentiable public
Paddle ops, so its gradients are exact at every order inside the exact scope. Where the stock kernel gives no
gradient for a floating input that the loss depends on (soft labels, ``pos_weight``, targets), the rule gives the
true one. ``mse_loss`` and ``l1_loss`` are built from stock elementwise ops and need no rule. Class weights of
``nll_loss`` are treated as constants, as in stock Paddle. Each input that needs a gradient gets its own
single-input PyLayer (`apply_rule()`), so ``paddle.grad`` with respect to
any subset of the inputs works.
"""
from __future__ import annotations

from typing import Any, Sequence

import paddle
import paddle.nn.functional as F

from paddlefsl.metaopt.autodiff.common import apply_rule
from paddlefsl.metaopt.autodiff.registry import exact, original

Tensor = paddle.Tensor


def _needs_grad(*tensors: Any) -> bool:
    return paddle.is_grad_enabled() and any(
        isinstance(t, paddle.Tensor) and not t.stop_gradient for t in tensors)


def _valid_one_hot(label: Tensor, ignore_index: int, classes: int, axis: int, ndim: int,
                   dtype: Any) -> tuple[Tensor, Tensor]:
    """``(valid, target)`` for integer ``label`` (size 1 along ``axis``): ``valid`` is 1 where the label is not
    ``ignore_index``, ``target`` its one-hot along ``axis`` (``classes`` entries), zero where it is ignored.

    The labels are in range wherever they are not ignored (stock Paddle checks them before its kernel). Along the
    last axis this is Paddle's ``one_hot`` kernel (4 us; the ``arange`` and comparison it replaces took 60 us, a
    fifth of a small cross-entropy rule), elsewhere a comparison with the class ids.
    """
    valid = paddle.cast(label != ignore_index, dtype)
    if axis == ndim - 1:
        clean = label * paddle.cast(valid, label.dtype)   # ignored labels point at class 0, masked below
        hot = original("one_hot")(clean.squeeze(axis), classes)
    else:
        shape = [1] * ndim
        shape[axis] = classes
        hot = label == paddle.arange(classes, dtype=label.dtype).reshape(shape)
    return valid, paddle.cast(hot, dtype) * valid


# ------------------------------------------------------------------------------------- softmax cross entropy

@exact("cross_entropy_with_softmax", "loss", "hard/soft labels, ignore_index, any axis, use_softmax on/off")
def cross_entropy_with_softmax(input, label, soft_label, use_softmax, numeric_stable_mode, ignore_index, axis,
                               **kwargs):
    """Exact ``_C_ops.cross_entropy_with_softmax``: returns ``(softmax, loss)``, both differentiable w.r.t.
    ``input`` (and w.r.t. soft labels)."""
    args = (input, label, soft_label, use_softmax, numeric_stable_mode, ignore_index, axis)
    if not _needs_grad(input, label):
        return original("cross_entropy_with_softmax")(*args, **kwargs)
    x = input
    ndim = len(x.shape)
    ax = axis % ndim
    def run():
        return tuple(original("cross_entropy_with_softmax")(*args))

    if not soft_label:
        valid, target = _valid_one_hot(label, ignore_index, x.shape[ax], ax, ndim, x.dtype)

    def softmax_of_x():
        # Differentiable softmax of the live input (the saved kernel output is a constant inside backward).
        return F.softmax(x, axis=ax) if use_softmax else x

    def grad_x(g_sm, g_loss):
        sm = softmax_of_x()
        if use_softmax:
            if soft_label:
                dx = g_loss * (sm * label.sum(axis=ax, keepdim=True) - label)
            else:
                dx = g_loss * (valid * sm - target)
            return dx + sm * (g_sm - (g_sm * sm).sum(axis=ax, keepdim=True))
        if soft_label:
            dx = -g_loss * label / x
        else:
            dx = -g_loss * target / ((x * target).sum(axis=ax, keepdim=True) + (1.0 - valid))
        return dx + g_sm

    def grad_label(g_sm, g_loss):
        logp = F.log_softmax(x, axis=ax) if use_softmax else paddle.log(x)
        return -g_loss * logp

    return apply_rule([x, label if soft_label else None], run, [grad_x, grad_label])


@exact("label_smooth", "loss", "linear")
def label_smooth(label, prior_dist, epsilon, **kwargs):
    """Exact ``_C_ops.label_smooth``: ``(1 - epsilon) * label + epsilon * prior`` (prior uniform if None)."""
    if not _needs_grad(label, prior_dist):
        return original("label_smooth")(label, prior_dist, epsilon, **kwargs)
    eps = float(epsilon)

    def grad_prior(g):
        lead = list(range(len(g.shape) - 1))
        return (g * eps).sum(axis=lead).reshape(prior_dist.shape) if lead else (g * eps).reshape(prior_dist.shape)

    return apply_rule([label, prior_dist], lambda: original("label_smooth")(label, prior_dist, epsilon),
                      [lambda g: g * (1.0 - eps), grad_prior])


# ------------------------------------------------------------------------------------------------- nll loss

@exact("nll_loss", "loss", "class weights are constants (as in stock Paddle)")
def nll_loss(input, label, weight, ignore_index, reduction, **kwargs):
    """Exact ``_C_ops.nll_loss``: returns ``(out, total_weight)``; ``out`` is differentiable w.r.t. ``input``."""
    if not _needs_grad(input):
        return original("nll_loss")(input, label, weight, ignore_index, reduction, **kwargs)
    x = input
    rest: list[Tensor] = []

    def run():
        out, total_weight = original("nll_loss")(x, label, weight, ignore_index, reduction)
        rest.append(total_weight)
        return out

    ndim = len(x.shape)
    lab = label.unsqueeze(1)
    _, coef = _valid_one_hot(lab, ignore_index, x.shape[1], 1, ndim, x.dtype)
    if weight is not None:
        shape = [1] * ndim
        shape[1] = x.shape[1]
        coef = coef * weight.detach().reshape(shape)

    def grad_x(g):
        g = g.unsqueeze(1) if reduction == "none" else g
        c = coef / rest[0].detach() if reduction == "mean" else coef
        return -g * c

    out = apply_rule([x], run, [grad_x])
    return out, rest[0]


# ------------------------------------------------------------------------------------------------ logsumexp

def _reduced_axes(ndim: int, axis: Any) -> list[int]:
    if axis is None:
        return list(range(ndim))
    if isinstance(axis, paddle.Tensor):
        axis = axis.tolist()
    if isinstance(axis, int):
        axis = [axis]
    axes = sorted({int(a) % ndim for a in axis}) if ndim else []
    return axes or list(range(ndim))


@exact("logsumexp", "loss")
def logsumexp(x, *args, **kwargs):
    """Exact ``_C_ops.logsumexp`` (kernel form ``(x, axis, keepdim, reduce_all)`` and the public form
    ``(x, axis=None, keepdim=False, name=None)``)."""
    if not _needs_grad(x):
        return original("logsumexp")(x, *args, **kwargs)
    ndim = len(x.shape)
    axes = _reduced_axes(ndim, args[0] if args else kwargs.get("axis"))
    out: list[Tensor] = []

    def run():
        out.append(original("logsumexp")(x, *args, **kwargs))
        return out[0]

    def grad_x(g):
        keep = list(x.shape)
        for a in (axes if len(out[0].shape) else range(ndim)):
            keep[a] = 1
        # d logsumexp / dx = softmax over the reduced axes, written with the live x
        m = x.max(axis=axes if len(out[0].shape) else None, keepdim=True).detach()
        e = paddle.exp(x - m)
        return g.reshape(keep) * e / e.sum(axis=[a for a in range(ndim) if keep[a] == 1], keepdim=True)

    return apply_rule([x], run, [grad_x])


# --------------------------------------------------------------------------------- sigmoid cross entropy

@exact("sigmoid_cross_entropy_with_logits", "loss", "pos_weight, normalize, ignore_index")
def sigmoid_cross_entropy_with_logits(x, label, pos_weight, normalize, ignore_index, **kwargs):
    """Exact ``_C_ops.sigmoid_cross_entropy_with_logits`` (differentiable w.r.t. logits, labels, pos_weight).

    The kernel computes ``(1 - label) * x + pw * softplus(-x)`` (``pw = 1`` without ``pos_weight``), zero where
    ``label == ignore_index``, divided by the number of kept entries when ``normalize``.
    """
    args = (x, label, pos_weight, normalize, ignore_index)
    if not _needs_grad(x, label, pos_weight):
        return original("sigmoid_cross_entropy_with_logits")(*args, **kwargs)
    valid = paddle.cast(label != ignore_index, x.dtype)
    if normalize:
        valid = valid / paddle.clip(valid.sum(), min=1.0)

    def grad_x(g):
        s = F.sigmoid(x)
        if pos_weight is None:
            return g * valid * (s - label)
        return g * valid * ((1.0 - label) - pos_weight * (1.0 - s))

    def grad_label(g):
        return -g * valid * x

    def grad_pw(g):
        return -g * valid * paddle.log(F.sigmoid(x))

    return apply_rule([x, label, pos_weight], lambda: original("sigmoid_cross_entropy_with_logits")(*args),
                      [grad_x, grad_label, grad_pw])


# -------------------------------------------------------------------------------------------------- kl div

@exact("kldiv_loss", "loss", "reductions none/mean/sum/batchmean, log_target")
def kldiv_loss(x, label, reduction, log_target=False, **kwargs):
    """Exact ``_C_ops.kldiv_loss`` (differentiable w.r.t. the input and the target)."""
    if not _needs_grad(x, label):
        return original("kldiv_loss")(x, label, reduction, log_target, **kwargs)
    n = 1
    for d in x.shape:
        n *= d
    factor = {"mean": 1.0 / max(n, 1), "batchmean": 1.0 / (x.shape[0] if len(x.shape) else 1)}.get(reduction, 1.0)

    def grad_x(g):
        if log_target:
            return -g * factor * paddle.exp(label)
        return -g * factor * paddle.where(label > 0, label, paddle.zeros_like(label))

    def grad_label(g):
        if log_target:
            return g * factor * paddle.exp(label) * (label - x + 1.0)
        pos = label > 0
        safe = paddle.where(pos, label, paddle.ones_like(label))
        return g * factor * paddle.where(pos, paddle.log(safe) + 1.0 - x, paddle.zeros_like(label))

    return apply_rule([x, label], lambda: original("kldiv_loss")(x, label, reduction, log_target),
                      [grad_x, grad_label])


# ------------------------------------------------------------------------------------------------ huber loss

@exact("huber_loss", "loss")
def huber_loss(input, label, delta, **kwargs):
    """Exact ``_C_ops.huber_loss`` (used by ``smooth_l1_loss``)."""
    if not _needs_grad(input, label):
        return original("huber_loss")(input, label, delta, **kwargs)
    d = float(delta)
    return apply_rule([input, label], lambda: original("huber_loss")(input, label, delta),
                      [lambda g: -g * paddle.clip(label - input, -d, d),
                       lambda g: g * paddle.clip(label - input, -d, d)])


# -------------------------------------------------------------------------------------------------- bce loss

@exact("bce_loss", "loss")
def bce_loss(input, label, **kwargs):
    """Exact ``_C_ops.bce_loss`` (binary cross entropy on probabilities)."""
    if not _needs_grad(input, label):
        return original("bce_loss")(input, label, **kwargs)
    p = input
    return apply_rule([p, label], lambda: original("bce_loss")(p, label),
                      [lambda g: g * (p - label) / (p * (1.0 - p)),
                       lambda g: g * (paddle.log(1.0 - p) - paddle.log(p))])


__all__: Sequence[str] = ["cross_entropy_with_softmax", "label_smooth", "nll_loss", "logsumexp",
                          "sigmoid_cross_entropy_with_logits", "kldiv_loss", "huber_loss", "bce_loss"]
