"""Docstrings are written in the syntax mkdocstrings renders (Markdown, Google style): no Sphinx roles such as
:meth:`x` and no doctest directives, which the API reference would show raw."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPHINX = re.compile(r":(?:py:)?(?:meth|class|func|mod|attr|data|exc|obj|ref|term|const):`")
DOCTEST = re.compile(r"#\s*doctest:")

# Files still to convert (none left): remove each file here once its docstrings are converted.
NOT_YET_CONVERTED: set[str] = set()


def _offences(text: str) -> list[str]:
    return [f"line {n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
            if SPHINX.search(line) or DOCTEST.search(line)]


def test_no_sphinx_roles_or_doctest_directives_in_the_package():
    found = {}
    for path in sorted((ROOT / "paddlefsl").rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        offences = _offences(path.read_text(encoding="utf-8"))
        if offences and name not in NOT_YET_CONVERTED:
            found[name] = offences
    assert found == {}, "use `name` or [name][paddlefsl.module.name] instead of Sphinx roles; drop doctest comments"


def test_the_exemption_list_only_names_files_that_still_need_it():
    stale = [name for name in NOT_YET_CONVERTED
             if (ROOT / name).exists() and not _offences((ROOT / name).read_text(encoding="utf-8"))]
    assert stale == [], f"{stale} no longer use Sphinx roles: remove them from NOT_YET_CONVERTED"


def test_the_scan_catches_both_kinds():
    assert len(_offences("see :meth:`clone`\n>>> f(x)  # doctest: +SKIP\nplain `clone()`\n")) == 2
