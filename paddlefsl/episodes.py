"""N-way K-shot episode sampling, task assembly and confidence intervals.

Example:
    >>> sampler = EpisodeSampler(dataset.labels, ways=5, shots=1, queries=15, seed=0, num_tasks=100)
    >>> for task in sampler:
    ...     xs, ys, xq, yq = make_task(dataset.images, dataset.labels, task)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Task", "EpisodeSampler", "make_task", "mean_confidence_interval", "shard_range"]


def shard_range(count: int, rank: int, world_size: int) -> range:
    """The indices ``0..count-1`` that process ``rank`` of ``world_size`` takes: a contiguous block, the first
    ``count % world_size`` processes one more than the others (a process may get none).

    Every process draws the same ``count`` tasks and keeps its block, so the set of tasks, and their order across
    blocks, does not depend on the number of processes.

    Args:
        count: Number of items (tasks of a meta-batch, evaluation tasks), ``>= 0``.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of processes, ``>= 1``.

    Returns:
        A ``range`` of indices.

    Raises:
        ValueError: If an argument is out of range.

    Example:
        >>> shard_range(5, 0, 2), shard_range(5, 1, 2)
        (range(0, 3), range(3, 5))
    """
    count, rank, world_size = int(count), int(rank), int(world_size)
    if count < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need count >= 0, world_size >= 1 and 0 <= rank < world_size; got count={count}, "
                         f"rank={rank}, world_size={world_size}")
    base, extra = divmod(count, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


@dataclass(frozen=True)
class Task:
    """One N-way K-shot Q-query task.

    Attributes:
        classes: Original class ids of the N ways; way ``i`` is ``classes[i]``.
        support_indices: Dataset indices of the support set, ``[N*K]``, grouped by way.
        support_labels: Remapped support labels in ``0..N-1``, ``[N*K]``.
        query_indices: Dataset indices of the query set, ``[N*Q]``, grouped by way.
        query_labels: Remapped query labels in ``0..N-1``, ``[N*Q]``.
    """

    classes: np.ndarray
    support_indices: np.ndarray
    support_labels: np.ndarray
    query_indices: np.ndarray
    query_labels: np.ndarray

    @property
    def ways(self) -> int:
        """Number of classes N in the task."""
        return int(len(self.classes))


class EpisodeSampler:
    """Seeded, reproducible sampler of N-way K-shot Q-query tasks.

    Each task draws ``ways`` distinct classes, then ``shots + queries`` distinct examples of each
    class without replacement, so support and query never share an index.

    Iterating (``for task in sampler``) restarts from ``seed`` every time, so two iterations give the
    same tasks (useful for a fixed validation/test set); it yields ``num_tasks`` tasks, or forever if
    ``num_tasks`` is None. `sample()` draws from a separate persistent stream, also seeded by
    ``seed``, whose state can be saved with `get_state()` / `set_state()`.

    Args:
        labels: Integer class label of every example of the dataset, ``[num_examples]``.
        ways: Number of classes per task (N).
        shots: Support examples per class (K), at least 1.
        queries: Query examples per class (Q), at least 0.
        seed: Seed of the random streams (None: fresh OS entropy, not reproducible).
        num_tasks: Tasks yielded per iteration (None: infinite).

    Raises:
        ValueError: If ``ways`` exceeds the number of classes, if any class has fewer than
            ``shots + queries`` examples, or if an argument is out of range.
    """

    def __init__(self, labels: Sequence[int], ways: int, shots: int, queries: int,
                 seed: Optional[int] = None, num_tasks: Optional[int] = None) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if int(ways) < 1 or int(shots) < 1 or int(queries) < 0:
            raise ValueError(f"need ways >= 1, shots >= 1, queries >= 0; got ways={ways}, "
                             f"shots={shots}, queries={queries}")
        if num_tasks is not None and int(num_tasks) < 0:
            raise ValueError(f"num_tasks must be >= 0 or None, got {num_tasks}")
        self.labels = labels.astype(np.int64)
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.seed = seed
        self.num_tasks = None if num_tasks is None else int(num_tasks)
        self.classes = np.unique(self.labels)
        if self.ways > len(self.classes):
            raise ValueError(f"ways={self.ways} exceeds the number of classes ({len(self.classes)})")
        order = np.argsort(self.labels, kind="stable")
        bounds = np.searchsorted(self.labels[order], self.classes)
        bounds = np.append(bounds, len(order))
        self._members = [order[bounds[i]:bounds[i + 1]] for i in range(len(self.classes))]
        need = self.shots + self.queries
        small = [(int(c), len(m)) for c, m in zip(self.classes, self._members) if len(m) < need]
        if small:
            c, n = small[0]
            raise ValueError(f"class {c} has {n} examples, fewer than shots+queries={need} "
                             f"({len(small)} such classes in total)")
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        if self.num_tasks is None:
            raise TypeError("an EpisodeSampler with num_tasks=None is infinite and has no length")
        return self.num_tasks

    def __iter__(self) -> Iterator[Task]:
        rng = np.random.default_rng(self.seed)
        count = 0
        while self.num_tasks is None or count < self.num_tasks:
            yield self._draw(rng)
            count += 1

    def sample(self) -> Task:
        """Draw one task from the persistent stream (see `get_state()`)."""
        return self._draw(self._rng)

    def sample_batch(self, size: int, rank: int = 0, world_size: int = 1) -> List[Task]:
        """Draw a meta-batch of ``size`` tasks from the persistent stream and return process ``rank``'s shard.

        Every process draws all ``size`` tasks (only indices, cheap), so the stream advances identically everywhere
        and one seed gives the same meta-batches for any number of processes; the shard is
        ``shard_range(size, rank, world_size)``.

        Args:
            size: Tasks per meta-batch, ``>= 1``.
            rank: This process's rank.
            world_size: Number of processes.

        Returns:
            This process's tasks, in meta-batch order (possibly none).

        Raises:
            ValueError: If an argument is out of range.
        """
        if int(size) < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        mine = shard_range(size, rank, world_size)
        tasks = [self._draw(self._rng) for _ in range(int(size))]
        return [tasks[i] for i in mine]

    def get_state(self) -> Dict[str, Any]:
        """Return the state of the persistent stream used by `sample()` (picklable)."""
        return self._rng.bit_generator.state

    def set_state(self, state: Dict[str, Any]) -> None:
        """Restore a state returned by `get_state()`."""
        self._rng.bit_generator.state = state

    def _draw(self, rng: np.random.Generator) -> Task:
        picked = rng.choice(len(self.classes), size=self.ways, replace=False)
        support, query = [], []
        for way in picked:
            members = self._members[way]
            chosen = members[rng.choice(len(members), size=self.shots + self.queries, replace=False)]
            support.append(chosen[:self.shots])
            query.append(chosen[self.shots:])
        ways = np.arange(self.ways, dtype=np.int64)
        return Task(
            classes=self.classes[picked].copy(),
            support_indices=np.concatenate(support).astype(np.int64),
            support_labels=np.repeat(ways, self.shots),
            query_indices=np.concatenate(query).astype(np.int64),
            query_labels=np.repeat(ways, self.queries),
        )


def _gather(images: Any, indices: np.ndarray) -> np.ndarray:
    if isinstance(images, np.ndarray) or getattr(images, "supports_fancy_indexing", False):
        return np.asarray(images[indices])
    items = []
    for i in indices:
        item = images[int(i)]
        if isinstance(item, tuple):
            item = item[0]
        items.append(np.asarray(item))
    return np.stack(items) if items else np.zeros((0,), dtype=np.float32)


def make_task(dataset_images: Any, dataset_labels: Sequence[int], task: Task,
              to_tensor: bool = False) -> Tuple[Any, Any, Any, Any]:
    """Assemble the arrays of a task.

    Args:
        dataset_images: Either a numpy array or an array view with ``supports_fancy_indexing = True``
            (e.g. ``Omniglot.images``), indexed by an index array, or any indexable dataset whose
            items are images or ``(image, label)`` tuples.
        dataset_labels: Class label of every example (checked against ``task.classes``).
        task: A `Task` from `EpisodeSampler`.
        to_tensor: Return ``paddle.Tensor`` s instead of numpy arrays.

    Returns:
        ``(xs, ys, xq, yq)``: support images ``[N*K, ...]``, support labels ``[N*K]`` (int64 in
        ``0..N-1``), query images ``[N*Q, ...]`` and query labels ``[N*Q]``.

    Raises:
        ValueError: If the task's indices do not carry the classes the task claims.
    """
    labels = np.asarray(dataset_labels)
    for idx, lab in ((task.support_indices, task.support_labels), (task.query_indices, task.query_labels)):
        if len(idx) and not np.array_equal(labels[idx], task.classes[lab]):
            raise ValueError("task does not match dataset_labels (was it sampled from another dataset?)")
    xs = _gather(dataset_images, task.support_indices)
    xq = _gather(dataset_images, task.query_indices)
    ys = task.support_labels.astype(np.int64)
    yq = task.query_labels.astype(np.int64)
    if to_tensor:
        import paddle
        return paddle.to_tensor(xs), paddle.to_tensor(ys), paddle.to_tensor(xq), paddle.to_tensor(yq)
    return xs, ys, xq, yq


def mean_confidence_interval(accuracies: Sequence[float], z: float = 1.96) -> Tuple[float, float]:
    """Mean and half-width of the normal-approximation confidence interval.

    Uses the *population* standard deviation (``ddof=0``), as is customary in few-shot papers:
    ``half_width = z * std(accuracies, ddof=0) / sqrt(n)``.

    Args:
        accuracies: Per-task accuracies (any real values).
        z: Normal quantile; 1.96 gives a 95% interval.

    Returns:
        ``(mean, half_width)`` as Python floats.

    Raises:
        ValueError: If ``accuracies`` is empty.
    """
    acc = np.asarray(accuracies, dtype=np.float64).ravel()
    if acc.size == 0:
        raise ValueError("mean_confidence_interval needs at least one value")
    return float(acc.mean()), float(z * acc.std(ddof=0) / math.sqrt(acc.size))
