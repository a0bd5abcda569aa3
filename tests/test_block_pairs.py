"""Token pairs of block keep-masks, the last block partial."""

from __future__ import annotations

import torch

from sparse_compile.kernels.block_select_reference import block_sizes
from sparse_compile.methods.block_pairs import kept_pair_density, kept_pairs


def _token_mask(block_mask: torch.Tensor, tokens: int, block: int) -> torch.Tensor:
    blocks = torch.arange(tokens) // block
    return block_mask[..., blocks, :][..., blocks]


def test_kept_pairs_count_the_token_pairs_of_each_mask_in_a_batch():
    tokens, block = 100, 32  # four blocks, the last of 4 tokens
    masks = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    expected = _token_mask(masks, tokens, block).sum(dim=(-1, -2)).double()
    assert torch.equal(kept_pairs(masks, block_sizes(tokens, block)), expected)


def test_kept_pair_density_is_the_share_of_all_token_pairs():
    tokens, block = 100, 32
    mask = torch.eye(4, dtype=torch.bool)
    assert kept_pair_density(mask, tokens, block) == (3 * 32**2 + 4**2) / tokens**2
    assert kept_pair_density(torch.ones(4, 4, dtype=torch.bool), tokens, block) == 1.0
