"""Recompute across inner steps: exact meta-gradients whose memory does not grow with the number of inner steps.

Back-propagating through ``K`` inner steps normally keeps ``K`` copies of every activation of the support loss
(and of its gradient graph), because the meta-backward needs all of them. With ``MAML(..., recompute=r)`` an inner
step keeps none of them. Each step runs once without building a second-order graph (its values only) and the task
model's weights become the outputs of one autograd node, a *segment*, whose inputs are the weights at the last kept
boundary (every ``r`` steps) and the learner's other meta-learned tensors (learned inner rates, per-step batch-norm
weights). When the meta-backward reaches the segment, it replays the steps from the kept boundary with
``create_graph=True``, exactly as the stored inner loop would have run them, and back-propagates the incoming
gradient through them (a vector-Jacobian product). So the meta-gradient is the stored one, second-order terms
included, and at most ``r`` steps' graphs exist at a time.

What makes a replay identical to the original steps:

* The support loss is given as a function of the learner (``task.adapt(lambda learner: loss_of(learner))``), so it
  can be run again. It is run on a twin of the task learner (its own copy of the layer structure, sharing the task
  learner's running statistics), so the autograd graph never holds a reference back to the task learner.
* Paddle's random generator state is saved before each step and restored for its replay (same dropout masks); the
  state after the replay is put back, so the random stream of the program is unchanged.
* Batch-norm running statistics (and every other buffer) are saved before each step, set back for its replay and
  restored afterwards, so they are updated once, by the original step, as in the stored loop.

Order: the segment's backward is exact for the meta-gradient (first derivative of the meta-loss, second order in
the inner loss). Differentiating the meta-gradient again (``paddle.grad(..., create_graph=True)`` through a
segment) raises `paddlefsl.metaopt.SecondOrderError` instead of returning a wrong value.

``innerloop_ctx(model, opt, inner_steps=K, recompute=r)`` does the same for the ``higher``-style loop
(`recomputed_loop_step`): a segment's inputs are the fast weights, the optimizer's state tensors and the override
tensors at the boundary, and it replays ``diffopt.step``'s update (the optimizer twin, clipping, callbacks) from a
loss function given a functional model.

Time: every second-order step runs twice forward (once for its values, once in the replay), plus the replay's
vector-Jacobian product, which is the backward the stored loop does anyway.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

import paddle
from paddle import nn
from paddlefsl.metaopt.autodiff import audit, scope
from paddlefsl.metaopt.autodiff.released import GuardedPyLayer
from paddlefsl.metaopt.errors import SecondOrderError
from paddlefsl.metaopt.functional import ParameterSlots

if TYPE_CHECKING:
    from paddlefsl.metaopt.maml import MAML

__all__ = ["LoopProgram", "check_loop_state", "check_step_count", "recomputed_loop_step", "recomputed_step"]

Closure = Callable[[Any], paddle.Tensor]


_NEEDS_INNER_STEPS = {
    "learner": "(the number of adapt calls per task learner); build the learner with inner_steps=K",
    "innerloop_ctx": "(the number of diffopt.step calls per inner loop); open the loop with "
                     "innerloop_ctx(..., inner_steps=K)",
}


def check_step_count(value: object, argument: str, inner_steps: int | None, owner: str = "learner") -> int:
    """Return ``value`` if it is a positive integer no larger than ``inner_steps``, else raise a clear error.

    Args:
        value: the option's value.
        argument: the option's name, for the message.
        inner_steps: the number of inner steps the learner runs; ``None`` (unknown) is an error.
        owner: ``"learner"`` or ``"innerloop_ctx"``: what the message tells the user to give ``inner_steps`` to.

    Returns:
        ``value``.

    Raises:
        TypeError: if ``value`` is not an integer.
        ValueError: if it is not positive, or larger than ``inner_steps``, or ``inner_steps`` is ``None``.

    Example:
        >>> check_step_count(2, "recompute", inner_steps=5)
        2
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be a positive integer (a number of inner steps), got "
                        f"{type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{argument} must be a positive integer (a number of inner steps), got {value}")
    if inner_steps is None:
        raise ValueError(f"{argument}={value} needs inner_steps {_NEEDS_INNER_STEPS[owner]}")
    if value > inner_steps:
        raise ValueError(f"{argument}={value} is larger than inner_steps={inner_steps}; give at most "
                         f"{inner_steps}")
    return value


@dataclass(frozen=True)
class _Record:
    """One inner step as it ran: what to replay and the state it ran in."""

    closure: Closure
    index: int
    first_order: bool
    rng: list[Any]
    buffers: list[paddle.Tensor]


class _Twin:
    """A structural copy of a task learner that shares its tensors but never holds the segment outputs."""

    def __init__(self, task: "MAML") -> None:
        learner = type(task).__new__(type(task))
        nn.Layer.__init__(learner)
        for name, value in vars(task).items():
            if not name.startswith("_") and not isinstance(value, nn.Layer) and name != "meta_optimizer":
                setattr(learner, name, value)
        learner.meta_optimizer = None
        learner._meta = task._meta
        learner._lease = None
        learner._graph_tokens = task._graph_tokens[:-1] + (object(),)  # the replay builds a graph of its own
        learner._adapt_steps = 0
        learner._clones_since_step = 0
        learner._iteration = 0
        learner._step_index = getattr(task, "_step_index", 0)
        learner._tasks = task._tasks
        for name, layer in _own_layers(task):
            memo: dict[int, object] = {}
            for sub in layer.sublayers(include_self=True):
                for tensor in list(sub._parameters.values()) + list(sub._buffers.values()):
                    if tensor is not None:
                        memo[id(tensor)] = tensor
            setattr(learner, name, copy.deepcopy(layer, memo))
        self.learner = learner
        self.model_slots = ParameterSlots(learner.model)
        self.adapted = [i for i, p in enumerate(self.model_slots.tensors) if not p.stop_gradient]
        self.context_slots = [ParameterSlots(layer) for name, layer in _own_layers(learner) if name != "model"]
        self.context = [[i for i, p in enumerate(s.tensors) if not p.stop_gradient] for s in self.context_slots]
        self.buffers = [t for _, layer in _own_layers(learner) for sub in layer.sublayers(include_self=True)
                        for t in _stat_tensors(sub)]

    def read_context(self) -> list[paddle.Tensor]:
        return [s.tensors[i] for s, idx in zip(self.context_slots, self.context) for i in idx]

    def read_adapted(self) -> list[paddle.Tensor]:
        return [self.model_slots.tensors[i] for i in self.adapted]

    def run(self, adapted: list[paddle.Tensor], context: list[paddle.Tensor], record: _Record,
            create_graph: bool, allowed: list[paddle.Tensor] | None = None) -> list[paddle.Tensor]:
        """One inner step of the twin from ``adapted`` weights with ``context`` tensors; returns the new weights."""
        learner = self.learner
        undo_model = self.model_slots.write(_place(len(self.model_slots), self.adapted, adapted))
        undo_context = []
        it = iter(context)
        for slots, idx in zip(self.context_slots, self.context):
            undo_context.append(slots.write(_place(len(slots), idx, [next(it) for _ in idx])))
        index, steps = learner._step_index, learner._adapt_steps
        learner._step_index = record.index
        try:
            loss = record.closure(learner)
            if allowed is not None and isinstance(loss, paddle.Tensor) and not loss.stop_gradient:
                check_loss_function_once(learner._meta, loss, allowed, record.index)
            learner._gradient_step(learner.model, loss, learner._rates(), not create_graph)
            return [ParameterSlots(learner.model).tensors[i] for i in self.adapted]
        finally:
            learner._step_index, learner._adapt_steps = index, steps
            for slots, undo in zip(self.context_slots, undo_context):
                slots.restore(undo)
            self.model_slots.restore(undo_model)


def _own_layers(learner: nn.Layer) -> list[tuple[str, nn.Layer]]:
    """The learner's own sublayers (model, learned rates, per-step batch-norm sets), not its meta-learner."""
    return [(name, layer) for name, layer in learner.named_children() if not name.startswith("_")]


def _stat_tensors(layer: nn.Layer) -> list[paddle.Tensor]:
    """The tensors of ``layer`` (not its sublayers) that forward passes may update in place: buffers, and the
    running statistics Paddle keeps as frozen parameters of batch-norm layers."""
    out = [t for t in layer._buffers.values() if t is not None and t._is_initialized()]
    if isinstance(layer, (nn.layer.norm._BatchNormBase, nn.BatchNorm)):
        out += [layer._parameters[k] for k in ("_mean", "_variance") if layer._parameters.get(k) is not None]
    return out


def _place(count: int, positions: list[int], tensors: list[paddle.Tensor]) -> list[paddle.Tensor | None]:
    full: list[paddle.Tensor | None] = [None] * count
    for i, t in zip(positions, tensors):
        full[i] = t
    return full


def _leaves(tensors: list[paddle.Tensor]) -> list[paddle.Tensor]:
    out = []
    for t in tensors:
        leaf = t.detach()
        leaf.stop_gradient = False
        out.append(leaf)
    return out


def check_loss_function_once(root: nn.Layer, loss: paddle.Tensor, allowed: list[paddle.Tensor], index: int) -> None:
    """Run `_check_leaves` on the first replayable step of a meta-learner only.

    Walking Paddle's grad nodes from Python (``grad_fn`` / ``next_functions``) keeps the walked graph alive for the
    life of the process (seen in Paddle 3.3.1: about one support step's activations per walk), so the walk is done
    once per meta-learner, on its first step, where a loss function that reads the wrong tensors shows at once.
    """
    if getattr(root, "_loss_function_checked", False):
        return
    _check_leaves(loss, allowed, index)
    root._loss_function_checked = True


def _reads_foreign_leaf(roots: list[paddle.Tensor], allowed: list[paddle.Tensor]) -> bool:
    """True if ``roots`` depend on a tensor that needs gradients other than ``allowed`` (a graph walk: call it once
    per model, since in Paddle 3.3 a walked graph stays alive)."""
    known = {t.grad_fn.node_ptr() for t in allowed}
    seen: set[int] = set()
    stack = [r.grad_fn for r in roots if isinstance(r, paddle.Tensor) and not r.stop_gradient]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        ptr = node.node_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        if node.name() == "GradNodeAccumulation" and ptr not in known:
            return True
        stack.extend(n[0] if isinstance(n, tuple) else n for n in node.next_functions)
    return False


def _check_leaves(loss: paddle.Tensor, allowed: list[paddle.Tensor], index: int) -> None:
    """Raise if ``loss`` depends on a tensor that needs gradients other than ``allowed`` (the step's inputs):
    its meta-gradient through the recomputed steps would be missing."""
    if _reads_foreign_leaf([loss], allowed):
        raise ValueError(
            f"adapt step {index + 1}: the loss function uses a tensor that needs gradients and is not a "
            "parameter of the learner it is given; the loss must be computed from that learner only "
            "(task.adapt(lambda learner: loss_fn(learner(x), y))), not from the task learner or other tensors "
            "captured by the function, or their meta-gradient through the replayed steps would be missing")


def _set_buffers(tensors: list[paddle.Tensor], values: list[paddle.Tensor]) -> None:
    with paddle.no_grad():
        for t, v in zip(tensors, values):
            t.set_value(v)


def _snapshot(tensors: list[paddle.Tensor]) -> list[paddle.Tensor]:
    with paddle.no_grad():
        return [t.detach().clone() for t in tensors]


class _Replay:
    """What a segment's backward needs: the twin and the records of the steps from the kept boundary."""

    def __init__(self, twin: _Twin, records: tuple[_Record, ...], n_adapted: int) -> None:
        self.twin = twin
        self.records = records
        self.n_adapted = n_adapted
        self.values: list[paddle.Tensor] | None = None

    def describe(self) -> tuple[str, str]:
        """What the segment's `SecondOrderError` calls it, and what to do instead."""
        first, last = self.records[0].index + 1, self.records[-1].index + 1
        return (f"recompute (inner steps {first}..{last})",
                "is a recomputed segment of the inner loop: its meta-gradient is exact, but it cannot be "
                "differentiated again (a third derivative of the inner loss); build the learner without recompute "
                "for higher orders")

    def vjp(self, inputs: list[paddle.Tensor], grads: list[paddle.Tensor | None]) -> list[paddle.Tensor | None]:
        twin = self.twin
        # A graph token of this replay's own: the previous segment's replay graph, back-propagated just before and
        # still alive inside the meta-backward, is no part of this one, and the twin's check for released nodes
        # (before each second-order step) must not count it.
        twin.learner._graph_tokens = twin.learner._graph_tokens[:-1] + (object(),)
        with scope.exact_ops(), paddle.enable_grad():
            leaves = _leaves(inputs)
            adapted, context = leaves[:self.n_adapted], leaves[self.n_adapted:]
            rng = paddle.get_rng_state()
            current = _snapshot(twin.buffers)
            try:
                for record in self.records:
                    paddle.set_rng_state(record.rng)
                    _set_buffers(twin.buffers, record.buffers)
                    adapted = twin.run(adapted, context, record, create_graph=not record.first_order)
            finally:
                paddle.set_rng_state(rng)
                _set_buffers(twin.buffers, current)
            pairs = [(out, g) for out, g in zip(adapted, grads) if g is not None and not out.stop_gradient]
            if not pairs:
                return [None] * len(inputs)
            return _grad([o for o, _ in pairs], leaves, [g for _, g in pairs])


def _grad(outputs: list[paddle.Tensor], inputs: list[paddle.Tensor],
          grad_outputs: list[paddle.Tensor]) -> list[paddle.Tensor | None]:
    """The vector-Jacobian product ``grad_outputs . d outputs / d inputs`` for fresh leaf ``inputs``, re-raising a
    `SecondOrderError` met inside Paddle's backward as itself.

    It runs ``paddle.autograd.backward`` and reads the leaves' ``.grad``: ``paddle.grad`` called inside a PyLayer's
    backward kept the replayed step's graph alive (Paddle 3.3.1; about one support step's activations per segment on
    W2 shapes, so memory grew with the number of steps again).
    """
    scope.take_error()
    try:
        paddle.autograd.backward(outputs, grad_outputs)
        return [leaf.grad for leaf in inputs]
    except SecondOrderError:
        raise
    except Exception:
        error = scope.take_error()
        if error is not None:
            raise error from None
        raise


@audit.first_order_pylayer("recompute", "is a recomputed segment of the inner loop (MAML(recompute=...) or "
                           "innerloop_ctx(recompute=...)): its meta-gradient is exact, but it cannot be differentiated "
                           "again (a third derivative of the inner loss); build the learner or open the loop without "
                           "recompute for higher orders")
class _Segment(GuardedPyLayer):
    """The node whose backward replays a segment. Guarded: Paddle frees a PyLayer node's context when backward()
    runs it, and a second backward through it (two losses sharing the inner loop, back-propagated one after the
    other) crashed the process; it raises `GraphReleasedError` instead, as the op layer's nodes do."""

    @staticmethod
    def forward(ctx, replay: _Replay, *tensors: paddle.Tensor):
        ctx.replay = replay
        ctx.save_for_backward(*tensors)
        values, replay.values = replay.values, None
        return tuple(v.clone() for v in values)

    @staticmethod
    def backward(ctx, *grads: paddle.Tensor):
        replay: _Replay | _LoopReplay = ctx.replay
        if paddle.is_grad_enabled():
            label, advice = replay.describe()
            scope._raise(SecondOrderError(label, scope.OUTSIDE, advice))
        inputs = list(ctx.saved_tensor())
        found = replay.vjp(inputs, list(grads))
        return tuple(found)


class _Open:
    """The segment a task learner is extending: its kept boundary, the steps since, and its last outputs."""

    def __init__(self, twin: _Twin, start: list[paddle.Tensor], context: list[paddle.Tensor]) -> None:
        self.twin = twin
        self.start = start
        self.context = context
        self.records: tuple[_Record, ...] = ()
        self.values = [t.detach() for t in start]
        self.outputs: list[int] = []


def recomputed_step(task: "MAML", closure: Closure, first_order: bool, interval: int) -> None:
    """One second-order inner step of ``task`` that keeps no activations (see the module docstring).

    The task model's trainable weights are replaced by the outputs of a segment node whose backward replays the
    steps since the last kept boundary. A new boundary is kept every ``interval`` steps.

    Args:
        task: a MAML task learner.
        closure: the support loss as a function of a learner, e.g. ``lambda l: F.cross_entropy(l(x), y)``.
        first_order: take this step first order (its replay builds no second-order graph).
        interval: steps per segment (``recompute``).

    Raises:
        ValueError: if ``closure`` uses tensors that need gradients other than the learner's it is given, and every
            error of a plain adapt step (the message gives the step).
    """
    slots = ParameterSlots(task.model)
    adapted_now = [p for p in slots.tensors if not p.stop_gradient]
    state: _Open | None = getattr(task, "_recompute_open", None)
    fresh = state is None or len(state.records) >= interval \
        or [id(p) for p in adapted_now] != state.outputs
    if fresh:
        twin = state.twin if state is not None else _Twin(task)
        twin.learner._step_index = task._step_index
        context_now = [s.tensors[i] for s, idx in zip(
            [ParameterSlots(layer) for name, layer in _own_layers(task) if name != "model"], twin.context)
            for i in idx]
        state = _Open(twin, adapted_now, context_now)
    twin = state.twin
    record = _Record(closure, task._step_index, bool(first_order), paddle.get_rng_state(),
                     _snapshot(twin.buffers))
    with paddle.enable_grad():
        adapted = _leaves(state.values)
        context = _leaves(state.context)
        new = twin.run(adapted, context, record, create_graph=False, allowed=adapted + context)
    state.values = [t.detach() for t in new]
    state.records = state.records + (record,)
    replay = _Replay(twin, state.records, len(state.start))
    replay.values = state.values
    outputs = _Segment.apply(replay, *state.start, *state.context)
    if isinstance(outputs, paddle.Tensor):
        outputs = [outputs]
    outputs = list(outputs)
    slots.write(_place(len(slots), [i for i, p in enumerate(slots.tensors) if not p.stop_gradient], outputs))
    state.outputs = [id(p) for p in outputs]
    task._recompute_open = state
    task._adapt_steps += 1


# ------------------------------------------------------------------------------------ innerloop_ctx(recompute=r)
State = list  # one dict per fast weight, as `paddlefsl.metaopt.optim.OptimizerTwin.init` returns
_PLAIN = (int, float, bool, str, type(None))


class LoopProgram(Protocol):
    """What a recomputed step of `paddlefsl.metaopt.innerloop_ctx` replays: one optimizer step from a loss function.

    It must hold nothing that holds the fast-weight history (the functional model or the differentiable optimizer):
    the autograd graph keeps it, and a reference back to the history would be a cycle through Paddle's C++ graph
    that Python's collector cannot free.
    """

    module: nn.Layer
    twin_name: str

    def run(self, closure: Closure, params: list[paddle.Tensor], state: State, hyper: list[dict[str, Any]],
            create_graph: bool, grad_callback: Callable | None, step: int
            ) -> tuple[list[paddle.Tensor], State, paddle.Tensor]:
        """Run ``closure`` on a functional model of ``params`` and take the step: ``(params, state, loss)``."""


def check_loop_state(state: object, twin_name: str) -> None:
    """Raise unless an optimizer state can be carried through a recomputed segment.

    A segment's inputs and outputs are tensors, so the state must be one dict per fast weight whose values are
    tensors (floating ones are carried and differentiated; others are replayed as they were) or plain numbers,
    strings and ``None``. The built-in twins' states are; a registered twin's may not be.

    Args:
        state: the state from the twin's ``init`` or ``update``.
        twin_name: the optimizer's name, for the message.

    Raises:
        TypeError: if ``state`` is not a list of such dicts.

    Example:
        >>> check_loop_state([{"velocity": paddle.zeros([3])}], "Momentum")
    """
    advice = ("innerloop_ctx(recompute=...) carries the optimizer state through recomputed segments as a flat list "
              "of tensors, so it needs one dict per parameter of tensors and numbers (the built-in twins' states "
              f"are). Open the loop without recompute for {twin_name}, or register a twin with such a state")
    if not isinstance(state, (list, tuple)) or not all(isinstance(s, dict) for s in state):
        raise TypeError(f"the {twin_name} twin's state is a {type(state).__name__}, not a list of dicts; {advice}")
    for i, one in enumerate(state):
        for key, value in one.items():
            if not isinstance(value, (paddle.Tensor,) + _PLAIN):
                raise TypeError(f"the {twin_name} twin's state of parameter {i} holds {key!r} of type "
                                f"{type(value).__name__}; {advice}")


def _is_slot(value: object) -> bool:
    """A state value carried (and differentiated) through a segment: a floating-point tensor."""
    return isinstance(value, paddle.Tensor) and paddle.is_floating_point(value)


def _state_slots(state: State) -> list[paddle.Tensor]:
    return [v for one in state for v in one.values() if _is_slot(v)]


def _fill_state(state: State, slots: list[paddle.Tensor]) -> State:
    """``state`` with its floating-point tensors replaced, in order, by ``slots``."""
    it = iter(slots)
    return [{k: (next(it) if _is_slot(v) else v) for k, v in one.items()} for one in state]


def _substitute(hyper: list[dict[str, Any]], mapping: dict[int, paddle.Tensor]) -> list[dict[str, Any]]:
    """``hyper`` with each override tensor replaced by its stand-in in ``mapping`` (keyed by ``id``)."""
    return [{k: (mapping.get(id(v), v) if isinstance(v, paddle.Tensor) else v) for k, v in h.items()}
            for h in hyper]


@dataclass(frozen=True)
class _LoopRecord:
    """One ``diffopt.step`` as it ran: what to replay and the state it ran in."""

    closure: Closure
    grad_callback: Callable | None
    index: int
    rng: list[Any]
    buffers: list[paddle.Tensor]
    hyper: list[dict[str, Any]]


class _Boundary:
    """A kept boundary of ``innerloop_ctx``: the fast weights, optimizer-state tensors and override tensors there
    (``start``, in that order), the state's layout, the steps since, and the values after the last of them."""

    def __init__(self, program: LoopProgram, params: list[paddle.Tensor], state: State,
                 context: list[paddle.Tensor]) -> None:
        slots = _state_slots(state)
        self.start = list(params) + slots + list(context)
        self.needs = [not t.stop_gradient for t in self.start]
        self.template = _fill_state(state, [t.detach() for t in slots])  # the layout; the graph is not kept
        self.n_params, self.n_slots = len(params), len(slots)
        self.context_ids = [id(t) for t in context]
        self.buffers = [t for sub in program.module.sublayers(include_self=True) for t in _stat_tensors(sub)]
        self.records: tuple[_LoopRecord, ...] = ()
        self.params = [t.detach() for t in params]
        self.state = _fill_state(state, [t.detach() for t in slots])
        self.output_ids: list[int] = []


class _LoopReplay:
    """What a segment of ``innerloop_ctx`` needs in the meta-backward: the step rule, the boundary, the records."""

    def __init__(self, program: LoopProgram, boundary: _Boundary) -> None:
        self.program = program
        self.records = boundary.records
        self.start = [t.detach() if not need else None for t, need in zip(boundary.start, boundary.needs)]
        self.needs = boundary.needs
        self.template = boundary.template
        self.n_params, self.n_slots = boundary.n_params, boundary.n_slots
        self.context_ids = boundary.context_ids
        self.buffers = boundary.buffers
        self.values: list[paddle.Tensor] | None = None

    def describe(self) -> tuple[str, str]:
        first, last = self.records[0].index + 1, self.records[-1].index + 1
        return (f"innerloop_ctx recompute (inner steps {first}..{last})",
                "is a recomputed segment of the inner loop: its meta-gradient is exact, but it cannot be "
                "differentiated again (a third derivative of the inner loss); open innerloop_ctx without recompute "
                "for higher orders")

    def vjp(self, inputs: list[paddle.Tensor], grads: list[paddle.Tensor | None]) -> list[paddle.Tensor | None]:
        with scope.exact_ops(), paddle.enable_grad():
            leaves = _leaves(inputs)
            it = iter(leaves)
            full = [next(it) if need else const for const, need in zip(self.start, self.needs)]
            n, m = self.n_params, self.n_slots
            params, state = full[:n], _fill_state(self.template, full[n:n + m])
            mapping = dict(zip(self.context_ids, full[n + m:]))
            rng = paddle.get_rng_state()
            current = _snapshot(self.buffers)
            try:
                for record in self.records:
                    paddle.set_rng_state(record.rng)
                    _set_buffers(self.buffers, record.buffers)
                    params, state, _ = self.program.run(record.closure, params, state,
                                                        _substitute(record.hyper, mapping), True,
                                                        record.grad_callback, record.index + 1)
            finally:
                paddle.set_rng_state(rng)
                _set_buffers(self.buffers, current)
            outputs = list(params) + _state_slots(state)
            position = {id(leaf): i for i, leaf in enumerate(leaves)}
            direct: list[paddle.Tensor | None] = [None] * len(leaves)
            merged: dict[int, list] = {}
            for out, g in zip(outputs, grads):
                if g is None:
                    continue
                if id(out) in position:  # an output that is its input (a weight the loss does not reach)
                    i = position[id(out)]
                    direct[i] = g if direct[i] is None else direct[i] + g
                elif not out.stop_gradient:
                    if id(out) in merged:
                        merged[id(out)][1] = merged[id(out)][1] + g
                    else:
                        merged[id(out)] = [out, g]
            found = _grad([o for o, _ in merged.values()], leaves, [g for _, g in merged.values()]) \
                if merged else [None] * len(leaves)
            return [d if f is None else (f if d is None else f + d) for f, d in zip(found, direct)]


_walked: "weakref.WeakSet[nn.Layer]" = weakref.WeakSet()


def _check_loop_leaves(roots: list[paddle.Tensor], allowed: list[paddle.Tensor], step: int) -> None:
    """Raise if ``roots`` (the loss and the new weights and state of a step's value run) depend on a tensor that
    needs gradients other than ``allowed`` (the step's inputs)."""
    if _reads_foreign_leaf(roots, allowed):
        raise ValueError(
            f"diffopt.step (step {step}): the loss function or grad_callback uses a tensor that needs gradients "
            "and is not a fast weight of the functional model the function is given, nor an override of "
            "innerloop_ctx; with recompute, compute the loss from that model only "
            "(diffopt.step(lambda fmodel: loss_fn(fmodel(x), y))), not from the outer fmodel or other tensors "
            "captured by the function, or their meta-gradient through the replayed steps would be missing")


def recomputed_loop_step(program: LoopProgram, boundary: _Boundary | None, closure: Closure,
                         grad_callback: Callable | None, params: list[paddle.Tensor], state: State,
                         hyper: list[dict[str, Any]], context: list[paddle.Tensor], interval: int, index: int
                         ) -> tuple[list[paddle.Tensor], State, _Boundary]:
    """One second-order step of `paddlefsl.metaopt.innerloop_ctx` that keeps no activations.

    The step runs once for its values (no second-order graph). The new fast weights and optimizer-state tensors
    are the outputs of a segment node whose inputs are those at the last kept boundary (one every ``interval``
    steps) and the override tensors; its backward replays the steps since the boundary with ``create_graph=True``.

    Args:
        program: the step rule (see `LoopProgram`).
        boundary: the open boundary returned by the previous call, or ``None`` for the first.
        closure: the support loss as a function of a functional model.
        grad_callback: ``diffopt.step``'s gradient callback, or ``None``.
        params: the current fast weights.
        state: the current optimizer state.
        hyper: this step's hyper-parameters, one dict per fast weight.
        context: the override tensors that need gradients (segment inputs, substituted in ``hyper``).
        interval: steps per segment (``recompute``).
        index: the step's index, from 0.

    Returns:
        ``(new_params, new_state, boundary)``; pass ``boundary`` to the next call.

    Raises:
        ValueError: if ``closure`` or ``grad_callback`` reads tensors that need gradients other than the step's
            inputs (checked on a module's first recomputed step), and every error of a plain step.
        TypeError: if the optimizer state cannot be carried through a segment (`check_loop_state`).
    """
    if boundary is None or len(boundary.records) >= interval or [id(p) for p in params] != boundary.output_ids:
        boundary = _Boundary(program, params, state, context)
    record = _LoopRecord(closure, grad_callback, index, paddle.get_rng_state(), _snapshot(boundary.buffers),
                         list(hyper))
    with paddle.enable_grad():
        leaf_params = _leaves(boundary.params)
        leaf_slots = _leaves(_state_slots(boundary.state))
        leaf_context = _leaves(context)
        mapping = dict(zip(boundary.context_ids, leaf_context))
        new_params, new_state, loss = program.run(closure, leaf_params, _fill_state(boundary.state, leaf_slots),
                                                  _substitute(hyper, mapping), False, grad_callback, index + 1)
        check_loop_state(new_state, program.twin_name)
        if program.module not in _walked:
            # once per module: walking grad nodes from Python keeps the walked graph alive (see
            # check_loss_function_once)
            _check_loop_leaves([loss] + list(new_params) + _state_slots(new_state),
                               leaf_params + leaf_slots + leaf_context, index + 1)
            _walked.add(program.module)
    new_slots = [t.detach() for t in _state_slots(new_state)]
    boundary.params = [t.detach() for t in new_params]
    boundary.state = _fill_state(new_state, new_slots)
    boundary.records = boundary.records + (record,)
    values = boundary.params + new_slots
    if not any(boundary.needs):  # nothing before the segment needs a gradient: the values are the result
        outputs = [v.clone() for v in values]
    else:
        replay = _LoopReplay(program, boundary)
        replay.values = values
        outputs = _Segment.apply(replay, *[t for t, need in zip(boundary.start, boundary.needs) if need])
        outputs = [outputs] if isinstance(outputs, paddle.Tensor) else list(outputs)
    n = len(new_params)
    out_params = outputs[:n]
    boundary.output_ids = [id(p) for p in out_params]
    return out_params, _fill_state(new_state, outputs[n:]), boundary
