"""The code runs on the oldest Python that setup.py's python_requires claims (3.9): no syntax or runtime use of
newer features. An AST scan of every Python file of the project (a real 3.9 run is in the report of issue 20)."""
from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ("paddlefsl", "tests", "examples", "benchmarks")


def _minimum() -> tuple[int, int]:
    setup = open(os.path.join(ROOT, "setup.py"), encoding="utf-8").read()
    found = re.search(r'python_requires=">=(\d+)\.(\d+)"', setup)
    assert found, "setup.py must state python_requires"
    return int(found.group(1)), int(found.group(2))


def _files() -> list[str]:
    out = [os.path.join(ROOT, "setup.py")]
    for folder in FOLDERS:
        for base, _, names in os.walk(os.path.join(ROOT, folder)):
            out += [os.path.join(base, n) for n in names if n.endswith(".py")]
    return sorted(out)


def _annotations(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def _problems(path: str, minimum: tuple[int, int]) -> list[str]:
    source = open(path, encoding="utf-8").read()
    tree = ast.parse(source, filename=path)
    future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and
                 any(a.name == "annotations" for a in n.names) for n in tree.body)
    problems = []
    if minimum < (3, 10):
        if not future:
            for annotation in _annotations(tree):
                if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)):
                    problems.append(f"line {annotation.lineno}: X | Y annotation without "
                                    "'from __future__ import annotations' (Python 3.10+)")
        for node in ast.walk(tree):
            if type(node).__name__ == "Match":
                problems.append(f"line {node.lineno}: match statement (Python 3.10+)")
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", getattr(node.func, "attr", ""))
                if name == "isinstance" and len(node.args) == 2 and isinstance(node.args[1], ast.BinOp) \
                        and isinstance(node.args[1].op, ast.BitOr):
                    problems.append(f"line {node.lineno}: isinstance(x, A | B) (Python 3.10+)")
                if name == "zip" and any(k.arg == "strict" for k in node.keywords):
                    problems.append(f"line {node.lineno}: zip(strict=...) (Python 3.10+)")
            if isinstance(node, ast.With) and len(node.items) > 1 and source.splitlines()[node.lineno - 1] \
                    .rstrip().endswith("with ("):
                problems.append(f"line {node.lineno}: parenthesized context managers (Python 3.10+)")
    return problems


@pytest.mark.parametrize("path", _files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_python_feature_newer_than_python_requires(path):
    assert _problems(path, _minimum()) == []


def test_the_scan_finds_a_runtime_pep_604_annotation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(x: dict | None = None):\n    return isinstance(x, int | str)\n")
    assert len(_problems(str(bad), (3, 9))) == 2
    assert _problems(str(bad), (3, 10)) == []


def test_a_tuple_of_types_joined_with_plus_is_not_a_union(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("PLAIN = (int, str)\ndef f(x):\n    return isinstance(x, (float,) + PLAIN)\n")
    assert _problems(str(ok), (3, 9)) == []
