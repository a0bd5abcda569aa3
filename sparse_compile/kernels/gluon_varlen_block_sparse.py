"""Cluster (variable-block) sparse attention for Hopper (sm_90), written in Gluon.

The computation of :func:`~sparse_compile.kernels.varlen_block_sparse.varlen_block_sparse_attention`
with both permutations (SVG2's layout; the specification is
:mod:`~sparse_compile.kernels.varlen_block_sparse_reference`), on the structure of the gathering kernel
(:mod:`~sparse_compile.kernels.gluon_gather_block_sparse`): the Triton path's prep stays (the kept-rows
lists, each q cluster's kept keys as k/v token rows packed one after another, and the tile table of
64- or 128-row tiles per q cluster; :func:`~sparse_compile.kernels.varlen_block_sparse.varlen_block_sparse_attention_gluon`
runs it and launches this kernel per group), and one program
per tile slot runs a producer warpgroup that gathers the tile's Q rows through ``q_perm`` and each run of
``BLOCK_N`` kept keys' K and V rows with ``cp.async``, beside consumer warpgroups on the tensor cores
(keys past the cluster's kept count masked). O and LSE go straight to the token rows. Surplus slots of
the upper-bound grid and q clusters that keep nothing compute nothing (the latter store O = 0, LSE
``-inf``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from sparse_compile.kernels.common import LOG2E
from sparse_compile.kernels.gluon_block_sparse import CONSUMER_ROWS, _ring_barriers
from sparse_compile.kernels.gluon_gather_block_sparse import (
    GATHER_CHUNK_ROWS,
    GATHER_REGS,
    _run_partitions,
    _tile_layout,
)
from sparse_compile.kernels.tile_configs import TileConfig

GLUON_VARLEN_TILE = TileConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
"""Default tile: 64-row q tiles (one consumer warpgroup: little padding on clusters of ~100-200 rows),
64-key K/V tiles, 3 ring slots (about 112 KB of shared memory, two programs per multiprocessor)."""


@gluon.jit
def _varlen_fwd_gluon(
    Q, K, V, O, LSE, Q_PERM, TILE_CLUSTER, TILE_ROW, Q_OFF, TOTAL, STARTS, ROWS,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_qpb, stride_qph, stride_qps,
    bh_start, H, NQC, num_tiles, S_Q, qk_scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CONSUMERS: gl.constexpr,
    STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    CHUNK: gl.constexpr,
    q_layout: gl.constexpr,
    kv_layout: gl.constexpr,
):  # fmt: skip
    """One program per (tile slot, (batch, head) pair of the group): the slot's ``CONSUMERS * 64`` rows of
    one q cluster (cluster order, token ``q_perm[r]``) against that cluster's packed kept keys.

    ``TILE_CLUSTER`` / ``TILE_ROW`` int32 ``(G, num_tiles)``: each slot's cluster (``NQC``: surplus) and
    first row; ``Q_OFF`` int32 ``(B*H, NQC + 1)``; ``TOTAL`` int32 ``(G, NQC)`` kept keys per cluster,
    listed from ``ROWS + STARTS[pair * NQC + cluster]`` as k/v token rows. Launched with ``num_warps=4``.
    """
    ROWS_PER_WG: gl.constexpr = 64  # CONSUMER_ROWS
    dtype: gl.constexpr = Q.dtype.element_ty
    tile = gl.program_id(0)
    local = gl.program_id(1)
    bh = (local + bh_start).to(gl.int64)
    table = local.to(gl.int64) * num_tiles + tile
    cluster = gl.load(TILE_CLUSTER + table)
    valid = cluster < NQC
    c = gl.minimum(cluster, NQC - 1).to(gl.int64)
    first_row = gl.where(valid, gl.load(TILE_ROW + table), 0)
    q_end = gl.where(valid, gl.load(Q_OFF + bh * (NQC + 1) + c + 1), 0)
    kept = local.to(gl.int64) * NQC + c
    total = gl.where(valid, gl.load(TOTAL + kept), 0)
    kept_rows = ROWS + gl.load(STARTS + kept)
    n_tiles = (total + BLOCK_N - 1) // BLOCK_N
    off_b = bh // H
    off_h = bh % H

    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, 1, ROWS_PER_WG, HEAD_DIM], q_layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], kv_layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar, k_ready, k_empty, v_ready, v_empty = _ring_barriers(STAGES, CONSUMERS)

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = O + off_b * stride_ob + off_h * stride_oh
    lse_base = LSE + bh * S_Q
    q_perm_row = Q_PERM + off_b * stride_qpb + off_h * stride_qph
    _run_partitions(q_base, k_base, v_base, o_base, lse_base, q_perm_row, kept_rows, stride_qs, stride_ks,
                    stride_vs, stride_os, stride_qps, 1, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready,
                    v_empty, kept_rows, 0, n_tiles, first_row, q_end, total, qk_scale, BLOCK_N, False, CONSUMERS,
                    CONSUMER_REGS, PRODUCER_REGS, CHUNK, True)  # fmt: skip


def launch_gluon_varlen(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_perm: Tensor, q_offsets: Tensor, total: Tensor,
    starts: Tensor, rows: Tensor, tile_cluster: Tensor, tile_row: Tensor, bh_start: int, scale: float,
    tile: TileConfig,
) -> None:  # fmt: skip
    """Run the kernel for one launch group: pairs ``bh_start ..`` of ``total``'s ``G`` rows.

    q, k, v, out ``(B, H, S, D)`` views with unit last stride, ``lse`` contiguous fp32 ``(B, H, S_q)``;
    ``q_perm`` ``(B, H, S_q)`` (stride 0 where broadcast); ``q_offsets`` contiguous int32 ``(B*H, NQC + 1)``;
    ``total`` int32 ``(G, NQC)``, ``starts`` int64 and ``rows`` int32 the group's kept-rows lists
    (:func:`~sparse_compile.kernels.varlen_block_sparse.kept_rows_plan`); ``tile_cluster`` / ``tile_row``
    int32 ``(G, T)`` the tile table (:func:`~sparse_compile.kernels.varlen_tiles.tile_tables` at
    ``tile.block_m``). Inputs must pass :func:`~sparse_compile.kernels.gluon_block_sparse.gluon_ineligibility`.
    """
    b, h, s_q, d = q.shape
    group, nqc = total.shape
    consumers = tile.block_m // CONSUMER_ROWS
    consumer_regs, producer_regs = GATHER_REGS[consumers]
    num_tiles = tile_cluster.shape[1]
    with torch.cuda.device(q.device):
        _varlen_fwd_gluon[(num_tiles, group)](
            q, k, v, out, lse, q_perm, tile_cluster, tile_row, q_offsets, total, starts, rows,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *q_perm.stride(),
            bh_start, h, nqc, num_tiles, s_q, scale * LOG2E,
            HEAD_DIM=d, BLOCK_N=tile.block_n, CONSUMERS=consumers, STAGES=tile.num_stages,
            CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, CHUNK=GATHER_CHUNK_ROWS,
            q_layout=_tile_layout(CONSUMER_ROWS, d, q.dtype), kv_layout=_tile_layout(tile.block_n, d, q.dtype),
            num_warps=4, maxnreg=(consumer_regs * consumers + producer_regs) // (consumers + 1) // 8 * 8,
        )  # fmt: skip
