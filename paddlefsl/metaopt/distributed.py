"""Data-parallel meta-training on Paddle's collective engine (gloo on CPU, NCCL on GPU).

Each process adapts its own shard of a meta-batch's tasks; `BaseLearner.step` with ``num_tasks`` then
all-reduces the meta-gradients, weighting each process's gradient by its number of tasks, so the meta-optimizer
applies the gradient of the mean query loss over the whole meta-batch on every process (an uneven split is still
exact). Nothing here runs, and nothing changes, in a single process.

Why not ``paddle.DataParallel``: it wraps one model and all-reduces in backward hooks registered on that model's
parameters. A meta-learner's backward pass runs through task learners cloned from the meta-model (their parameters are
graph-connected copies), an inner loop that itself differentiates, and learned inner rates or per-step batch-norm
weights outside the model; ``DataParallel`` would see neither the clones nor the order in which their gradients
arrive, and it cannot weight ranks by their number of tasks. One all-reduce of the finished meta-gradients, after
``loss.backward()`` and before the meta-optimizer, is simpler and exact.

Example:
    >>> rank, world = distributed.init_parallel()
    >>> mine = tasks[shard_range(len(tasks), rank, world)]
    >>> learner.step(paddle.stack(losses).mean() if losses else None, num_tasks=len(mine))
"""
from __future__ import annotations

import itertools
import math
import os
import time
from typing import Callable, Sequence, TypeVar

import numpy as np
import paddle
import paddle.distributed as dist

__all__ = ["CollectiveError", "TIMEOUT_VARIABLE", "all_gather_floats", "all_reduce_meta_gradients",
           "all_reduce_sum", "average_statistics", "broadcast_parameters", "check_num_tasks", "collective_timeout",
           "init_parallel", "is_parallel", "rank", "world_size"]

T = TypeVar("T")

TIMEOUT_VARIABLE = "PADDLEFSL_COLLECTIVE_TIMEOUT"
_collectives = itertools.count()  # the same sequence on every process: collectives are called in the same order


class CollectiveError(RuntimeError):
    """A collective operation failed: another process did not arrive within `collective_timeout` (it hangs or
    died), or the backend failed. The other process's own error is in its log."""


def is_parallel() -> bool:
    """Whether a parallel environment with more than one process is initialised."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a parallel environment)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a parallel environment)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def init_parallel() -> tuple[int, int]:
    """Initialise Paddle's parallel environment when this process was started as one of several.

    ``paddle.distributed.launch`` and ``paddle.distributed.spawn`` set ``PADDLE_TRAINERS_NUM``; with more than one
    process this calls ``paddle.distributed.init_parallel_env()`` (once). A plain ``python script.py`` does nothing.

    Returns:
        ``(rank, world_size)``.

    Example:
        >>> rank, world = init_parallel()
        >>> (rank, world)
        (0, 1)
    """
    if not dist.is_initialized() and int(os.environ.get("PADDLE_TRAINERS_NUM", "1")) > 1:
        dist.init_parallel_env()
    return rank(), world_size()


def collective_timeout() -> float:
    """Seconds a process waits at a collective operation for the others: ``PADDLEFSL_COLLECTIVE_TIMEOUT``, default
    600.

    Raises:
        ValueError: if the variable is not a positive number.
    """
    text = os.environ.get(TIMEOUT_VARIABLE, "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{TIMEOUT_VARIABLE} must be a positive number of seconds, got {text!r}")
    return seconds


def _wait_for_all(what: str) -> None:
    """Wait, through Paddle's TCP store, until every process has reached this collective, at most
    `collective_timeout` seconds; then the collective itself runs without waiting on a slow process (gloo
    would give up after its fixed 30 s)."""
    from paddle.base import core

    store = core.create_or_get_global_tcp_store()
    key = f"paddlefsl/collective/{next(_collectives)}"
    store.add(f"{key}/rank{rank()}", 1)
    arrived = store.add(key, 1)
    timeout = collective_timeout()
    deadline = time.monotonic() + timeout
    pause = 0.001
    while arrived < world_size():
        if time.monotonic() > deadline:
            missing = [k for k in range(world_size()) if store.add(f"{key}/rank{k}", 0) == 0]
            raise CollectiveError(
                f"rank {rank()} of {world_size()}: waited {timeout:g} s at {what} for ranks {missing}, which did not "
                "arrive: they hang, died, or run a different sequence of collectives; their own error is in their log "
                f"(paddle.distributed.launch writes LOG_DIR/workerlog.N). Set {TIMEOUT_VARIABLE} (seconds) to wait "
                "longer")
        time.sleep(pause)
        pause = min(2 * pause, 0.01)
        arrived = store.add(key, 0)


def _collective(what: str, call: Callable[[], T]) -> T:
    """Wait for every process (`_wait_for_all`), run one collective, and turn a backend failure into a
    `CollectiveError` that says what to look at."""
    _wait_for_all(what)
    try:
        return call()
    except RuntimeError as error:
        raise CollectiveError(
            f"rank {rank()} of {world_size()}: {what} failed: another process died or called a different "
            "collective; its own error is in its log "
            f"(paddle.distributed.launch writes LOG_DIR/workerlog.N). Backend message: {error}") from error


def check_num_tasks(num_tasks: object) -> int | None:
    """Validate ``step``'s ``num_tasks``: an integer ``>= 0``, required (not None) when several processes run.

    Returns:
        ``num_tasks`` as an int, or None (one process, not given).

    Raises:
        TypeError: if ``num_tasks`` is not an integer.
        ValueError: if it is negative, 0 in a single process, or None when several processes run.
    """
    if num_tasks is None:
        if is_parallel():
            raise ValueError(f"step(loss, num_tasks=None) with {world_size()} processes: pass num_tasks, the number "
                             "of tasks this process adapted (its shard of the meta-batch), so the meta-gradient is "
                             "weighted exactly; loss is the mean query loss over those tasks")
        return None
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)):
        raise TypeError(f"num_tasks must be an integer >= 0, got {type(num_tasks).__name__} {num_tasks!r}")
    if num_tasks < 0 or (num_tasks == 0 and not is_parallel()):
        raise ValueError(f"num_tasks must be >= 1 in a single process (>= 0 with several), got {num_tasks}")
    return int(num_tasks)


def all_reduce_meta_gradients(parameters: Sequence[paddle.Tensor], num_tasks: int) -> int:
    """Replace each parameter's gradient by the task-weighted mean over all processes.

    Each process's gradient is the gradient of its mean loss over its ``num_tasks`` tasks; the result,
    ``sum_k num_tasks_k * grad_k / sum_k num_tasks_k``, is the gradient of the mean over the whole meta-batch, the
    same on every process. A gradient that is None on every process stays None; None on some is taken as zero.
    Two collectives: one for the task counts and which gradients exist, one per dtype for the gradients. In one
    process the gradients are left as they are.

    Args:
        parameters: the trainable parameters, in the same order on every process.
        num_tasks: this process's number of tasks (0 for an empty shard: its gradients count as zero).

    Returns:
        The total number of tasks over all processes.

    Raises:
        CollectiveError: if a collective fails.
    """
    parameters = list(parameters)
    if not is_parallel():
        return int(num_tasks)
    header = paddle.to_tensor([float(num_tasks)] + [float(p.grad is not None) for p in parameters], dtype="float64")
    _collective("all_reduce of the task counts", lambda: dist.all_reduce(header))
    counts = header.numpy()
    total = int(round(counts[0]))
    if total == 0:
        return 0
    present = [p for p, seen in zip(parameters, counts[1:]) if seen > 0]
    for dtype in sorted({str(p.dtype) for p in present}):
        group = [p for p in present if str(p.dtype) == dtype]
        with paddle.no_grad():
            flat = paddle.concat([(paddle.zeros_like(p) if p.grad is None else p.grad * float(num_tasks)).reshape([-1])
                                  for p in group])
            _collective(f"all_reduce of the {dtype} meta-gradients", lambda: dist.all_reduce(flat))
            flat = flat / float(total)
            offset = 0
            for p in group:
                size = int(np.prod(p.shape)) if len(p.shape) else 1
                p.grad = flat[offset:offset + size].reshape(p.shape)
                offset += size
    return total


def average_statistics(tensors: Sequence[paddle.Tensor], num_tasks: int) -> None:
    """Make running statistics identical on every process: a tensor that differs between processes becomes the
    task-weighted mean of the processes' values (process ``k`` weighs ``num_tasks_k``); one that is the same
    everywhere is left exactly as it is. In place.

    A learner whose task learners update the meta-model's running statistics (``batch_norm="shared"``, or ANIL's
    shared features) chains the momentum updates task after task in one process; with several processes each
    chains its own shard, and this mean combines them. It is the same on every process but not bit-equal to a
    one-process run. Training forward passes normalise with batch statistics, so the meta-gradients do not depend on
    it.

    Args:
        tensors: floating tensors, in the same order and of the same shapes on every process.
        num_tasks: this process's number of tasks.

    Raises:
        CollectiveError: if a collective fails.
    """
    tensors = [t for t in tensors if t.is_floating_point()]
    if not tensors or not is_parallel():
        return
    with paddle.no_grad():
        flat = paddle.concat([paddle.to_tensor([float(num_tasks)], dtype="float64")]
                             + [t.astype("float64").reshape([-1]) for t in tensors])
        parts: list[paddle.Tensor] = []
        _collective("all_gather of the running statistics", lambda: dist.all_gather(parts, flat))
        table = np.stack([part.numpy() for part in parts])
    weights, values = table[:, 0], table[:, 1:]
    if weights.sum() == 0:
        return
    offset = 0
    for t in tensors:
        size = int(np.prod(t.shape)) if len(t.shape) else 1
        block = values[:, offset:offset + size]
        offset += size
        if (block == block[0]).all():
            continue
        mean = (weights[:, None] * block).sum(axis=0) / weights.sum()
        t.set_value(paddle.to_tensor(mean.reshape(t.shape), dtype=t.dtype))


def broadcast_parameters(layer: paddle.nn.Layer, src: int = 0) -> None:
    """Copy every parameter and buffer of ``layer`` from process ``src`` to all processes (no-op in one process).

    Call it once after building (or loading) the learner, so every process starts from the same meta-model.

    Raises:
        CollectiveError: if a collective fails.
    """
    if not is_parallel():
        return
    tensors = [t for t in list(layer.parameters()) + list(layer.buffers()) if t is not None]
    for t in tensors:
        with paddle.no_grad():
            _collective("broadcast of the parameters", lambda: dist.broadcast(t, src=src))


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Sum a list of numbers over all processes (float64; returned as is in one process).

    Raises:
        CollectiveError: if a collective fails.
    """
    values = [float(v) for v in values]
    if not is_parallel():
        return values
    tensor = paddle.to_tensor(values, dtype="float64")
    _collective("all_reduce_sum", lambda: dist.all_reduce(tensor))
    return [float(v) for v in tensor.numpy()]


def all_gather_floats(values: Sequence[float]) -> list[float]:
    """Concatenate every process's list of numbers in rank order (lists may differ in length).

    Returns:
        The concatenation, the same on every process (``values`` itself in one process).

    Raises:
        CollectiveError: if a collective fails.
    """
    values = [float(v) for v in values]
    if not is_parallel():
        return values
    lengths = paddle.zeros([world_size()], dtype="float64")
    lengths[rank()] = float(len(values))
    _collective("all_reduce of the list lengths", lambda: dist.all_reduce(lengths))
    sizes = [int(round(n)) for n in lengths.numpy()]
    longest = max(sizes)
    if longest == 0:
        return []
    padded = paddle.to_tensor(values + [0.0] * (longest - len(values)), dtype="float64")
    parts: list[paddle.Tensor] = []
    _collective("all_gather of the values", lambda: dist.all_gather(parts, padded))
    return [float(v) for part, n in zip(parts, sizes) for v in part.numpy()[:n]]
