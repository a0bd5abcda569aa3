"""Joint attention assembly: a sparse method's video part plus dense text rows and columns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from method_calls import method_call
from sparse_compile.methods.base import TokenLayout
from sparse_compile.methods.fallback import input_checks, input_problem
from sparse_compile.methods.text_tokens import (
    MASKED_VIDEO_KEYS,
    attend_video_and_text,
    attention_over_keys,
    mask_problem,
    video_keys_kept,
)


def _call(q, k, v, mask, layout):
    return method_call(q, k, v, layout, mask=mask)


def _dense_video(q, k, v):
    out, lse = attention_over_keys(q, k, v, None, q.shape[-1] ** -0.5)
    return out, lse, 1.0


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("text_tokens", [0, 5])
@pytest.mark.parametrize("masked", [False, True])
def test_dense_video_part_reproduces_full_attention(text_first, text_tokens, masked):
    torch.manual_seed(0)
    layout = TokenLayout(frames=2, height=3, width=5, text_tokens=text_tokens, text_first=text_first)
    seq = layout.video_tokens + text_tokens
    q, k, v = (torch.randn(2, 3, seq, 8, dtype=torch.float64) for _ in range(3))
    mask = None
    if masked and text_tokens:
        mask = torch.ones(2, 1, 1, seq, dtype=torch.bool)
        text_at = slice(0, text_tokens) if text_first else slice(seq - text_tokens, seq)
        mask[1, ..., text_at] = torch.tensor([True, True, False, False, False])
    result = attend_video_and_text(_call(q, k, v, mask, layout), _dense_video)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(result.output, expected, rtol=1e-10, atol=1e-10)
    assert result.kept_density == pytest.approx(1.0)


def test_kept_density_counts_text_rows_and_columns():
    layout = TokenLayout(frames=1, height=4, width=4, text_tokens=4, text_first=False)
    q = k = v = torch.randn(1, 1, 20, 4)
    result = attend_video_and_text(_call(q, k, v, None, layout),
                                   lambda q, k, v: (*attention_over_keys(q, k, v, None, 0.5), 0.25))
    assert result.kept_density == pytest.approx((0.25 * 16 * 16 + 2 * 16 * 4 + 16) / 400)


def test_only_key_padding_masks_of_text_keys_are_supported():
    layout = TokenLayout(frames=1, height=2, width=2, text_tokens=2, text_first=False)
    text_masked, video_masked = (torch.tensor(keep).view(1, 1, 1, 6) for keep in ([True] * 5 + [False], [False] + [True] * 5))
    assert mask_problem(None, layout) is None
    assert mask_problem(text_masked, layout) is None and mask_problem(video_masked, layout) is None  # values: on the device
    assert int(video_keys_kept(text_masked, layout)) == 1 and int(video_keys_kept(video_masked, layout)) == 0
    assert "not a key-padding mask" in mask_problem(torch.ones(1, 1, 6, 6, dtype=torch.bool), layout)
    q, k, v = (torch.randn(1, 1, 6, 4) for _ in range(3))
    assert input_problem(*_read(input_checks(_call(q, k, v, text_masked, layout)))) is None
    assert input_problem(*_read(input_checks(_call(q, k, v, video_masked, layout)))) == MASKED_VIDEO_KEYS
    k[0, 0, 5, 0] = float("nan")  # a masked video key outranks a non-finite input
    assert input_problem(*_read(input_checks(_call(q, k, v, video_masked, layout)))) == MASKED_VIDEO_KEYS
    assert input_problem(*_read(input_checks(_call(q, k, v, text_masked, layout)))).startswith("key holds NaN")


def _read(checks: tuple[list[str], torch.Tensor]) -> tuple[list[str], list[int]]:
    names, flags = checks
    return names, flags.tolist()


@pytest.mark.parametrize("text_first", [True, False])
def test_context_on_both_sides_of_the_video_reproduces_full_attention(text_first):
    torch.manual_seed(0)
    layout = TokenLayout(frames=2, height=3, width=5, text_tokens=4, text_first=text_first, context_tokens=6)
    seq = layout.video_tokens + layout.dense_tokens
    q, k, v = (torch.randn(2, 3, seq, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(2, 1, 1, seq, dtype=torch.bool)
    mask[1, ..., 0] = mask[1, ..., seq - 1] = False  # one padded context key on each side of the video
    result = attend_video_and_text(_call(q, k, v, mask, layout), _dense_video)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(result.output, expected, rtol=1e-10, atol=1e-10)
    assert result.kept_density == pytest.approx(1.0)


def test_kept_density_counts_context_rows_and_columns_on_both_sides():
    layout = TokenLayout(frames=1, height=4, width=4, text_tokens=4, text_first=False, context_tokens=3)
    q = k = v = torch.randn(1, 1, 23, 4)
    result = attend_video_and_text(_call(q, k, v, None, layout),
                                   lambda q, k, v: (*attention_over_keys(q, k, v, None, 0.5), 0.25))
    assert result.kept_density == pytest.approx((0.25 * 16 * 16 + 2 * 16 * 7 + 7 * 7) / 23**2)
