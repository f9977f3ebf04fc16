"""The first code a user sees runs as printed: the README's loop, which is docs/index.md's first loop, and the
gradient check that follows it on that page; and docs/learner-loop.md's loops take `meta_batches` in the same sense
(an iterable of meta-batches, each a list of tasks)."""
import math
import re
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F

from paddlefsl.metaopt.maml import MAML

ROOT = Path(__file__).resolve().parents[2]


def python_blocks(path: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / path).read_text(), re.S)


def test_readme_shows_the_first_loop_of_the_docs():
    assert python_blocks("README.md")[0] == python_blocks("docs/index.md")[0]


def test_getting_started_page_runs_as_printed(capsys):
    blocks = python_blocks("docs/index.md")
    assert len(blocks) == 2, "update this test when the page gets more code blocks"
    paddle.set_default_dtype("float32")               # a fresh interpreter's default
    namespace = {}
    exec(compile(blocks[0], "docs/index.md (first loop)", "exec"), namespace)
    printed = capsys.readouterr().out
    mse = float(re.fullmatch(r"query MSE after one inner step, last meta-batch: (\S+)\n", printed).group(1))
    assert math.isfinite(mse) and mse > 0
    assert namespace["model"].parameters()[0].dtype == paddle.float32
    exec(compile(blocks[1], "docs/index.md (gradient check)", "exec"), namespace)
    assert namespace["report"].ok, str(namespace["report"])
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("OK (max ")
    assert paddle.get_default_dtype() == "float32"     # the page puts the default back


def _classification_tasks(rng, count):
    def task():
        x = rng.standard_normal((6, 4))
        y = np.arange(6) % 3
        return [paddle.to_tensor(a) for a in (x[:3], y[:3], x[3:], y[3:])]
    return [task() for _ in range(count)]


def test_learner_loop_page_takes_meta_batches_of_tasks():
    blocks = python_blocks("docs/learner-loop.md")
    assert len(blocks) == 3, "update this test when the page gets more code blocks"
    rng = np.random.default_rng(0)
    for block in blocks:
        model = paddle.nn.Linear(4, 3)
        before = model.weight.numpy().copy()
        namespace = {"paddle": paddle, "F": F, "MAML": MAML, "model": model, "maml": MAML(model, inner_lr=0.4),
                     "meta_batches": [_classification_tasks(rng, 2) for _ in range(3)]}
        exec(compile(block, "docs/learner-loop.md", "exec"), namespace)
        assert not np.allclose(model.weight.numpy(), before)      # the loop took meta-steps on these batches
