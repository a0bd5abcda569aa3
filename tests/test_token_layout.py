"""The forward shape analysis that recovers (frames, height, width) and text segments."""

from __future__ import annotations

import pytest
import sympy
import torch
import torch.fx as fx

from sparse_compile.passes.site_plan import split_video_text
from sparse_compile.passes.token_layout import DimLayout, Factor, TokenLayoutAnalysis, _align_reshape, same_size


@pytest.mark.parametrize(
    "in_shape, out_shape, groups",
    [
        ((2, 3, 4, 5), (2, 60), [([0], [0]), ([1, 2, 3], [1])]),
        ((2, 60), (2, 3, 4, 5), [([0], [0]), ([1], [1, 2, 3])]),
        ((1, 8, 3, 4, 5), (1, 8, 60), [([0], [0]), ([1], [1]), ([2, 3, 4], [2])]),
        ((1, 8, 1, 4, 5), (1, 8, 20), [([0], [0]), ([1], [1]), ([2, 3, 4], [2])]),  # a single frame stays a factor
        ((3, 16, 4, 4), (1, 3, 16, 4, 4), [([0], [0, 1]), ([1], [2]), ([2], [3]), ([3], [4])]),  # (B*F) -> (1, F)
        ((6, 4), (4, 6), [([0, 1], [0, 1])]),
        ((6, 4), (5, 5), None),
    ],
)
def test_reshape_alignment(in_shape, out_shape, groups):
    assert _align_reshape(in_shape, out_shape) == groups


def test_symbolic_sizes_compare_by_value():
    s0, s1 = sympy.symbols("s0 s1", positive=True, integer=True)
    assert same_size(s0 * s1 * 4, 2 * s1 * s0 * 2)
    assert not same_size(s0 * s1, s0 + s1)


def _factors(*sizes):
    return tuple(Factor(sympy.Integer(s), s, None) for s in sizes)


def test_split_video_text_finds_grid_and_text_position():
    video = _factors(3, 4, 5)
    assert split_video_text(DimLayout((video,))) == (video, (), None)
    assert split_video_text(DimLayout((_factors(7), video))) == (video, _factors(7), "prefix")
    assert split_video_text(DimLayout((video, _factors(7)))) == (video, _factors(7), "suffix")
    assert split_video_text(DimLayout((_factors(1, 3, 4, 5),))) == (_factors(3, 4, 5), (), None)
    assert split_video_text(DimLayout((_factors(12, 5),))) is None
    assert split_video_text(DimLayout((_factors(2), video, _factors(2)))) is None


class _JoinedSequence(torch.nn.Module):
    """Video from a Conv3d joined with text, sliced apart, rejoined in the other order."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv3d(3, 8, kernel_size=(1, 2, 2), stride=(1, 2, 2))

    def forward(self, video, text):
        tokens = self.embed(video).flatten(2).transpose(1, 2)
        joined = torch.cat([text, tokens], dim=1)
        text_part, video_part = joined[:, : text.shape[1]], joined[:, text.shape[1] :]
        return torch.cat([video_part, text_part], dim=1).view(1, -1, 2, 4).transpose(1, 2)


def _analyse(module, *inputs):
    captured = {}

    def backend(gm: fx.GraphModule, example_inputs):
        captured["gm"], captured["analysis"] = gm, TokenLayoutAnalysis(gm)
        return gm.forward

    torch.compile(module, backend=backend, fullgraph=True)(*inputs)
    output = [n for n in captured["gm"].graph.nodes if n.op == "output"][0].args[0]
    output = output[0] if isinstance(output, (tuple, list)) else output
    return captured["analysis"].layouts(output)


def test_slices_and_rejoins_keep_the_segments():
    torch._dynamo.reset()
    layouts = _analyse(_JoinedSequence(), torch.randn(1, 3, 3, 8, 10), torch.randn(1, 6, 8))
    seq = layouts[2]  # (B, heads, S, D)
    assert [tuple(f.hint for f in seg) for seg in seq.segments] == [(3, 4, 5), (6,)]


class _PerTokenModulation(torch.nn.Module):
    """Diffusion-forcing modulation: ``(table + temb).chunk(6, dim=1)`` then ``squeeze(1)`` per piece."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv3d(3, 8, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.to_temb = torch.nn.Linear(8, 6 * 8)
        self.table = torch.nn.Parameter(torch.randn(1, 6, 1, 8))

    def forward(self, video):
        tokens = self.embed(video).flatten(2).transpose(1, 2)  # (B, S, C)
        temb = self.to_temb(tokens).unflatten(-1, (6, 8)).transpose(1, 2)  # (B, 6, S, C)
        shift, scale, *_ = [e.squeeze(1) for e in (self.table + temb).chunk(6, dim=1)]
        return (tokens * (1 + scale) + shift).view(1, -1, 2, 4).transpose(1, 2)


class _StartEndCoordinates(torch.nn.Module):
    """RoPE from (start, end) patch coordinates: ``coords.chunk(2, dim=-1)``, ``squeeze(-1)``, then a
    stack over the three position axes."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv3d(3, 6, kernel_size=(1, 2, 2), stride=(1, 2, 2))

    def forward(self, video):
        tokens = self.embed(video).flatten(2).transpose(1, 2)  # (B, S, C)
        coords = torch.stack([tokens[..., :2]] * 3, dim=1)  # (B, 3, S, 2)
        start, end = coords.chunk(2, dim=-1)
        coords = ((start + end) / 2).squeeze(-1)  # (B, 3, S)
        grid = torch.stack([coords[:, i] for i in range(3)], dim=-1)  # (B, S, 3)
        freqs = ((grid.unsqueeze(-1) * 2 - 1) * torch.arange(2.0)).transpose(-1, -2).flatten(2)  # (B, S, C)
        return (tokens * freqs.cos()).view(1, -1, 2, 3).transpose(1, 2)


@pytest.mark.parametrize("module", [_PerTokenModulation, _StartEndCoordinates])
def test_unit_pieces_from_chunk_and_squeeze_leave_the_grid_intact(module):
    torch._dynamo.reset()
    layouts = _analyse(module(), torch.randn(1, 3, 3, 8, 10))
    found = split_video_text(layouts[2])
    assert found is not None
    video, text, _ = found
    assert tuple(f.hint for f in video) == (3, 4, 5) and text == ()
