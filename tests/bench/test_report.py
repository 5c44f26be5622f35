"""Benchmarks share docs/benchmarks.md: each one rewrites only its own marked section."""

from pathlib import Path

from bench.report import markdown_table, update_section


def test_sections_are_added_then_replaced_without_touching_others(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    update_section("a", "first A", doc)
    update_section("b", "only B", doc)
    update_section("a", "second A", doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks")
    assert "first A" not in text
    assert text.index("<!-- bench:a -->\nsecond A\n<!-- /bench:a -->") < text.index("<!-- bench:b -->\nonly B\n")


def test_markdown_table() -> None:
    assert markdown_table(["x", "y"], [[1, "a"]]) == "| x | y |\n| --- | --- |\n| 1 | a |"
