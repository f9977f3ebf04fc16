"""The README's full-data commands (Omniglot standard split, miniImageNet) run end to end on tiny synthetic trees in
the official layouts, and write loadable checkpoints."""
import json
from pathlib import Path

import numpy as np
import paddle

from paddlefsl.backbones import Conv4
from tests.datasets.conftest import make_miniimagenet_pickle, make_omniglot_zip
from tests.examples.scripts import read_checkpoint, run_example

SHORT = ["--iterations", "2", "--meta-batch", "2", "--eval-tasks", "3", "--shots", "1", "--query", "2",
         "--inner-steps", "1", "--test-inner-steps", "1", "--checkpoint-every", "1"]


def _example(script: str, data: Path, out: Path, *extra: str):
    return run_example(script, "--data-root", data, "--out", out, *extra)


def _miniimagenet_pickles(root: Path, classes: int = 6, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    for mode in ("train", "val", "test"):
        images = rng.integers(0, 256, (classes * per_class, 84, 84, 3), dtype=np.uint8)
        make_miniimagenet_pickle(root, mode, images, {f"n{mode}{c:02d}": list(range(c * per_class, (c + 1) * per_class))
                                                      for c in range(classes)})


def _check_outputs(out: Path, make_model) -> None:
    results = json.loads((out / "results.json").read_text())
    assert results["iterations"] == 2 and 0 <= results["test_accuracy"] <= 1 and results["test_ci95"] >= 0
    weights = read_checkpoint(out)["model"]
    paddle.set_default_dtype("float32")             # the scripts train in Paddle's default dtype
    model = make_model()
    assert weights.keys() == model.state_dict().keys()
    model.set_state_dict({k: paddle.to_tensor(v) for k, v in weights.items()})  # no learner needed
    np.testing.assert_array_equal(model.head.weight.numpy(), weights["head.weight"])


def test_omniglot_standard_split_command(tmp_path):
    data = tmp_path / "omniglot"
    data.mkdir()
    rng = np.random.default_rng(0)

    def strokes(char_id, example):
        return np.where(rng.random((8, 8)) < 0.3, 0, 255).astype(np.uint8)

    for top, alphabets, first_id in (("images_background", 14, 0), ("images_evaluation", 11, 700)):
        make_omniglot_zip(data / f"{top}.zip", top, {f"{top}-alphabet{a:02d}": 50 for a in range(alphabets)},
                          examples=3, start_id=first_id, image=strokes)          # 1250 characters in all
    run = _example("omniglot.py", data, tmp_path / "run", "--split", "standard", *SHORT)
    assert run.returncode == 0, run.stderr[-3000:]
    _check_outputs(tmp_path / "run", lambda: Conv4.omniglot(5))
    config = json.loads((tmp_path / "run" / "results.json").read_text())["config"]
    assert config["split"] == "standard"


def test_miniimagenet_command_and_resume(tmp_path):
    data = tmp_path / "miniimagenet"
    data.mkdir()
    _miniimagenet_pickles(data)
    first = _example("miniimagenet.py", data, tmp_path / "run", *SHORT[:1], "1", *SHORT[2:])
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _example("miniimagenet.py", data, tmp_path / "run", "--resume", *SHORT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _check_outputs(tmp_path / "run", lambda: Conv4.miniimagenet(5))


def test_miniimagenet_rejects_an_omniglot_split(tmp_path):
    run = _example("miniimagenet.py", tmp_path, tmp_path / "run", "--split", "standard")
    assert run.returncode == 2 and "--split applies to Omniglot only" in run.stderr
