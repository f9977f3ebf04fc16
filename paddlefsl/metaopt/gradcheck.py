"""check_meta_gradients: compare a learner's meta-gradient with central finite differences at several step sizes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import paddle

from paddlefsl.metaopt.base import BaseLearner

__all__ = ["GradCheckReport", "check_meta_gradients"]

_ROUNDING = 8 * np.finfo(np.float64).eps


@dataclass
class GradCheckReport:
    """The outcome of `check_meta_gradients()`.

    Attributes:
        errors: for each parameter name, the worst error over its verified and wrong coordinates (relative, with a
            floor tied to the gradient's scale; see `check_meta_gradients()`).
        checked: for each parameter name, how many coordinates were checked.
        wrong: for each parameter name, how many coordinates missed every stable finite-difference estimate.
        kinks: for each parameter name, how many coordinates sit at a kink (ReLU at 0, a max-pool tie): the one-sided
            slopes disagree at every step size, and the meta-gradient lies between them. They are neither verified nor
            counted wrong.
        worst: for each parameter name with a wrong coordinate, ``(flat index, analytic, numeric)`` of the worst.
        rtol: the tolerance ``ok`` uses.
    """

    errors: dict[str, float] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)
    wrong: dict[str, int] = field(default_factory=dict)
    kinks: dict[str, int] = field(default_factory=dict)
    worst: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    rtol: float = 1e-6

    @property
    def max_error(self) -> float:
        """The worst relative error over all parameters (kinks excluded)."""
        return max(self.errors.values(), default=0.0)

    @property
    def unverified(self) -> list[str]:
        """Parameters whose every checked coordinate sat at a kink (check more coordinates)."""
        return [n for n, count in self.checked.items() if count and self.kinks.get(n, 0) == count]

    @property
    def ok(self) -> bool:
        """True if no coordinate is wrong and every parameter has at least one verified coordinate."""
        return not any(self.wrong.values()) and not self.unverified

    def __str__(self) -> str:
        rows = []
        for name, err in self.errors.items():
            row = f"{name}: worst relative error {err:.2e} over {self.checked[name]} coordinates"
            if self.kinks.get(name):
                row += f", {self.kinks[name]} at kinks (not compared)"
            if self.wrong.get(name):
                index, got, numeric = self.worst[name]
                row += (f", {self.wrong[name]} WRONG (worst: flat index {index}, meta-gradient {got:.6e}, "
                        f"finite differences {numeric:.6e})")
            rows.append(row)
        if any(self.wrong.values()):
            verdict = "MISMATCH"
        elif self.unverified:
            verdict = f"UNVERIFIED ({', '.join(self.unverified)}: every checked coordinate sits at a kink)"
        else:
            verdict = "OK"
        return "\n".join(rows + [f"{verdict} (max {self.max_error:.2e}, rtol {self.rtol:.0e})"])


def check_meta_gradients(learner_factory: Callable[[], BaseLearner],
                         loss_fn: Callable[[BaseLearner, Any], paddle.Tensor], data: Any, *,
                         coordinates: int | None = 6, eps: float | Sequence[float] = (1e-4, 1e-5),
                         rtol: float = 1e-6, atol: float = 1e-9, scale_floor: float = 1e-4, seed: int = 0,
                         progress: bool = False) -> GradCheckReport:
    """Check a learner's meta-gradient against central finite differences at several step sizes, in float64.

    ``loss_fn(learner, data)`` must build the meta-loss deterministically (clone, adapt, query loss), with the model
    in float64. The meta-gradient from ``loss.backward()`` is compared, on sampled coordinates of each trainable
    parameter, with central differences ``(f(w + h) - f(w - h)) / 2h`` for every step ``h`` in ``eps``:

    * an estimate is *stable* when it agrees with the estimate of a neighbouring step size (finite differences have
      converged there); with a single step size every estimate counts as stable;
    * a coordinate is *verified* when the meta-gradient agrees with one stable estimate, and *wrong* only when it
      misses every stable estimate;
    * a coordinate sits at a *kink* (a ReLU input or a max-pool tie at the point, where the loss has no derivative)
      when the one-sided slopes ``(f(w + h) - f(w)) / h`` and ``(f(w) - f(w - h)) / h`` still disagree at the smallest
      step and their gap does not shrink with ``h``; it is reported, and counted wrong only if the meta-gradient lies
      outside the two slopes.

    Two values agree when ``|a - b| <= rtol * max(|a|, |b|, floor) + noise``: ``floor`` is
    ``max(atol / rtol, scale_floor * G)`` with ``G`` the largest meta-gradient entry (so near-zero entries, such as the
    bias of a convolution followed by batch norm, whose true gradient is 0, are judged on the gradient's scale), and
    ``noise`` the rounding error of the difference quotient (``8 eps64 |f| / h``).

    Cost: ``2 * len(eps)`` meta-loss evaluations per coordinate (4 by default; one more where no stable estimate
    agrees, to look for a kink). ``coordinates=None`` checks every coordinate: on a small CNN (a few hundred weights)
    with one inner step, minutes on a CPU; pass ``progress=True`` for a progress bar.

    Args:
        learner_factory: returns a fresh learner; called once.
        loss_fn: maps ``(learner, data)`` to the scalar meta-loss.
        data: passed to ``loss_fn`` unchanged.
        coordinates: how many coordinates to sample per parameter (``None``: all of them).
        eps: the finite-difference step sizes (a sequence, largest first, or one number).
        rtol: the relative tolerance.
        atol: the absolute tolerance for near-zero gradients.
        scale_floor: near-zero entries are compared relative to ``scale_floor`` times the largest meta-gradient entry.
        seed: the seed for sampling coordinates.
        progress: show a progress bar over the coordinates.

    Returns:
        A `GradCheckReport`: ``ok``, and per parameter the worst error, wrong coordinates and kinks.

    Raises:
        TypeError: if the factory does not return a BaseLearner, or the model is not float64.
        ValueError: for a step size that is not positive.

    Example:
        ```python
        report = check_meta_gradients(lambda: MAML(make_model(), 0.1), query_loss_after_adapt, batch)
        assert report.ok, str(report)
        ```
    """
    steps = sorted([float(eps)] if np.isscalar(eps) else [float(h) for h in eps], reverse=True)
    if not steps or any(not h > 0 for h in steps):
        raise ValueError(f"eps must be positive step sizes, got {eps!r}")
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
    scale = max((float(np.abs(g).max()) for g in analytic.values() if g.size), default=0.0)
    floor = max(atol / rtol, scale_floor * scale)

    rng = np.random.default_rng(seed)
    picks = {}
    for name, p in named:
        size = int(np.prod(p.shape)) if p.shape else 1
        count = size if coordinates is None else min(coordinates, size)
        picks[name] = rng.choice(size, size=count, replace=False)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(v) for v in picks.values()), desc="check_meta_gradients", unit="coordinate")

    def loss_at(p: paddle.Tensor, flat: np.ndarray, shape: list[int]) -> float:
        paddle.assign(flat.reshape(shape), output=p)
        return float(loss_fn(learner, data).item())

    report = GradCheckReport(rtol=rtol)
    try:
        for name, p in named:
            base = p.numpy().copy()
            flat = base.reshape(-1)
            shape = list(base.shape)
            worst, worst_wrong, wrong, kinks = 0.0, 0.0, 0, 0
            try:
                for index in picks[name]:
                    got = float(analytic[name].reshape(-1)[index])
                    values = []
                    for h in steps:
                        shifted = flat.copy()
                        shifted[index] += h
                        fp = loss_at(p, shifted, shape)
                        shifted[index] = flat[index] - h
                        values.append((h, fp, loss_at(p, shifted, shape)))
                    verdict, error, numeric = _judge(got, values, lambda: loss_at(p, flat, shape), rtol, floor)
                    if bar is not None:
                        bar.update(1)
                    if verdict == "kink":
                        kinks += 1
                        continue
                    worst = max(worst, error)
                    if verdict == "wrong":
                        wrong += 1
                        if error >= worst_wrong:
                            worst_wrong = error
                            report.worst[name] = (int(index), got, numeric)
            finally:
                paddle.assign(base, output=p)
            report.errors[name] = worst
            report.checked[name] = len(picks[name])
            report.wrong[name] = wrong
            report.kinks[name] = kinks
    finally:
        if bar is not None:
            bar.close()
    return report


def _relative(a: float, b: float, floor: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), floor)


def _agree(a: float, b: float, noise: float, floor: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), floor) + noise


def _judge(got: float, values: list[tuple[float, float, float]], at_point: Callable[[], float], rtol: float,
           floor: float) -> tuple[str, float, float]:
    """``("ok" | "wrong" | "kink", relative error, the closest numeric estimate)`` for one coordinate.

    ``values`` holds ``(h, f(w + h), f(w - h))`` per step size, largest step first; ``at_point()`` evaluates
    ``f(w)``, needed only to look for a kink (when no stable estimate agrees).
    """
    central = [(fp - fm) / (2 * h) for h, fp, fm in values]
    noise = [_ROUNDING * max(abs(fp), abs(fm)) / h for h, fp, fm in values]
    if len(values) == 1:
        stable = [0]
    else:
        stable = sorted({k for i in range(len(values) - 1)
                         if _agree(central[i], central[i + 1], max(noise[i], noise[i + 1]), floor, rtol)
                         for k in (i, i + 1)})
    closest = min((_relative(got, central[k], floor), central[k]) for k in (stable or range(len(central))))
    if any(_agree(got, central[k], noise[k], floor, rtol) for k in stable):
        return "ok", min(_relative(got, central[k], floor) for k in stable
                         if _agree(got, central[k], noise[k], floor, rtol)), closest[1]
    # No stable estimate agrees: a kink at the point shows as one-sided slopes that disagree at the smallest step by
    # a gap that does not shrink with the step (a smooth function's gap shrinks in proportion to the step).
    f0 = at_point()
    slopes = [((fp - f0) / h, (f0 - fm) / h) for h, fp, fm in values]
    forward, backward = slopes[-1]
    last_noise = max(noise[-1], _ROUNDING * abs(f0) / values[-1][0])
    gap = abs(forward - backward)
    smooth_gap = abs(slopes[-2][0] - slopes[-2][1]) * 0.3 if len(values) > 1 else 0.0
    if not _agree(forward, backward, last_noise, floor, rtol) and gap >= smooth_gap:
        low, high = min(forward, backward), max(forward, backward)
        if low - rtol * max(abs(low), abs(high), floor) - last_noise <= got <= \
                high + rtol * max(abs(low), abs(high), floor) + last_noise:
            return "kink", 0.0, (forward + backward) / 2
    if not stable:
        # Finite differences never settle and show no kink at the smallest step (a kink between the step sizes):
        # the smallest step is the one the kink did not reach.
        verdict = "ok" if _agree(got, central[-1], noise[-1], floor, rtol) else "kink"
        return verdict, _relative(got, central[-1], floor), central[-1]
    return "wrong", closest[0], closest[1]
