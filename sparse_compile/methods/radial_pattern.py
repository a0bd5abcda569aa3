"""Radial attention's static energy-decay pattern, as a block layout of frame-major video tokens.

Token rule (Radial Attention, Li et al. 2025, mask construction of mit-han-lab/radial-attention).
Video tokens are frame-major: token ``n = t * P + s`` with ``P = height * width`` tokens per frame
and ``s = h * width + w`` the flattened spatial index. A query token ``(t_q, s_q)`` attends to a
key token ``(t_k, s_k)`` at frame distance ``d = |t_q - t_k|`` when

- ``d <= 1`` (same or adjacent frame): always (dense band around the diagonal);
- ``first_frame_sink`` and ``t_k == 0``: always (every frame attends the whole first frame);
- otherwise, with ``g = bit_length(d) = floor(log2 d) + 1`` and ``P2 = 2 ** bit_length(P)`` (the
  smallest power of two above ``P``), only if both

  * the frame pair is kept: ``L(d) = P2 / 2**g >= block``, or else ``d % floor(block / L(d)) == 0``
    (once the undecayed band is narrower than one block, only every ``m``-th frame pair of the
    distance group is kept, ``m`` growing as the band shrinks), and
  * the spatial distance is within the band: ``|s_q - s_k| <= W(d) = max(decay * L(d), block)``
    (``W`` is the band's half-width in flattened spatial positions; it halves each time ``d``
    doubles and is never narrower than one block).

So ``decay`` scales every band of frame distance >= 2 relative to the undecayed half-width
``P2 / 2**g`` (e.g. at ``d = 2`` the band is ``decay * P2 / 4`` positions either side); it does not
change which frame pairs are kept. Published settings: ``decay=0.2`` with the first-frame sink for
Wan, ``decay=0.95`` without it for HunyuanVideo.

Differences from the published code, on purpose:

- Adjacent frames are always dense (the published Wan variant narrows ``d = 1`` to half a frame).
- Block reduction: a (query block, key block) pair is kept when *any* token pair inside it is kept
  (the published code keeps a block only when it is mostly covered, which can drop parts of the
  same and adjacent frames at frame boundaries that do not fall on block boundaries). The block
  layout therefore never drops a pair the token rule keeps; its density is somewhat higher.
- The "one block" threshold of the frame-pair skip is ``block`` (the published code hard-codes 128,
  its default block size).

Construction is O(segments * frames + NQ * NK) and vectorised: the tokens are cut into segments
(one block within one frame); for every (query segment, key frame) the kept key tokens form one
interval ``[s_lo - W, s_hi + W]`` of that frame (or all of it, or nothing), i.e. one interval of
key blocks, marked with a difference array. Kept blocks grow as O(n log n) in the number of frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from sparse_compile.methods.block_pairs import kept_pair_density


@dataclass(frozen=True)
class RadialLayout:
    """A block layout for :func:`sparse_compile.kernels.block_sparse.block_sparse_attention`.

    Attributes:
        counts: int32 ``(1, 1, NQ)``: kept key blocks per query block (broadcast over batch and heads).
        indices: int32 ``(1, 1, NQ, MAXK)``: their ids, the first ``count`` ascending, the rest 0.
        block: tokens per query and key block.
        kept_density: kept (query, key) token pairs of the block layout / ``Sv**2`` (partial last
            block counted by its real size).
    """

    counts: Tensor
    indices: Tensor
    block: int
    kept_density: float


def _distance_tables(frames: int, tokens_per_frame: int, block: int, decay: float) -> tuple[Tensor, Tensor]:
    """Per frame distance ``d`` in ``[0, frames)``: whether the frame pair is kept, and the band half-width.

    Returns ``(pair_kept bool (frames,), half_width int64 (frames,))``; the half-width of ``d <= 1``
    is ``tokens_per_frame`` (the whole frame).
    """
    p2 = 1 << tokens_per_frame.bit_length()
    kept, half = [], []
    for d in range(frames):  # one entry per frame distance: O(frames)
        if d <= 1:
            kept.append(True)
            half.append(tokens_per_frame)
            continue
        g = d.bit_length()
        undecayed = p2 / 2**g
        kept.append(p2 >= block << g or d % ((block << g) // p2) == 0)
        half.append(int(max(decay * undecayed, block)))
    return torch.tensor(kept, dtype=torch.bool), torch.tensor(half, dtype=torch.int64)


def _segments(frames: int, tokens_per_frame: int, block: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cut the ``frames * tokens_per_frame`` tokens at block and frame boundaries.

    Returns, per segment (int64 ``(N,)`` each): its block, its frame, and its first and last spatial
    index within the frame.
    """
    seq = frames * tokens_per_frame
    starts = torch.unique(torch.cat([torch.arange(0, seq, block), torch.arange(0, seq, tokens_per_frame)]))
    ends = torch.cat([starts[1:], torch.tensor([seq])]) - 1
    frame = starts // tokens_per_frame
    return starts // block, frame, starts - frame * tokens_per_frame, ends - frame * tokens_per_frame


def radial_block_mask(
    frames: int, height: int, width: int, block: int, decay: float, first_frame_sink: bool
) -> Tensor:
    """Boolean block mask ``(NQ, NK)`` (``NQ = NK = ceil(Sv / block)``) of the radial pattern on CPU.

    Block ``(i, j)`` is kept when some query token of block ``i`` attends some key token of block
    ``j`` under the token rule of the module docstring. ``block`` is any int >= 1 here (the kernel
    needs a power of two in [16, 256]); ``decay`` > 0.
    """
    tokens_per_frame = height * width
    seq = frames * tokens_per_frame
    n_blocks = -(-seq // block)
    pair_kept, half_width = _distance_tables(frames, tokens_per_frame, block, decay)
    q_block, q_frame, q_lo, q_hi = (x.unsqueeze(1) for x in _segments(frames, tokens_per_frame, block))
    k_frame = torch.arange(frames).unsqueeze(0)  # (segments, frames) below
    dist = (q_frame - k_frame).abs()
    whole = (dist <= 1) | ((k_frame == 0) & first_frame_sink)
    keep = whole | pair_kept[dist]
    w = half_width[dist]
    last = tokens_per_frame - 1
    lo = torch.where(whole, 0, (q_lo - w).clamp(min=0)) + k_frame * tokens_per_frame
    hi = torch.where(whole, last, (q_hi + w).clamp(max=last)) + k_frame * tokens_per_frame
    rows = q_block.expand_as(keep)[keep]
    # Difference array over key blocks: +1 at the interval's first block, -1 after its last.
    diff = torch.zeros(n_blocks, n_blocks + 1, dtype=torch.int32)
    ones = torch.ones(rows.shape, dtype=torch.int32)
    diff.index_put_((rows, lo[keep] // block), ones, accumulate=True)
    diff.index_put_((rows, hi[keep] // block + 1), -ones, accumulate=True)
    return diff.cumsum(dim=1)[:, :n_blocks] > 0


def block_mask_to_layout(mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(NQ, NK)`` boolean block mask -> counts int32 ``(NQ,)`` and indices int32 ``(NQ, MAXK)``.

    ``MAXK`` is the largest count; each row lists its kept blocks ascending, the unused slots 0.
    """
    counts = mask.sum(dim=1)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: columns ascending within each row
    slots = torch.arange(rows.numel()) - (counts.cumsum(0) - counts)[rows]
    indices = torch.zeros(mask.shape[0], int(counts.max()), dtype=torch.int32)
    indices[rows, slots] = cols.to(torch.int32)
    return counts.to(torch.int32), indices


@lru_cache(maxsize=32)
def radial_layout(
    frames: int, height: int, width: int, block: int, decay: float, first_frame_sink: bool, device: torch.device
) -> RadialLayout:
    """The cached radial layout of one grid, built once per (grid, block, decay, sink, device).

    Static: shared by every site, step, CFG branch and model with this grid.
    """
    mask = radial_block_mask(frames, height, width, block, decay, first_frame_sink)
    counts, indices = block_mask_to_layout(mask)
    return RadialLayout(
        counts=counts.view(1, 1, *counts.shape).to(device),
        indices=indices.view(1, 1, *indices.shape).to(device),
        block=block,
        kept_density=kept_pair_density(mask, frames * height * width, block),
    )
