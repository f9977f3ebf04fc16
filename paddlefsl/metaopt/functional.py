"""The functional core: graph-preserving clones and calls of any ``paddle.nn.Layer`` with given parameters.

Paddle layers read their weights as attributes (``self.weight``) looked up in ``Layer._parameters``; some layers
also keep lists of their weights elsewhere (``nn.LSTM`` keeps ``_all_weights`` for its fused kernel). Both places are
rewritten here, in one generic way, so a clone or a functional call really computes with the given tensors.
"""
from __future__ import annotations

import copy
from typing import Any, Iterator, Mapping, Sequence

import paddle
from paddle import nn

__all__ = ["ParameterSlots", "clone_model", "functional_call"]


def _check_layer(layer: object, argument: str) -> None:
    if not isinstance(layer, nn.Layer):
        raise TypeError(f"{argument} must be a paddle.nn.Layer, got {type(layer).__name__}")


class ParameterSlots:
    """Every place in a layer tree that holds a parameter, grouped by distinct tensor.

    Tied parameters (one tensor in several layers) count once. ``tensors[i]`` is the tensor now in the slots of
    ``names[i]`` (its first path, as in ``named_parameters``).

    Args:
        layer: the layer tree to index.

    Example:
        >>> slots = ParameterSlots(model)
        >>> undo = slots.write([p * 2 for p in slots.tensors])
        >>> slots.restore(undo)
    """

    def __init__(self, layer: nn.Layer) -> None:
        _check_layer(layer, "layer")
        self.names: list[str] = []
        self.tensors: list[paddle.Tensor] = []
        self._slots: list[list[tuple[dict, str]]] = []
        self._lists: list[list[tuple[list, int]]] = []
        index: dict[int, int] = {}
        for prefix, sub in layer.named_sublayers(include_self=True):
            for key, tensor in sub._parameters.items():
                if tensor is None:
                    continue
                i = index.get(id(tensor))
                if i is None:
                    i = index[id(tensor)] = len(self.tensors)
                    self.names.append(f"{prefix}.{key}" if prefix else key)
                    self.tensors.append(tensor)
                    self._slots.append([])
                    self._lists.append([])
                self._slots[i].append((sub._parameters, key))
        for _, sub in layer.named_sublayers(include_self=True):
            for value in vars(sub).values():
                if isinstance(value, list):
                    for pos, item in enumerate(value):
                        i = index.get(id(item))
                        if i is not None:
                            self._lists[i].append((value, pos))

    def __len__(self) -> int:
        return len(self.tensors)

    def named(self) -> Iterator[tuple[str, paddle.Tensor]]:
        """Yield ``(name, tensor)`` for each distinct parameter."""
        return zip(self.names, self.tensors)

    def write(self, tensors: Sequence[paddle.Tensor | None]) -> list[paddle.Tensor]:
        """Put ``tensors[i]`` into every slot of parameter ``i`` (``None`` keeps it) and return the previous ones.

        Raises:
            ValueError: if the number of tensors differs from the number of parameters.
        """
        if len(tensors) != len(self.tensors):
            raise ValueError(f"expected {len(self.tensors)} parameters, got {len(tensors)}")
        previous = list(self.tensors)
        for i, new in enumerate(tensors):
            if new is None:
                continue
            for params, key in self._slots[i]:
                params[key] = new
            for container, pos in self._lists[i]:
                container[pos] = new
            self.tensors[i] = new
        return previous

    def restore(self, previous: Sequence[paddle.Tensor]) -> None:
        """Undo `write()` with the list it returned."""
        self.write(previous)


def clone_model(layer: nn.Layer, share_stats: bool = False) -> nn.Layer:
    """Copy a layer so that its parameters are differentiable functions of the original's.

    Trainable parameters become graph-connected copies (gradients flow back to the original); tied parameters stay
    tied; frozen (``stop_gradient=True``) parameters and buffers, such as BatchNorm running statistics, are copied by
    value, so nothing the clone does changes the original. The original is never modified.

    Args:
        layer: any ``paddle.nn.Layer``.
        share_stats: share the frozen tensors and buffers (e.g. running statistics) with the original instead of
            copying them, so updates made by the clone reach the original.

    Returns:
        The clone, a new layer of the same type.

    Raises:
        TypeError: if ``layer`` is not a ``paddle.nn.Layer``.

    Example:
        >>> task_model = clone_model(model)
        >>> loss = F.mse_loss(task_model(x), y)           # gradients reach model's parameters
    """
    _check_layer(layer, "layer")
    memo: dict[int, object] = {}
    for _, sub in layer.named_sublayers(include_self=True):
        for tensor in sub._parameters.values():
            if tensor is None or id(tensor) in memo:
                continue
            if not tensor.stop_gradient:
                memo[id(tensor)] = tensor.clone()
            elif share_stats:
                memo[id(tensor)] = tensor
        if share_stats:
            for tensor in sub._buffers.values():
                if tensor is not None:
                    memo[id(tensor)] = tensor
    return copy.deepcopy(layer, memo)


def functional_call(layer: nn.Layer, params: Mapping[str, paddle.Tensor] | Sequence[paddle.Tensor], *args: Any,
                    **kwargs: Any) -> Any:
    """Run ``layer(*args, **kwargs)`` with the given parameters in place of its own, then put its own back.

    Args:
        layer: any ``paddle.nn.Layer``.
        params: a mapping from parameter names (as in ``layer.named_parameters()``) to tensors, replacing those
            named, or a sequence with one tensor per parameter in ``layer.parameters()`` order.
        *args: positional inputs of the layer.
        **kwargs: keyword inputs of the layer.

    Returns:
        Whatever the layer returns.

    Raises:
        KeyError: if a name in ``params`` is not a parameter of ``layer``.
        ValueError: if a sequence has the wrong length.

    Example:
        >>> fast = [p - 0.1 * g for p, g in zip(model.parameters(), grads)]
        >>> out = functional_call(model, fast, x)
    """
    slots = ParameterSlots(layer)
    if isinstance(params, Mapping):
        position = {name: i for i, name in enumerate(slots.names)}
        unknown = [name for name in params if name not in position]
        if unknown:
            raise KeyError(f"params names {unknown} are not parameters of {type(layer).__name__}; "
                           f"known names: {slots.names}")
        new: list[paddle.Tensor | None] = [None] * len(slots)
        for name, tensor in params.items():
            new[position[name]] = tensor
    else:
        new = list(params)
    previous = slots.write(new)
    try:
        return layer(*args, **kwargs)
    finally:
        slots.restore(previous)
