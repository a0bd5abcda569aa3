"""benchmarks/RESULTS.md is the index of the measured results: every file kept under
benchmarks/results/ is linked from it, and every link of it points at a file that exists."""

from __future__ import annotations

import re
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
LINK = re.compile(r"\]\(([^)#]+)(?:#[^)]*)?\)")


def linked_paths() -> set[Path]:
    text = (BENCHMARKS / "RESULTS.md").read_text()
    return {(BENCHMARKS / target).resolve() for target in LINK.findall(text) if "://" not in target}


def test_every_link_of_the_results_page_exists():
    missing = sorted(str(p.relative_to(BENCHMARKS)) for p in linked_paths() if not p.exists())
    assert not missing


def test_every_results_file_is_cited_by_the_results_page():
    files = {p.resolve() for p in (BENCHMARKS / "results").rglob("*") if p.is_file()}
    uncited = sorted(str(p.relative_to(BENCHMARKS)) for p in files - linked_paths())
    assert not uncited


def test_results_page_and_notes_stay_short():
    assert len((BENCHMARKS / "RESULTS.md").read_text().splitlines()) <= 250
    assert len((BENCHMARKS / "NOTES.md").read_text().splitlines()) <= 150
