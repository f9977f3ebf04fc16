from pathlib import Path

from paddlefsl.metaopt.autodiff.table import markdown_table


def test_docs_op_table_is_generated_from_the_registry():
    page = Path(__file__).resolve().parents[3] / "docs" / "ops.md"
    assert page.read_text() == markdown_table(), \
        "docs/ops.md is stale: run python -m paddlefsl.metaopt.autodiff.table > docs/ops.md"
