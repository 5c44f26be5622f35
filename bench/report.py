"""Shared by the benchmarks: where they find the shipped data, how they describe the machine, and how each one
writes its own section of docs/benchmarks.md without touching the others."""

import os
import platform
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import torch
import transformers

BENCHMARKS_DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
DOC_HEADER = """# Benchmarks

Measured on real models and text shipped inside PyPI packages (no hub downloads). Each section below is written by
the benchmark named in its markers; rerun the command shown in a section to refresh it.
"""


def machine_description() -> str:
    """CPU, core count and library versions, so a reader knows what the numbers were measured on."""
    return (
        f"{_cpu_name()}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python "
        f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, {date.today().isoformat()}"
    )


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: above the core count, other jobs shared the CPU while timing."""
    with open("/proc/loadavg", encoding="ascii") as handle:
        return ", ".join(handle.read().split()[:3])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = [" | ".join(headers), " | ".join("---" for _ in headers)]
    lines += [" | ".join(str(cell) for cell in row) for row in rows]
    return "\n".join(f"| {line} |" for line in lines)


def update_section(name: str, body: str, doc: Path = BENCHMARKS_DOC) -> None:
    """Replace the section between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` (append it if new)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = doc.read_text(encoding="utf-8") if doc.exists() else DOC_HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + section + rest.split(end, 1)[1]
    else:
        text = f"{text.rstrip()}\n\n{section}\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text, encoding="utf-8")


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"
