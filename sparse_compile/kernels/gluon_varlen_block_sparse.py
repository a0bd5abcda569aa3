"""Cluster (variable-block) kept-key attention forward for Hopper (sm_90), written in Gluon.

The same computation, layout format and buffers as the Triton kernel of
:mod:`sparse_compile.kernels.varlen_block_sparse` (the specification is
:mod:`~sparse_compile.kernels.varlen_block_sparse_reference`): its tile tables say which q cluster and rows a
program runs, its prep kernel has written every q cluster's kept keys as one packed list of k/v token rows.
:func:`gluon_varlen_ineligibility` says which calls it takes; the Triton kernel keeps every other device and input.

One program computes 64 or 128 cluster-order query rows of one q cluster of one (batch, head), warp-specialized:

- a producer warpgroup gathers the K and V rows of the kept keys, ``BLOCK_N`` list positions per tile, with
  ``cp.async`` into a ``STAGES``-deep shared-memory ring (16-byte vectors, unpredicated: positions past the list
  repeat its last row, which the consumers mask; int32 row offsets where a head's rows allow);
  each producer thread's copies arrive on the slot's ready barrier as they land (``.noinc``: the barrier
  counts the 128 producer threads), so the producer never waits on its own copies;
- the consumer warpgroups (one per 64 rows) are the fixed-block kernel's
  (:func:`~sparse_compile.kernels.gluon_block_sparse._attend_kept_tiles` on
  :data:`~sparse_compile.kernels.gluon_block_sparse.PACKED_KEYS`): both GEMMs as asynchronous
  ``warpgroup_mma``, the softmax of a tile under the ``P V`` of the previous one, only the last tile masking
  positions past the list. Each gathers its Q rows through the q permutation and stores O and LSE to their
  tokens (:func:`~sparse_compile.kernels.gluon_block_sparse._load_permuted_q`, ``_store_permuted``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from sparse_compile.kernels.common import LOG2E
from sparse_compile.kernels.gluon_block_sparse import (
    CONSUMER_REGS,
    CONSUMER_ROWS,
    PACKED_KEYS,
    _attend_kept_tiles,
    _load_permuted_q,
    _normalise,
    _store_permuted,
    gluon_device_ineligibility,
    launch_registers,
    tile_shared_layout,
)
from sparse_compile.kernels.tile_configs import TileConfig

PRODUCER_WARPS = gl.constexpr(4)
"""Warps of the gathering producer: one warpgroup, 128 threads issuing 16-byte ``cp.async`` copies."""
_WG_ROWS = gl.constexpr(CONSUMER_ROWS)
"""Query rows of one consumer warpgroup, for the kernel's shared-memory shapes."""
GATHER_PRODUCER_REGS = 72
"""Registers per producer thread (``setmaxnreg``): a tile's token rows, the next tile's, and the gathers' pointers."""


def gluon_varlen_ineligibility(
    q: Tensor, k: Tensor, v: Tensor, capability: tuple[int, int] | None, out: Tensor | None = None
) -> str | None:
    """Why the Gluon cluster kernel cannot run this call (a sentence), or ``None`` when it can: an sm_90
    device (``capability``), fp16/bf16, head dim 64 or 128, and q, k, v and ``out`` (``None``: the op's own
    token-major O) with a unit last stride (rows are read and written as 16-byte vectors where aligned).
    Shapes are assumed valid."""
    reason = gluon_device_ineligibility(q, capability, "Gluon cluster kernel")
    if reason is not None:
        return reason
    if any(t.stride(3) != 1 for t in (q, k, v, out) if t is not None):
        return "the Gluon cluster kernel needs q, k, v and out with a unit last stride"
    return None


@gluon.constexpr_function
def _gather_layout(head_dim):
    """The producer's register layout of a ``[rows, head_dim]`` gather: 16-byte vectors (8 elements) per thread,
    a row's first 128 bytes across 8 adjacent threads (at D = 128 each thread's second vector of the row lies
    128 bytes on, one address apart), rows across the producer's warps."""
    return gl.BlockedLayout([1, 8], [4, 8], [PRODUCER_WARPS, 1], [1, 0])


@gluon.jit
def _tile_row_offsets(kept_rows, first, total, stride_ks, stride_vs, BLOCK_N: gl.constexpr, D: gl.constexpr,
                      WIDE_OFFSETS: gl.constexpr):  # fmt: skip
    """Element offsets in K and V (``BLOCK_N``, in the gather layout's rows) of the token rows at list positions
    ``first ..``; positions at or past ``total`` repeat the last kept row (the consumers mask those keys), so no
    load or copy is predicated. Offsets are int32 unless ``WIDE_OFFSETS``."""
    pos = gl.minimum(first + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, _gather_layout(D))), total - 1)
    tokens = gl.load(kept_rows + pos)
    if WIDE_OFFSETS:
        tokens = tokens.to(gl.int64)
    return tokens * stride_ks, tokens * stride_vs


@gluon.jit
def _gather_rows(ring_slot, base_dims, row_offsets):
    """``cp.async`` the rows at ``row_offsets`` (elements) from ``base_dims`` (a head's base pointer plus each
    thread's columns, ``[1, D]``) into ``ring_slot`` ``[BLOCK_N, D]``."""
    async_copy.async_copy_global_to_shared(ring_slot, base_dims + gl.expand_dims(row_offsets, 1))


@gluon.jit
def _gather_producer(k_base, v_base, stride_ks, stride_vs, kept_rows, total, n_tiles, k_ring, v_ring,
                     k_ready, k_empty, v_ready, v_empty, WIDE_OFFSETS: gl.constexpr):  # fmt: skip
    """The producer warpgroup: per kv tile ``t``, list positions ``t * BLOCK_N ..`` of ``kept_rows`` (``total``
    of them) gathered from K and V into ring slot ``t % STAGES`` once every consumer has released it. The list
    entries of tile ``t + 1`` are loaded before waiting for tile ``t``'s slot, so no copy waits on them."""
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[3]
    D: gl.constexpr = k_ring.shape[4]
    dims = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(0, _gather_layout(D))), 0)
    k_dims = k_base + dims
    v_dims = v_base + dims
    if n_tiles > 0:  # a list with no entries has none to read
        k_rows, v_rows = _tile_row_offsets(kept_rows, 0, total, stride_ks, stride_vs, BLOCK_N, D, WIDE_OFFSETS)
        slot = 0
        free_phase = 1  # a fresh barrier counts as released
        for t in range(n_tiles):
            next_k_rows, next_v_rows = _tile_row_offsets(kept_rows, (t + 1) * BLOCK_N, total, stride_ks, stride_vs,
                                                         BLOCK_N, D, WIDE_OFFSETS)  # fmt: skip
            mbarrier.wait(k_empty.index(slot), free_phase)
            _gather_rows(k_ring.index(slot).reshape([BLOCK_N, D]), k_dims, k_rows)
            async_copy.mbarrier_arrive(k_ready.index(slot), increment_count=False)
            mbarrier.wait(v_empty.index(slot), free_phase)
            _gather_rows(v_ring.index(slot).reshape([BLOCK_N, D]), v_dims, v_rows)
            async_copy.mbarrier_arrive(v_ready.index(slot), increment_count=False)
            k_rows = next_k_rows
            v_rows = next_v_rows
            slot += 1
            if slot == STAGES:
                slot = 0
                free_phase ^= 1


@gluon.jit
def _cluster_consumer(q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, total, n_tiles, q_base, stride_qs,
                      o_base, stride_os, lse_base, perm_row, stride_ps, first_row, row_end, qk_scale,
                      WG: gl.constexpr):  # fmt: skip
    """Consumer warpgroup ``WG``: cluster-order rows ``first_row + WG * 64 ..`` (those below ``row_end``) against
    the packed kept keys, Q gathered and O/LSE scattered through ``perm_row``."""
    ROWS: gl.constexpr = q_smem.shape[3]
    D: gl.constexpr = q_smem.shape[4]
    q_tile = q_smem.index(WG).reshape([ROWS, D])
    start = first_row + WG * ROWS
    if n_tiles > 0:
        _load_permuted_q(q_tile, q_base, stride_qs, perm_row, stride_ps, start, row_end)
    acc, m_i, l_i = _attend_kept_tiles(q_tile, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, 0, 0, n_tiles,
                                       total, qk_scale, PACKED_KEYS, False)  # fmt: skip
    out, lse = _normalise(acc, m_i, l_i)
    _store_permuted(out, lse, q_tile, o_base, stride_os, lse_base, perm_row, stride_ps, start, row_end)


@gluon.jit
def _gather_ring_barriers(STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    """Per ring slot the K and V ready barriers (one arrival per producer thread, on its copies' landing) and
    empty barriers (one arrival per consumer warpgroup), initialised and fenced."""
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=PRODUCER_WARPS * 32)
        mbarrier.init(v_ready.index(i), count=PRODUCER_WARPS * 32)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    fence_async_shared()
    return k_ready, k_empty, v_ready, v_empty


@gluon.jit
def _varlen_fwd_gluon(
    Q, K, V, O, LSE, Q_PERM, TILE_CLUSTER, TILE_ROW, Q_OFF, TOTAL, STARTS, ROWS,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_pb, stride_ph, stride_ps,
    bh_start, H, NQC, num_tiles, S_Q, qk_scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CONSUMERS: gl.constexpr,
    STAGES: gl.constexpr,
    Q_LAYOUT: gl.constexpr,
    KV_LAYOUT: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    WIDE_OFFSETS: gl.constexpr,
):  # fmt: skip
    """One program per (tile slot, batch * head of the launch group): ``CONSUMERS * 64`` rows of one q cluster.

    Launched with ``num_warps=4`` (the first consumer warpgroup); the second consumer (``CONSUMERS`` 2) and the
    producer warpgroup are worker partitions. Q, K, V, O ``(B, H, S, D)`` with a unit last stride (others
    given); LSE contiguous fp32 ``(B, H, S_Q)``; ``Q_PERM`` ``(B, H, S_Q)`` int32/int64, cluster-order row ``r``
    is token ``Q_PERM[b, h, r]``. The tile tables, the flat q cluster offsets ``(BH, NQC + 1)`` and the kept-rows
    buffers (``TOTAL`` and ``STARTS`` per (pair of the group, q cluster), the int32 lists in ``ROWS``) are the
    Triton kernel's. Slots whose table entry is ``NQC`` (the upper-bound grid's surplus) return at once.
    """
    tile = gl.program_id(0)
    local = gl.program_id(1)
    table = local.to(gl.int64) * num_tiles + tile
    cluster = gl.load(TILE_CLUSTER + table)
    if cluster >= NQC:
        return
    bh = local + bh_start
    off_b = (bh // H).to(gl.int64)
    off_h = (bh % H).to(gl.int64)
    first_row = gl.load(TILE_ROW + table)
    row_end = gl.load(Q_OFF + bh.to(gl.int64) * (NQC + 1) + cluster + 1)
    kept = local.to(gl.int64) * NQC + cluster
    total = gl.load(TOTAL + kept)
    kept_rows = ROWS + gl.load(STARTS + kept)
    n_tiles = gl.cdiv(total, BLOCK_N)

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = O + off_b * stride_ob + off_h * stride_oh
    perm_row = Q_PERM + off_b * stride_pb + off_h * stride_ph
    lse_base = LSE + bh.to(gl.int64) * S_Q

    dtype: gl.constexpr = Q.dtype.element_ty
    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, 1, _WG_ROWS, HEAD_DIM], Q_LAYOUT)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], KV_LAYOUT)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], KV_LAYOUT)
    k_ready, k_empty, v_ready, v_empty = _gather_ring_barriers(STAGES, CONSUMERS)

    if CONSUMERS == 2:
        gl.warp_specialize([
            (_cluster_consumer, (q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, total, n_tiles, q_base,
                                 stride_qs, o_base, stride_os, lse_base, perm_row, stride_ps, first_row, row_end,
                                 qk_scale, 0)),
            (_cluster_consumer, (q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, total, n_tiles, q_base,
                                 stride_qs, o_base, stride_os, lse_base, perm_row, stride_ps, first_row, row_end,
                                 qk_scale, 1)),
            (_gather_producer, (k_base, v_base, stride_ks, stride_vs, kept_rows, total, n_tiles, k_ring, v_ring,
                                k_ready, k_empty, v_ready, v_empty, WIDE_OFFSETS)),
        ], [4, PRODUCER_WARPS], [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip
    else:
        gl.warp_specialize([
            (_cluster_consumer, (q_smem, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, total, n_tiles, q_base,
                                 stride_qs, o_base, stride_os, lse_base, perm_row, stride_ps, first_row, row_end,
                                 qk_scale, 0)),
            (_gather_producer, (k_base, v_base, stride_ks, stride_vs, kept_rows, total, n_tiles, k_ring, v_ring,
                                k_ready, k_empty, v_ready, v_empty, WIDE_OFFSETS)),
        ], [PRODUCER_WARPS], [PRODUCER_REGS])  # fmt: skip


def int32_row_offsets(t: Tensor) -> bool:
    """Whether every element offset of a row within one head of ``t`` ``(B, H, S, D)`` fits in int32."""
    return (t.shape[2] - 1) * t.stride(2) + t.shape[3] <= torch.iinfo(torch.int32).max


def consumer_registers(consumers: int) -> int:
    """Registers per consumer thread (``setmaxnreg``): what the launch cap (:func:`launch_registers`) gives the
    padded warpgroups, less the producer's :data:`GATHER_PRODUCER_REGS`, shared by the consumers (at most
    :data:`CONSUMER_REGS`, a multiple of 8). More would make ``setmaxnreg.inc`` wait for registers no one frees."""
    pool = (consumers + 1) * launch_registers(consumers) - GATHER_PRODUCER_REGS
    return min(CONSUMER_REGS, pool // consumers // 8 * 8)


def launch_gluon_varlen(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, q_perm: Tensor, tile_cluster: Tensor,
    tile_row: Tensor, q_off: Tensor, total: Tensor, starts: Tensor, rows: Tensor, bh_start: int, group: int,
    scale: float, tile: TileConfig,
) -> None:  # fmt: skip
    """One launch of the kernel over ``group`` (batch, head) pairs from ``bh_start``: the tile tables
    ``(group, slots)`` of ``tile.block_m``-row tiles (64 or 128: one consumer warpgroup per 64 rows) and the
    kept-rows buffers the prep kernel wrote for that group. ``q_perm`` ``(B, H, S_q)`` int32/int64 (the identity
    when the caller has none); inputs must pass :func:`gluon_varlen_ineligibility`; ``tile.block_n`` keys per
    K/V tile, ``tile.num_stages`` ring slots."""
    if tile.block_m not in (CONSUMER_ROWS, 2 * CONSUMER_ROWS):
        raise ValueError(f"{tile} must have block_m 64 or 128 (one consumer warpgroup per 64 rows)")
    _, h, s_q, d = q.shape
    consumers = tile.block_m // CONSUMER_ROWS
    num_tiles = tile_cluster.shape[1]
    with torch.cuda.device(q.device):
        _varlen_fwd_gluon[(num_tiles, group)](
            q, k, v, out, lse, q_perm, tile_cluster, tile_row, q_off, total, starts, rows,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            *q_perm.stride(), bh_start, h, q_off.shape[1] - 1, num_tiles, s_q,
            scale * LOG2E,
            HEAD_DIM=d, BLOCK_N=tile.block_n, CONSUMERS=consumers, STAGES=tile.num_stages,
            Q_LAYOUT=tile_shared_layout(CONSUMER_ROWS, d, q.dtype),
            KV_LAYOUT=tile_shared_layout(tile.block_n, d, q.dtype),
            CONSUMER_REGS=consumer_registers(consumers), PRODUCER_REGS=GATHER_PRODUCER_REGS,
            WIDE_OFFSETS=not (int32_row_offsets(k) and int32_row_offsets(v)),
            num_warps=4, maxnreg=launch_registers(consumers),
        )  # fmt: skip
