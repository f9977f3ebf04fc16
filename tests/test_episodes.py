"""Tests for paddlefsl.episodes: sampler invariants, determinism, errors, task assembly, CI formula."""
import math

import numpy as np
import paddle
import pytest

from paddlefsl.episodes import EpisodeSampler, Task, make_task, mean_confidence_interval, shard_range


def _labels(num_classes=10, per_class=20, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes) * 3 + 7, per_class)  # non-contiguous class ids
    return rng.permutation(labels)


@pytest.mark.parametrize("ways,shots,queries", [(5, 1, 15), (5, 5, 5), (10, 1, 1), (3, 2, 0), (1, 20, 0)])
def test_task_invariants(ways, shots, queries):
    labels = _labels()
    sampler = EpisodeSampler(labels, ways, shots, queries, seed=1, num_tasks=20)
    assert len(sampler) == 20
    tasks = list(sampler)
    assert len(tasks) == 20
    for task in tasks:
        assert isinstance(task, Task) and task.ways == ways
        assert len(set(task.classes.tolist())) == ways  # distinct classes
        assert task.support_indices.shape == (ways * shots,)
        assert task.query_indices.shape == (ways * queries,)
        assert set(task.support_indices).isdisjoint(task.query_indices)
        assert len(set(task.support_indices)) == ways * shots
        assert len(set(task.query_indices)) == ways * queries
        assert task.support_labels.min() == 0 and task.support_labels.max() == ways - 1
        if queries:
            assert set(task.query_labels.tolist()) == set(range(ways))
        np.testing.assert_array_equal(labels[task.support_indices], task.classes[task.support_labels])
        np.testing.assert_array_equal(labels[task.query_indices], task.classes[task.query_labels])
        np.testing.assert_array_equal(np.bincount(task.support_labels, minlength=ways), np.full(ways, shots))


def test_determinism_and_seed_dependence():
    labels = _labels()
    a = list(EpisodeSampler(labels, 5, 1, 3, seed=42, num_tasks=5))
    b = list(EpisodeSampler(labels, 5, 1, 3, seed=42, num_tasks=5))
    c = list(EpisodeSampler(labels, 5, 1, 3, seed=43, num_tasks=5))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.support_indices, y.support_indices)
        np.testing.assert_array_equal(x.query_indices, y.query_indices)
    assert any(not np.array_equal(x.support_indices, z.support_indices) for x, z in zip(a, c))
    sampler = EpisodeSampler(labels, 5, 1, 3, seed=42, num_tasks=5)
    first, second = list(sampler), list(sampler)  # iteration restarts from the seed
    assert all(np.array_equal(x.query_indices, y.query_indices) for x, y in zip(first, second))


def test_sample_stream_state_roundtrip():
    sampler = EpisodeSampler(_labels(), 5, 2, 2, seed=3)
    sampler.sample()
    state = sampler.get_state()
    expected = [sampler.sample() for _ in range(3)]
    sampler.set_state(state)
    again = [sampler.sample() for _ in range(3)]
    for x, y in zip(expected, again):
        np.testing.assert_array_equal(x.support_indices, y.support_indices)
    infinite = EpisodeSampler(_labels(), 5, 2, 2, seed=3)
    it = iter(infinite)
    assert all(isinstance(next(it), Task) for _ in range(50))
    with pytest.raises(TypeError):
        len(infinite)


@pytest.mark.parametrize("kwargs,match", [
    (dict(ways=11, shots=1, queries=1), "exceeds the number of classes"),
    (dict(ways=5, shots=15, queries=6), "fewer than shots\\+queries=21"),
    (dict(ways=0, shots=1, queries=1), "ways >= 1"),
    (dict(ways=2, shots=0, queries=1), "shots >= 1"),
    (dict(ways=2, shots=1, queries=-1), "queries >= 0"),
])
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EpisodeSampler(_labels(), seed=0, **kwargs)


def test_error_names_small_class():
    labels = np.concatenate([np.repeat(np.arange(4), 10), np.full(3, 9)])
    with pytest.raises(ValueError, match="class 9 has 3 examples"):
        EpisodeSampler(labels, 2, 2, 2, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        EpisodeSampler(labels.reshape(-1, 1), 2, 1, 1)
    with pytest.raises(ValueError, match="integers"):
        EpisodeSampler(labels.astype(float), 2, 1, 1)


@pytest.mark.parametrize("to_tensor", [False, True])
@pytest.mark.parametrize("as_dataset", [False, True])
def test_make_task(to_tensor, as_dataset):
    labels = _labels(num_classes=6, per_class=8)
    images = np.stack([np.full((1, 4, 4), float(i), dtype=np.float32) for i in range(len(labels))])
    source = [(images[i], labels[i]) for i in range(len(labels))] if as_dataset else images
    task = EpisodeSampler(labels, 4, 2, 3, seed=5).sample()
    xs, ys, xq, yq = make_task(source, labels, task, to_tensor=to_tensor)
    if to_tensor:
        assert all(isinstance(t, paddle.Tensor) for t in (xs, ys, xq, yq))
        xs, ys, xq, yq = (t.numpy() for t in (xs, ys, xq, yq))
    assert xs.shape == (8, 1, 4, 4) and xq.shape == (12, 1, 4, 4)
    assert ys.dtype == np.int64 and yq.dtype == np.int64
    np.testing.assert_array_equal(xs[:, 0, 0, 0].astype(int), task.support_indices)
    np.testing.assert_array_equal(xq[:, 0, 0, 0].astype(int), task.query_indices)
    np.testing.assert_array_equal(ys, task.support_labels)
    np.testing.assert_array_equal(yq, task.query_labels)


def test_make_task_rejects_foreign_task():
    labels = _labels(num_classes=6, per_class=8)
    task = EpisodeSampler(labels, 4, 2, 3, seed=5).sample()
    with pytest.raises(ValueError, match="does not match"):
        make_task(np.zeros((len(labels), 2)), np.roll(labels, 1), task)


@pytest.mark.parametrize("values", [[0.5], [0.1, 0.9], [0.2, 0.4, 0.4, 0.8, 1.0], list(np.linspace(0, 1, 600))])
def test_mean_confidence_interval(values):
    mean, half = mean_confidence_interval(values)
    n = len(values)
    pop_std = math.sqrt(sum((v - sum(values) / n) ** 2 for v in values) / n)  # ddof=0
    assert mean == pytest.approx(sum(values) / n, abs=1e-12)
    assert half == pytest.approx(1.96 * pop_std / math.sqrt(n), abs=1e-12)
    assert isinstance(mean, float) and isinstance(half, float)


def test_mean_confidence_interval_known_value_and_errors():
    mean, half = mean_confidence_interval([0.0, 1.0])  # population std 0.5
    assert mean == 0.5 and half == pytest.approx(1.96 * 0.5 / math.sqrt(2))
    assert mean_confidence_interval([1.0, 3.0], z=1.0)[1] == pytest.approx(1.0 / math.sqrt(2))
    with pytest.raises(ValueError):
        mean_confidence_interval([])


@pytest.mark.parametrize("count, world", [(4, 2), (5, 2), (1, 2), (0, 3), (7, 3), (600, 7), (3, 1)])
def test_shards_are_contiguous_blocks_that_cover_every_index_once(count, world):
    shards = [shard_range(count, r, world) for r in range(world)]
    assert [i for shard in shards for i in shard] == list(range(count))
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("args", [(-1, 0, 1), (3, 2, 2), (3, -1, 2), (3, 0, 0)])
def test_bad_shard_arguments(args):
    with pytest.raises(ValueError, match="need count >= 0"):
        shard_range(*args)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_meta_batches_are_the_same_tasks_for_any_number_of_processes(world):
    """One seed: the shards of every process together are one process's meta-batch, and the streams stay in step."""
    single = EpisodeSampler(_labels(), 5, 1, 2, seed=7)
    samplers = [EpisodeSampler(_labels(), 5, 1, 2, seed=7) for _ in range(world)]
    for _ in range(3):
        expected = single.sample_batch(5)
        got = [task for r, sampler in enumerate(samplers) for task in sampler.sample_batch(5, r, world)]
        assert len(got) == 5
        for x, y in zip(expected, got):
            np.testing.assert_array_equal(x.support_indices, y.support_indices)
            np.testing.assert_array_equal(x.query_indices, y.query_indices)
    assert all(s.get_state() == single.get_state() for s in samplers)
    # the meta-batch is the persistent stream's next tasks, as sample() draws them one by one
    one_by_one = EpisodeSampler(_labels(), 5, 1, 2, seed=7)
    for _ in range(3 * 5):
        one_by_one.sample()
    np.testing.assert_array_equal(one_by_one.sample().query_indices, single.sample().query_indices)


def test_sample_batch_rejects_an_empty_meta_batch():
    with pytest.raises(ValueError, match="size must be >= 1"):
        EpisodeSampler(_labels(), 5, 1, 2, seed=7).sample_batch(0)
