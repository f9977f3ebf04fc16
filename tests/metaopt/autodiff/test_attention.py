"""Transformer blocks inside the exact scope: Hessian-vector products with respect to parameters against finite
differences of stock first-order gradients (directional: (g(w + e v) - g(w - e v)) / 2e)."""
from __future__ import annotations

from typing import Callable

import numpy as np
import paddle
import pytest

from paddlefsl.metaopt.autodiff import exact_ops

paddle.set_default_dtype("float64")

D_MODEL, N_HEAD, D_FF, BATCH, SEQ = 4, 2, 6, 2, 3
_SEED = 2024


def _inputs() -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.standard_normal((BATCH, SEQ, D_MODEL)))
    target = paddle.to_tensor(rng.standard_normal((BATCH, SEQ, D_MODEL)))
    keep = np.ones((BATCH, 1, SEQ, SEQ), dtype=bool)
    keep[0, :, :, -1] = False  # the first sequence's last position is padding
    return x, target, paddle.to_tensor(keep)


def _float_mask(keep: paddle.Tensor) -> paddle.Tensor:
    return paddle.where(keep, paddle.zeros(keep.shape), paddle.full(keep.shape, -1e4))


def _params(model: paddle.nn.Layer, names: list[str]) -> list[paddle.Tensor]:
    named = dict(model.named_parameters())
    return [named[n] for n in names]


def _grads(loss_fn: Callable[[], paddle.Tensor], params: list[paddle.Tensor], create_graph: bool):
    return paddle.grad(loss_fn(), params, create_graph=create_graph)


def _check_hvp(model: paddle.nn.Layer, loss_fn: Callable[[], paddle.Tensor], names: list[str],
               eps: float = 1e-5, rtol: float = 1e-6) -> None:
    params = _params(model, names)
    base = [p.numpy().copy() for p in params]
    rng = np.random.default_rng(1)
    vs = [rng.standard_normal(b.shape) for b in base]

    with exact_ops():
        grads = _grads(loss_fn, params, create_graph=True)
        inner = sum((g * paddle.to_tensor(v)).sum() for g, v in zip(grads, vs))
        got = [h.numpy() for h in paddle.grad(inner, params)]

    shifted = []
    for sign in (1.0, -1.0):
        for p, b, v in zip(params, base, vs):
            p.set_value(b + sign * eps * v)
        shifted.append([g.numpy() for g in _grads(loss_fn, params, create_graph=False)])
    for p, b in zip(params, base):
        p.set_value(b)
    want = [(a - b) / (2 * eps) for a, b in zip(*shifted)]

    scale = max(float(np.abs(w).max()) for w in want)
    assert scale > 1e-4, "the Hessian-vector product is zero: the check could not tell first order from exact"
    for n, g, w in zip(names, got, want):
        np.testing.assert_allclose(g, w, rtol=rtol, atol=1e-6 * scale, err_msg=f"HVP w.r.t. {n}")


def _seeded(fn: Callable[[], paddle.Tensor]) -> Callable[[], paddle.Tensor]:
    def run() -> paddle.Tensor:
        paddle.seed(_SEED)  # the same dropout masks at every evaluation
        return fn()
    return run


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
def test_multi_head_attention_hvp(mask: str) -> None:
    paddle.seed(0)
    mha = paddle.nn.MultiHeadAttention(D_MODEL, N_HEAD, dropout=0.2)
    mha.train()
    x, target, keep = _inputs()
    attn_mask = {"none": None, "bool": keep, "float": _float_mask(keep)}[mask]

    def loss() -> paddle.Tensor:
        return ((mha(x, x, x, attn_mask=attn_mask) - target) ** 2).sum()

    _check_hvp(mha, _seeded(loss), ["q_proj.weight", "k_proj.weight", "v_proj.bias", "out_proj.weight"])


@pytest.mark.parametrize("normalize_before", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_layer_hvp(normalize_before: bool, activation: str) -> None:
    paddle.seed(0)
    layer = paddle.nn.TransformerEncoderLayer(D_MODEL, N_HEAD, D_FF, dropout=0.1, activation=activation,
                                              normalize_before=normalize_before)
    layer.train()
    x, target, keep = _inputs()

    def loss() -> paddle.Tensor:
        return ((layer(x, src_mask=keep) - target) ** 2).sum()

    _check_hvp(layer, _seeded(loss), ["self_attn.k_proj.weight", "linear1.weight", "linear2.bias",
                                      "norm1.weight", "norm2.bias"])


@pytest.mark.parametrize("normalize_before", [False, True])
def test_transformer_encoder_hvp(normalize_before: bool) -> None:
    paddle.seed(0)
    layer = paddle.nn.TransformerEncoderLayer(D_MODEL, N_HEAD, D_FF, dropout=0.1, activation="gelu",
                                              normalize_before=normalize_before)
    norm = paddle.nn.LayerNorm(D_MODEL) if normalize_before else None
    encoder = paddle.nn.TransformerEncoder(layer, num_layers=2, norm=norm)
    encoder.train()
    x, target, keep = _inputs()

    def loss() -> paddle.Tensor:
        return ((encoder(x, src_mask=_float_mask(keep)) - target) ** 2).sum()

    _check_hvp(encoder, _seeded(loss), ["layers.0.self_attn.q_proj.weight", "layers.1.linear1.weight",
                                        "layers.0.norm2.weight", "layers.1.self_attn.out_proj.bias"])


def test_stock_paddle_cannot_differentiate_attention_twice() -> None:
    paddle.seed(0)
    mha = paddle.nn.MultiHeadAttention(D_MODEL, N_HEAD)
    x, _, _ = _inputs()
    w = mha.q_proj.weight
    with pytest.raises((RuntimeError, OSError), match="softmax_grad"):
        (g,) = paddle.grad((mha(x, x, x) ** 2).sum(), [w], create_graph=True)
        paddle.grad((g ** 2).sum(), [w])
