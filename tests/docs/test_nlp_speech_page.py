"""The code of docs/nlp-speech.md runs as printed: the ERNIE meta-training step, the wrapper and the exactness check
(which passes at second order and fails at first order). Needs the `nlp` extra; skipped without it."""
import re
from pathlib import Path

import paddle
import pytest

pytestmark = pytest.mark.nlp
pytest.importorskip("paddlenlp", reason="PaddleNLP is not installed (see the `nlp` extra)")
ROOT = Path(__file__).resolve().parents[2]


def test_page_code_runs(capsys):
    page = (ROOT / "docs" / "nlp-speech.md").read_text()
    five, *blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(blocks) == 3, "update this test when the page gets more code blocks"
    statements = [line.split("#")[0].strip() for line in five.splitlines()]
    assert len(statements) == 5
    example = [line.strip() for line in blocks[0].splitlines()]
    assert statements[0].split("  ")[0] in example and all(s in example for s in statements[1:]), statements

    paddle.set_default_dtype("float32")           # the page runs in Paddle's default dtype until it switches
    namespace = {}
    for k, code in enumerate(blocks):
        exec(compile(code, f"docs/nlp-speech.md block {k + 2}", "exec"), namespace)
    reports = re.findall(r"^(OK|MISMATCH) \(max", capsys.readouterr().out, re.M)
    assert reports == ["OK", "OK"]
    assert namespace["first"].ok is False
