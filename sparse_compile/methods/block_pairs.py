"""Token pairs that block keep-masks compute, counting each kept block whole (the last block partial)."""

from __future__ import annotations

from torch import Tensor

from sparse_compile.kernels.block_select_reference import block_sizes


def kept_pairs(masks: Tensor, sizes: Tensor) -> Tensor:
    """(query, key) token pairs of block keep-masks bool ``(..., N, N)``: fp64 ``(...)``.

    ``sizes``: int ``(N,)``, the tokens of each block. Per-row token counts are exact in fp32 (below
    ``2**24``), the sum over rows runs in fp64.
    """
    row_tokens = masks.float() @ sizes.float()
    return row_tokens.double() @ sizes.double()


def kept_pair_density(mask: Tensor, tokens: int, block: int) -> float:
    """Share of the ``tokens x tokens`` pairs a block keep-mask ``(N, N)`` of ``block``-token blocks keeps."""
    return float(kept_pairs(mask, block_sizes(tokens, block, mask.device))) / tokens**2
