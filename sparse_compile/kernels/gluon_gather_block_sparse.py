"""Kept-block attention through token permutations for Hopper (sm_90), written in Gluon.

The computation of :func:`~sparse_compile.kernels.block_sparse.block_sparse_attention` with ``q_perm`` and
``kv_perm`` (row ``i`` of the kernel order is token ``perm[b, h, i]``; the specification is
:mod:`~sparse_compile.kernels.block_sparse_reference`): SVG's temporal order and any other per-head
permutation, read and written in the caller's token order.

TMA copies boxes of consecutive rows and cannot gather, so this kernel keeps the structure of
:mod:`~sparse_compile.kernels.gluon_block_sparse` (same consumer main loop,
:func:`~sparse_compile.kernels.gluon_block_sparse._attend_kept_tiles`) and swaps its producer: a
producer *warpgroup* loads the permutation entries of a tile and copies its rows with ``cp.async``
(16-byte vectors, every row read whole, rows past the sequence zero-filled), so the gathers run
asynchronously beside the consumers' GEMMs instead of in their loop. A slot is ready once the copies of
every producer thread have landed (``cp.async.mbarrier.arrive`` per thread, then one arrive of the
warpgroup); the consumers fence it for the tensor cores' async proxy before reading it. O and LSE are
stored to the permuted token rows directly from registers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier

from sparse_compile.kernels.block_sparse_reference import BlockLayout
from sparse_compile.kernels.common import LOG2E, cdiv
from sparse_compile.kernels.gluon_block_sparse import (
    _GL_DTYPES,
    CONSUMER_ROWS,
    _attend_kept_tiles,
    _kv_tile_start,
    _normalise,
    _ring_barriers,
)
from sparse_compile.kernels.tile_configs import TileConfig, gluon_block_sparse_tile

GATHER_WARPS = 4
"""Warps of the producer: one warpgroup issues the row copies."""
GATHER_CHUNK_ROWS = 32
"""Rows of one ``cp.async`` batch (bounds the producer's pointer registers)."""
GATHER_REGS = {1: (200, 56), 2: (216, 72)}
"""Registers per thread (consumers, producer) after ``setmaxnreg``, by consumer warpgroups."""


@gluon.jit
def _gather_rows(smem, base, stride_s, perm_row, stride_p, start, limit, CHUNK: gl.constexpr,
                 layout: gl.constexpr):  # fmt: skip
    """``cp.async`` rows ``start ..`` (kernel order) of one head into ``smem`` ``[ROWS, D]``: row ``r`` is
    token ``perm_row[r]`` of ``base``; rows at or past ``limit`` are zero-filled."""
    ROWS: gl.constexpr = smem.shape[0]
    D: gl.constexpr = smem.shape[1]
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    for c in gl.static_range(ROWS // CHUNK):
        rows = start + c * CHUNK + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
        ok = rows < limit
        token = gl.load(perm_row + rows.to(gl.int64) * stride_p, mask=ok, other=0).to(gl.int64)
        pointers = base + gl.expand_dims(token * stride_s, 1) + gl.expand_dims(dims, 0)
        async_copy.async_copy_global_to_shared(smem.slice(c * CHUNK, CHUNK), pointers, mask=gl.expand_dims(ok, 1))


@gluon.jit
def _signal_landed(bar):
    """Complete ``bar``'s phase once every producer thread's outstanding copies have landed."""
    async_copy.mbarrier_arrive(bar)
    gl.thread_barrier()  # every thread has registered its copies before the warpgroup arrives
    mbarrier.arrive(bar, count=1)


@gluon.jit
def _gather_producer(q_base, k_base, v_base, q_perm_row, kv_perm_row, stride_qs, stride_ks, stride_vs,
                     stride_qp, stride_kvp, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready, v_empty,
                     idx_row, stride_ik, n_tiles, off_m, S_Q, S_K, LAYOUT_BK: gl.constexpr,
                     CHUNK: gl.constexpr, PACKED: gl.constexpr):  # fmt: skip
    """The gathering warpgroup: the Q rows of every consumer, then K and V of each kept tile into ring
    slot ``t % STAGES`` once every consumer has released it, each signalled when its rows have landed.
    Query rows at or past ``S_Q`` and keys at or past ``S_K`` (kernel order) are zero-filled; ``PACKED``
    as in :func:`~sparse_compile.kernels.gluon_block_sparse._attend_kept_tiles`."""
    CONSUMERS: gl.constexpr = q_smem.shape[0]
    ROWS: gl.constexpr = q_smem.shape[3]
    D: gl.constexpr = q_smem.shape[4]
    BLOCK_N: gl.constexpr = k_ring.shape[3]
    STAGES: gl.constexpr = k_ring.shape[0]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])
    if n_tiles > 0:
        for i in gl.static_range(CONSUMERS):
            _gather_rows(q_smem.index(i).reshape([ROWS, D]), q_base, stride_qs, q_perm_row, stride_qp,
                         off_m + i * ROWS, S_Q, CHUNK, layout)  # fmt: skip
        _signal_landed(q_bar)
    for t in range(n_tiles):
        slot = t % STAGES
        free_phase = ((t // STAGES) & 1) ^ 1  # a fresh barrier counts as released
        start = _kv_tile_start(idx_row, stride_ik, t, LAYOUT_BK, BLOCK_N, PACKED)
        mbarrier.wait(k_empty.index(slot), free_phase)
        _gather_rows(k_ring.index(slot).reshape([BLOCK_N, D]), k_base, stride_ks, kv_perm_row, stride_kvp, start,
                     S_K, CHUNK, layout)  # fmt: skip
        _signal_landed(k_ready.index(slot))
        mbarrier.wait(v_empty.index(slot), free_phase)
        _gather_rows(v_ring.index(slot).reshape([BLOCK_N, D]), v_base, stride_vs, kv_perm_row, stride_kvp, start,
                     S_K, CHUNK, layout)  # fmt: skip
        _signal_landed(v_ready.index(slot))


@gluon.jit
def _gather_consumer(o_base, lse_base, q_perm_row, stride_os, stride_qp, q_smem, k_ring, v_ring, q_bar, k_ready,
                     k_empty, v_ready, v_empty, idx_row, stride_ik, n_tiles, off_m, S_Q, S_K, qk_scale,
                     LAYOUT_BK: gl.constexpr, EVEN_K: gl.constexpr, WG: gl.constexpr,
                     PACKED: gl.constexpr):  # fmt: skip
    """Consumer warpgroup ``WG``: kernel-order query rows ``off_m + WG * 64`` .. + 64 (those below
    ``S_Q``) against every kept tile, then O and LSE stored to their token rows."""
    ROWS: gl.constexpr = q_smem.shape[3]
    D: gl.constexpr = q_smem.shape[4]
    q_tile = q_smem.index(WG).reshape([ROWS, D])
    if n_tiles > 0:
        mbarrier.wait(q_bar, 0)
        fence_async_shared()
    acc, m_i, l_i = _attend_kept_tiles(q_tile, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, idx_row,
                                       stride_ik, n_tiles, S_K, qk_scale, LAYOUT_BK, EVEN_K, True, PACKED)  # fmt: skip
    out, lse = _normalise(acc, m_i, l_i)
    out_rows: gl.constexpr = gl.SliceLayout(1, out.type.layout)
    rows = off_m + WG * ROWS + gl.arange(0, ROWS, layout=out_rows)
    ok = rows < S_Q
    token = gl.load(q_perm_row + rows.to(gl.int64) * stride_qp, mask=ok, other=0).to(gl.int64)
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, out.type.layout))
    gl.store(o_base + gl.expand_dims(token * stride_os, 1) + gl.expand_dims(dims, 0), out.to(q_smem.dtype),
             mask=gl.expand_dims(ok, 1))  # fmt: skip
    gl.store(lse_base + gl.convert_layout(token, lse.type.layout), lse, mask=gl.convert_layout(ok, lse.type.layout))


@gluon.jit
def _run_partitions(q_base, k_base, v_base, o_base, lse_base, q_perm_row, kv_perm_row, stride_qs, stride_ks,
                    stride_vs, stride_os, stride_qp, stride_kvp, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty,
                    v_ready, v_empty, idx_row, stride_ik, n_tiles, off_m, S_Q, S_K, qk_scale, LAYOUT_BK: gl.constexpr,
                    EVEN_K: gl.constexpr, CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                    PRODUCER_REGS: gl.constexpr, CHUNK: gl.constexpr, PACKED: gl.constexpr):  # fmt: skip
    """One program's warp specialization: ``CONSUMERS`` consumer warpgroups (:func:`_gather_consumer`; the
    first is the launch's own 4 warps) and the gathering producer warpgroup (:func:`_gather_producer`)."""
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_gather_consumer, (o_base, lse_base, q_perm_row, stride_os, stride_qp, q_smem, k_ring, v_ring, q_bar,
                                k_ready, k_empty, v_ready, v_empty, idx_row, stride_ik, n_tiles, off_m, S_Q, S_K,
                                qk_scale, LAYOUT_BK, EVEN_K, 0, PACKED)),
            (_gather_consumer, (o_base, lse_base, q_perm_row, stride_os, stride_qp, q_smem, k_ring, v_ring, q_bar,
                                k_ready, k_empty, v_ready, v_empty, idx_row, stride_ik, n_tiles, off_m, S_Q, S_K,
                                qk_scale, LAYOUT_BK, EVEN_K, 1, PACKED)),
            (_gather_producer, (q_base, k_base, v_base, q_perm_row, kv_perm_row, stride_qs, stride_ks, stride_vs,
                                stride_qp, stride_kvp, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready,
                                v_empty, idx_row, stride_ik, n_tiles, off_m, S_Q, S_K, LAYOUT_BK, CHUNK, PACKED)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip
    else:
        gl.warp_specialize([
            (_gather_consumer, (o_base, lse_base, q_perm_row, stride_os, stride_qp, q_smem, k_ring, v_ring, q_bar,
                                k_ready, k_empty, v_ready, v_empty, idx_row, stride_ik, n_tiles, off_m, S_Q, S_K,
                                qk_scale, LAYOUT_BK, EVEN_K, 0, PACKED)),
            (_gather_producer, (q_base, k_base, v_base, q_perm_row, kv_perm_row, stride_qs, stride_ks, stride_vs,
                                stride_qp, stride_kvp, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready,
                                v_empty, idx_row, stride_ik, n_tiles, off_m, S_Q, S_K, LAYOUT_BK, CHUNK, PACKED)),
        ], [4], [PRODUCER_REGS])  # fmt: skip


@gluon.jit
def _block_sparse_fwd_gluon_gather(
    Q, K, V, O, LSE, Q_PERM, KV_PERM, COUNTS, INDICES,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os, stride_qpb, stride_qph, stride_qps, stride_kvpb, stride_kvph, stride_kvps,
    stride_cb, stride_ch, stride_cq, stride_ib, stride_ih, stride_iq, stride_ik,
    H, S_Q, S_K, qk_scale,
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    LAYOUT_BQ: gl.constexpr,
    LAYOUT_BK: gl.constexpr,
    EVEN_K: gl.constexpr,
    CONSUMERS: gl.constexpr,
    STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    CHUNK: gl.constexpr,
    q_layout: gl.constexpr,
    kv_layout: gl.constexpr,
):  # fmt: skip
    """One program: ``CONSUMERS * 64`` kernel-order query rows of one (batch, head) against the kept kv
    blocks of their q block (:mod:`~sparse_compile.kernels.gluon_block_sparse`'s grid), rows gathered
    through ``Q_PERM`` / ``KV_PERM`` (int32 or int64 ``(B, H, S)``, strides 0 where broadcast).

    Launched with ``num_warps=4`` (the first consumer warpgroup); a second consumer warpgroup and the
    producer warpgroup are worker partitions. q, k, v, o are ``(B, H, S, D)`` with a unit last stride; LSE
    contiguous fp32 ``(B, H, S_Q)`` in token order; ``q_layout`` / ``kv_layout`` the shared layouts of
    ``(1, 1, 64, D)`` / ``(1, 1, BLOCK_N, D)`` tiles.
    """
    ROWS: gl.constexpr = 64  # CONSUMER_ROWS: one consumer warpgroup's rows
    SUB_N: gl.constexpr = LAYOUT_BK // BLOCK_N
    dtype: gl.constexpr = Q.dtype.element_ty

    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    off_b = (pid_bh // H).to(gl.int64)
    off_h = (pid_bh % H).to(gl.int64)
    off_m = pid_m * (CONSUMERS * ROWS)
    q_block = pid_m // (LAYOUT_BQ // (CONSUMERS * ROWS))

    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS, 1, 1, ROWS, HEAD_DIM], q_layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], kv_layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_DIM], kv_layout)
    q_bar, k_ready, k_empty, v_ready, v_empty = _ring_barriers(STAGES, CONSUMERS)

    count = gl.load(COUNTS + off_b * stride_cb + off_h * stride_ch + q_block * stride_cq)
    idx_row = INDICES + off_b * stride_ib + off_h * stride_ih + q_block * stride_iq
    n_tiles = count * SUB_N
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    o_base = O + off_b * stride_ob + off_h * stride_oh
    lse_base = LSE + pid_bh.to(gl.int64) * S_Q
    q_perm_row = Q_PERM + off_b * stride_qpb + off_h * stride_qph
    kv_perm_row = KV_PERM + off_b * stride_kvpb + off_h * stride_kvph
    _run_partitions(q_base, k_base, v_base, o_base, lse_base, q_perm_row, kv_perm_row, stride_qs, stride_ks,
                    stride_vs, stride_os, stride_qps, stride_kvps, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty,
                    v_ready, v_empty, idx_row, stride_ik, n_tiles, off_m, S_Q, S_K, qk_scale, LAYOUT_BK, EVEN_K,
                    CONSUMERS, CONSUMER_REGS, PRODUCER_REGS, CHUNK, False)  # fmt: skip


def _tile_layout(rows: int, head_dim: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, head_dim], _GL_DTYPES[dtype])


def launch_gluon_gather_block_sparse(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, q_perm: Tensor, kv_perm: Tensor, block_q: int,
    block_k: int, scale: float, out: Tensor, lse: Tensor, tile: TileConfig | None = None,
) -> None:  # fmt: skip
    """Run the kernel into ``out`` ``(B, H, S_q, D)`` (unit last stride) and ``lse`` (contiguous fp32
    ``(B, H, S_q)``), both in token order. ``q_perm`` ``(B, H, S_q)`` and ``kv_perm`` ``(B, H, S_k)`` (stride 0 where broadcast)
    int32/int64 map kernel-order rows to tokens. Inputs must pass
    :func:`~sparse_compile.kernels.gluon_block_sparse.gluon_ineligibility` (permutations aside: rows are
    then read as 16-byte vectors) and be valid; ``tile`` as for the TMA kernel.
    """
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    tile = gluon_block_sparse_tile(block_q, block_k) if tile is None else tile
    if tile.block_m not in (CONSUMER_ROWS, 2 * CONSUMER_ROWS) or block_q % tile.block_m or block_k % tile.block_n:
        raise ValueError(f"{tile} must have block_m 64 or 128 and tile block_q={block_q} and block_k={block_k}")
    consumers = tile.block_m // CONSUMER_ROWS
    consumer_regs, producer_regs = GATHER_REGS[consumers]
    counts, indices = layout.counts, layout.indices
    grid = (cdiv(s_q, tile.block_m), b * h)
    with torch.cuda.device(q.device):
        _block_sparse_fwd_gluon_gather[grid](
            q, k, v, out, lse, q_perm, kv_perm, counts, indices,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *q_perm.stride(), *kv_perm.stride(),
            *counts.stride(), *indices.stride(),
            h, s_q, s_k, scale * LOG2E,
            HEAD_DIM=d, BLOCK_N=tile.block_n, LAYOUT_BQ=block_q, LAYOUT_BK=block_k, EVEN_K=s_k % block_k == 0,
            CONSUMERS=consumers, STAGES=tile.num_stages, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs,
            CHUNK=GATHER_CHUNK_ROWS, q_layout=_tile_layout(CONSUMER_ROWS, d, q.dtype),
            kv_layout=_tile_layout(tile.block_n, d, q.dtype), num_warps=4,
            maxnreg=(consumer_regs * consumers + producer_regs) * 128 // ((consumers + 1) * 128) // 8 * 8,
        )  # fmt: skip
