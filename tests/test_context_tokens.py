"""Context tokens on both sides of the video grid (latents packed before a video window, text after
it): every method runs on the grid alone and attends the context densely, through the one shared
joint-attention path, so a method that keeps every video pair equals SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from method_calls import method_call
from test_auto import DIM, FRAMES, HEIGHT, SEQ, WIDTH, _auto, _choice, _layout_token_mask, synthetic_heads

from sparse_compile.methods.base import SiteCache, TokenLayout
from sparse_compile.methods.text_tokens import attend_video_and_text, video_text_slices
from sparse_compile.options import validate_options
from sparse_compile.registry import METHODS

KEEP_EVERY_PAIR = {
    "dense": {},
    "svg": {"density": 1.0, "block": 16},
    "svg2": {"q_clusters": 4, "k_clusters": 8, "top_p": 1.0, "min_kc_ratio": 1.0},
    "radial": {"block": 16},  # two frames: the radial mask keeps every block
    "adaspa": {"density": 1.0, "block": 16},
    "auto": {"recall": 1.0, "block": 32},
}
"""Each method's options that keep every (query, key) pair of the video grid."""

LAYOUT = TokenLayout(frames=2, height=4, width=4, text_tokens=5, text_first=False, context_tokens=7)
"""``[7 context tokens, 2x4x4 video grid, 5 text tokens]``."""


def _qkv(seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return tuple(torch.randn(1, 2, seq, 16, generator=gen) for _ in range(3))


def _context_padding(seq: int) -> torch.Tensor:
    """A key-padding mask ``(1, 1, 1, S)`` that drops one context key before the video and one after it."""
    mask = torch.ones(1, 1, 1, seq, dtype=torch.bool)
    mask[..., 2] = False
    mask[..., seq - 1] = False
    return mask


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def test_the_table_names_every_method():
    assert set(KEEP_EVERY_PAIR) == set(METHODS)


def test_the_layout_places_the_video_between_its_context_tokens():
    video, context = video_text_slices(LAYOUT)
    assert (LAYOUT.tokens_before, LAYOUT.dense_tokens) == (7, 12)
    assert video == slice(7, 39)
    assert context == (slice(0, 7), slice(39, 44))
    text_first = TokenLayout(frames=2, height=4, width=4, text_tokens=5, text_first=True, context_tokens=7)
    assert video_text_slices(text_first) == (slice(5, 37), (slice(0, 5), slice(37, 44)))


@pytest.mark.parametrize("padded", [False, True], ids=["unmasked", "context-keys-padded"])
@pytest.mark.parametrize("name", sorted(KEEP_EVERY_PAIR))
def test_keeping_every_pair_with_context_before_and_after_the_video_equals_sdpa(name, padded):
    method = METHODS[name](validate_options({"method": name, **KEEP_EVERY_PAIR[name]}))
    seq = LAYOUT.video_tokens + LAYOUT.dense_tokens
    q, k, v = _qkv(seq)
    mask = _context_padding(seq) if padded else None
    call = method_call(q, k, v, LAYOUT, mask=mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    joint = attend_video_and_text(call, lambda qv, kv, vv: method.video_attention(qv, kv, vv, call))
    assert torch.isfinite(joint.output).all()
    assert _rel_err(joint.output, expected) <= 1e-5
    assert float(joint.kept_density) == pytest.approx(1.0)
    assert _rel_err(method.run(call).output, expected) <= 1e-5


def test_auto_with_context_before_and_after_the_video_equals_sdpa_under_its_chosen_pattern():
    before, after = 9, 16
    q, k, v = synthetic_heads()
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.cat([torch.randn(1, 3, before, DIM, generator=gen), t,
                          torch.randn(1, 3, after, DIM, generator=gen)], dim=2) for t in (q, k, v))
    seq = before + SEQ + after
    padding = torch.ones(1, 1, 1, seq, dtype=torch.bool)
    padding[..., 0] = padding[..., -4:] = False
    cache = SiteCache()
    layout = TokenLayout(FRAMES, HEIGHT, WIDTH, text_tokens=after, text_first=False, context_tokens=before)
    result = _auto().attend(method_call(q, k, v, layout, cache, mask=padding))
    token_mask = torch.ones(1, 3, seq, seq, dtype=torch.bool)
    video = slice(before, before + SEQ)
    token_mask[..., video, video] = _layout_token_mask(_choice(cache), 3)
    assert not token_mask.all(), "auto chose a sparse pattern"
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask & padding)
    torch.testing.assert_close(result.output, expected, atol=1e-5, rtol=1e-5)
