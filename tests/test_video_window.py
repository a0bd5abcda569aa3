"""A video window with latents packed before it and text after it (Framepack's layout): the window
the graph returns is the grid the method runs on, every other token is dense context."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.nn.functional as F

from sparse_compile.backend import rewrite_graph
from sparse_compile.passes.token_layout import DimLayout, Factor
from sparse_compile.passes.video_window import Window, find_window

HISTORY = (2, 2, 2)
WINDOW = (3, 2, 2)
TEXT = 6


class _PackedWindow(torch.nn.Module):
    """Joint attention over ``[history tokens (2x2x2), window tokens (3x2x2), text]``; returns the
    window's tokens unpatchified to ``(B, C, F, H, W)`` (the clip), or as tokens ``(B, S, C)``."""

    def __init__(self, returns_clip: bool = True):
        super().__init__()
        self.returns_clip = returns_clip
        self.window_embed = torch.nn.Conv3d(4, 16, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.history_embed = torch.nn.Conv3d(4, 16, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = torch.nn.Linear(16, 48)
        self.proj_out = torch.nn.Linear(16, 16)

    def forward(self, video: torch.Tensor, history: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = video.shape
        window = self.window_embed(video).flatten(2).transpose(1, 2)
        past = self.history_embed(history).flatten(2).transpose(1, 2)
        tokens = torch.cat([past, window, text], dim=1)
        q, k, v = self.qkv(tokens).view(batch, tokens.shape[1], 2, 24).transpose(1, 2).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        out = self.proj_out(attended[:, past.shape[1] : past.shape[1] + window.shape[1]])
        if not self.returns_clip:
            return out
        out = out.reshape(batch, frames, height // 2, width // 2, channels, 1, 2, 2)
        return out.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, WINDOW[0], 4, 4, generator=gen), torch.randn(1, 4, HISTORY[0], 4, 4, generator=gen),
            torch.randn(1, TEXT, 16, generator=gen))


def _compile(module: torch.nn.Module, options: dict) -> tuple[torch.Tensor, torch.Tensor, list]:
    records: list = []

    def backend(gm, example_inputs):
        rewrite_graph(gm, example_inputs, options)
        records.extend(gm.meta["sparse_compile_graph"].sites)
        return gm.forward

    torch._dynamo.reset()
    torch.manual_seed(0)
    with torch.no_grad():
        eager = module(*_inputs())
        out = torch.compile(module, backend=backend, fullgraph=True)(*_inputs())
    return out, eager, records


def test_the_returned_window_is_the_grid_and_history_and_text_are_context():
    out, eager, (site,) = _compile(_PackedWindow(), {"method": "dense", "min_seq_len": 16})
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)
    assert site.rewritten
    assert site.facts.grid == WINDOW
    assert (site.facts.context_tokens, site.facts.text_tokens, site.facts.text_position) == (8, TEXT, "suffix")


@pytest.mark.parametrize("method", ["svg", "radial", "adaspa"])
def test_a_sparse_method_runs_on_the_window_with_finite_output(method):
    out, _, (site,) = _compile(_PackedWindow(), {"method": method, "block": 16, "min_seq_len": 16,
                                                 "dense_steps": 0})
    assert site.status == "sparse"
    assert torch.isfinite(out).all()


def test_without_the_returned_clip_several_video_segments_stay_dense_with_the_reason():
    out, eager, (site,) = _compile(_PackedWindow(returns_clip=False), {"method": "dense", "min_seq_len": 16})
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)
    assert not site.rewritten
    assert "several video segments" in site.status
    assert "no clip (B, C, F, H, W)" in site.status


def _segment(*sizes: int) -> tuple[Factor, ...]:
    return tuple(Factor(sympy.Integer(s), s, None) for s in sizes)


def test_find_window_splits_the_sequence_around_the_segment_with_the_clips_grid():
    clip = _segment(*WINDOW)
    history, text = _segment(*HISTORY), _segment(TEXT)
    window = find_window(DimLayout((history, clip, text)), clip)
    assert window == Window(clip, (history,), (text,))


def test_find_window_takes_the_one_run_of_the_clips_token_count_among_plain_runs():
    clip = _segment(*WINDOW)
    runs = (_segment(2), _segment(8), _segment(12), _segment(TEXT))
    assert find_window(DimLayout(runs), clip) == Window(clip, runs[:2], runs[3:])


@pytest.mark.parametrize("segments, why", [
    ((_segment(*HISTORY), _segment(4, 2, 2), _segment(TEXT)), "none of its 3 segments has the 3x2x2 grid"),
    ((_segment(*WINDOW), _segment(*WINDOW), _segment(TEXT)), "2 of its 3 segments have the 3x2x2 grid"),
])
def test_find_window_says_why_when_no_single_segment_is_the_clip(segments, why):
    assert why in find_window(DimLayout(segments), _segment(*WINDOW))
