"""The attention op's output layout: (B, H, S, Dv) laid out as a contiguous (B, S, H, Dv)."""

from __future__ import annotations

import torch

from sparse_compile.kernels.common import attention_output_like
from sparse_compile.runtime.ops import _in_output_layout


def test_a_result_already_in_the_output_layout_is_returned_without_a_copy():
    q = torch.randn(1, 5, 3, 4).transpose(1, 2)
    result = torch.randn(1, 5, 3, 4).transpose(1, 2)
    assert _in_output_layout(result, q, q) is result


def test_other_layouts_are_copied_into_the_output_layout():
    q = torch.randn(1, 5, 3, 4).transpose(1, 2)
    v = torch.randn(1, 5, 3, 6).transpose(1, 2)
    result = torch.randn(1, 3, 5, 6)  # contiguous (B, H, S, Dv)
    out = _in_output_layout(result, q, v)
    assert out is not result and torch.equal(out, result)
    assert out.stride() == attention_output_like(q, v).stride() == (90, 6, 18, 1)
