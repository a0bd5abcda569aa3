"""The tile each kernel family chooses, pinned for representative shapes and devices (shared memory per
block: Hopper 227 KiB, A100 163 KiB, unknown); a change here changes the kernels' speed."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.kernels.tile_configs import (
    AUTOTUNE_TILES,
    FP8_CHANNEL_TOKENS,
    KMEANS_TILE,
    TileConfig,
    VarlenConfig,
    attention_lse_config,
    block_mass_config,
    block_sparse_tiles,
    fp8_quant_warps,
    interpreter_block_sparse_tile,
    max_shared_memory,
    tile_table_warps,
    top_p_selection_warps,
    varlen_config,
)

HOPPER = 232448  # 227 KiB per block
AMPERE = 166912  # 163 KiB


def test_block_sparse_autotunes_over_the_hopper_candidates():
    assert AUTOTUNE_TILES == (
        TileConfig(128, 128, 8, 2),
        TileConfig(128, 128, 8, 3),
        TileConfig(128, 64, 8, 2),
        TileConfig(128, 64, 8, 3),
        TileConfig(128, 64, 8, 4),
        TileConfig(64, 64, 4, 3),
    )
    assert block_sparse_tiles(128, 128) == AUTOTUNE_TILES
    assert block_sparse_tiles(256, 256) == AUTOTUNE_TILES


def test_block_sparse_candidates_fit_inside_the_layout_blocks():
    assert block_sparse_tiles(128, 64) == tuple(t for t in AUTOTUNE_TILES if t.block_n == 64)
    assert block_sparse_tiles(64, 128) == (TileConfig(64, 64, 4, 3),)
    assert block_sparse_tiles(64, 32) == (TileConfig(64, 32, 4, 2),)  # smaller than every candidate
    assert block_sparse_tiles(16, 16) == (TileConfig(16, 16, 4, 2),)


def test_block_sparse_interpreter_tile_is_at_most_64_by_64():
    assert interpreter_block_sparse_tile(128, 128) == TileConfig(64, 64, 4, 2)
    assert interpreter_block_sparse_tile(32, 256) == TileConfig(32, 64, 4, 2)


@pytest.mark.parametrize(
    "s_q, clusters, head_dim, element_size, shared, want",
    [
        # SVG2 at Wan 480p and HunyuanVideo 720p shapes, 16-bit: 128x128 + 64x64 tails, 5 stages on Hopper
        (32760, 200, 128, 2, HOPPER, VarlenConfig(128, 128, 8, 5, tail_block_m=64, tail_block_n=64)),
        (118800, 400, 128, 2, HOPPER, VarlenConfig(128, 128, 8, 5, tail_block_m=64, tail_block_n=64)),
        (32760, 200, 128, 2, AMPERE, VarlenConfig(128, 128, 8, 3, tail_block_m=64, tail_block_n=64)),
        (32760, 200, 128, 2, None, VarlenConfig(128, 128, 8, 3, tail_block_m=64, tail_block_n=64)),
        (32760, 200, 64, 2, AMPERE, VarlenConfig(128, 128, 8, 5, tail_block_m=64, tail_block_n=64)),  # half the bytes
        # small clusters (< 96 rows on average): 64x128
        (32760, 1000, 128, 2, HOPPER, VarlenConfig(64, 128, 4, 3)),
        # fp32 never takes the 128x128 tile (3 stages need 257 KiB), however large the clusters
        (118800, 200, 128, 4, HOPPER, VarlenConfig(64, 128, 4, 3)),
        (118800, 20, 128, 4, HOPPER, VarlenConfig(64, 128, 4, 3)),
        (118800, 200, 128, 4, AMPERE, VarlenConfig(64, 64, 4, 3)),
        (118800, 200, 128, 4, None, VarlenConfig(64, 64, 4, 3)),
    ],
)
def test_varlen_config_by_cluster_size_dtype_and_shared_memory(s_q, clusters, head_dim, element_size, shared, want):
    assert varlen_config(s_q, clusters, head_dim, element_size, shared_memory=shared) == want


def test_varlen_config_tail_block_m_must_be_a_smaller_power_of_two():
    for bad in (8, 48, 128, 256):
        with pytest.raises(ValueError, match="tail_block_m"):
            VarlenConfig(128, 128, 8, 3, tail_block_m=bad)
    assert VarlenConfig(128, 128, 8, 3, tail_block_m=64).tail_block_m == 64


def test_varlen_config_tail_tile_keys_and_stages_are_checked():
    for bad in (8, 48):
        with pytest.raises(ValueError, match="tail_block_n"):
            VarlenConfig(128, 128, 8, 3, tail_block_m=64, tail_block_n=bad)
    with pytest.raises(ValueError, match="tail_num_stages"):
        VarlenConfig(128, 128, 8, 3, tail_block_m=64, tail_num_stages=-1)


def test_cpu_devices_report_no_shared_memory():
    assert max_shared_memory(torch.device("cpu")) is None


def test_kmeans_assignment_tile_is_64_tokens_by_64_centroids():
    assert KMEANS_TILE == TileConfig(64, 64, 4, 2)


@pytest.mark.parametrize(
    "block, head_dim, want",
    [
        (128, 128, TileConfig(128, 64, 8, 3)),
        (128, 64, TileConfig(128, 128, 8, 3)),
        (64, 128, TileConfig(64, 64, 4, 3)),
        (16, 32, TileConfig(16, 128, 4, 3)),
    ],
)
def test_attention_lse_tile(block, head_dim, want):
    assert attention_lse_config(block, head_dim) == want


@pytest.mark.parametrize(
    "block_q, block_k, head_dim, want",
    [
        (128, 128, 128, TileConfig(128, 64, 8, 3)),
        (128, 128, 64, TileConfig(128, 128, 8, 3)),
        (64, 64, 128, TileConfig(64, 64, 4, 3)),
        (100, 40, 64, TileConfig(128, 64, 8, 3)),  # rows and keys padded to powers of two
        (8, 8, 128, TileConfig(16, 16, 4, 3)),
    ],
)
def test_block_mass_tile(block_q, block_k, head_dim, want):
    assert block_mass_config(block_q, block_k, head_dim) == want


def test_helper_kernel_warps_grow_with_the_row_length():
    assert [top_p_selection_warps(n) for n in (256, 1024, 2048, 4096, 8192)] == [4, 4, 4, 8, 16]
    assert [tile_table_warps(n) for n in (16, 2048, 4096, 8192)] == [4, 4, 8, 8]


def test_fp8_quantisation_takes_a_warp_per_1024_elements_and_64_tokens_of_v():
    """Q/K runs of 64 x 64 to 256 x 128 and V's 64-token tiles: 4 to 16 warps (Wan's 128 x 128: 16)."""
    assert [fp8_quant_warps(n) for n in (2048, 4096, 8192, 16384, 32768)] == [4, 4, 8, 16, 16]
    assert FP8_CHANNEL_TOKENS == 64
