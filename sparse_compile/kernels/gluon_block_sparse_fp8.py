"""Fixed-block kept-block attention forward with FP8 (e4m3) tensor-core math for Hopper (sm_90a), in Gluon.

The computation of :func:`~sparse_compile.kernels.block_sparse_fp8._block_sparse_fp8_fwd` (the
specification is :func:`~sparse_compile.kernels.block_sparse_fp8.block_sparse_attention_fp8_reference`)
on the same quantised inputs (:func:`~sparse_compile.kernels.fp8_quant.quantize_attention_inputs`),
laid out as :mod:`~sparse_compile.kernels.gluon_block_sparse` lays out the bf16 kernel, whose producer,
barriers, tile walk, softmax step and normalisation it imports. The entry is
:func:`~sparse_compile.kernels.block_sparse_fp8.block_sparse_attention_fp8_gluon`.

One program computes 128 query rows of one (batch, head) (grid ``(cdiv(S_q, 128), B * H)``), warp-specialized:

- the producer warp (:func:`~sparse_compile.kernels.gluon_block_sparse._producer`) TMA-loads the e4m3
  Q rows, then K ``(BLOCK_N, D)`` and V transposed ``(D, BLOCK_N)`` tiles of the kept blocks into a
  ``STAGES``-deep ring. Hopper's e4m3 ``wgmma`` takes shared operands K-major only: K rows are for
  ``S = Q K^T``, and V is quantised channels first (keys padded to 16 for TMA's strides,
  :func:`~sparse_compile.kernels.fp8_quant.channels_first_fp8`) so its tiles are K-major for ``P V``;
- each of two consumer warpgroups (64 query rows each) issues, per kept tile ``t``, ``S = Q K_t^T`` and the
  ``P V`` of tile ``t - 1`` back to back (asynchronous ``warpgroup_mma``, both operands in shared memory), runs
  the softmax of ``t`` while ``P V`` is on the tensor cores, and writes ``e4m3(P_t)`` into its shared P buffer
  ``t % 2`` for the next trip (the bf16 kernel's overlap: there P stays in registers, but an fp8 register
  tensor carried across the loop is unpacked to one byte per register).

The softmax is the Triton kernel's (``_softmax_step`` with ``INTEGER_MAX``): scores times the q block's and kv
block's scales (softmax scale and log2(e) folded into the q scale), the running row max an integer (base 2,
rounded up) so ``P = 2^(S - m)`` lies in ``(0, 1]`` and every rescale is a power of two, ``448 P`` (the factor
folded into the exponent, the row sum divided by it at the end) cast to e4m3. Each GEMM is one whole-tile
``wgmma`` chain into a fresh accumulator; a tile's ``P V`` is added to the fp32 running output rescaled by that
tile's factor, ``acc = acc * alpha_t + PV_t``, one fused multiply-add per element: the same fp32 values as the
Triton kernel's, as ``alpha`` is a power of two. O is divided by ``l`` and multiplied by V's channel scale over 448
(the Triton kernel's order), then stored from registers (any strides, rows past ``S_q`` dropped); LSE is that
of the smoothed scores, natural log, ``-inf`` for rows that kept nothing (O = 0).

Q, K and V are read through 4-D descriptors over ``(B, H, S, D)`` (q, k) and ``(B, H, D, S_k)`` (V
transposed), so rows and keys past the sequence read as zeros; keys past ``S_k`` score ``-inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from sparse_compile.kernels.block_sparse_reference import BlockLayout
from sparse_compile.kernels.common import LOG2E, cdiv
from sparse_compile.kernels.fp8_quant import FP8_MAX, Fp8Inputs
from sparse_compile.kernels.gluon_block_sparse import (
    _TMA_ALIGN_BYTES,
    CONSUMER_REGS,
    CONSUMER_ROWS,
    GLUON_LAYOUT_BLOCKS,
    PRODUCER_REGS,
    _descriptor,
    _issue_scores,
    _normalise,
    _producer,
    _ring_barriers,
    _softmax_step,
    _tile_start,
    gluon_device_ineligibility,
    launch_registers,
    tile_shared_layout,
    warpgroup_mma_layout,
)
from sparse_compile.kernels.tile_configs import TileConfig, gluon_fp8_block_sparse_tile

V_KEY_MULTIPLE = _TMA_ALIGN_BYTES
"""V's keys are padded to this multiple in its channels-first e4m3 storage: 16-byte strides for TMA."""
_P_SCALE = gl.constexpr(FP8_MAX)
_P_LOG2 = gl.constexpr(math.log2(FP8_MAX))
_CONSUMERS = gl.constexpr(2)
"""Consumer warpgroups per program. One (64-row programs) hangs on the H200 with a ring of 3 or more
slots once a row keeps 32 tiles or more, for a reason not found (benchmarks/NOTES.md)."""
GLUON_FP8_QUERY_BLOCKS = (128, 256)
"""Query layout blocks the kernel takes: whole 128-row programs."""


def fp8_gluon_ineligibility(
    q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int, capability: tuple[int, int] | None
) -> str | None:
    """Why the Gluon FP8 kernel cannot run this call (a sentence), or ``None`` when it can.

    ``capability`` is the CUDA device's ``(major, minor)``, ``None`` for tensors on another device.
    q/k/v may have any strides (the kernel reads the e4m3 copies the entry makes). Shapes are assumed
    valid (:func:`~sparse_compile.kernels.block_sparse.validate_inputs`).
    """
    reason = gluon_device_ineligibility(q, capability, "Gluon FP8 kernel")
    if reason is not None:
        return reason
    if block_q not in GLUON_FP8_QUERY_BLOCKS or block_k not in GLUON_LAYOUT_BLOCKS:
        return (f"the Gluon FP8 kernel takes layout blocks of {GLUON_FP8_QUERY_BLOCKS} query rows (two consumer "
                f"warpgroups) and {GLUON_LAYOUT_BLOCKS} keys (got {block_q} x {block_k})")
    return None


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------


@gluon.jit
def _kv_start_and_scale(t, idx_row, stride_ik, k_scales, q_scale, LAYOUT_BK: gl.constexpr, BLOCK_N: gl.constexpr):
    """First key of kv tile ``t`` and its scores' scale (the q scale times its kv block's), loaded before the
    tile's scores are waited for."""
    k_start = _tile_start(idx_row, stride_ik, t, LAYOUT_BK, BLOCK_N)
    return k_start, q_scale * gl.load(k_scales + k_start // LAYOUT_BK)


@gluon.jit
def _softmax_into_shared(s, m_i, l_i, s_scale, k_start, p_buf, S_K, EVEN_K: gl.constexpr):
    """The softmax of a tile's raw scores ``s`` (``_softmax_step`` with ``INTEGER_MAX`` and 448 folded in), ``e4m3(P)``
    stored into the warpgroup's shared P buffer ``p_buf``, fenced for the tensor cores and with every warp's rows
    written. Returns the tile's rescale factor and the new row max and row sum."""
    ROWS: gl.constexpr = s.shape[0]
    BLOCK_N: gl.constexpr = s.shape[1]
    s_layout: gl.constexpr = warpgroup_mma_layout(BLOCK_N, 32)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, s_scale, k_start, S_K, EVEN_K, BLOCK_N, s_layout, True,
                                       _P_LOG2)  # fmt: skip
    p_buf.reshape([ROWS, BLOCK_N]).store(p.to(gl.float8e4nv))
    fence_async_shared()
    gl.thread_barrier()
    return alpha, m_i, l_i


@gluon.jit
def _issue_pv(p_bufs, p_first, t, v_ring, v_ready, pv_zero):
    """Once V^T of tile ``t`` is in ring slot ``t % STAGES``: issue (asynchronously) ``P V`` of the tile into a fresh
    accumulator, P from ``p_bufs[p_first + t % 2]``."""
    ROWS: gl.constexpr = pv_zero.shape[0]
    HEAD_DIM: gl.constexpr = pv_zero.shape[1]
    BLOCK_N: gl.constexpr = v_ring.shape[4]
    STAGES: gl.constexpr = v_ring.shape[0]
    mbarrier.wait(v_ready.index(t % STAGES), (t // STAGES) & 1)
    return warpgroup_mma(p_bufs.index(p_first + t % 2).reshape([ROWS, BLOCK_N]),
                         v_ring.index(t % STAGES).reshape([HEAD_DIM, BLOCK_N]).permute((1, 0)), pv_zero, use_acc=False,
                         is_async=True)  # fmt: skip


@gluon.jit
def _add_rescaled(acc, alpha, pv):
    """``acc * alpha + pv``: the running output rescaled by a tile's factor ``alpha`` ``(ROWS,)`` plus its ``P V``."""
    return acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout)), 1) + pv


@gluon.jit
def _attend_kept_tiles_fp8(q_tile, k_ring, v_ring, p_bufs, p_first, k_ready, k_empty, v_ready, v_empty, idx_row,
                           stride_ik, n_tiles, k_scales, q_scale, S_K, LAYOUT_BK: gl.constexpr,
                           EVEN_K: gl.constexpr):  # fmt: skip
    """One consumer warpgroup's main loop: its 64 e4m3 query rows ``q_tile`` against every kept tile.

    Tile 0's scores and softmax come first; each later tile ``t`` issues its ``S`` with the ``P V`` of ``t - 1``
    (:func:`_attend_tile_range_fp8`); the last tile's ``P V`` closes. P of tile ``t`` lives in
    ``p_bufs[p_first + t % 2]``. ``k_ring`` holds ``(BLOCK_N, D)`` K tiles, ``v_ring`` ``(D, BLOCK_N)`` V^T tiles;
    ``k_scales`` points at the head's kv-block scales; ``q_scale`` is the q block's scale times softmax scale *
    log2(e). Kept blocks ascend, so only the last kept block can reach past ``S_K``: without ``EVEN_K`` its tiles
    run in a second loop, the only one that masks keys. Returns the fp32 sum of ``e4m3(448 P) V_fp8``, the integer
    row max and the row sum of ``448 P`` (base 2).
    """
    ROWS: gl.constexpr = q_tile.shape[0]
    HEAD_DIM: gl.constexpr = q_tile.shape[1]
    BLOCK_N: gl.constexpr = k_ring.shape[3]
    STAGES: gl.constexpr = k_ring.shape[0]
    s_layout: gl.constexpr = warpgroup_mma_layout(BLOCK_N, 32)
    o_layout: gl.constexpr = warpgroup_mma_layout(HEAD_DIM, 32)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    alpha_prev = gl.full([ROWS], 1.0, gl.float32, layout=row_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    if n_tiles > 0:
        s = warpgroup_mma_wait(0, deps=[_issue_scores(q_tile, k_ring, k_ready, 0, s_zero, LAYOUT_BK)])
        mbarrier.arrive(k_empty.index(0), count=1)
        k_start, s_scale = _kv_start_and_scale(0, idx_row, stride_ik, k_scales, q_scale, LAYOUT_BK, BLOCK_N)
        alpha_prev, m_i, l_i = _softmax_into_shared(s, m_i, l_i, s_scale, k_start, p_bufs.index(p_first), S_K,
                                                    EVEN_K)  # fmt: skip
    unmasked = n_tiles
    if not EVEN_K:
        unmasked = gl.maximum(n_tiles - LAYOUT_BK // BLOCK_N, 1)
    acc, m_i, l_i, alpha_prev = _attend_tile_range_fp8(1, unmasked, acc, m_i, l_i, alpha_prev, q_tile, k_ring, v_ring,
                                                       p_bufs, p_first, k_ready, k_empty, v_ready, v_empty, idx_row,
                                                       stride_ik, k_scales, q_scale, S_K, LAYOUT_BK, True)  # fmt: skip
    if not EVEN_K:
        acc, m_i, l_i, alpha_prev = _attend_tile_range_fp8(unmasked, n_tiles, acc, m_i, l_i, alpha_prev, q_tile,
                                                           k_ring, v_ring, p_bufs, p_first, k_ready, k_empty, v_ready,
                                                           v_empty, idx_row, stride_ik, k_scales, q_scale, S_K,
                                                           LAYOUT_BK, False)  # fmt: skip
    if n_tiles > 0:
        pv_zero = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
        pv = _issue_pv(p_bufs, p_first, n_tiles - 1, v_ring, v_ready, pv_zero)
        pv = warpgroup_mma_wait(0, deps=[pv])
        mbarrier.arrive(v_empty.index((n_tiles - 1) % STAGES), count=1)
        acc = _add_rescaled(acc, alpha_prev, pv)
    return acc, m_i, l_i


@gluon.jit
def _attend_tile_range_fp8(first, end, acc, m_i, l_i, alpha_prev, q_tile, k_ring, v_ring, p_bufs, p_first, k_ready,
                           k_empty, v_ready, v_empty, idx_row, stride_ik, k_scales, q_scale, S_K,
                           LAYOUT_BK: gl.constexpr, EVEN_K: gl.constexpr):  # fmt: skip
    """Tiles ``first`` .. ``end - 1`` (``first >= 1``) of :func:`_attend_kept_tiles_fp8`: per tile ``t``, ``S`` of
    ``t`` and the ``P V`` of ``t - 1`` issued back to back, the softmax of ``t`` (keys at or past ``S_K`` masked
    unless ``EVEN_K``) and its P's store while ``P V`` runs, then ``acc = acc * alpha_prev + P V`` (``alpha_prev``:
    tile ``t - 1``'s rescale factor). Returns the running output, row max and row sum, and the last factor."""
    ROWS: gl.constexpr = q_tile.shape[0]
    HEAD_DIM: gl.constexpr = q_tile.shape[1]
    BLOCK_N: gl.constexpr = k_ring.shape[3]
    STAGES: gl.constexpr = k_ring.shape[0]
    s_layout: gl.constexpr = warpgroup_mma_layout(BLOCK_N, 32)
    o_layout: gl.constexpr = acc.type.layout
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    pv_zero = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    for t in range(first, end):
        slot = t % STAGES
        prev = (t - 1) % STAGES
        s = _issue_scores(q_tile, k_ring, k_ready, t, s_zero, LAYOUT_BK)
        pv = _issue_pv(p_bufs, p_first, t - 1, v_ring, v_ready, pv_zero)
        k_start, s_scale = _kv_start_and_scale(t, idx_row, stride_ik, k_scales, q_scale, LAYOUT_BK, BLOCK_N)
        s = warpgroup_mma_wait(1, deps=[s])
        mbarrier.arrive(k_empty.index(slot), count=1)
        alpha, m_i, l_i = _softmax_into_shared(s, m_i, l_i, s_scale, k_start, p_bufs.index(p_first + t % 2), S_K,
                                               EVEN_K)  # fmt: skip
        pv = warpgroup_mma_wait(0, deps=[pv])
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = _add_rescaled(acc, alpha_prev, pv)
        alpha_prev = alpha
    return acc, m_i, l_i, alpha_prev


@gluon.jit
def _fp8_consumer(O, LSE, Q_SCALE, K_SCALE, V_SCALE, q_smem, k_ring, v_ring, p_smem, q_bar, k_ready, k_empty, v_ready,
                  v_empty, idx_row, stride_ik, n_tiles, off_b, off_h, off_m, pid_bh, q_block,
                  stride_ob, stride_oh, stride_om, stride_od, S_Q, S_K, NQ, NK, qk_scale,
                  LAYOUT_BK: gl.constexpr, EVEN_K: gl.constexpr, WG: gl.constexpr):  # fmt: skip
    """Consumer warpgroup ``WG``: query rows ``off_m + WG * 64`` .. + 64 against every kept tile
    (:func:`_attend_kept_tiles_fp8`, P through ``p_smem[2 WG]`` and ``p_smem[2 WG + 1]``), then O (scaled back,
    stored from registers) and LSE."""
    ROWS: gl.constexpr = q_smem.shape[3]
    HEAD_DIM: gl.constexpr = q_smem.shape[4]
    q_tile = q_smem.index(WG).reshape([ROWS, HEAD_DIM])
    q_scale = gl.load(Q_SCALE + pid_bh.to(gl.int64) * NQ + q_block) * qk_scale
    k_scales = K_SCALE + pid_bh.to(gl.int64) * NK
    if n_tiles > 0:
        mbarrier.wait(q_bar, 0)
    acc, m_i, l_i = _attend_kept_tiles_fp8(q_tile, k_ring, v_ring, p_smem, 2 * WG, k_ready, k_empty, v_ready, v_empty,
                                           idx_row, stride_ik, n_tiles, k_scales, q_scale, S_K, LAYOUT_BK,
                                           EVEN_K)  # fmt: skip
    out, lse = _normalise(acc, m_i, l_i * (1.0 / _P_SCALE))  # l summed the probabilities times 448
    rows_lse = off_m + WG * ROWS + gl.arange(0, ROWS, layout=lse.type.layout)
    gl.store(LSE + pid_bh.to(gl.int64) * S_Q + rows_lse, lse, mask=rows_lse < S_Q)

    o_layout: gl.constexpr = acc.type.layout
    cols = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    v_scale = gl.load(V_SCALE + pid_bh.to(gl.int64) * HEAD_DIM + cols) * (1.0 / _P_SCALE)
    out = out * gl.expand_dims(v_scale, 0)
    rows = off_m + WG * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, o_layout))
    o_ptrs = (O + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
              + gl.expand_dims(rows.to(gl.int64) * stride_om, 1) + gl.expand_dims(cols * stride_od, 0))  # fmt: skip
    gl.store(o_ptrs, out.to(O.dtype.element_ty), mask=gl.expand_dims(rows < S_Q, 1))


@gluon.jit
def _block_sparse_fp8_fwd_gluon(
    q_desc, k_desc, vt_desc, Q_SCALE, K_SCALE, V_SCALE, O, LSE, COUNTS, INDICES,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq, stride_ik,
    H, S_Q, S_K, NQ, NK, qk_scale,
    LAYOUT_BQ: gl.constexpr,
    LAYOUT_BK: gl.constexpr,
    EVEN_K: gl.constexpr,
    STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    P_LAYOUT: gl.constexpr,
):  # fmt: skip
    """One program: 128 query rows of one (batch, head) against the kept kv blocks of their q block.

    Launched with ``num_warps=4`` (the first consumer warpgroup); the second consumer warpgroup and the
    producer warp are worker partitions. Descriptors (e4m3) are 4-D over
    ``(B, H, S, D)`` with blocks ``(1, 1, 64, D)`` (q) and ``(1, 1, BLOCK_N, D)`` (k), and over V
    transposed ``(B, H, D, S_K)`` with blocks ``(1, 1, D, BLOCK_N)``. Q_SCALE ``(B, H, NQ)``, K_SCALE
    ``(B, H, NK)``, V_SCALE ``(B, H, D)`` and LSE ``(B, H, S_Q)`` contiguous fp32; O ``(B, H, S_Q, D)``
    fp16/bf16, any strides; ``qk_scale`` is softmax scale * log2(e). ``P_LAYOUT``: the shared layout of a
    ``(1, 1, 64, BLOCK_N)`` e4m3 P buffer (two per consumer).
    """
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    ROWS: gl.constexpr = q_desc.block_type.shape[2]
    SUB_N: gl.constexpr = LAYOUT_BK // BLOCK_N
    dtype: gl.constexpr = q_desc.dtype

    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_m = pid_m * (_CONSUMERS * ROWS)
    q_block = pid_m // (LAYOUT_BQ // (_CONSUMERS * ROWS))

    q_smem = gl.allocate_shared_memory(dtype, [_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES] + vt_desc.block_type.shape, vt_desc.layout)
    p_smem = gl.allocate_shared_memory(dtype, [2 * _CONSUMERS, 1, 1, ROWS, BLOCK_N], P_LAYOUT)
    q_bar, k_ready, k_empty, v_ready, v_empty = _ring_barriers(STAGES, _CONSUMERS)

    count = gl.load(COUNTS + off_b.to(gl.int64) * stride_cb + off_h * stride_ch + q_block * stride_cq)
    idx_row = INDICES + off_b.to(gl.int64) * stride_ib + off_h * stride_ih + q_block * stride_iq
    n_tiles = count * SUB_N
    gl.warp_specialize([
        (_fp8_consumer, (O, LSE, Q_SCALE, K_SCALE, V_SCALE, q_smem, k_ring, v_ring, p_smem, q_bar, k_ready,
                         k_empty, v_ready, v_empty, idx_row, stride_ik, n_tiles, off_b, off_h, off_m, pid_bh,
                         q_block, stride_ob, stride_oh, stride_om, stride_od, S_Q, S_K, NQ, NK, qk_scale,
                         LAYOUT_BK, EVEN_K, 0)),
        (_fp8_consumer, (O, LSE, Q_SCALE, K_SCALE, V_SCALE, q_smem, k_ring, v_ring, p_smem, q_bar, k_ready,
                         k_empty, v_ready, v_empty, idx_row, stride_ik, n_tiles, off_b, off_h, off_m, pid_bh,
                         q_block, stride_ob, stride_oh, stride_om, stride_od, S_Q, S_K, NQ, NK, qk_scale,
                         LAYOUT_BK, EVEN_K, 1)),
        (_producer, (q_desc, k_desc, vt_desc, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready, v_empty,
                     idx_row, stride_ik, n_tiles, off_b, off_h, off_m, LAYOUT_BK, True, True)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------


def launch_gluon_block_sparse_fp8(
    x: Fp8Inputs, layout: BlockLayout, scale: float, out: Tensor, lse: Tensor, tile: TileConfig | None = None
) -> None:
    """Run the kernel on quantised inputs ``x`` into ``out`` ``(B, H, S_q, D)`` (any strides) and ``lse``
    (contiguous fp32 ``(B, H, S_q)``, the LSE of the smoothed scores).

    ``x.v`` must be stored channels first with 16-byte key strides
    (``quantize_attention_inputs(..., v_key_multiple=V_KEY_MULTIPLE)``); the layout blocks are
    ``x.block_q`` and ``x.block_k``. ``tile`` (``block_m`` 128 rows, two consumer warpgroups of 64;
    ``block_n`` keys per K/V tile; ``num_stages`` ring slots) defaults to
    :func:`~sparse_compile.kernels.tile_configs.gluon_fp8_block_sparse_tile`.
    """
    b, h, s_q, d = x.q.shape
    s_k = x.k.shape[2]
    block_q, block_k = x.block_q, x.block_k
    tile = gluon_fp8_block_sparse_tile(block_k) if tile is None else tile
    rows = _CONSUMERS.value * CONSUMER_ROWS
    if tile.block_m != rows or block_q % tile.block_m or block_k % tile.block_n:
        raise ValueError(f"{tile} must have block_m {rows} and tile block_q={block_q} and "
                         f"block_k={block_k}")  # fmt: skip
    v_t = x.v.transpose(-1, -2)  # (B, H, D, S_k), keys contiguous
    if v_t.stride(3) != 1 or v_t.stride(2) % V_KEY_MULTIPLE:
        raise ValueError(f"x.v must be stored channels first with keys padded to {V_KEY_MULTIPLE}, got strides "
                         f"{x.v.stride()}")  # fmt: skip
    counts, indices = layout.counts, layout.indices
    grid = (cdiv(s_q, tile.block_m), b * h)
    with torch.cuda.device(x.q.device):
        _block_sparse_fp8_fwd_gluon[grid](
            _descriptor(x.q, CONSUMER_ROWS), _descriptor(x.k, tile.block_n), _descriptor(v_t, d, tile.block_n),
            x.q_scale, x.k_scale, x.v_scale, out, lse, counts, indices,
            *out.stride(), *counts.stride(), *indices.stride(),
            h, s_q, s_k, x.q_scale.shape[-1], x.k_scale.shape[-1], scale * LOG2E,
            LAYOUT_BQ=block_q, LAYOUT_BK=block_k, EVEN_K=s_k % block_k == 0,
            STAGES=tile.num_stages, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
            P_LAYOUT=tile_shared_layout(CONSUMER_ROWS, tile.block_n, x.q.dtype), num_warps=4,
            maxnreg=launch_registers(_CONSUMERS.value),
        )  # fmt: skip
