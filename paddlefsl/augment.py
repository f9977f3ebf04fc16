"""Seeded image augmentation for meta-training episodes.

Example:
    >>> shift = RandomShift(max_shift=2, seed=0)
    >>> xs, ys, xq, yq = make_task(dataset.images, dataset.labels, sampler.sample())
    >>> xs, xq = shift(xs), shift(xq)
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

__all__ = ["RandomShift"]


class RandomShift:
    """Translate each image by a random whole number of pixels, filling the uncovered border with zeros.

    Every image gets its own offsets ``(dy, dx)``, drawn uniformly from ``-max_shift..max_shift``. The stream is
    seeded, and its state can be saved with `get_state()` and restored with `set_state()`, so a resumed
    run draws the same offsets as an uninterrupted one.

    Args:
        max_shift: The largest offset in pixels along each axis, an integer ``>= 0`` (0 returns the images as
            they are).
        seed: Seed of the random stream (None: fresh OS entropy, not reproducible).

    Raises:
        TypeError: If ``max_shift`` is not an integer.
        ValueError: If ``max_shift`` is negative.
    """

    def __init__(self, max_shift: int, seed: Optional[int] = None) -> None:
        if isinstance(max_shift, bool) or not isinstance(max_shift, (int, np.integer)):
            raise TypeError(f"max_shift must be an integer, got {type(max_shift).__name__} {max_shift!r}")
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.max_shift = int(max_shift)
        self._rng = np.random.default_rng(seed)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Return shifted copies of ``images``, an array ``[N, ..., H, W]`` (``images`` is left unchanged).

        Raises:
            ValueError: If ``images`` is not an array with at least 3 dimensions, or an image is not larger
                than ``max_shift`` along each axis.
        """
        if not isinstance(images, np.ndarray) or images.ndim < 3:
            raise ValueError(f"images must be a numpy array [N, ..., H, W], got "
                             f"{getattr(images, 'shape', type(images).__name__)}")
        height, width = images.shape[-2:]
        if self.max_shift >= min(height, width):
            raise ValueError(f"max_shift={self.max_shift} must be smaller than the image size {height}x{width}")
        offsets = self._offsets(len(images))
        out = np.zeros_like(images)
        for image, target, (dy, dx) in zip(images, out, offsets):
            target[..., max(dy, 0):height + min(dy, 0), max(dx, 0):width + min(dx, 0)] = \
                image[..., max(-dy, 0):height + min(-dy, 0), max(-dx, 0):width + min(-dx, 0)]
        return out

    def skip(self, count: int) -> None:
        """Advance the stream exactly as a call on ``count`` images would, without images.

        A process that meta-trains on a shard of each meta-batch skips the other processes' images, so every
        process's stream stays where a single process's would be.

        Raises:
            ValueError: If ``count`` is negative.
        """
        if int(count) < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._offsets(int(count))

    def _offsets(self, count: int) -> np.ndarray:
        return self._rng.integers(-self.max_shift, self.max_shift + 1, size=(count, 2))

    def get_state(self) -> Dict[str, Any]:
        """Return the state of the random stream (picklable)."""
        return self._rng.bit_generator.state

    def set_state(self, state: Dict[str, Any]) -> None:
        """Restore a state returned by `get_state()`."""
        self._rng.bit_generator.state = state
