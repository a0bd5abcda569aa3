"""Copy the marked tables of ``benchmarks/RESULTS.md`` into ``README.md``, so the README's numbers
cannot drift from the results page.

A table is marked in both files by a line ``<!-- table: NAME ... -->`` before it and ``<!-- /table -->``
after it; the README's block is replaced by the results page's block of the same NAME.

    python benchmarks/sync_readme.py          # rewrite README.md
    python benchmarks/sync_readme.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
README = ROOT / "README.md"
BLOCK = re.compile(r"^(?P<start><!-- table: (?P<name>[\w-]+)[^\n]*-->\n)(?P<body>.*?)^(?P<end><!-- /table -->)$", re.M | re.S)


def marked_tables(text: str) -> dict[str, str]:
    """Marked table name -> the lines between its markers."""
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def synced(readme: str, results: str) -> str:
    """``readme`` with every marked table replaced by the results page's table of the same name.

    Raises ``ValueError`` for a README table the results page does not have."""
    tables = marked_tables(results)
    missing = sorted(set(marked_tables(readme)) - set(tables))
    if missing:
        raise ValueError(f"README.md marks tables {missing} that {RESULTS.name} does not have")
    return BLOCK.sub(lambda m: m["start"] + tables[m["name"]] + m["end"], readme)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if README.md is out of date")
    args = parser.parse_args(argv)
    readme = README.read_text()
    updated = synced(readme, RESULTS.read_text())
    if args.check:
        if updated != readme:
            print("README.md is out of date: run python benchmarks/sync_readme.py", file=sys.stderr)
            sys.exit(1)
        return
    README.write_text(updated)


if __name__ == "__main__":
    main()
