"""Tile shapes and launch options of every Triton kernel, chosen here and nowhere else.

A launch's tile is a :class:`TileConfig` (rows x columns per program, warps, software-pipeline
stages), or for the cluster-attention kernel a :class:`VarlenConfig` (a main tile plus an optional
tail tile). Each kernel family has one function that picks it from the call's shape and, where it
matters, the device's shared memory per block (:func:`max_shared_memory`):

==========================  ================================  ===========================================
family                      function                          tile
==========================  ================================  ===========================================
fixed-block attention       :func:`block_sparse_tiles`        autotune candidates that tile the layout
                                                              blocks (the autotuner times them on CUDA);
                                                              :func:`interpreter_block_sparse_tile` in
                                                              Triton's CPU interpreter
fixed-block attention,      :func:`gluon_block_sparse_tile`   by layout blocks
Gluon (sm_90)
fixed-block attention,      :func:`fp8_block_sparse_tile`     by layout blocks (no autotuning)
FP8 (e4m3)
cluster attention           :func:`varlen_config`             by mean q cluster size, element size,
                                                              head dim and shared memory
k-means assignment          :data:`KMEANS_TILE`               one tile for every shape
full-attention LSE          :func:`attention_lse_config`      by query block and head dim
exact block mass            :func:`block_mass_config`         by layout blocks and head dim
top-p cluster selection     :func:`top_p_selection_warps`     warps by the padded cluster count
cluster tile tables         :func:`tile_table_warps`          warps by the padded q-cluster count
FP8 quantisation            :func:`fp8_quant_warps`           Q/K: one run of rows per program; V:
                                                              :data:`FP8_CHANNEL_TOKENS` tokens; warps
                                                              by the tile's elements
==========================  ================================  ===========================================

The helper kernels' fixed block sizes (kept-rows prep, k-means finalize, permutation, ranks and scale
pass, tile-table fill) are the constants at the end. Shared-memory needs are those of sm_90 compiles at D = 128.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class TileConfig:
    """One launch's tile: ``block_m`` rows x ``block_n`` columns per program, ``num_warps``, ``num_stages``.

    Rows and columns are query rows x keys for attention, tokens x centroids for the k-means assignment.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class VarlenConfig:
    """Tile shape and launch options of the cluster-attention kernel.

    ``tail_block_m`` > 0 splits off the last rows of each q cluster when they fill at most that many
    (``size % block_m`` in ``(0, tail_block_m]``): a second launch runs them in ``tail_block_m``-row
    tiles with ``tail_num_warps`` warps, ``tail_block_n``-key tiles and ``tail_num_stages`` stages
    (0: the main launch's), so a 130-row cluster computes 128 + 32 rows, not 256.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tail_block_m: int = 0  # 0: no tail launch
    tail_num_warps: int = 4
    tail_block_n: int = 0
    tail_num_stages: int = 0

    def __post_init__(self) -> None:
        tail = self.tail_block_m
        if tail and (tail < 16 or tail & (tail - 1) or tail >= self.block_m):
            raise ValueError(
                f"VarlenConfig.tail_block_m must be 0 or a power of two in [16, block_m={self.block_m}), got {tail}"
            )
        tail_n = self.tail_block_n
        if tail_n and (tail_n < 16 or tail_n & (tail_n - 1)):
            raise ValueError(f"VarlenConfig.tail_block_n must be 0 or a power of two >= 16, got {tail_n}")
        if self.tail_num_stages < 0:
            raise ValueError(f"VarlenConfig.tail_num_stages must be >= 0, got {self.tail_num_stages}")


def max_shared_memory(device: torch.device) -> int | None:
    """Opt-in shared memory per block of a CUDA device, in bytes (``None`` for other devices)."""
    if device.type != "cuda":
        return None
    return _cuda_max_shared_memory(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_max_shared_memory(index: int) -> int:
    """The driver's answer for CUDA device ``index``, asked once (every call of the ops needs it)."""
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


# ------------------------------------------------------------------------------------------------
# Fixed-block attention (sparse_compile.kernels.block_sparse)
# ------------------------------------------------------------------------------------------------

AUTOTUNE_TILES = (
    TileConfig(128, 128, 8, 2),
    TileConfig(128, 128, 8, 3),
    TileConfig(128, 64, 8, 2),
    TileConfig(128, 64, 8, 3),
    TileConfig(128, 64, 8, 4),
    TileConfig(64, 64, 4, 3),
)
"""Candidates the autotuner times once per (D, block_q, block_k, TMA, permutations, dtype): 128-row
tiles over two warpgroups (8 warps) with 64/128-key sub-tiles and 2-4 stages (128x128 with 3 stages
needs 224 KiB of shared memory at D = 128, 16-bit), and 64x64 with 4 warps. 128x64 and 64x128 tiles
with 4 warps spill registers and are not candidates."""


def interpreter_block_sparse_tile(block_q: int, block_k: int) -> TileConfig:
    """The tile of layouts whose blocks are smaller than every candidate, and of Triton's CPU interpreter."""
    return TileConfig(min(block_q, 64), min(block_k, 64), 4, 2)


def block_sparse_tiles(block_q: int, block_k: int) -> tuple[TileConfig, ...]:
    """Autotune candidates for a ``block_q`` x ``block_k`` layout: those whose tile fits inside a layout
    block (BLOCK_M <= block_q, BLOCK_N <= block_k), else :func:`interpreter_block_sparse_tile` alone."""
    kept = tuple(t for t in AUTOTUNE_TILES if t.block_m <= block_q and t.block_n <= block_k)
    return kept or (interpreter_block_sparse_tile(block_q, block_k),)


def fp8_block_sparse_tile(block_q: int, block_k: int) -> TileConfig:
    """Tile of the FP8 fixed-block kernel (:mod:`~sparse_compile.kernels.block_sparse_fp8`) on CUDA.

    ``block_m`` = min(block_q, 128) query rows and ``block_n`` = min(block_k, 128) keys, 8 warps for a
    128-row tile and 4 otherwise, 3 stages (128x128 at D = 128 holds 32 KiB of fp8 K/V per stage).
    """
    block_m = min(block_q, 128)
    return TileConfig(block_m, min(block_k, 128), 8 if block_m == 128 else 4, 3)


def gluon_block_sparse_tile(block_q: int, block_k: int) -> TileConfig:
    """Tile of the Gluon fixed-block kernel (sm_90), for layout blocks of 64, 128 or 256.

    ``block_m`` = min(block_q, 128) query rows, one consumer warpgroup per 64 (``num_warps`` 4 or 8,
    plus the producer warp); ``block_n`` = min(block_k, 128) keys per K/V tile; 2 K/V ring slots
    (at most 160 KiB of shared memory at D = 128; a third slot ran no faster at Wan 480p on the H200).
    """
    block_m = min(block_q, 128)
    return TileConfig(block_m, min(block_k, 128), block_m // 16, 2)


def gluon_fp8_block_sparse_tile(block_k: int) -> TileConfig:
    """Tile of the Gluon FP8 fixed-block kernel (sm_90), for query blocks of 128 or 256 and key blocks of
    64, 128 or 256: 128 rows (two consumer warpgroups), ``block_n`` = min(block_k, 128) keys, 3 K/V ring
    slots (e4m3 tiles take half the shared memory of 16-bit ones: at most 112 KiB at D = 128, with 32 KiB
    of P buffers beside them).
    """
    return TileConfig(128, min(block_k, 128), 8, 3)


# ------------------------------------------------------------------------------------------------
# Cluster attention (sparse_compile.kernels.varlen_block_sparse)
# ------------------------------------------------------------------------------------------------

DEEP_PIPELINE_SHARED_BYTES = 230400
"""Shared memory of the 5-stage 128x128 tile at D = 128, 16-bit: Hopper's 227 KiB per block holds it,
an A100's 163 KiB does not."""
WIDE_FP32_TILE_SHARED_BYTES = 197120
"""Shared memory of the 3-stage 64x128 tile at D = 128, fp32; without it fp32 takes 64x64 (115 KB)."""


def varlen_config(
    s_q: int, num_q_clusters: int, head_dim: int, element_size: int, shared_memory: int | None = None
) -> VarlenConfig:
    """Tile config by mean q cluster size, element size and the device's shared memory per block
    (``shared_memory`` bytes, :func:`max_shared_memory`; ``None``: assume the smallest pipeline).

    - 16-bit inputs, q clusters of >= 96 rows on average: 128x128 tiles, 8 warps (128-row tiles
      amortise the per-tile work over twice the rows, despite more padding in each cluster's last
      tile); a cluster's last rows, when at most 64, run in a second launch of 64x64 tiles, 4 warps.
      5 stages where the device has :data:`DEEP_PIPELINE_SHARED_BYTES` (so that the K/V gathers of
      a tile are issued two tiles ahead; with 3 or 4 they are issued one tile ahead and their
      latency is exposed), else 3.
    - 16-bit inputs, smaller clusters: 64x128 tiles, 4 warps, 3 stages.
    - fp32 inputs (twice the shared memory per tile: 128x128 at 3 stages would need 257 KiB): 64x128
      where the device has :data:`WIDE_FP32_TILE_SHARED_BYTES`, else 64x64; 4 warps, 3 stages.

    Shared-memory needs are those of D = 128, scaled by ``head_dim / 128`` for smaller heads.
    """
    mean_rows = s_q / max(num_q_clusters, 1)

    def fits(bytes_at_d128: int) -> bool:
        return shared_memory is not None and shared_memory >= bytes_at_d128 * head_dim // 128

    if element_size <= 2 and mean_rows >= 96:
        stages = 5 if fits(DEEP_PIPELINE_SHARED_BYTES) else 3
        return VarlenConfig(128, 128, 8, stages, tail_block_m=64, tail_block_n=64)
    if element_size <= 2:
        return VarlenConfig(64, 128, 4, 3)
    return VarlenConfig(64, 128 if fits(WIDE_FP32_TILE_SHARED_BYTES) else 64, 4, 3)


GLUON_VARLEN_CONFIG = VarlenConfig(128, 128, 8, 2)
"""Tiles of the Gluon cluster kernel (sm_90, 16-bit): 128-row q tiles (two consumer warpgroups; ``num_warps``
counts their warps, besides the producer warpgroup), 128-key K/V tiles in 2 ring slots: 160 KiB of shared memory
at D = 128, one program per SM. Of the tiles measured at SVG2's layouts (64x64 and 128x64 at 3 slots, 128x128 at
3 slots and with 64-row tails) the fastest or within noise of it, and one launch per group (benchmarks/NOTES.md)."""


def tile_table_warps(nqc_pad: int) -> int:
    """Warps of the tile-table program that sorts ``nqc_pad`` (padded) q clusters: 4 up to 2048, then 8."""
    return 4 if nqc_pad <= 2048 else 8


# ------------------------------------------------------------------------------------------------
# k-means (sparse_compile.kernels.kmeans)
# ------------------------------------------------------------------------------------------------

KMEANS_TILE = TileConfig(64, 64, 4, 2)
"""Tile of the k-means assignment kernel for every shape: 64 tokens x 64 centroids, 4 warps, 2 stages
(wgmma m64n64k16 on sm_90, no spills)."""


# ------------------------------------------------------------------------------------------------
# Block scoring and selection (sparse_compile.kernels.block_select)
# ------------------------------------------------------------------------------------------------


def attention_lse_config(block: int, head_dim: int) -> TileConfig:
    """Tile of the full-attention LSE kernel: ``block`` query rows x 64 keys (D > 64) or 128 keys,
    8 warps for 128-row tiles else 4, 3 stages."""
    return TileConfig(block, 64 if head_dim > 64 else 128, 8 if block == 128 else 4, 3)


def block_mass_config(block_q: int, block_k: int, head_dim: int) -> TileConfig:
    """Tile of the block-mass kernel: one q block per program (rows padded to a power of two >= 16);
    key tiles of the kv block size padded to a power of two in [16, 64 (D > 64) or 128]; 8 warps for
    128-row tiles else 4, 3 stages."""
    block_m = max(16, triton.next_power_of_2(block_q))
    block_n = max(16, min(64 if head_dim > 64 else 128, triton.next_power_of_2(block_k)))
    return TileConfig(block_m, block_n, 8 if block_m == 128 else 4, 3)


def top_p_selection_warps(nk_pad: int) -> int:
    """Warps per row program of the top-p cluster selection: 4 up to 2048 clusters, then one per 512."""
    return 4 if nk_pad <= 2048 else nk_pad // 512


# ------------------------------------------------------------------------------------------------
# FP8 quantisation (sparse_compile.kernels.fp8_quant)
# ------------------------------------------------------------------------------------------------

FP8_CHANNEL_TOKENS = 64
"""Tokens per program of V's two quantisation passes (channel amax, then the e4m3 cast)."""


def fp8_quant_warps(tile_elements: int) -> int:
    """Warps of a quantisation program over a tile of ``tile_elements`` (a power of two): one per 1024
    elements (32 fp32 values per thread), 4 to 16. Tiles up to 128 x 128 compile for sm_90 without
    spills (about 110 to 160 registers); a 256 x 128 run spills."""
    return max(4, min(16, tile_elements // 1024))


# ------------------------------------------------------------------------------------------------
# Fixed block sizes of the helper kernels
# ------------------------------------------------------------------------------------------------

KEPT_ROWS_SLOTS = 32
"""Kept kv clusters per step of the cluster kernel's kept-rows prep kernel."""
KEPT_ROWS_KEYS = 64
"""Keys of each of those clusters per inner step of the prep kernel."""
TILE_TABLE_FILL = 128
"""Empty tile-table slots written per step."""
KMEANS_FINALIZE_ELEMENTS = 4096
"""Centroid elements per program of the k-means finalize kernel (``4096 // D`` rows)."""
PERMUTATION_TOKENS = 1024
"""Tokens per program of the cluster-permutation scatter."""
RANK_TOKENS = 1024
"""Tokens per program of the k-means stable-rank passes (a tile's label counts, then its tokens sorted by label)."""
INTERPRETER_RANK_TOKENS = 64
""":data:`RANK_TOKENS` under Triton's interpreter, whose sort of 1024 elements is slow."""
AMAX_TOKENS = 64
"""Tokens per program of the k-means scale pass (each head's largest magnitude)."""
