import json
import os
import sys
from pathlib import Path

import numpy as np
import paddle
import pytest

from tests.examples.scripts import ROOT, run_example

sys.path.insert(0, str(ROOT / "examples"))
import sinusoid  # noqa: E402


def _run(out: Path, iterations: int, eval_tasks: int) -> dict:
    run = run_example("sinusoid.py", "--out", out, "--iterations", iterations, "--eval-tasks", eval_tasks)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "sinusoid.png").stat().st_size > 10_000
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 2 and all(set(r) == {"iteration", "train_query_mse", "seconds"} for r in records)
    return json.loads((out / "results.json").read_text())


def test_short_demo_writes_its_outputs_and_learns(tmp_path):
    results = _run(tmp_path, iterations=120, eval_tasks=30)
    mse = results["query_mse"]
    assert set(mse) == {"maml", "pretrained_baseline", "maml_before_training"}
    assert mse["maml"]["10_steps"] < mse["maml_before_training"]["10_steps"]


def test_figure_labels_its_axes_titles_its_panels_with_the_test_mse_and_keeps_the_legend_off_the_curves():
    paddle.set_default_dtype("float32")                  # the script's dtype
    rng = np.random.default_rng(0)
    task = sinusoid.sample_tasks(1, rng)[0]
    xs, ys = sinusoid.sample_points(task, 10, rng)
    models = {key: sinusoid.make_model() for key, _ in sinusoid.PANELS}
    mse = {key: {"1_steps": 0.1 * i + 0.123, "10_steps": 0.1 * i + 0.0456}
           for i, (key, _) in enumerate(sinusoid.PANELS)}
    fig = sinusoid.plot_fits(task, xs, ys, models, mse, inner_lr=0.01, test_steps=10, eval_tasks=200)
    assert "sinusoid" in fig._suptitle.get_text() and "200 test tasks" in fig._suptitle.get_text()
    axes = fig.axes
    assert [ax.get_title().splitlines()[0] for ax in axes] == ["before meta-training", "MAML (meta-trained)",
                                                                "pre-trained baseline"]
    for i, ax in enumerate(axes):
        assert ax.get_xlabel() == "x"
        mse_line = f"test MSE {0.1 * i + 0.123:.3f} (1 step), {0.1 * i + 0.0456:.3f} (10 steps)"
        assert ax.get_title().splitlines()[1] == mse_line
        assert ax.get_legend() is None                   # no legend inside a panel, over the curves
    assert axes[0].get_ylabel().startswith("y")
    legend, = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["true function", "0 steps (no adaptation)", "after 1 step",
                                                         "after 10 steps", "10 support points"]
    fig.canvas.draw()
    legend_box = legend.get_window_extent()
    assert all(legend_box.y1 <= ax.get_window_extent().y0 for ax in axes)    # below the panels
    assert all(len(ax.get_lines()) == 4 for ax in axes)


def test_bad_arguments_get_a_clear_message(tmp_path):
    run = run_example("sinusoid.py", "--out", tmp_path, "--iterations", 0)
    assert run.returncode == 2 and "--iterations must be at least 1" in run.stderr


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PADDLEFSL_SLOW") != "1", reason="full demo: set PADDLEFSL_SLOW=1")
def test_full_demo_beats_the_pretrained_baseline(tmp_path):
    results = _run(tmp_path, iterations=3000, eval_tasks=200)
    assert results["maml_beats_baseline"], results["query_mse"]
