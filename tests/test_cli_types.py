"""The command lines' number types: parsed, checked against their bounds, refused with the bound named."""

from __future__ import annotations

import argparse

import pytest

from sparse_compile.cli_types import number_in


def test_a_number_within_its_bounds_is_parsed_as_its_kind():
    assert number_in(int, 1)("3") == 3 and isinstance(number_in(int, 1)("3"), int)
    assert number_in(float, 0, 1)("0") == 0.0 and number_in(float, 0, 1)("1") == 1.0
    assert number_in(float, 0, low_open=True)("1e-9") == 1e-9


@pytest.mark.parametrize("kind, bounds, text, message", [
    (int, dict(low=16), "8", "must be at least 16, got 8"),
    (float, dict(low=0, low_open=True), "0", "must be greater than 0, got 0"),
    (float, dict(low=0, high=1), "1.5", "must be in [0, 1], got 1.5"),
    (float, dict(low=0, high=1), "nan", "must be in [0, 1], got nan"),
    (float, dict(low=0), "nan", "must be at least 0, got nan"),
])
def test_a_number_out_of_bounds_is_refused_naming_the_bounds(kind, bounds, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        number_in(kind, **bounds)(text)
