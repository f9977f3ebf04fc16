"""Task batching: one task learner for a batch of tasks, each with its own parameters, one kernel call per layer.

A learner cloned with ``clone(tasks=T)`` holds every adapted parameter with a leading task axis (``[T, *shape]``;
task ``t``'s copy is row ``t``). Its forward pass runs the model once for all tasks: inputs, given task-major as
``[T, N, ...]``, are laid out sample-major inside (``[N * T, ...]``, sample ``n`` of task ``t`` in row ``n * T + t``),
where a layer's ``T`` copies are one kernel call each:

* a convolution (``nn.Conv1D/2D/3D``) becomes one convolution with ``T`` times the groups;
* a batch norm (``nn.BatchNorm1D/2D/3D``) normalises ``T`` times the channels, so each task keeps its own batch
  statistics and its own running statistics;
* a linear layer becomes one batched matrix product;
* a layer norm (``nn.LayerNorm``) normalises every sample as before and applies each task's affine transform;
* an embedding (``nn.Embedding``) looks each task's ids up in its own table (one lookup in the ``T`` tables side by
  side).

Layers without parameters (activations, pooling, dropout, flatten) run unchanged, so they must treat samples
independently, as they do in every model whose samples do not interact except through batch norm. Each task's
update and meta-gradient are those of a learner cloned for that task alone (the tests check it against the loop);
on small per-task shapes the batch saves most of the per-call cost (see the speed guide).

Example:
    ```python
    import paddle
    import paddle.nn.functional as F
    from paddlefsl.metaopt import MAML

    model = paddle.nn.Sequential(paddle.nn.Linear(4, 8), paddle.nn.ReLU(), paddle.nn.Linear(8, 3))
    maml = MAML(model, inner_lr=0.1)
    xs, ys = paddle.randn([16, 5, 4]), paddle.randint(0, 3, [16, 5])   # 16 tasks of 5 samples
    task = maml.clone(tasks=16)
    task.adapt(F.cross_entropy(task(xs), ys, reduction="none").mean(axis=1))   # one loss per task: [16]
    F.cross_entropy(task(xs), ys).backward()
    ```
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import paddle
from paddle import nn

from paddlefsl.metaopt.functional import ParameterSlots

__all__ = ["BATCHED_LAYERS", "batched_forward", "check_tasks", "stack_parameters", "task_losses_total",
           "to_samples", "to_tasks"]

_CONVS = (nn.Conv1D, nn.Conv2D, nn.Conv3D)
_NORMS = (nn.layer.norm._BatchNormBase,)
BATCHED_LAYERS = _CONVS + (nn.Linear, nn.LayerNorm, nn.Embedding) + _NORMS
"""The layer types whose parameters a batched task learner holds per task (channel-first layouts, Paddle's own
``forward``)."""
_STOCK_FORWARDS = frozenset(cls.forward for cls in BATCHED_LAYERS)


def _stock(layer: nn.Layer) -> bool:
    """Whether ``layer`` computes with its class's Paddle ``forward`` (not a subclass's or an instance's own)."""
    return "forward" not in layer.__dict__ and type(layer).forward in _STOCK_FORWARDS


def check_tasks(tasks: object) -> int:
    """Return ``tasks`` as an int, or raise unless it is an integer >= 1."""
    if isinstance(tasks, bool) or not isinstance(tasks, int):
        raise TypeError(f"tasks must be a positive integer (the number of tasks in the batch), got "
                        f"{type(tasks).__name__} {tasks!r}")
    if tasks < 1:
        raise ValueError(f"tasks must be a positive integer (the number of tasks in the batch), got {tasks}")
    return tasks


def _channel_last(layer: nn.Layer) -> bool:
    return str(getattr(layer, "_data_format", "NC")).upper() in ("NHWC", "NLC", "NDHWC")


def _check_layers(layer: nn.Layer) -> None:
    """Raise a ValueError naming every sublayer a batched forward cannot run per task."""
    unsupported, channel_last, custom = [], [], []
    for name, sub in layer.named_sublayers(include_self=True):
        own = [key for key, p in sub._parameters.items() if p is not None and not p.stop_gradient]
        if isinstance(sub, nn.Embedding) and own and (sub._sparse or sub._max_norm is not None
                                                      or sub._scale_grad_by_freq):
            unsupported.append(f"{name or '(the model)'} (Embedding with sparse, max_norm or scale_grad_by_freq)")
        elif isinstance(sub, BATCHED_LAYERS):
            per_task = bool(own) or isinstance(sub, _NORMS)    # adapted parameters or batch statistics
            extra = sorted(set(own) - {"weight", "bias"})
            if per_task and not _stock(sub):
                custom.append(f"{name or '(the model)'} ({type(sub).__name__} with a forward of its own)")
            elif extra:
                custom.append(f"{name or '(the model)'} ({type(sub).__name__} with parameters {extra})")
            elif per_task and _channel_last(sub):
                channel_last.append(f"{name or type(sub).__name__} ({type(sub).__name__}, {sub._data_format})")
        elif own or isinstance(sub, nn.BatchNorm):   # the old-style batch norm: batch statistics would mix tasks
            unsupported.append(f"{name or '(the model)'} ({type(sub).__name__})")
    if unsupported:
        raise ValueError(f"clone(tasks=...): the layers {unsupported} hold trainable parameters or batch statistics, "
                         f"and a batched task learner runs them per task only in "
                         f"{[t.__name__ for t in BATCHED_LAYERS]}; clone one learner per task instead "
                         "(learner.clone())")
    if custom:
        raise ValueError(f"clone(tasks=...): the layers {'; '.join(custom)} compute otherwise than Paddle's forward "
                         "of their type (a forward defined by a subclass or on the instance, or parameters that "
                         "forward does not read, such as weight_norm's weight_g and weight_v), and a batched task "
                         "learner computes per-task parameters and batch statistics with Paddle's own forward of "
                         "each layer type, which would ignore the difference; clone one learner per task instead "
                         "(learner.clone())")
    if channel_last:
        raise ValueError(f"clone(tasks=...): the layers {channel_last} use a channel-last layout, and a batched task "
                         "learner supports channel-first layouts only (NCL, NCHW, NCDHW); clone one learner per task "
                         "instead (learner.clone())")


def stack_parameters(layer: nn.Layer, tasks: int, statistics: set[int]) -> None:
    """Give a cloned layer tree one copy of its state per task, in place (the clone is the caller's own).

    Each trainable parameter ``w`` becomes ``w`` expanded to ``[tasks, *w.shape]`` (graph-connected: the gradient of
    ``w`` is the sum over tasks); batch-norm running statistics become ``tasks`` copies side by side
    (``[tasks * C]``), which the batched batch norm reads as ``tasks * C`` channels.

    Args:
        layer: a clone (`paddlefsl.metaopt.clone_model`) whose layers are all in `BATCHED_LAYERS` or hold no
            trainable parameters.
        tasks: the number of tasks.
        statistics: the ids of ``layer``'s batch-norm running statistics (Paddle keeps them as frozen parameters).

    Raises:
        ValueError: if a layer with trainable parameters is not in `BATCHED_LAYERS`, or uses a channel-last layout.
    """
    _check_layers(layer)
    slots = ParameterSlots(layer)
    stacked = []
    for p in slots.tensors:
        if not p.stop_gradient:
            stacked.append(p.unsqueeze(0).expand([tasks, *p.shape]))
        elif id(p) in statistics:
            stacked.append(paddle.tile(p.detach(), [tasks]))
        else:
            stacked.append(None)
    slots.write(stacked)


def to_samples(value: paddle.Tensor, tasks: int, where: str) -> paddle.Tensor:
    """``[tasks, N, ...]`` (task-major) to ``[N * tasks, ...]`` (sample-major: row ``n * tasks + t``).

    Raises:
        ValueError: unless ``value`` has at least two axes and ``tasks`` rows.
    """
    if value.ndim < 2 or value.shape[0] != tasks:
        raise ValueError(f"{where} has shape {list(value.shape)}; a learner cloned for {tasks} tasks takes each input "
                         f"with the task axis first, [{tasks}, N, ...] (stack the tasks' inputs: "
                         "paddle.stack([x_1, x_2, ...]))")
    perm = [1, 0] + list(range(2, value.ndim))
    return value.transpose(perm).reshape([-1, *value.shape[2:]])


def to_tasks(value: Any, tasks: int) -> Any:
    """The inverse of `to_samples` for a model's output (a tensor, or a tuple or list of them)."""
    if isinstance(value, paddle.Tensor):
        if value.ndim < 1 or value.shape[0] % tasks:
            raise ValueError(f"the model returned shape {list(value.shape)}, whose first axis is not a multiple of "
                             f"the {tasks} tasks: a batched task learner needs a model that keeps one output row per "
                             "sample")
        out = value.reshape([-1, tasks, *value.shape[1:]])
        return out.transpose([1, 0] + list(range(2, out.ndim)))
    if isinstance(value, (tuple, list)):
        return type(value)(to_tasks(v, tasks) for v in value)
    return value


def task_losses_total(loss: object, tasks: int, where: str) -> paddle.Tensor:
    """The sum of one loss per task (each task's inner step is then the gradient of its own loss).

    Raises:
        TypeError: if ``loss`` is not a tensor.
        ValueError: unless ``loss`` has shape ``[tasks]``.
    """
    if not isinstance(loss, paddle.Tensor):
        raise TypeError(f"{where}: loss must be a paddle.Tensor, got {type(loss).__name__}")
    if list(loss.shape) != [tasks]:
        raise ValueError(f"{where}: a learner cloned for {tasks} tasks steps each task on its own loss, so loss must "
                         f"have shape [{tasks}] (one per task), got {list(loss.shape)}; reduce within each task "
                         "only, e.g. F.cross_entropy(task(x), y, reduction='none').mean(axis=1)")
    return loss.sum()


# ---------------------------------------------------------------------------------------------- batched layers
def _regrouped(x: paddle.Tensor, tasks: int) -> paddle.Tensor:
    """``[N * tasks, C, ...]`` as ``[N, tasks * C, ...]`` (a free reshape in the sample-major layout)."""
    return x.reshape([x.shape[0] // tasks, -1, *x.shape[2:]])


def _ungrouped(y: paddle.Tensor, tasks: int) -> paddle.Tensor:
    return y.reshape([y.shape[0] * tasks, -1, *y.shape[2:]])


def _side_by_side(p: paddle.Tensor, tasks: int) -> paddle.Tensor:
    """A channel vector for ``tasks * C`` channels: per-task ``[tasks, C]`` flattened, or a shared ``[C]`` repeated."""
    return p.reshape([-1]) if p.ndim == 2 else paddle.tile(p, [tasks])


@contextlib.contextmanager
def _swapped(layer: nn.Layer, params: dict[str, paddle.Tensor | None], **attrs: Any) -> Iterator[None]:
    old_params = {key: layer._parameters[key] for key in params}
    old_attrs = {key: getattr(layer, key) for key in attrs}
    try:
        layer._parameters.update(params)
        for key, value in attrs.items():
            setattr(layer, key, value)
        yield
    finally:
        layer._parameters.update(old_params)
        for key, value in old_attrs.items():
            setattr(layer, key, value)


def _conv(layer: nn.Layer, forward: Callable, tasks: int) -> Callable:
    def run(x: paddle.Tensor) -> paddle.Tensor:
        w, b = layer._parameters["weight"], layer._parameters.get("bias")
        if w.ndim == x.ndim:          # shared weight (not adapted): one ordinary convolution over all samples
            return forward(x)
        params = {"weight": w.reshape([-1, *w.shape[2:]])}
        if b is not None:
            params["bias"] = _side_by_side(b, tasks)
        with _swapped(layer, params, _groups=layer._groups * tasks):
            return _ungrouped(forward(_regrouped(x, tasks)), tasks)
    return run


def _linear(layer: nn.Linear, forward: Callable, tasks: int) -> Callable:
    def run(x: paddle.Tensor) -> paddle.Tensor:
        w, b = layer._parameters["weight"], layer._parameters.get("bias")
        if w.ndim == 2:
            return forward(x)
        n, features = x.shape[0] // tasks, x.shape[-1]
        h = x.reshape([n, tasks, -1, features]).transpose([1, 0, 2, 3]).reshape([tasks, -1, features])
        y = paddle.matmul(h, w)                                     # [tasks, n * M, out]
        if b is not None:
            y = y + (b.unsqueeze(1) if b.ndim == 2 else b)
        y = y.reshape([tasks, n, -1, y.shape[-1]]).transpose([1, 0, 2, 3])
        return y.reshape([n * tasks, *x.shape[1:-1], y.shape[-1]])
    return run


def _norm(layer: nn.Layer, forward: Callable, tasks: int, name: str) -> Callable:
    def run(x: paddle.Tensor) -> paddle.Tensor:
        mean = layer._parameters.get("_mean")
        per_task_stats = mean is not None and mean.shape[0] == tasks * x.shape[1]
        if not per_task_stats:
            if layer.training and not layer._use_global_stats:
                raise ValueError(f"batch-norm layer {name!r} is shared by the tasks of a batched task learner (ANIL's "
                                 "features) and normalises with batch statistics in train mode, which one call over "
                                 "all tasks would mix; put that layer in eval mode, or clone one learner per task")
            return forward(x)
        params = {}
        for key in ("weight", "bias"):
            p = layer._parameters.get(key)
            if p is not None:
                params[key] = _side_by_side(p, tasks)
        with _swapped(layer, params):
            return _ungrouped(forward(_regrouped(x, tasks)), tasks)
    return run


def _layer_norm(layer: nn.LayerNorm, forward: Callable, tasks: int) -> Callable:
    def run(x: paddle.Tensor) -> paddle.Tensor:
        normalized = list(layer._normalized_shape)
        w, b = layer._parameters.get("weight"), layer._parameters.get("bias")   # [prod(normalized)] or [T, ...]
        if all(p is None or p.ndim == 1 for p in (w, b)):
            return forward(x)
        with _swapped(layer, {key: None for key in ("weight", "bias") if key in layer._parameters}):
            y = forward(x)                                    # every sample normalised, no affine transform
        y = y.reshape([-1, tasks, *x.shape[1:]])              # [N, T, ..., *normalized]
        shape = [1, tasks] + [1] * (x.ndim - 1 - len(normalized)) + normalized
        if w is not None:
            y = y * w.reshape(shape if w.ndim == 2 else normalized)
        if b is not None:
            y = y + b.reshape(shape if b.ndim == 2 else normalized)
        return y.reshape(x.shape)
    return run


def _embedding(layer: nn.Embedding, forward: Callable, tasks: int) -> Callable:
    def run(x: paddle.Tensor) -> paddle.Tensor:
        w = layer._parameters["weight"]
        if w.ndim == 2:
            return forward(x)
        rows = w.shape[1]
        task_of_row = (paddle.arange(x.shape[0], dtype=x.dtype) % tasks).reshape([-1] + [1] * (x.ndim - 1))
        y = paddle.nn.functional.embedding(x + task_of_row * rows, w.reshape([-1, w.shape[-1]]))
        if layer._padding_idx is not None:                    # zero output (and so no gradient) for padding ids
            pad = layer._padding_idx if layer._padding_idx >= 0 else rows + layer._padding_idx
            y = y * (x != pad).unsqueeze(-1).astype(y.dtype)
        return y
    return run


@contextlib.contextmanager
def batched_forward(layer: nn.Layer, tasks: int) -> Iterator[None]:
    """Run ``layer``'s forward passes batched over ``tasks`` tasks while inside (restored on exit, error or not).

    Each layer of `BATCHED_LAYERS` in the tree computes with its per-task parameters (``[tasks, *shape]``, from
    `stack_parameters`) on sample-major inputs (``[N * tasks, ...]``, see `to_samples`); a convolution or linear
    layer whose weight has no task axis (shared by the tasks), and a layer with a forward of its own (which
    `stack_parameters` leaves without per-task state), runs as it is; a shared batch norm must not mix the tasks'
    batch statistics (eval mode or global statistics).

    Args:
        layer: a layer tree prepared by `stack_parameters` (or sharing unbatched layers, as ANIL's features).
        tasks: the number of tasks.
    """
    swapped = []
    try:
        for name, sub in layer.named_sublayers(include_self=True):
            if not isinstance(sub, BATCHED_LAYERS) or not (_stock(sub) or isinstance(sub, _NORMS)):
                continue          # (a batch norm of its own still gets `_norm`'s check against mixing the tasks)
            forward = sub.forward
            if isinstance(sub, _CONVS):
                run = _conv(sub, forward, tasks)
            elif isinstance(sub, nn.Linear):
                run = _linear(sub, forward, tasks)
            elif isinstance(sub, nn.LayerNorm):
                run = _layer_norm(sub, forward, tasks)
            elif isinstance(sub, nn.Embedding):
                run = _embedding(sub, forward, tasks)
            else:
                run = _norm(sub, forward, tasks, name)
            swapped.append((sub, sub.__dict__.get("forward")))
            sub.__dict__["forward"] = run
        yield
    finally:
        for sub, previous in reversed(swapped):
            if previous is None:
                sub.__dict__.pop("forward", None)
            else:
                sub.__dict__["forward"] = previous
