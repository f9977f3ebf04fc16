"""The 5-way 1-shot loop of docs/few-shot.md runs as printed (with fewer iterations and tasks) on the real Omniglot
minimal split, and its test-time adaptation beats chance."""
import os
import re
from pathlib import Path

import paddle
import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ["PADDLEFSL_DATA"]) / "omniglot"
SHORTER = {'"data/omniglot"': repr(str(DATA)), "range(2000)": "range(10)", "range(32)": "range(8)",
           "num_tasks=600": "num_tasks=60"}


@pytest.mark.skipif(not (DATA / "images_background_small1.zip").exists(),
                    reason=f"Omniglot minimal zips not found in {DATA}")
def test_omniglot_loop_runs_and_beats_chance(capsys):
    page = (ROOT / "docs" / "few-shot.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 1, "update this test when the page gets more code blocks"
    code = blocks[0]
    for printed, short in SHORTER.items():
        assert printed in code, f"{printed} no longer appears in the page's loop"
        code = code.replace(printed, short)
    paddle.set_default_dtype("float32")           # the page runs in Paddle's default dtype
    namespace = {}
    exec(compile(code, "docs/few-shot.md", "exec"), namespace)
    mean, half_width = map(float, re.fullmatch(r"accuracy (\S+) \+- (\S+)\n", capsys.readouterr().out).groups())
    assert len(namespace["accuracies"]) == 60
    assert mean - half_width > 0.3, (mean, half_width)   # chance is 0.2
