"""argparse types for the package's command lines: a number parsed and checked against its bounds.

A value out of bounds (NaN included) raises ``argparse.ArgumentTypeError``, which argparse reports
naming the option.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def number_in(kind: type, low: float, high: float = math.inf, low_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: ``kind(text)`` (int or float), refused unless ``low <= value <= high``
    (``low < value`` with ``low_open``)."""
    def parse(text: str) -> int | float:
        value = kind(text)
        above = value > low if low_open else value >= low
        if not (above and value <= high):
            if high < math.inf:
                bounds = f"in {'(' if low_open else '['}{low}, {high}]"
            else:
                bounds = f"greater than {low}" if low_open else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return parse
