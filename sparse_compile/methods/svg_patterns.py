"""Sparse VideoGen's two candidate patterns as block layouts, and the temporal layout transform.

Video tokens arrive frame-major: token ``t*F + p`` is frame ``t`` at spatial position
``p = h*W + w`` (``F = H*W`` positions, ``T`` frames, ``Sv = T*F`` tokens). Both patterns keep,
for every query, all keys of the first frame (the attention sink) and a band of keys around it:

- **spatial**: keys whose frame is within ``±n`` frames of the query's frame. Run in
  frame-major order, where the band is a block-diagonal band and the sink the first blocks.
- **temporal**: keys whose position is within ``±m`` positions (raster order) of the query's
  position, in every frame. Run in the *temporal order*, where that band is block-contiguous.

Temporal order (the layout transform, sink first, then position-major): the ``F`` first-frame
tokens in position order, then frames ``1..T-1`` position-major, i.e. frame ``t >= 1`` at
position ``p`` goes to slot ``F + p*(T-1) + (t-1)``. Plain position-major order (``p*T + t``)
would scatter the sink over every block (one token in ``T``), forcing either every block or a
second, LSE-merged sink pass; with the sink moved to the front it is ``ceil(F / block)``
contiguous key blocks and one layout covers band and sink. The transform is never applied to
the tensors: the block kernel reads q, k, v and writes O and LSE through the permutation
(:func:`temporal_permutation`, one cached index per grid and device).

Both layouts are block-granular: query block ``i`` keeps key block ``j`` when ``j`` holds a
first-frame token, or some query token of ``i`` and some key token of ``j`` are within the band
(so a block's own block is always kept). A (query, key) token pair is kept exactly when its
blocks are; :meth:`SvgPatterns.row_masks` returns that token mask for sampled rows, which is what
the profiler scores, so the profiled pattern is the one the kernel computes.

Band width from ``density``: the widest band whose layout keeps at most ``density`` of the
``Sv x Sv`` video pairs; never narrower than 0 (own frame / own position, plus the sink), so a
density below the narrowest pattern keeps that pattern. ``density=1`` keeps every block.
Layouts are built on the CPU once per (grid, block, density, device) and cached.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_compile.kernels.block_select import keep_mask_to_layout
from sparse_compile.kernels.common import cdiv
from sparse_compile.methods.block_pairs import kept_pair_density

_EMPTY = 1 << 40  # interval bound of a block without tokens of a class: farther than any band reaches
_DENSITY_SLACK = 1e-9


@dataclass(frozen=True, eq=False)
class BlockPattern:
    """One block layout over ``Sv`` tokens in the order its pattern runs in.

    Attributes:
        counts: int32 ``(NQ,)`` kept key blocks per query block.
        indices: int32 ``(NQ, MAXK)`` kept key block ids, ascending, then zeros
            (``MAXK`` = the largest count).
        mask: bool ``(NQ, NK)`` the same layout as a block keep-mask.
        width: band half-width (frames for spatial, positions for temporal).
        kept: fraction of the ``Sv x Sv`` token pairs the layout keeps.
    """

    counts: Tensor
    indices: Tensor
    mask: Tensor
    width: int
    kept: float


@dataclass(frozen=True, eq=False)
class SvgPatterns:
    """Both patterns of one grid, block size and density, and the temporal order's index tensors.

    Attributes:
        spatial: layout in frame-major order.
        temporal: layout in temporal order.
        to_temporal: int32 ``(Sv,)``: the frame-major token at each temporal-order slot
            (``x_temporal = x[..., to_temporal, :]``; :func:`temporal_permutation`).
        spatial_block: int64 ``(Sv,)``: block of each frame-major token in frame-major order.
        temporal_block: int64 ``(Sv,)``: block of each frame-major token in temporal order.
        block: tokens per block (query and key).
    """

    spatial: BlockPattern
    temporal: BlockPattern
    to_temporal: Tensor
    spatial_block: Tensor
    temporal_block: Tensor
    block: int

    def row_masks(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Token keep-masks of frame-major query ``rows`` (int64 ``(R,)``) over the frame-major keys.

        Returns ``(spatial, temporal)``, bool ``(R, Sv)`` each: exactly the pairs the block
        kernel computes for those rows under each pattern.
        """
        spatial = self.spatial.mask[self.spatial_block[rows]][:, self.spatial_block]
        temporal = self.temporal.mask[self.temporal_block[rows]][:, self.temporal_block]
        return spatial, temporal


def temporal_order(frames: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The layout transform of temporal heads as ``(to_temporal, from_temporal)``, int64 ``(Sv,)`` each.

    ``from_temporal[t*F + p]`` is ``p`` for the first frame and ``F + p*(T-1) + (t-1)`` otherwise;
    ``to_temporal`` is its inverse permutation.
    """
    positions = height * width
    token = torch.arange(frames * positions)
    t, p = token // positions, token % positions
    from_temporal = torch.where(t == 0, p, positions + p * (frames - 1) + t - 1)
    to_temporal = torch.empty_like(from_temporal).scatter_(0, from_temporal, token)
    return to_temporal, from_temporal


@functools.lru_cache(maxsize=32)
def temporal_permutation(frames: int, height: int, width: int, device: torch.device) -> Tensor:
    """``to_temporal`` of :func:`temporal_order` as int32 ``(Sv,)`` on ``device``: the token permutation the
    kernel folds into its loads and stores for temporal heads. Built once per grid and device."""
    return temporal_order(frames, height, width)[0].to(device=device, dtype=torch.int32)


def _block_intervals(coord: Tensor, member: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per block of ``block`` consecutive tokens, the least and greatest ``coord`` of its ``member`` tokens.

    ``coord`` int64 ``(S,)``, ``member`` bool ``(S,)``. Returns ``(lo, hi)`` int64 ``(NB,)``; a block
    without members gets the empty interval ``(+_EMPTY, -_EMPTY)``.
    """
    pad = cdiv(coord.numel(), block) * block - coord.numel()
    lo = F.pad(torch.where(member, coord, _EMPTY), (0, pad), value=_EMPTY)
    hi = F.pad(torch.where(member, coord, -_EMPTY), (0, pad), value=-_EMPTY)
    return lo.view(-1, block).amin(1), hi.view(-1, block).amax(1)


def _interval_gap(q_lo: Tensor, q_hi: Tensor, k_lo: Tensor, k_hi: Tensor) -> Tensor:
    """Distance between query intervals ``(NQ,)`` and key intervals ``(NK,)``: int64 ``(NQ, NK)``, 0 if they meet."""
    below = k_lo[None, :] - q_hi[:, None]
    above = q_lo[:, None] - k_hi[None, :]
    return torch.clamp_min(torch.maximum(below, above), 0)


def band_block_mask(coord: Tensor, sink: Tensor, block: int, width: int) -> Tensor:
    """Block keep-mask of "sink keys, or keys within ``width`` of the query's ``coord``", bool ``(NB, NB)``.

    ``coord`` int64 ``(S,)`` (frame or position of each token, in the order the kernel runs) and
    ``sink`` bool ``(S,)``. Within a block the sink tokens' coordinates and the others' are each a
    run of consecutive integers, so two intervals per query block describe its tokens exactly;
    key blocks holding a sink token are kept whole, so only their non-sink interval matters.
    """
    k_lo, k_hi = _block_intervals(coord, ~sink, block)
    gaps = [_interval_gap(*_block_intervals(coord, member, block), k_lo, k_hi) for member in (sink, ~sink)]
    pad = cdiv(sink.numel(), block) * block - sink.numel()
    has_sink = F.pad(sink, (0, pad), value=False).view(-1, block).any(1)
    return (torch.minimum(*gaps) <= width) | has_sink[None, :]


def band_pattern(coord: Tensor, sink: Tensor, block: int, density: float, max_width: int) -> BlockPattern:
    """The widest band in ``[0, max_width]`` whose layout keeps at most ``density`` (width 0 if none does).

    ``coord``/``sink`` as :func:`band_block_mask` (CPU tensors); the kept fraction grows with the
    width, so the width is found by bisection.
    """
    tokens = coord.numel()

    def fits(width: int) -> bool:
        return kept_pair_density(band_block_mask(coord, sink, block, width), tokens, block) <= density + _DENSITY_SLACK

    lo, hi = 0, max_width
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    mask = band_block_mask(coord, sink, block, lo)
    counts, indices = keep_mask_to_layout(mask)
    indices = indices[:, : int(counts.max())].contiguous()
    return BlockPattern(counts, indices, mask, lo, kept_pair_density(mask, tokens, block))


def _to_device(pattern: BlockPattern, device: torch.device) -> BlockPattern:
    return BlockPattern(pattern.counts.to(device), pattern.indices.to(device), pattern.mask.to(device),
                        pattern.width, pattern.kept)


@functools.lru_cache(maxsize=32)
def build_patterns(
    frames: int, height: int, width: int, block: int, density: float, device: torch.device
) -> SvgPatterns:
    """Spatial and temporal layouts of a ``frames x height x width`` grid (built on the CPU, cached per arguments)."""
    positions = height * width
    token = torch.arange(frames * positions)
    frame, position = token // positions, token % positions
    first_frame = frame == 0
    to_temporal, from_temporal = temporal_order(frames, height, width)
    spatial = band_pattern(frame, first_frame, block, density, frames - 1)
    temporal = band_pattern(position[to_temporal], first_frame[to_temporal], block, density, positions - 1)
    return SvgPatterns(
        spatial=_to_device(spatial, device),
        temporal=_to_device(temporal, device),
        to_temporal=temporal_permutation(frames, height, width, device),
        spatial_block=(token // block).to(device),
        temporal_block=(from_temporal // block).to(device),
        block=block,
    )
