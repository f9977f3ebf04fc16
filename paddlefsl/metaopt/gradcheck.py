"""check_meta_gradients: compare a learner's meta-gradient with central finite differences."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import paddle

from paddlefsl.metaopt.base import BaseLearner

__all__ = ["GradCheckReport", "check_meta_gradients"]


@dataclass
class GradCheckReport:
    """The outcome of `check_meta_gradients()`.

    Attributes:
        errors: for each parameter name, the worst error over the checked coordinates (relative, with an absolute
            floor; see `check_meta_gradients()`).
        checked: for each parameter name, how many coordinates were checked.
        rtol: the tolerance `ok` uses.
    """

    errors: dict[str, float] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)
    rtol: float = 1e-6

    @property
    def max_error(self) -> float:
        """The worst relative error over all parameters."""
        return max(self.errors.values(), default=0.0)

    @property
    def ok(self) -> bool:
        """True if every checked coordinate agrees with finite differences within ``rtol``."""
        return self.max_error <= self.rtol

    def __str__(self) -> str:
        rows = [f"{name}: worst relative error {err:.2e} over {self.checked[name]} coordinates"
                for name, err in self.errors.items()]
        verdict = "OK" if self.ok else "MISMATCH"
        return "\n".join(rows + [f"{verdict} (max {self.max_error:.2e}, rtol {self.rtol:.0e})"])


def check_meta_gradients(learner_factory: Callable[[], BaseLearner],
                         loss_fn: Callable[[BaseLearner, Any], paddle.Tensor], data: Any, *,
                         coordinates: int | None = 6, eps: float = 1e-6, rtol: float = 1e-6,
                         atol: float = 1e-9, seed: int = 0) -> GradCheckReport:
    """Check a learner's meta-gradient against central finite differences, in float64.

    ``loss_fn(learner, data)`` must build the meta-loss deterministically (clone, adapt, query loss), with
    the model in float64. The meta-gradient from ``loss.backward()`` is compared, on sampled coordinates of each
    trainable parameter, with ``(loss(w + eps) - loss(w - eps)) / (2 eps)``. The error of a coordinate is
    ``|analytic - numeric| / max(|analytic|, |numeric|, atol / rtol)``: a relative error, measured absolutely (against
    ``atol``) for gradients too small for finite differences to resolve relatively.

    Args:
        learner_factory: returns a fresh learner; called once.
        loss_fn: maps ``(learner, data)`` to the scalar meta-loss.
        data: passed to ``loss_fn`` unchanged.
        coordinates: how many coordinates to sample per parameter (``None``: all of them).
        eps: the finite-difference step.
        rtol: the tolerance the report's ``ok`` uses.
        atol: the absolute tolerance for near-zero gradients.
        seed: the seed for sampling coordinates.

    Returns:
        A `GradCheckReport` with the worst relative error per parameter.

    Raises:
        TypeError: if the factory does not return a BaseLearner, or the model is not float64.

    Example:
        >>> report = check_meta_gradients(lambda: MAML(make_model(), 0.1), query_loss_after_adapt, batch)
        >>> assert report.ok, str(report)
    """
    learner = learner_factory()
    if not isinstance(learner, BaseLearner):
        raise TypeError(f"learner_factory must return a BaseLearner, got {type(learner).__name__}")
    named = [(n, p) for n, p in learner.named_parameters() if not p.stop_gradient]
    for name, p in named:
        if p.dtype != paddle.float64:
            raise TypeError(f"check_meta_gradients needs a float64 model; parameter {name} is {p.dtype}")
    for _, p in named:
        p.clear_gradient()
    loss_fn(learner, data).backward()
    analytic = {n: (np.zeros(p.shape) if p.grad is None else p.grad.numpy().copy()) for n, p in named}
    for _, p in named:
        p.clear_gradient()

    rng = np.random.default_rng(seed)
    report = GradCheckReport(rtol=rtol)
    for name, p in named:
        base = p.numpy().copy()
        flat = base.reshape(-1)
        count = flat.size if coordinates is None else min(coordinates, flat.size)
        picks = rng.choice(flat.size, size=count, replace=False)
        numeric = np.empty(count)
        try:
            for k, index in enumerate(picks):
                values = []
                for sign in (1.0, -1.0):
                    shifted = flat.copy()
                    shifted[index] += sign * eps
                    paddle.assign(shifted.reshape(base.shape), output=p)
                    values.append(float(loss_fn(learner, data).item()))
                numeric[k] = (values[0] - values[1]) / (2 * eps)
        finally:
            paddle.assign(base, output=p)
        got = analytic[name].reshape(-1)[picks]
        floor = atol / rtol
        denom = np.maximum(np.maximum(np.abs(got), np.abs(numeric)), floor)
        report.errors[name] = float((np.abs(got - numeric) / denom).max())
        report.checked[name] = count
    return report
