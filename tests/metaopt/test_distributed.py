"""Distributed meta-training (paddlefsl/metaopt/distributed.py): 2 processes (gloo, 127.0.0.1) against 1.

Each spawn starts two Paddle processes (several seconds each), so every 2-process case runs in one spawn."""
import time

import numpy as np
import paddle
import paddle.distributed as dist
import pytest

from paddlefsl.metaopt import MAML, CollectiveError, distributed
from tests.metaopt import distributed_workers as workers

NAMES = list(workers.CONFIGS)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The learner states after 3 meta-iterations of every config, on each of 2 spawned processes."""
    out = tmp_path_factory.mktemp("dist")
    dist.spawn(workers.train_all, args=(str(out), NAMES), nprocs=2)
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]


@pytest.mark.parametrize("name", NAMES)
def test_two_processes_reach_the_one_process_meta_parameters(two_processes, name):
    one = workers.train(name)
    algorithm, meta_batch, options = workers.CONFIGS[name]
    statistics = [k for k in one if k.endswith(("_mean", "_variance")) or ".mean_" in k or ".variance_" in k]
    for key, value in one.items():
        for r, states in enumerate(two_processes):
            got = states[f"{name}/{key}"]
            if key in statistics and (algorithm == "anil" or options.get("batch_norm") == "shared"):
                continue  # updated by the tasks: the task-weighted mean of each process's running average
            np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-9 * np.abs(value).max(),
                                       err_msg=f"{name}: {key} on process {r}")
    # every process holds the same state, statistics included; the meta-update moved every parameter
    for key in one:
        np.testing.assert_array_equal(two_processes[0][f"{name}/{key}"], two_processes[1][f"{name}/{key}"])
    start = workers.train(name, iterations=0)
    moved = {k for k in one if k not in statistics and not np.array_equal(one[k], start[k])}
    expected = {k for k in one if k not in statistics}
    if options.get("per_step_bn_weights"):  # the per-step weights replace the model's own batch-norm weights
        expected -= {f"model.features.{i}.{w}" for i in (1, 5) for w in ("weight", "bias")}
    assert moved == expected, sorted(expected ^ moved)


@pytest.mark.parametrize("key, words", [
    ("missing-num-tasks-error", ["num_tasks=None", "2 processes", "pass num_tasks"]),
    ("loss-without-tasks-error", ["num_tasks=0", "pass loss=None"]),
    ("no-tasks-anywhere-error", ["num_tasks=0) on every process", "no tasks"]),
])
def test_misuse_on_several_processes_gets_a_clear_error(two_processes, key, words):
    for states in two_processes:
        message = str(states[key])
        assert all(word in message for word in words), message


def test_collective_helpers_on_two_processes(two_processes):
    for states in two_processes:
        # process r holds 10 (r + 1) with weight r + 1 of 3: (1 * 10 + 2 * 20) / 3
        np.testing.assert_allclose(states["helpers/average_statistics"], [50 / 3] * 3, rtol=1e-12)
        np.testing.assert_array_equal(states["helpers/same_everywhere"], np.array([0.1, 0.2], dtype="float32"))
        np.testing.assert_array_equal(states["helpers/all_reduce_sum"], [3.0, 1.0])
        np.testing.assert_array_equal(states["helpers/all_gather_floats"], [0.0, 0.0, 0.0, 1.0])


def test_a_process_that_raises_ends_the_job_with_its_error_in_seconds():
    start = time.time()
    with pytest.raises(Exception, match="rank one fails on purpose"):
        dist.spawn(workers.fail_on_rank_one, args=("rank one fails on purpose",), nprocs=2)
    assert time.time() - start < 60


def test_a_process_that_hangs_ends_the_job_with_a_collective_error_after_the_timeout(monkeypatch):
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "5")          # the spawned processes inherit it
    start = time.time()
    with pytest.raises(Exception, match=r"CollectiveError: rank 0 of 2: waited 5 s at .* for ranks \[1\]"):
        dist.spawn(workers.hang_on_rank_one, args=(600,), nprocs=2)
    assert time.time() - start < 90


@pytest.mark.parametrize("value", ["0", "-3", "soon", "nan", "inf"])
def test_a_bad_timeout_gets_a_clear_error(monkeypatch, value):
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, value)
    with pytest.raises(ValueError, match="PADDLEFSL_COLLECTIVE_TIMEOUT must be a positive number of seconds"):
        distributed.collective_timeout()


def test_the_timeout_defaults_to_ten_minutes(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_VARIABLE, raising=False)
    assert distributed.collective_timeout() == 600
    monkeypatch.setenv(distributed.TIMEOUT_VARIABLE, "2.5")
    assert distributed.collective_timeout() == 2.5


@pytest.mark.parametrize("num_tasks, error, message", [
    (0, ValueError, "num_tasks must be >= 1 in a single process"),
    (-1, ValueError, "num_tasks must be >= 1"),
    (2.0, TypeError, "num_tasks must be an integer"),
    (True, TypeError, "num_tasks must be an integer"),
])
def test_bad_num_tasks_in_one_process(num_tasks, error, message):
    learner = MAML(workers.ConvNet(), 0.3)
    with pytest.raises(error, match=message):
        learner.step(paddle.zeros([1]), num_tasks=num_tasks)


def test_one_process_with_num_tasks_steps_as_without():
    states = []
    for num_tasks in (None, 4):
        paddle.seed(0)
        learner = MAML(workers.ConvNet(), 0.3)
        learner.meta_optimizer = paddle.optimizer.SGD(0.1, parameters=learner.parameters())
        losses = []
        for index in range(4):
            xs, ys, xq, yq = workers.task(0, index)
            clone = learner.clone()
            clone.adapt(paddle.nn.functional.cross_entropy(clone(xs), ys))
            losses.append(paddle.nn.functional.cross_entropy(clone(xq), yq))
        learner.step(paddle.stack(losses).mean(), num_tasks=num_tasks)
        states.append({k: v.numpy() for k, v in learner.state_dict().items()})
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key])


def test_helpers_are_identities_in_one_process():
    assert (distributed.rank(), distributed.world_size(), distributed.is_parallel()) == (0, 1, False)
    assert distributed.init_parallel() == (0, 1)
    assert distributed.all_reduce_sum([1.5, 2]) == [1.5, 2.0]
    assert distributed.all_gather_floats([3, 4]) == [3.0, 4.0]
    weight = paddle.create_parameter([2], "float64")
    weight.grad = paddle.to_tensor([1.0, 2.0])
    assert distributed.all_reduce_meta_gradients([weight], 3) == 3
    np.testing.assert_array_equal(weight.grad.numpy(), [1.0, 2.0])
    assert issubclass(CollectiveError, RuntimeError)
