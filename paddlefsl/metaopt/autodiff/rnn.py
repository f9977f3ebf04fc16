"""Recurrent layers: an exact rule for the fused ``rnn`` kernel behind ``nn.SimpleRNN``, ``nn.LSTM`` and ``nn.GRU``.

Paddle's fused kernel ``_C_ops.rnn`` has no double gradient. While any of its inputs needs a gradient, the rule
below computes the same recurrence unrolled over time with primitive ops (``matmul``, ``sigmoid``, ``tanh``,
``relu``, ``split``, ``multiply``, ``concat``, ``stack``) whose double gradients are stock-exact, so autograd through
it is exact at every order. When nothing needs a gradient the fused kernel runs unchanged.

The unrolled recurrence follows the CPU kernel exactly:

* weights come in the kernel's list layout: ``[w_ih, w_hh]`` for every (layer, direction), then
  ``[b_ih, b_hh]`` for every (layer, direction), direction varying fastest;
* gate order: LSTM ``[i, f, g, o]``; GRU ``[r, z, c]`` with the reset gate applied after the hidden projection,
  ``c = tanh(W_ic x + b_ic + r * (W_hc h + b_hc))`` and ``h' = z * h + (1 - z) * c``;
* with ``sequence_length``, a step past a sequence's length outputs zeros and carries the previous state, so the
  final states are those of the last valid step (the reverse direction starts at the last valid step);
* dropout between layers (training mode): the kernel draws ONE mask of the output's shape and reuses it for every
  layer after the first, scaling by ``1 / (1 - p)`` computed in float32. The rule runs the fused kernel once (without
  gradients) to draw that mask from Paddle's generator exactly as stock does, then applies it differentiably.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import paddle
import paddle.nn.functional as F

from paddlefsl.metaopt.autodiff.registry import exact, original

MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")
_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}


def _needs_grad(*values) -> bool:
    for value in values:
        if isinstance(value, paddle.Tensor):
            if not value.stop_gradient:
                return True
        elif isinstance(value, (list, tuple)):
            if _needs_grad(*value):
                return True
    return False


def _step_masks(sequence_length: paddle.Tensor | None, steps: int, dtype) -> list[tuple | None]:
    """Per time step: ``None`` if every sequence is still running, else ``(keep, 1 - keep)`` of shape ``[B, 1]``."""
    if sequence_length is None:
        return [None] * steps
    lengths = np.asarray(sequence_length.numpy()).reshape(-1)
    masks: list[tuple | None] = []
    for t in range(steps):
        keep = (t < lengths).astype("float64")[:, None]
        if keep.all():
            masks.append(None)
        else:
            masks.append((paddle.to_tensor(keep).astype(dtype), paddle.to_tensor(1.0 - keep).astype(dtype)))
    return masks


def _direction(x: paddle.Tensor, w_ih: paddle.Tensor, w_hh: paddle.Tensor, b_ih: paddle.Tensor,
               b_hh: paddle.Tensor, h: paddle.Tensor, c: paddle.Tensor | None, masks: Sequence[tuple | None],
               mode: str, reverse: bool) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor | None]:
    """Run one direction of one layer over a time-major input ``x`` [T, B, I]; return (outputs, h_T, c_T)."""
    steps = x.shape[0]
    gx = paddle.matmul(x, w_ih, transpose_y=True) + b_ih
    if mode != "GRU":
        gx = gx + b_hh
    gx = paddle.unbind(gx, axis=0)
    outputs: list[paddle.Tensor | None] = [None] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        gh = paddle.matmul(h, w_hh, transpose_y=True)
        c_new = None
        if mode == "RNN_TANH":
            h_new = paddle.tanh(gx[t] + gh)
        elif mode == "RNN_RELU":
            h_new = F.relu(gx[t] + gh)
        elif mode == "LSTM":
            i, f, g, o = paddle.split(gx[t] + gh, 4, axis=-1)
            c_new = F.sigmoid(f) * c + F.sigmoid(i) * paddle.tanh(g)
            h_new = F.sigmoid(o) * paddle.tanh(c_new)
        else:
            xr, xz, xc = paddle.split(gx[t], 3, axis=-1)
            hr, hz, hc = paddle.split(gh + b_hh, 3, axis=-1)
            r = F.sigmoid(xr + hr)
            z = F.sigmoid(xz + hz)
            cand = paddle.tanh(xc + r * hc)
            h_new = cand + z * (h - cand)
        if masks[t] is None:
            outputs[t], h = h_new, h_new
            if c_new is not None:
                c = c_new
        else:
            keep, drop = masks[t]
            outputs[t] = h_new * keep
            h = outputs[t] + h * drop
            if c_new is not None:
                c = c_new * keep + c * drop
    return paddle.stack(outputs, axis=0), h, c


def unrolled_rnn(x: paddle.Tensor, initial_states: Sequence[paddle.Tensor], weights: Sequence[paddle.Tensor],
                 sequence_length: paddle.Tensor | None, mode: str, num_layers: int, is_bidirec: bool,
                 dropout_mask: paddle.Tensor | None = None, dropout_prob: float = 0.0
                 ) -> tuple[paddle.Tensor, list[paddle.Tensor]]:
    """The fused ``rnn`` kernel's computation written in differentiable primitive ops.

    Args:
        x: time-major input, shape ``[T, B, input_size]``.
        initial_states: ``[h0]`` (or ``[h0, c0]`` for LSTM), each ``[num_layers * directions, B, hidden]``.
        weights: the kernel's weight list (``RNNBase._all_weights`` layout).
        sequence_length: int tensor ``[B]`` of valid lengths, or ``None``.
        mode: one of ``"RNN_TANH"``, ``"RNN_RELU"``, ``"LSTM"``, ``"GRU"``.
        num_layers: number of stacked layers.
        is_bidirec: whether each layer has a reverse direction.
        dropout_mask: the kernel's mask (uint8 or float, shape of the output) applied to the input of every layer
            after the first, or ``None`` for no dropout.
        dropout_prob: the dropout probability the mask was drawn with.

    Returns:
        ``(outputs [T, B, directions * hidden], [h_T] or [h_T, c_T])`` as the kernel returns them.

    Raises:
        ValueError: for an unknown mode or a weight list of the wrong length.
    """
    if mode not in MODES:
        raise ValueError(f"rnn mode must be one of {MODES}, got {mode!r}")
    directions = 2 if is_bidirec else 1
    n = 2 * num_layers * directions
    if len(weights) != 2 * n:
        raise ValueError(f"rnn expects {2 * n} weights (w_ih, w_hh, b_ih, b_hh per layer and direction), "
                         f"got {len(weights)}")
    lstm = mode == "LSTM"
    masks = _step_masks(sequence_length, x.shape[0], x.dtype)
    h0 = paddle.unbind(initial_states[0], axis=0)
    c0 = paddle.unbind(initial_states[1], axis=0) if lstm else [None] * n
    if dropout_mask is not None:
        scale = float(np.float32(1.0) - np.float32(dropout_prob))
        keep = dropout_mask.astype(x.dtype)
    finals_h, finals_c = [], []
    layer_in = x
    for layer in range(num_layers):
        if layer > 0 and dropout_mask is not None:
            layer_in = layer_in * 0.0 if scale == 0.0 else layer_in * keep / scale
        outs = []
        for d in range(directions):
            k = layer * directions + d
            out, h, c = _direction(layer_in, weights[2 * k], weights[2 * k + 1], weights[n + 2 * k],
                                   weights[n + 2 * k + 1], h0[k], c0[k], masks, mode, reverse=d == 1)
            outs.append(out)
            finals_h.append(h)
            finals_c.append(c)
        layer_in = paddle.concat(outs, axis=-1) if directions == 2 else outs[0]
    states = [paddle.stack(finals_h, axis=0)]
    if lstm:
        states.append(paddle.stack(finals_c, axis=0))
    return layer_in, states


@exact("rnn", "rnn", "unrolled over time in differentiable primitives; dropout mask drawn by the fused kernel")
def rnn(x, pre_state, weight_list, sequence_length, dropout_state_in, dropout_prob, is_bidirec, input_size,
        hidden_size, num_layers, mode, seed, is_test, **kwargs):
    """Exact replacement of ``paddle._C_ops.rnn`` (same signature and outputs)."""
    args = (x, pre_state, weight_list, sequence_length, dropout_state_in, dropout_prob, is_bidirec, input_size,
            hidden_size, num_layers, mode, seed, is_test)
    if not paddle.is_grad_enabled() or not _needs_grad(x, pre_state, weight_list):
        return original("rnn")(*args, **kwargs)
    dropping = not is_test and dropout_prob != 0 and num_layers > 1
    if dropping:
        with paddle.no_grad():
            _, dropout_state, _ = original("rnn")(*args, **kwargs)
    out, states = unrolled_rnn(x, list(pre_state), list(weight_list), sequence_length, mode, num_layers,
                               is_bidirec, dropout_state if dropping else None, dropout_prob)
    if not dropping:
        dropout_state = dropout_state_in if is_test else paddle.ones(out.shape, dtype="uint8")
    return out, dropout_state, states
