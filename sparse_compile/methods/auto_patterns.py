"""The static candidates ``method="auto"`` scores per head, as block keep-masks in frame-major order.

Video tokens are frame-major (token ``t*P + p``: frame ``t``, raster position ``p`` of ``P``) and cut
into ``N = ceil(Sv / block)`` blocks. A candidate keeps query block ``i`` and key block ``j`` when
some query token of ``i`` and some key token of ``j`` satisfy its token rule:

- ``spatial w``: the key's frame is within ``w`` frames of the query's (SVG's spatial head);
- ``temporal w``: the key's raster position is within ``w`` positions of the query's, in any
  frame (SVG's temporal head, run in frame-major order: no token permutation);
- ``radial``: Radial attention's decay mask (:func:`radial_block_mask`, first-frame sink).

Every candidate keeps the diagonal block. Masks are built on the call's device and cached per
(grid, block, device).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_compile.kernels.block_select_reference import block_sizes
from sparse_compile.methods.radial_pattern import radial_block_mask

SPATIAL_WIDTHS = (0, 1, 2)
RADIAL_DECAY = 0.2


@dataclass(frozen=True, eq=False)
class Candidates:
    """The static candidates of one grid and block size.

    Attributes:
        names: one label per candidate, e.g. ``"spatial 1"``, ``"temporal 0"``, ``"radial"``.
        masks: bool ``(C, N, N)``: block keep-masks, diagonal included.
        block_sizes: int64 ``(N,)``: tokens per block (the last may be partial).
    """

    names: tuple[str, ...]
    masks: Tensor
    block_sizes: Tensor


def _coordinate_sets(coord: Tensor, values: int, block: int) -> Tensor:
    """Whether block ``i`` holds a token with coordinate ``c``: float ``(N, values)`` of 0/1."""
    n_blocks = -(-coord.numel() // block)
    sets = torch.zeros(n_blocks, values, device=coord.device)
    blocks = torch.arange(coord.numel(), device=coord.device) // block
    sets[blocks, coord] = 1.0
    return sets


def band_mask(coord: Tensor, values: int, block: int, width: int) -> Tensor:
    """Block keep-mask bool ``(N, N)`` of "key coordinate within ``width`` of the query's".

    ``coord`` int64 ``(Sv,)``: each token's coordinate in ``[0, values)``.
    """
    sets = _coordinate_sets(coord, values, block)
    reach = F.max_pool1d(sets.unsqueeze(1), 2 * width + 1, stride=1, padding=width).squeeze(1) if width else sets
    return (reach @ sets.T) > 0


@functools.lru_cache(maxsize=8)
def static_candidates(frames: int, height: int, width: int, block: int, device: torch.device) -> Candidates:
    """Spatial bands of :data:`SPATIAL_WIDTHS` frames, temporal bands of 0 and ``width`` positions
    (same position / one raster row either way), and the radial mask, for one grid."""
    positions = height * width
    token = torch.arange(frames * positions, device=device)
    frame, position = token // positions, token % positions
    names: list[str] = []
    masks: list[Tensor] = []
    for w in SPATIAL_WIDTHS:
        if w < frames:
            names.append(f"spatial {w}")
            masks.append(band_mask(frame, frames, block, w))
    for w in (0, width):
        names.append(f"temporal {w}")
        masks.append(band_mask(position, positions, block, w))
    names.append("radial")
    masks.append(radial_block_mask(frames, height, width, block, RADIAL_DECAY, True).to(device))
    stacked = torch.stack(masks) | torch.eye(masks[0].shape[0], dtype=torch.bool, device=device)
    return Candidates(tuple(names), stacked, block_sizes(frames * positions, block, device))
