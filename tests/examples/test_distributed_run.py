"""examples/episodic.py (omniglot.py, miniimagenet.py) on several processes: the same meta-batches and weights as
one process, evaluation gathered, outputs written once, a 2-process checkpoint resumed on 1 process."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle.distributed as dist
import pytest

from tests.datasets.conftest import make_miniimagenet_pickle
from tests.examples import episodic_workers as workers
from tests.examples.scripts import ROOT, read_checkpoint


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_two_process_checkpoint_resumed_on_one_process_reaches_the_uninterrupted_weights(tmp_path, algorithm):
    split, straight, half = tmp_path / "split", tmp_path / "straight", tmp_path / "half"
    for out in (split, straight, half):
        out.mkdir()
    dist.spawn(workers.run, args=(str(split), 2, False, algorithm), nprocs=2)
    two = json.loads((split / "results.json").read_text())
    one = workers.run(str(half), 2, algorithm=algorithm)
    # the same tasks, the same weights, the same 5 evaluation tasks (sharded 3 + 2, gathered on rank 0)
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=1e-12)
    assert two["test_ci95"] == pytest.approx(one["test_ci95"], abs=1e-12)
    assert [r["step"] for r in _metrics(split)] == [1, 2]  # written by rank 0 alone
    for a, b in zip(_metrics(split), _metrics(half)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9) and a["accuracy"] == pytest.approx(b["accuracy"])
    workers.run(str(split), 4, resume=True, algorithm=algorithm)
    workers.run(str(straight), 4, algorithm=algorithm)
    a, b = read_checkpoint(split), read_checkpoint(straight)
    assert a["step"] == b["step"] == 4 and a["extra"]["sampler"] == b["extra"]["sampler"]
    assert a["extra"]["augment"] == b["extra"]["augment"]
    for key, value in b["model"].items():
        if key.endswith(("_mean", "_variance")) and algorithm == "anil":
            continue  # ANIL's shared features: each process's running average, combined (docs/distributed.md)
        np.testing.assert_allclose(a["model"][key], value, rtol=1e-6, atol=1e-12, err_msg=key)
    assert not np.allclose(b["model"]["head.weight"], read_checkpoint(half)["model"]["head.weight"])


def test_miniimagenet_script_runs_unchanged_under_paddle_distributed_launch(tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    rng = np.random.default_rng(0)
    for mode in ("train", "val", "test"):
        images = rng.integers(0, 256, (6 * 3, 84, 84, 3), dtype=np.uint8)
        make_miniimagenet_pickle(data, mode, images, {f"n{mode}{c}": list(range(3 * c, 3 * c + 3)) for c in range(6)})
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir",
               str(tmp_path / "log"), str(ROOT / "examples" / "miniimagenet.py"), "--data-root", str(data), "--out",
               str(out), "--iterations", "2", "--meta-batch", "3", "--eval-tasks", "3", "--shots", "1", "--query", "2",
               "--inner-steps", "1", "--test-inner-steps", "1", "--log-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "log").glob("workerlog.*")))
    assert done.returncode == 0, (done.stdout + done.stderr + logs)[-4000:]
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    results = json.loads((out / "results.json").read_text())
    assert results["iterations"] == 2 and 0 <= results["test_accuracy"] <= 1
    assert read_checkpoint(out)["step"] == 2
    assert logs.count("test accuracy") == 1  # the summary line comes from rank 0 only
