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
- each of two consumer warpgroups (64 query rows each) runs, per kept tile, ``S = Q K^T``, the softmax and ``P V``
  (asynchronous ``warpgroup_mma``; the two consumers' GEMMs and softmaxes overlap each other).

The softmax is the Triton kernel's (``_softmax_step`` with ``INTEGER_MAX``): scores times the q block's and kv
block's scales (softmax scale and log2(e) folded into the q scale), the running row max an integer (base 2,
rounded up) so ``P = 2^(S - m)`` lies in ``(0, 1]`` and every rescale is a power of two, ``448 P`` (the factor
folded into the exponent, the row sum divided by it at the end) cast to e4m3 in registers (the A operand,
``k_width`` 4). Each tile's ``P V`` goes into a fresh MMA accumulator and is added to the rescaled fp32
running output in registers, ``acc = acc * alpha_t + PV_t``, one fused multiply-add per element: the same
fp32 values as the Triton kernel's, as ``alpha`` is a power of two. O is divided by ``l`` and multiplied by V's channel scale over 448
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
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

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
    _normalise,
    _producer,
    _ring_barriers,
    _softmax_step,
    _tile_start,
    gluon_device_ineligibility,
    launch_registers,
    warpgroup_mma_layout,
)
from sparse_compile.kernels.tile_configs import TileConfig, gluon_fp8_block_sparse_tile

V_KEY_MULTIPLE = _TMA_ALIGN_BYTES
"""V's keys are padded to this multiple in its channels-first e4m3 storage: 16-byte strides for TMA."""
MMA_CHUNK = 128
"""Longest e4m3 ``wgmma`` chain (K length): Hopper sums a chain's products with fewer mantissa bits than
fp32; each chunk of a GEMM gets a fresh accumulator and the chunks are added in fp32. 32 (one
instruction per chain) does not compile without register spills yet, so the default keeps whole tiles."""
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
def _scores_fp8(q_tile, k_tile, s_zero, turn_next, PINGPONG: gl.constexpr, CHUNK: gl.constexpr):
    """``S = Q K^T`` (``(ROWS, BLOCK_N)`` fp32) of e4m3 ``q_tile`` ``(ROWS, D)`` and ``k_tile`` ``(BLOCK_N, D)``.

    One ``wgmma`` chain of ``CHUNK`` channels per fresh accumulator, the chunks summed in fp32 registers
    (the first two in flight together). With ``PINGPONG`` the other consumer's turn barrier ``turn_next``
    is arrived on once the last chunk is issued.
    """
    NC: gl.constexpr = q_tile.shape[1] // CHUNK
    gl.static_assert(NC * CHUNK == q_tile.shape[1])
    s = warpgroup_mma(q_tile.slice(0, CHUNK, 1), k_tile.slice(0, CHUNK, 1).permute((1, 0)), s_zero,
                      use_acc=False, is_async=True)  # fmt: skip
    if NC == 1:
        if PINGPONG:
            mbarrier.arrive(turn_next, count=1)
        s = warpgroup_mma_wait(0, deps=[s])
    for c in gl.static_range(1, NC):
        part = warpgroup_mma(q_tile.slice(c * CHUNK, CHUNK, 1), k_tile.slice(c * CHUNK, CHUNK, 1).permute((1, 0)),
                             s_zero, use_acc=False, is_async=True)  # fmt: skip
        if PINGPONG and c == NC - 1:
            mbarrier.arrive(turn_next, count=1)
        if c == 1:
            s = warpgroup_mma_wait(1, deps=[s])
        part = warpgroup_mma_wait(0, deps=[part])
        s = s + part
    return s


@gluon.jit
def _halves(x):
    """The left and right column halves of ``x`` ``(ROWS, N)``, split in registers."""
    return gl.split(x.reshape([x.shape[0], 2, x.shape[1] // 2]).permute((0, 2, 1)))


@gluon.jit
def _e4m3_operand(p, p_layout: gl.constexpr):
    """``e4m3(p)`` in the A-operand layout ``p_layout`` (``p`` is already times 448, by the softmax's ``P_LOG2``)."""
    return gl.convert_layout(p.to(gl.float8e4nv), p_layout)


@gluon.jit
def _p_operand(p, p_layout: gl.constexpr, NC: gl.constexpr):
    """``e4m3(p)`` of fp32 ``p`` ``(ROWS, BLOCK_N)`` (probabilities times 448) as a tuple of ``NC`` (1, 2 or 4)
    key chunks, left to right, each in the A-operand layout ``p_layout``."""
    if NC == 1:
        chunks = (_e4m3_operand(p, p_layout),)
    elif NC == 2:
        left, right = _halves(p)
        chunks = (_e4m3_operand(left, p_layout), _e4m3_operand(right, p_layout))
    else:
        left, right = _halves(p)
        left_0, left_1 = _halves(left)
        right_0, right_1 = _halves(right)
        chunks = (_e4m3_operand(left_0, p_layout), _e4m3_operand(left_1, p_layout),
                  _e4m3_operand(right_0, p_layout), _e4m3_operand(right_1, p_layout))  # fmt: skip
    return chunks


@gluon.jit
def _add_pv_fp8(acc, alpha, p_chunks, v_tile, pv_zero):
    """``acc * alpha + P V`` for e4m3 P as key chunks ``p_chunks`` (:func:`_p_operand`) and ``v_tile``
    ``(D, BLOCK_N)`` (V^T): one ``wgmma`` per chunk into a fresh accumulator, the first added to the
    rescaled fp32 ``acc`` by one fused multiply-add per element (``alpha`` ``(ROWS,)``, a power of two), the
    others added after it in registers, two chunks in flight."""
    NC: gl.constexpr = len(p_chunks)
    CHUNK: gl.constexpr = v_tile.shape[1] // NC
    scale = gl.expand_dims(alpha, 1)
    pending = warpgroup_mma(p_chunks[0], v_tile.slice(0, CHUNK, 1).permute((1, 0)), pv_zero, use_acc=False,
                            is_async=True)  # fmt: skip
    for c in gl.static_range(1, NC):
        issued = warpgroup_mma(p_chunks[c], v_tile.slice(c * CHUNK, CHUNK, 1).permute((1, 0)), pv_zero,
                               use_acc=False, is_async=True)  # fmt: skip
        if c == 1:
            acc = acc * scale + warpgroup_mma_wait(1, deps=[pending])
        else:
            acc = acc + warpgroup_mma_wait(1, deps=[pending])
        pending = issued
    if NC == 1:
        acc = acc * scale + warpgroup_mma_wait(0, deps=[pending])
    else:
        acc = acc + warpgroup_mma_wait(0, deps=[pending])
    return acc


@gluon.jit
def _attend_kept_tiles_fp8(q_tile, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, turn, idx_row, stride_ik,
                           n_tiles, k_scales, q_scale, S_K, LAYOUT_BK: gl.constexpr, EVEN_K: gl.constexpr,
                           WG: gl.constexpr, PINGPONG: gl.constexpr, CHUNK: gl.constexpr):  # fmt: skip
    """One consumer warpgroup's main loop: its 64 e4m3 query rows ``q_tile`` against every kept tile
    (:func:`_attend_tile_range_fp8`).

    Kept blocks ascend, so only the last kept block can reach past ``S_K``: without ``EVEN_K`` its tiles run
    in a second loop, the only one that masks keys (a compare and a select per score). Returns the fp32 sum of ``e4m3(448 P) V_fp8``, the integer row max and the row
    sum of ``448 P`` (base 2).
    """
    ROWS: gl.constexpr = q_tile.shape[0]
    HEAD_DIM: gl.constexpr = q_tile.shape[1]
    BLOCK_N: gl.constexpr = k_ring.shape[3]
    s_layout: gl.constexpr = warpgroup_mma_layout(BLOCK_N, 32)
    o_layout: gl.constexpr = warpgroup_mma_layout(HEAD_DIM, 32)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    unmasked = n_tiles
    if not EVEN_K:
        unmasked = gl.maximum(n_tiles - LAYOUT_BK // BLOCK_N, 0)
    acc, m_i, l_i = _attend_tile_range_fp8(0, unmasked, acc, m_i, l_i, q_tile, k_ring, v_ring, k_ready, k_empty,
                                           v_ready, v_empty, turn, idx_row, stride_ik, k_scales, q_scale, S_K,
                                           LAYOUT_BK, True, WG, PINGPONG, CHUNK)  # fmt: skip
    if not EVEN_K:
        acc, m_i, l_i = _attend_tile_range_fp8(unmasked, n_tiles, acc, m_i, l_i, q_tile, k_ring, v_ring, k_ready,
                                               k_empty, v_ready, v_empty, turn, idx_row, stride_ik, k_scales, q_scale,
                                               S_K, LAYOUT_BK, False, WG, PINGPONG, CHUNK)  # fmt: skip
    return acc, m_i, l_i


@gluon.jit
def _attend_tile_range_fp8(first, end, acc, m_i, l_i, q_tile, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty,
                           turn, idx_row, stride_ik, k_scales, q_scale, S_K, LAYOUT_BK: gl.constexpr,
                           EVEN_K: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr,
                           CHUNK: gl.constexpr):  # fmt: skip
    """Kept tiles ``first`` .. ``end - 1`` of the row into the running ``acc``, ``m_i`` and ``l_i``; keys at or
    past ``S_K`` masked unless ``EVEN_K``.

    ``k_ring`` holds ``(BLOCK_N, D)`` K tiles, ``v_ring`` ``(D, BLOCK_N)`` V^T tiles; ``k_scales`` points at
    the head's kv-block scales; ``q_scale`` is the q block's scale times softmax scale * log2(e).
    Per tile: ``S`` (:func:`_scores_fp8`), the softmax, then ``P V`` added to the rescaled running output
    (:func:`_add_pv_fp8`), every e4m3 ``wgmma`` chain at most ``CHUNK`` long. P is used in the step that makes
    it, never carried across the loop's back edge (a carried fp8 tensor is unpacked to bytes and packed
    again for the ``wgmma``). With ``PINGPONG`` (two consumers) the ``S``
    GEMMs of the two warpgroups alternate on the ``turn`` barriers (``turn[WG]`` is this warpgroup's).
    """
    ROWS: gl.constexpr = q_tile.shape[0]
    HEAD_DIM: gl.constexpr = q_tile.shape[1]
    BLOCK_N: gl.constexpr = k_ring.shape[3]
    STAGES: gl.constexpr = k_ring.shape[0]
    s_layout: gl.constexpr = warpgroup_mma_layout(BLOCK_N, 32)
    o_layout: gl.constexpr = warpgroup_mma_layout(HEAD_DIM, 32)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    alpha_layout: gl.constexpr = gl.SliceLayout(1, o_layout)
    S_CHUNK: gl.constexpr = min(CHUNK, HEAD_DIM)
    PV_CHUNK: gl.constexpr = min(CHUNK, BLOCK_N)
    turn_mine = turn.index(WG)
    turn_next = turn.index(1 - WG)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    pv_zero = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)

    for t in range(first, end):
        slot = t % STAGES
        phase = (t // STAGES) & 1
        if PINGPONG:
            mbarrier.wait(turn_mine, (t + 1 - WG) & 1)  # the first warpgroup goes first
        mbarrier.wait(k_ready.index(slot), phase)
        s = _scores_fp8(q_tile, k_ring.index(slot).reshape([BLOCK_N, HEAD_DIM]), s_zero, turn_next, PINGPONG,
                        S_CHUNK)  # fmt: skip
        mbarrier.arrive(k_empty.index(slot), count=1)
        k_start = _tile_start(idx_row, stride_ik, t, LAYOUT_BK, BLOCK_N)
        s_scale = q_scale * gl.load(k_scales + k_start // LAYOUT_BK)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, s_scale, k_start, S_K, EVEN_K, BLOCK_N, s_layout, True,
                                           _P_LOG2)
        p_chunks = _p_operand(p, p_layout, BLOCK_N // PV_CHUNK)
        mbarrier.wait(v_ready.index(slot), phase)
        acc = _add_pv_fp8(acc, gl.convert_layout(alpha, alpha_layout), p_chunks,
                          v_ring.index(slot).reshape([HEAD_DIM, BLOCK_N]), pv_zero)  # fmt: skip
        mbarrier.arrive(v_empty.index(slot), count=1)
    return acc, m_i, l_i


@gluon.jit
def _fp8_consumer(O, LSE, Q_SCALE, K_SCALE, V_SCALE, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready,
                  v_empty, turn, idx_row, stride_ik, n_tiles, off_b, off_h, off_m, pid_bh, q_block,
                  stride_ob, stride_oh, stride_om, stride_od, S_Q, S_K, NQ, NK, qk_scale,
                  LAYOUT_BK: gl.constexpr, EVEN_K: gl.constexpr, WG: gl.constexpr, PINGPONG: gl.constexpr,
                  CHUNK: gl.constexpr):  # fmt: skip
    """Consumer warpgroup ``WG``: query rows ``off_m + WG * 64`` .. + 64 against every kept tile
    (:func:`_attend_kept_tiles_fp8`), then O (scaled back, stored from registers) and LSE."""
    ROWS: gl.constexpr = q_smem.shape[3]
    HEAD_DIM: gl.constexpr = q_smem.shape[4]
    q_tile = q_smem.index(WG).reshape([ROWS, HEAD_DIM])
    q_scale = gl.load(Q_SCALE + pid_bh.to(gl.int64) * NQ + q_block) * qk_scale
    k_scales = K_SCALE + pid_bh.to(gl.int64) * NK
    if n_tiles > 0:
        mbarrier.wait(q_bar, 0)
    acc, m_i, l_i = _attend_kept_tiles_fp8(q_tile, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, turn, idx_row,
                                           stride_ik, n_tiles, k_scales, q_scale, S_K, LAYOUT_BK, EVEN_K, WG,
                                           PINGPONG, CHUNK)  # fmt: skip
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
    PINGPONG: gl.constexpr,
    CHUNK: gl.constexpr,
):  # fmt: skip
    """One program: 128 query rows of one (batch, head) against the kept kv blocks of their q block.

    Launched with ``num_warps=4`` (the first consumer warpgroup); the second consumer warpgroup and the
    producer warp are worker partitions. Descriptors (e4m3) are 4-D over
    ``(B, H, S, D)`` with blocks ``(1, 1, 64, D)`` (q) and ``(1, 1, BLOCK_N, D)`` (k), and over V
    transposed ``(B, H, D, S_K)`` with blocks ``(1, 1, D, BLOCK_N)``. Q_SCALE ``(B, H, NQ)``, K_SCALE
    ``(B, H, NK)``, V_SCALE ``(B, H, D)`` and LSE ``(B, H, S_Q)`` contiguous fp32; O ``(B, H, S_Q, D)``
    fp16/bf16, any strides; ``qk_scale`` is softmax scale * log2(e). ``CHUNK`` (32, 64 or 128) caps the K
    length of every e4m3 ``wgmma`` chain; ``PINGPONG`` alternates the two consumers' GEMMs.
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
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)  # fenced with the ring's barriers
    q_bar, k_ready, k_empty, v_ready, v_empty = _ring_barriers(STAGES, _CONSUMERS)

    count = gl.load(COUNTS + off_b.to(gl.int64) * stride_cb + off_h * stride_ch + q_block * stride_cq)
    idx_row = INDICES + off_b.to(gl.int64) * stride_ib + off_h * stride_ih + q_block * stride_iq
    n_tiles = count * SUB_N
    gl.warp_specialize([
        (_fp8_consumer, (O, LSE, Q_SCALE, K_SCALE, V_SCALE, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty,
                         v_ready, v_empty, turn, idx_row, stride_ik, n_tiles, off_b, off_h, off_m, pid_bh,
                         q_block, stride_ob, stride_oh, stride_om, stride_od, S_Q, S_K, NQ, NK, qk_scale,
                         LAYOUT_BK, EVEN_K, 0, PINGPONG, CHUNK)),
        (_fp8_consumer, (O, LSE, Q_SCALE, K_SCALE, V_SCALE, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty,
                         v_ready, v_empty, turn, idx_row, stride_ik, n_tiles, off_b, off_h, off_m, pid_bh,
                         q_block, stride_ob, stride_oh, stride_om, stride_od, S_Q, S_K, NQ, NK, qk_scale,
                         LAYOUT_BK, EVEN_K, 1, PINGPONG, CHUNK)),
        (_producer, (q_desc, k_desc, vt_desc, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready, v_empty,
                     idx_row, stride_ik, n_tiles, off_b, off_h, off_m, LAYOUT_BK, True, True)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------


def launch_gluon_block_sparse_fp8(
    x: Fp8Inputs, layout: BlockLayout, scale: float, out: Tensor, lse: Tensor, tile: TileConfig | None = None,
    pingpong: bool = False,
) -> None:  # fmt: skip
    """Run the kernel on quantised inputs ``x`` into ``out`` ``(B, H, S_q, D)`` (any strides) and ``lse``
    (contiguous fp32 ``(B, H, S_q)``, the LSE of the smoothed scores).

    ``x.v`` must be stored channels first with 16-byte key strides
    (``quantize_attention_inputs(..., v_key_multiple=V_KEY_MULTIPLE)``); the layout blocks are
    ``x.block_q`` and ``x.block_k``. ``tile`` (``block_m`` 128 rows, two consumer warpgroups of 64;
    ``block_n`` keys per K/V tile; ``num_stages`` ring slots) defaults to
    :func:`~sparse_compile.kernels.tile_configs.gluon_fp8_block_sparse_tile`. ``pingpong``: the two
    consumer warpgroups take turns at the tensor cores.
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
            PINGPONG=pingpong, CHUNK=MMA_CHUNK, num_warps=4, maxnreg=launch_registers(_CONSUMERS.value),
        )  # fmt: skip
