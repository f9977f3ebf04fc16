"""Atomic checkpoints that make a resumed run bit-identical to an uninterrupted one.

A checkpoint is one pickle file holding numpy copies of the model's and optimizer's state, the
step, the RNG states (Python ``random``, numpy's global generator, Paddle's generators) and any
picklable ``extra`` data (e.g. an `EpisodeSampler` state).

Model keys are those of the plain model: a wrapper exposing the wrapped model as ``.model`` (as
``paddlefsl.metaopt`` learners do) or ``.module`` is unwrapped, so the checkpoint loads into the bare
model. The wrapper's own full state (e.g. Meta-SGD learning rates) is stored as well and restored
when loading into a wrapper of the same structure. Optimizer
accumulators are stored by parameter *position* rather than by Paddle's auto-generated parameter
names, so they load into an optimizer over a freshly built model whose names differ.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from typing import Any, Dict, List, Optional

import numpy as np
import paddle

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state"]

_FORMAT = "paddlefsl-checkpoint-1"
_PARAM_TAG = "@param{}@"


_WRAPPED_ATTRS = ("model", "module")


def _plain_model(model: paddle.nn.Layer) -> paddle.nn.Layer:
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = next((getattr(model, a) for a in _WRAPPED_ATTRS
                      if isinstance(getattr(model, a, None), paddle.nn.Layer)), None)
        if inner is None:
            break
        model = inner
    return model


def _to_numpy(value: Any) -> Any:
    if isinstance(value, paddle.Tensor):
        return value.numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_numpy(v) for v in value)
    return value


def _optimizer_params(optimizer: paddle.optimizer.Optimizer) -> List[paddle.Tensor]:
    params = optimizer._parameter_list or []
    if params and isinstance(params[0], dict):  # parameter groups
        return [p for group in params for p in group["params"]]
    return list(params)


def _rename_keys(state: Dict[str, Any], names: List[str], to_positions: bool) -> Dict[str, Any]:
    """Swap parameter names for position tags in accumulator keys (or back)."""
    if to_positions:
        prefixes = sorted(((n, _PARAM_TAG.format(i)) for i, n in enumerate(names)), key=lambda t: -len(t[0]))
    else:
        prefixes = sorted(((_PARAM_TAG.format(i), n) for i, n in enumerate(names)), key=lambda t: -len(t[0]))
    out = {}
    for key, value in state.items():
        new_key = key
        for old, new in prefixes:
            if key.startswith(old + "_") or key == old:
                new_key = new + key[len(old):]
                break
        if isinstance(value, dict) and key == "master_weights":
            value = _rename_keys(value, names, to_positions)
        out[new_key] = value
    return out


def capture_rng_state() -> Dict[str, Any]:
    """Return the Python, numpy (global) and Paddle RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "paddle": paddle.get_rng_state()}


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Restore RNG states captured by `capture_rng_state()` (missing entries are skipped)."""
    if state.get("python") is not None:
        random.setstate(state["python"])
    if state.get("numpy") is not None:
        np.random.set_state(state["numpy"])
    if state.get("paddle") is not None:
        paddle.set_rng_state(state["paddle"])


def save_checkpoint(path: str, model: paddle.nn.Layer, optimizer: Optional[paddle.optimizer.Optimizer] = None,
                    step: int = 0, rng_state: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> str:
    """Write a checkpoint atomically (temp file in the same folder, then rename).

    Args:
        path: Destination file; parent folders are created.
        model: The model, or a wrapper whose ``.model`` / ``.module`` is the model.
        optimizer: Optional optimizer whose state (and LR scheduler state) is saved.
        step: Training step to store.
        rng_state: RNG states to store; None captures the current ones (`capture_rng_state()`).
        extra: Any picklable additional data.

    Returns:
        The path written.
    """
    path = os.fspath(path)
    payload = {
        "format": _FORMAT,
        "step": int(step),
        "model": _to_numpy(dict(_plain_model(model).state_dict())),
        "wrapper": None if _plain_model(model) is model else _to_numpy(dict(model.state_dict())),
        "optimizer": None,
        "rng_state": capture_rng_state() if rng_state is None else rng_state,
        "extra": extra,
    }
    if optimizer is not None:
        names = [p.name for p in _optimizer_params(optimizer)]
        payload["optimizer"] = _rename_keys(_to_numpy(dict(optimizer.state_dict())), names, to_positions=True)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".ckpt", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def load_checkpoint(path: str, model: Optional[paddle.nn.Layer] = None,
                    optimizer: Optional[paddle.optimizer.Optimizer] = None,
                    restore_rng: bool = True) -> Dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint()`.

    Args:
        path: Checkpoint file.
        model: If given, receives the state. A wrapper whose keys match the stored wrapper state gets
            that full state; otherwise the plain model (unwrapped as on save) gets the plain model
            state, and every key must match.
        optimizer: If given, receives the optimizer state (mapped onto its parameters by position).
        restore_rng: Restore the Python, numpy and Paddle RNG states stored in the checkpoint.

    Returns:
        The checkpoint dict: ``step``, ``model``, ``wrapper``, ``optimizer``, ``rng_state``, ``extra``.

    Raises:
        ValueError: If the file is not a paddlefsl checkpoint or the model keys do not match.
    """
    with open(os.fspath(path), "rb") as f:
        payload = pickle.load(f)
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a paddlefsl checkpoint")
    wrapper_state = payload.get("wrapper")
    if model is not None and wrapper_state is not None and _plain_model(model) is not model \
            and set(model.state_dict().keys()) == set(wrapper_state.keys()):
        model.set_state_dict(wrapper_state)
    elif model is not None:
        plain = _plain_model(model)
        expected, stored = set(plain.state_dict().keys()), set(payload["model"].keys())
        if expected != stored:
            raise ValueError(f"checkpoint model keys differ: missing {sorted(expected - stored)}, "
                             f"unexpected {sorted(stored - expected)}")
        plain.set_state_dict(payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        names = [p.name for p in _optimizer_params(optimizer)]
        state = _rename_keys(payload["optimizer"], names, to_positions=False)
        optimizer.set_state_dict({k: (paddle.to_tensor(v) if isinstance(v, np.ndarray) else v)
                                  for k, v in state.items()})
    if restore_rng and payload.get("rng_state") is not None:
        restore_rng_state(payload["rng_state"])
    return payload
