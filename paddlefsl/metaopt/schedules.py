"""Annealing schedules of MAML++ (Antoniou et al., 2019, "How to train your MAML").

* `multi_step_loss_weights()`: the importance weights of the multi-step loss (MSL), one per inner step.
* Derivative-order annealing is the ``first_order_until`` option of `MAML`.
* Cosine annealing of the meta learning rate is Paddle's own scheduler, passed to the meta-optimizer::

      schedule = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate=1e-3, T_max=total_meta_steps, eta_min=1e-5)
      learner.meta_optimizer = paddle.optimizer.Adam(schedule, parameters=learner.parameters())
      for iteration in range(total_meta_steps):
          ...
          learner.step(meta_loss)     # uses schedule.get_lr()
          schedule.step()             # advance the schedule once per meta-step (Paddle's convention)
"""
from __future__ import annotations

import math

__all__ = ["multi_step_loss_weights"]


def _number(value: object, argument: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{argument} must be a finite number, got {type(value).__name__} {value!r}")
    if (positive and value <= 0) or value < 0:
        expected = "> 0" if positive else ">= 0"
        raise ValueError(f"{argument} must be {expected}, got {value!r}")
    return float(value)


def multi_step_loss_weights(inner_steps: int, epoch: float, anneal_epochs: float,
                            min_fraction: float = 0.03) -> list[float]:
    """Importance weights of the query losses after each inner step, annealed as in MAML++ (MSL).

    At ``epoch = 0`` every step weighs ``1 / S``. Each epoch, every non-final weight decreases by
    ``1 / (S * anneal_epochs)`` down to ``min_fraction / S``, and the final weight grows by ``(S - 1)`` times that
    amount up to ``1 - (S - 1) * min_fraction / S``; the weights always sum to 1. Both bounds are reached at
    ``epoch = (1 - min_fraction) * anneal_epochs`` and held afterwards. (The paper then trains on the final loss
    alone; pass ``[0.0] * (S - 1) + [1.0]`` yourself for that.)

    Args:
        inner_steps: ``S``, the number of inner steps (adapt calls) per task, a positive integer.
        epoch: the current epoch (fractions allowed), ``>= 0``.
        anneal_epochs: the length of the annealing, ``> 0``.
        min_fraction: the floor of the non-final weights, as a fraction of ``1 / S`` (the paper's 0.03), in [0, 1].

    Returns:
        ``S`` floats: the weight of the query loss after inner step ``1, ..., S``.

    Raises:
        TypeError: if an argument is not a number (``inner_steps`` not an integer).
        ValueError: if an argument is out of range.

    Example:
        >>> weights = multi_step_loss_weights(inner_steps, epoch, anneal_epochs=15)
        >>> task = learner.clone()
        >>> query_losses = []
        >>> for k in range(inner_steps):
        ...     task.adapt(F.cross_entropy(task(x_support), y_support))
        ...     query_losses.append(F.cross_entropy(task(x_query), y_query))   # query loss after step k + 1
        >>> learner.step(sum(w * q for w, q in zip(weights, query_losses)))
    """
    if isinstance(inner_steps, bool) or not isinstance(inner_steps, int):
        raise TypeError(f"inner_steps must be a positive integer, got {type(inner_steps).__name__} {inner_steps!r}")
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be a positive integer, got {inner_steps}")
    epoch = _number(epoch, "epoch", positive=False)
    anneal_epochs = _number(anneal_epochs, "anneal_epochs", positive=True)
    min_fraction = _number(min_fraction, "min_fraction", positive=False)
    if min_fraction > 1:
        raise ValueError(f"min_fraction must be in [0, 1], got {min_fraction!r}")
    steps = inner_steps
    if steps == 1:
        return [1.0]
    decay = epoch / (steps * anneal_epochs)
    floor = min_fraction / steps
    early = max(1.0 / steps - decay, floor)
    final = min(1.0 / steps + (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return [early] * (steps - 1) + [final]
