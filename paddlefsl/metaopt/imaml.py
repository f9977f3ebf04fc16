"""iMAML (Rajeswaran et al., 2019): meta-gradients by implicit differentiation of a proximal inner loop.

The task learner solves the proximal problem

    phi*(theta) = argmin_phi  L_train(phi) + lam / 2 * |phi - theta|^2

by ``inner_steps`` gradient steps from ``phi = theta`` (no graph kept), and the meta-gradient of a query loss
``L(phi*)`` is, by the implicit function theorem,

    dL/dtheta = (I + H / lam)^{-1} dL/dphi*,    H = Hessian of L_train at phi*,

solved by conjugate gradient on Hessian-vector products at ``phi*`` during the meta-backward. Memory does not grow
with ``inner_steps``: one Hessian-vector graph of the support loss exists at a time. The meta-gradient is exact
for the *exact* proximal solution; the inner loop's convergence and the conjugate gradient's tolerance bound its
error (a conjugate gradient that stops above ``cg_tol`` raises `paddlefsl.metaopt.errors.ConvergenceError`
with its iterations and residual; with ``cg_tol=None`` it runs ``cg_steps`` iterations and every solve is recorded
in ``learner.cg_reports``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import paddle
from paddle import nn
from paddle.autograd import PyLayer

from paddlefsl.metaopt.autodiff import audit, scope
from paddlefsl.metaopt.base import BaseLearner, check_inner_lr
from paddlefsl.metaopt.errors import ConvergenceError, SecondOrderError
from paddlefsl.metaopt.functional import ParameterSlots
from paddlefsl.metaopt.recompute import (_leaves, check_loss_function_once, _place, _set_buffers, _snapshot, _Twin,
                                         check_step_count)

__all__ = ["CGReport", "IMAML", "conjugate_gradient"]


@dataclass(frozen=True)
class CGReport:
    """One conjugate-gradient solve: ``iterations`` run, the relative ``residual`` reached, whether it met the
    tolerance (``converged``; always ``False`` without a tolerance unless the residual is exactly zero), and why it
    stopped early (``stopped``: ``""``, or a note on the non-positive curvature it met)."""

    iterations: int
    residual: float
    converged: bool
    stopped: str = ""


def conjugate_gradient(matvec: Callable[[paddle.Tensor], paddle.Tensor], b: paddle.Tensor, steps: int,
                       tol: float | None) -> tuple[paddle.Tensor, CGReport]:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` given as ``matvec`` (flat 1-D tensors).

    Args:
        matvec: ``v -> A v``.
        b: the right-hand side.
        steps: the most iterations to run.
        tol: stop when ``|b - A x| <= tol * |b|``; ``None`` runs all ``steps``.

    Returns:
        ``(x, report)``. Without ``tol``, a non-positive curvature ``p^T A p <= 0`` (``A`` not positive definite)
        stops the iterations: ``x`` is the iterate reached (``b`` itself if it meets it at the first iteration) and
        ``report.stopped`` says so.

    Raises:
        ConvergenceError: if ``tol`` is given and not reached in ``steps`` iterations, or if ``tol`` is given and
            ``A`` shows a non-positive curvature.

    Example:
        >>> A = paddle.to_tensor([[4.0, 1.0], [1.0, 3.0]], dtype="float64")
        >>> x, report = conjugate_gradient(lambda v: A @ v, paddle.to_tensor([1.0, 2.0], dtype="float64"), 2, 1e-10)
        >>> report.converged
        True
    """
    with paddle.no_grad():
        norm_b = float(paddle.linalg.norm(b).item())
        x = paddle.zeros_like(b)
        if norm_b == 0.0:
            return x, CGReport(0, 0.0, True)
        r = b.clone()
        p = r.clone()
        rs = float((r * r).sum().item())
        iterations = 0
        for iterations in range(1, steps + 1):
            ap = matvec(p)
            curvature = float((p * ap).sum().item())
            if not curvature > 0:
                note = f"non-positive curvature p^T A p = {curvature:.3g}: I + H / lam is not positive definite"
                if tol is None:
                    return (b.clone() if iterations == 1 else x), CGReport(iterations - 1, math.sqrt(rs) / norm_b,
                                                                           False, note)
                raise ConvergenceError("conjugate gradient (iMAML meta-gradient)", iterations,
                                       math.sqrt(rs) / norm_b, tol, f"{note}; raise lam")
            alpha = rs / curvature
            x = x + alpha * p
            r = r - alpha * ap
            rs_new = float((r * r).sum().item())
            if tol is not None and math.sqrt(rs_new) <= tol * norm_b:
                return x, CGReport(iterations, math.sqrt(rs_new) / norm_b, True)
            p = r + (rs_new / rs) * p
            rs = rs_new
        residual = math.sqrt(rs) / norm_b
        if tol is not None:
            raise ConvergenceError("conjugate gradient (iMAML meta-gradient)", iterations, residual, tol,
                                   "raise cg_steps or lam, or pass cg_tol=None to accept a fixed number of "
                                   "iterations (each solve is then recorded in learner.cg_reports)")
        return x, CGReport(iterations, residual, residual == 0.0)


def _flat(tensors: list[paddle.Tensor]) -> paddle.Tensor:
    return paddle.concat([t.reshape([-1]) for t in tensors])


def _split(flat: paddle.Tensor, like: list[paddle.Tensor]) -> list[paddle.Tensor]:
    out, start = [], 0
    for t in like:
        n = int(t.size)
        out.append(flat[start:start + n].reshape(t.shape))
        start += n
    return out


class _Solve:
    """What the implicit node's backward needs (never the task learner itself, so no reference cycle)."""

    def __init__(self, twin: _Twin, closure: Callable, solution: list[paddle.Tensor], rng: list[Any],
                 buffers: list[paddle.Tensor], root: "IMAML") -> None:
        self.twin = twin
        self.closure = closure
        self.solution = solution
        self.rng = rng
        self.buffers = buffers
        self.root = root

    def backward(self, grads: list[paddle.Tensor]) -> list[paddle.Tensor]:
        root = self.root
        if root.first_order:
            return grads
        twin = self.twin
        with scope.exact_ops(), paddle.enable_grad():
            leaves = _leaves(self.solution)
            rng = paddle.get_rng_state()
            current = _snapshot(twin.buffers)
            undo = twin.model_slots.write(_place(len(twin.model_slots), twin.adapted, leaves))
            try:
                paddle.set_rng_state(self.rng)
                _set_buffers(twin.buffers, self.buffers)
                loss = self.closure(twin.learner)
                inner = scope.grad(loss, leaves, create_graph=True)
                pairs = [(g, leaf) for g, leaf in zip(inner, leaves) if g is not None and not g.stop_gradient]

                def matvec(v: paddle.Tensor) -> paddle.Tensor:
                    vs = _split(v, leaves)
                    hv = [paddle.zeros_like(leaf) for leaf in leaves]
                    if pairs:
                        position = {id(leaf): i for i, leaf in enumerate(leaves)}
                        found = paddle.grad([g for g, _ in pairs], leaves,
                                            grad_outputs=[vs[position[id(leaf)]] for _, leaf in pairs],
                                            retain_graph=True, allow_unused=True)
                        hv = [h if f is None else f for h, f in zip(hv, found)]
                    with paddle.no_grad():
                        return v + _flat(hv).detach() / root.lam

                b = _flat([g.detach() for g in grads])
                try:
                    x, report = conjugate_gradient(matvec, b, root.cg_steps, root.cg_tol)
                finally:
                    if pairs:
                        # Release the Hessian graph with a last traversal by paddle.autograd.backward: after
                        # paddle.grad inside a PyLayer's backward Paddle 3.3.1 kept it alive (memory grew with every
                        # task), and paddle.autograd.backward with retain_graph=True there crashed.
                        paddle.autograd.backward([g for g, _ in pairs], [paddle.zeros_like(g) for g, _ in pairs])
            except ConvergenceError as error:
                root._cg_error = error
                raise
            finally:
                twin.model_slots.restore(undo)
                paddle.set_rng_state(rng)
                _set_buffers(twin.buffers, current)
        root.cg_reports.append(report)
        return _split(x, leaves)


@audit.first_order_pylayer("imaml (implicit meta-gradient)", "is the implicit meta-gradient node: its backward "
                           "solves a linear system and cannot be differentiated again")
class _Implicit(PyLayer):
    @staticmethod
    def forward(ctx, solve: _Solve, *theta: paddle.Tensor):
        ctx.solve = solve
        return tuple(t.clone() for t in solve.solution)

    @staticmethod
    def backward(ctx, *grads: paddle.Tensor):
        if paddle.is_grad_enabled():
            scope._raise(SecondOrderError(
                "imaml (implicit meta-gradient)", scope.OUTSIDE,
                "is the implicit meta-gradient node: its backward solves a linear system and cannot be "
                "differentiated again"))
        return tuple(ctx.solve.backward(list(grads)))


class IMAML(BaseLearner):
    """Implicit MAML: a proximal inner loop and a meta-gradient by conjugate gradient (Rajeswaran et al., 2019).

    ``task.adapt(loss_fn)`` runs the whole inner loop at once: ``inner_steps`` gradient steps on
    ``loss_fn(task) + lam / 2 * |phi - theta|^2`` from ``phi = theta``, keeping no graph, so memory is the same for
    any ``inner_steps``. The meta-backward (``learner.step(query_loss)``) solves ``(I + H / lam) x = dL/dphi`` by
    conjugate gradient with Hessian-vector products of ``loss_fn`` at the adapted weights. The support loss is
    evaluated there once more, with the random state and batch-norm statistics it had at the end of the inner loop
    (dropout draws the masks that the last inner step's successor would have drawn; running statistics are restored,
    so they are updated by the inner loop only).

    Args:
        model: the meta-model, any ``paddle.nn.Layer``.
        inner_lr: the inner-loop step size, a positive finite number.
        lam: the proximal regularization strength ``lam > 0`` (the paper's lambda).
        inner_steps: gradient steps on the proximal objective, a positive integer.
        cg_steps: the most conjugate-gradient iterations per meta-gradient, a positive integer.
        cg_tol: the relative residual the conjugate gradient must reach, or ``None`` to run exactly ``cg_steps``
            iterations (each solve is then recorded in ``cg_reports``, never raised).
        first_order: use ``dL/dphi*`` as the meta-gradient (no linear solve).
        allow_unused: see `paddlefsl.metaopt.BaseLearner`.
        allow_nograd: see `paddlefsl.metaopt.BaseLearner`.
        meta_optimizer: see `paddlefsl.metaopt.BaseLearner`.
        batch_norm: see `paddlefsl.metaopt.BaseLearner`.

    Attributes:
        cg_reports: a `CGReport` per solve since the last `step`.

    Raises:
        TypeError, ValueError: for bad arguments (the message names the argument).

    Example:
        >>> imaml = IMAML(model, inner_lr=0.1, lam=1.0, inner_steps=10,
        ...               meta_optimizer=paddle.optimizer.Adam(1e-3, parameters=model.parameters()))
        >>> task = imaml.clone()
        >>> task.adapt(lambda learner: F.cross_entropy(learner(x_support), y_support))
        >>> imaml.step(F.cross_entropy(task(x_query), y_query))
    """

    def __init__(self, model: nn.Layer, inner_lr: float, lam: float, inner_steps: int, *, cg_steps: int = 10,
                 cg_tol: float | None = 1e-4, first_order: bool = False, allow_unused: bool | None = None,
                 allow_nograd: bool = False, meta_optimizer: paddle.optimizer.Optimizer | None = None,
                 batch_norm: str = "batch") -> None:
        try:
            lam = check_inner_lr(lam)
        except (TypeError, ValueError):
            raise ValueError(f"lam must be a positive finite number (the proximal strength), got {lam!r}") from None
        inner_steps = check_step_count(inner_steps, "inner_steps", inner_steps if isinstance(inner_steps, int)
                                       else None)
        cg_steps = check_step_count(cg_steps, "cg_steps", cg_steps if isinstance(cg_steps, int) else None)
        if cg_tol is not None:
            if isinstance(cg_tol, bool) or not isinstance(cg_tol, (int, float)) or not 0 < cg_tol < 1:
                raise ValueError(f"cg_tol must be a relative residual in (0, 1) or None, got {cg_tol!r}")
            cg_tol = float(cg_tol)
        super().__init__(model, first_order=first_order, allow_unused=allow_unused, allow_nograd=allow_nograd,
                         meta_optimizer=meta_optimizer, batch_norm=batch_norm)
        self.inner_lr = check_inner_lr(inner_lr)
        self.lam = lam
        self.inner_steps = inner_steps
        self.cg_steps = cg_steps
        self.cg_tol = cg_tol
        self.cg_reports: list[CGReport] = []
        self._cg_error: ConvergenceError | None = None

    def clone(self) -> "IMAML":
        """Return a task learner whose model starts at (and is graph-connected to) this learner's weights."""
        task = self._spawn(model=self._clone_layer(self.model))
        task._adapted = False
        return task

    def adapt(self, loss: Callable[["IMAML"], paddle.Tensor], steps: int | None = None) -> None:
        """Solve the proximal inner problem for this task learner (all ``inner_steps`` at once).

        Args:
            loss: the support loss as a function of the learner it is given,
                ``lambda learner: F.cross_entropy(learner(x), y)`` (it is evaluated again in the meta-backward).
            steps: the number of inner steps for this task learner instead of ``inner_steps`` (e.g. at test time).

        Raises:
            RuntimeError: if called on the meta-learner, or twice on one task learner.
            TypeError: if ``loss`` is not callable.
            ValueError, FloatingPointError: as ``MAML.adapt`` (the message gives the inner step).
        """
        self._require_task("adapt")
        if isinstance(loss, paddle.Tensor) or not callable(loss):
            raise TypeError("IMAML.adapt takes the support loss as a function of the learner, "
                            "task.adapt(lambda learner: F.cross_entropy(learner(x), y)), because the "
                            f"meta-backward evaluates it again; got {type(loss).__name__}")
        if self._adapted:
            raise RuntimeError("adapt() already solved this task learner's inner problem; clone again for a new task")
        steps = self.inner_steps if steps is None else check_step_count(steps, "steps", steps if isinstance(
            steps, int) else None)
        slots = ParameterSlots(self.model)
        positions = [i for i, p in enumerate(slots.tensors) if not p.stop_gradient]
        names = [slots.names[i] for i in positions]
        theta_graph = [slots.tensors[i] for i in positions]
        twin = _Twin(self)
        theta = [t.detach() for t in theta_graph]
        phi = list(theta)
        with paddle.enable_grad():
            for step in range(steps):
                leaves = _leaves(phi)
                undo = twin.model_slots.write(_place(len(twin.model_slots), twin.adapted, leaves))
                try:
                    value = loss(twin.learner)
                    if isinstance(value, paddle.Tensor) and not value.stop_gradient:
                        check_loss_function_once(self._meta, value, leaves, step)
                    self._adapt_steps = step
                    grads = self._gradients(value, names, leaves, True, self.allow_unused)
                finally:
                    twin.model_slots.restore(undo)
                with paddle.no_grad():
                    phi = [p - self.inner_lr * ((0 if g is None else g.detach()) + self.lam * (p - t))
                           for p, g, t in zip(phi, grads, theta)]
        self._adapt_steps = steps
        root = self._meta
        solve = _Solve(twin, loss, phi, paddle.get_rng_state(), _snapshot(twin.buffers), root)
        outputs = _Implicit.apply(solve, *theta_graph)
        outputs = [outputs] if isinstance(outputs, paddle.Tensor) else list(outputs)
        slots.write(_place(len(slots), positions, outputs))
        self._adapted = True

    def step(self, loss: paddle.Tensor | None, num_tasks: int | None = None) -> None:
        """Meta update as `BaseLearner.step` (``num_tasks`` as there); ``cg_reports`` then holds this step's solves.

        Raises:
            ConvergenceError: if a conjugate gradient did not reach ``cg_tol`` (iterations and residual given).
        """
        self.cg_reports = []
        self._cg_error = None
        try:
            super().step(loss, num_tasks)
        except Exception:
            error, self._cg_error = self._cg_error, None
            if error is not None:
                raise error from None
            raise
