import json
import os
from pathlib import Path

import pytest

from tests.examples.scripts import run_example


def _run(out: Path, iterations: int, eval_tasks: int) -> dict:
    run = run_example("sinusoid.py", "--out", out, "--iterations", iterations, "--eval-tasks", eval_tasks)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "sinusoid.png").stat().st_size > 10_000
    assert (out / "metrics.jsonl").read_text().count("\n") >= 2
    return json.loads((out / "results.json").read_text())


def test_short_demo_writes_its_outputs_and_learns(tmp_path):
    results = _run(tmp_path, iterations=120, eval_tasks=30)
    mse = results["query_mse"]
    assert set(mse) == {"maml", "pretrained_baseline", "maml_before_training"}
    assert mse["maml"]["10_steps"] < mse["maml_before_training"]["10_steps"]


def test_bad_arguments_get_a_clear_message(tmp_path):
    run = run_example("sinusoid.py", "--out", tmp_path, "--iterations", 0)
    assert run.returncode == 2 and "--iterations must be at least 1" in run.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PADDLEFSL_SLOW") != "1", reason="full demo: set PADDLEFSL_SLOW=1")
def test_full_demo_beats_the_pretrained_baseline(tmp_path):
    results = _run(tmp_path, iterations=3000, eval_tasks=200)
    assert results["maml_beats_baseline"], results["query_mse"]
