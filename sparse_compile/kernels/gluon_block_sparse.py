"""Fixed-block kept-block attention forward for Hopper (sm_90), written in Gluon.

The same computation and layout as the Triton kernel of :mod:`sparse_compile.kernels.block_sparse`
(the specification is :mod:`~sparse_compile.kernels.block_sparse_reference`), for the inputs
:func:`gluon_ineligibility` accepts: fp16/bf16, head dim 64 or 128, layout blocks of 64, 128 or 256,
no token permutations, q/k/v readable by TMA. :mod:`~sparse_compile.kernels.block_sparse` dispatches
here on sm_90 (permuted calls to the ``PERMUTE_Q`` variant on kernel-order copies of K and V) and keeps the
Triton kernel for every other device and input.

One program computes 64 or 128 query rows of one (batch, head) (grid ``(cdiv(S_q, rows), B * H)``),
warp-specialized:

- a producer warp issues every TMA load: the Q rows, then the K and V tiles of the kept blocks into a
  ``STAGES``-deep shared-memory ring (tile ``t``, the ``t % SUB_N``-th ``BLOCK_N``-key part of kept
  block ``indices[t // SUB_N]``, goes to slot ``t % STAGES``), each slot guarded by a ready and an
  empty mbarrier;
- one consumer warpgroup per 64 query rows runs both GEMMs as asynchronous ``warpgroup_mma``
  (``S = Q K^T`` from shared memory, ``O += P V`` with P from registers): it issues the scores of tile
  ``t`` and the ``P V`` of tile ``t - 1`` back to back and runs the online softmax (base 2, fp32) of
  tile ``t`` while ``P V`` is on the tensor cores, releasing each slot once its GEMM has finished.

Q, K and V are read through 4-D ``(B, H, S, D)`` descriptors (any strides with a unit last stride), so
rows past ``S`` read as zeros; keys past ``S_k`` (the last, partial kv block) are masked to ``-inf``; O
is written by a TMA store that drops rows past ``S_q``. Rows whose q block keeps nothing get O = 0 and
LSE = ``-inf``. The ``PERMUTE_Q`` variant takes a query permutation instead: each consumer gathers its Q
rows by pointer loads and writes O and LSE to their token rows by pointer stores (K and V still come
by TMA, so they must already be in kernel order).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sparse_compile.kernels.block_sparse_reference import BlockLayout
from sparse_compile.kernels.common import LOG2E, cdiv
from sparse_compile.kernels.tile_configs import TileConfig, gluon_block_sparse_tile

GLUON_DTYPES = (torch.float16, torch.bfloat16)
"""q/k/v dtypes of the Gluon kernel."""
GLUON_HEAD_DIMS = (64, 128)
"""Head dims of the Gluon kernel."""
GLUON_LAYOUT_BLOCKS = (64, 128, 256)
"""Layout block sizes (``block_q`` and ``block_k``) of the Gluon kernel."""
GLUON_CAPABILITY = (9, 0)
"""The device capability the kernel is built for (sm_90a: ``warpgroup_mma`` and TMA)."""

_TMA_ALIGN_BYTES = 16
_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.float8_e4m3fn: gl.float8e4nv}


# ------------------------------------------------------------------------------------------------
# Eligibility
# ------------------------------------------------------------------------------------------------


def tma_readable(t: Tensor) -> bool:
    """Whether a ``(B, H, S, D)`` view can back a TMA descriptor: unit last stride, 16-byte aligned base
    and other strides, none of them 0."""
    elem = t.element_size()
    if t.stride(3) != 1 or t.data_ptr() % _TMA_ALIGN_BYTES:
        return False
    return all((s * elem) % _TMA_ALIGN_BYTES == 0 and s != 0 for s in t.stride()[:3])


def gluon_device_ineligibility(q: Tensor, capability: tuple[int, int] | None, kernel: str) -> str | None:
    """Why the sm_90 Gluon kernel named ``kernel`` cannot take q's device ``capability`` (CUDA ``(major, minor)``,
    ``None`` off CUDA), dtype or head dim (a sentence), or ``None``: what every Gluon kernel here asks."""
    if capability != GLUON_CAPABILITY:
        return f"the {kernel} is built for sm_90 only (device capability {capability})"
    if q.dtype not in GLUON_DTYPES:
        return f"the {kernel} takes fp16/bf16 (got {q.dtype})"
    if q.shape[-1] not in GLUON_HEAD_DIMS:
        return f"the {kernel} takes head dim {GLUON_HEAD_DIMS} (got {q.shape[-1]})"
    return None


def gluon_config_ineligibility(q: Tensor, block_q: int, block_k: int, capability: tuple[int, int] | None) -> str | None:
    """Why the Gluon kernel cannot take q's device ``capability``, dtype, head dim
    (:func:`gluon_device_ineligibility`) or the layout blocks (a sentence), or ``None``. These are all a permuted
    call on kernel-order K/V copies (contiguous, so TMA-readable; q read by pointer) must pass."""
    reason = gluon_device_ineligibility(q, capability, "Gluon kernel")
    if reason is not None:
        return reason
    if block_q not in GLUON_LAYOUT_BLOCKS or block_k not in GLUON_LAYOUT_BLOCKS:
        return f"the Gluon kernel takes layout blocks {GLUON_LAYOUT_BLOCKS} (got {block_q} x {block_k})"
    return None


def gluon_ineligibility(
    q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int, capability: tuple[int, int] | None,
    has_permutation: bool,
) -> str | None:  # fmt: skip
    """Why the Gluon kernel cannot run this call on q/k/v as they are (a sentence), or ``None`` when it can:
    :func:`gluon_config_ineligibility`, then no token permutation and TMA-readable q/k/v.

    Shapes are assumed valid (:func:`~sparse_compile.kernels.block_sparse.validate_inputs`).
    """
    reason = gluon_config_ineligibility(q, block_q, block_k, capability)
    if reason is not None:
        return reason
    if has_permutation:
        return "the Gluon kernel reads tiles by TMA, which cannot gather permuted rows"
    if not all(tma_readable(t) for t in (q, k, v)):
        return "the Gluon kernel needs q/k/v with a unit last stride and 16-byte aligned base and strides"
    return None


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------

CONSUMER_ROWS = 64
"""Query rows of one consumer warpgroup (the M of its ``warpgroup_mma``)."""
CONSUMER_REGS = 232
"""Registers per thread of a consumer warpgroup (``setmaxnreg``); the producer warp keeps 24."""
PRODUCER_REGS = 24
PACKED_KEYS = gl.constexpr(0)
"""``LAYOUT_BK`` of the cluster kernel (:mod:`~sparse_compile.kernels.gluon_varlen_block_sparse`): kv tile ``t``
holds positions ``t * BLOCK_N ..`` of a q cluster's packed kept keys (only the last tile masks keys past their
number), gathered by ``cp.async``, so the consumers fence each filled slot for the tensor cores' async proxy."""


@gluon.jit
def _tile_start(idx_row, stride_ik, t, LAYOUT_BK: gl.constexpr, BLOCK_N: gl.constexpr):
    """First key of kv tile ``t``: sub-tile ``t % SUB_N`` of kept block ``idx_row[t // SUB_N]``; with
    ``LAYOUT_BK`` 0 (:data:`PACKED_KEYS`) position ``t * BLOCK_N`` of the packed kept keys."""
    if LAYOUT_BK == PACKED_KEYS:
        return t * BLOCK_N
    else:
        SUB_N: gl.constexpr = LAYOUT_BK // BLOCK_N
        kv_block = gl.load(idx_row + (t // SUB_N) * stride_ik)
        return kv_block * LAYOUT_BK + (t % SUB_N) * BLOCK_N


@gluon.jit
def _issue_tile_load(desc, bar, smem, off_b, off_h, start, KEYS_LAST: gl.constexpr):
    """TMA-load the row block of ``desc`` at row ``start`` of head (off_b, off_h) into ``smem``, completing on
    ``bar``; with ``KEYS_LAST`` the column block at ``start`` of a ``(B, H, D, S)`` descriptor."""
    mbarrier.expect(bar, desc.block_type.nbytes)
    if KEYS_LAST:
        tma.async_copy_global_to_shared(desc, [off_b, off_h, 0, start], bar, smem)
    else:
        tma.async_copy_global_to_shared(desc, [off_b, off_h, start, 0], bar, smem)


@gluon.jit
def _fence_gathered(LAYOUT_BK: gl.constexpr):
    """After a ready wait of a slot filled by ``cp.async`` (packed keys): make its generic-proxy writes visible to
    the ``warpgroup_mma`` that reads it (async proxy). TMA-filled slots need no fence."""
    if LAYOUT_BK == PACKED_KEYS:
        fence_async_shared()


@gluon.constexpr_function
def warpgroup_mma_layout(columns, k):
    """The layout of one warpgroup's ``warpgroup_mma`` accumulator: 64 rows x ``columns``, instruction K ``k``
    (16 for 16-bit operands, 32 for e4m3)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, columns, k])


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, k_start, S_K, EVEN_K: gl.constexpr, BLOCK_N: gl.constexpr,
                  s_layout: gl.constexpr, INTEGER_MAX: gl.constexpr, P_LOG2: gl.constexpr):  # fmt: skip
    """Base-2 online softmax of raw scores ``s`` (rows x BLOCK_N) of the tile at key ``k_start``.

    Keys at or past ``S_K`` are masked (only checked when not ``EVEN_K``). ``INTEGER_MAX``: the row max of
    the scaled scores is rounded up to an integer, so ``P = 2^(s * qk_scale - m)`` lies in ``(0, 1]`` and
    the rescale factor is a power of two (the FP8 kernel's softmax). Either way ``qk_scale > 0`` scales the
    row max rather than every score (the same value: rounding is monotonic) and each exponent is one
    fused multiply-add. Returns the unnormalised probabilities times ``2^P_LOG2`` (a scale folded into the
    exponent), the factor rescaling the running output, and the new row max and row sum (of the scaled
    probabilities).
    """
    if not EVEN_K:
        if k_start + BLOCK_N > S_K:
            offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(k_start + offs_n < S_K, 0), s, float("-inf"))
    if INTEGER_MAX:
        m_new = gl.maximum(m_i, gl.ceil(gl.max(s, 1) * qk_scale))
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if P_LOG2 == 0.0:
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    else:
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new - P_LOG2, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready, v_empty,
              idx_row, stride_ik, n_tiles, off_b, off_h, off_m, LAYOUT_BK: gl.constexpr,
              V_KEYS_LAST: gl.constexpr, LOAD_Q: gl.constexpr):  # fmt: skip
    """The TMA warp: the Q rows of every consumer (with ``LOAD_Q``; else the consumers load them), then K
    and V of each kept tile into the ring slot ``t % STAGES`` once every consumer has released it
    (``*_empty``), signalling ``*_ready``. ``V_KEYS_LAST``: ``v_desc`` is over V transposed,
    ``(B, H, D, S)``, its tiles ``(D, BLOCK_N)``."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    STAGES: gl.constexpr = k_ring.shape[0]
    CONSUMERS: gl.constexpr = q_smem.shape[0]
    ROWS: gl.constexpr = q_desc.block_type.shape[2]
    if LOAD_Q:
        if n_tiles > 0:
            mbarrier.expect(q_bar, CONSUMERS * q_desc.block_type.nbytes)
            for i in gl.static_range(CONSUMERS):
                tma.async_copy_global_to_shared(q_desc, [off_b, off_h, off_m + i * ROWS, 0], q_bar, q_smem.index(i))
    for t in range(n_tiles):
        slot = t % STAGES
        free_phase = ((t // STAGES) & 1) ^ 1  # a fresh barrier counts as released
        start = _tile_start(idx_row, stride_ik, t, LAYOUT_BK, BLOCK_N)
        mbarrier.wait(k_empty.index(slot), free_phase)
        _issue_tile_load(k_desc, k_ready.index(slot), k_ring.index(slot), off_b, off_h, start, False)
        mbarrier.wait(v_empty.index(slot), free_phase)
        _issue_tile_load(v_desc, v_ready.index(slot), v_ring.index(slot), off_b, off_h, start, V_KEYS_LAST)


@gluon.jit
def _issue_scores(q_tile, k_ring, k_ready, t, s_zero, LAYOUT_BK: gl.constexpr):
    """Once K of tile ``t`` is in ring slot ``t % STAGES``: issue (asynchronously) ``S = Q K_t^T`` into a fresh
    accumulator."""
    STAGES: gl.constexpr = k_ring.shape[0]
    slot = t % STAGES
    mbarrier.wait(k_ready.index(slot), (t // STAGES) & 1)
    _fence_gathered(LAYOUT_BK)
    k_tile = k_ring.index(slot).reshape([k_ring.shape[3], k_ring.shape[4]])
    return warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)


@gluon.jit
def _issue_register_pv(p, v_ring, v_ready, t, acc, LAYOUT_BK: gl.constexpr):
    """Once V of tile ``t`` is in ring slot ``t % STAGES``: issue (asynchronously) ``acc += P V_t``, P in registers."""
    STAGES: gl.constexpr = v_ring.shape[0]
    slot = t % STAGES
    mbarrier.wait(v_ready.index(slot), (t // STAGES) & 1)
    _fence_gathered(LAYOUT_BK)
    return warpgroup_mma(p, v_ring.index(slot).reshape([v_ring.shape[3], v_ring.shape[4]]), acc, is_async=True)


@gluon.jit
def _softmax_operand(s, m_i, l_i, qk_scale, k_start, S_K, EVEN_K: gl.constexpr, dtype: gl.constexpr,
                     p_layout: gl.constexpr):  # fmt: skip
    """:func:`_softmax_step` of a tile's scores ``s``, its P as the ``P V`` GEMM's register operand (``dtype`` in
    ``p_layout``): returns P, the rescale factor, and the new row max and row sum."""
    BLOCK_N: gl.constexpr = s.shape[1]
    s_layout: gl.constexpr = s.type.layout
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, k_start, S_K, EVEN_K, BLOCK_N, s_layout, False, 0.0)
    return gl.convert_layout(p.to(dtype), p_layout), alpha, m_i, l_i


@gluon.jit
def _attend_kept_tiles(q_tile, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, idx_row, stride_ik, n_tiles,
                       S_K, qk_scale, LAYOUT_BK: gl.constexpr, EVEN_K: gl.constexpr):  # fmt: skip
    """One consumer warpgroup's main loop: its 64 query rows ``q_tile`` (shared memory) against every kept tile.

    Per tile ``t`` it issues ``S = Q K_t^T`` and the ``P V`` of tile ``t - 1`` back to back, runs the
    softmax of tile ``t`` while ``P V`` is on the tensor cores (:func:`_attend_tile_range`), and releases
    each ring slot once its GEMM has finished. Returns the unnormalised output, the row max and the row sum
    (base 2).
    """
    ROWS: gl.constexpr = q_tile.shape[0]
    HEAD_DIM: gl.constexpr = q_tile.shape[1]
    BLOCK_N: gl.constexpr = k_ring.shape[3]
    dtype: gl.constexpr = k_ring.dtype
    s_layout: gl.constexpr = warpgroup_mma_layout(BLOCK_N, 16)
    o_layout: gl.constexpr = warpgroup_mma_layout(HEAD_DIM, 16)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)

    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.full([ROWS], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    p_prev = gl.zeros([ROWS, BLOCK_N], dtype, layout=p_layout)

    if n_tiles > 0:
        # Tile 0: scores and softmax; its P V is issued with the scores of tile 1.
        s = warpgroup_mma_wait(0, deps=[_issue_scores(q_tile, k_ring, k_ready, 0, s_zero, LAYOUT_BK)])
        mbarrier.arrive(k_empty.index(0), count=1)
        k_start = _tile_start(idx_row, stride_ik, 0, LAYOUT_BK, BLOCK_N)
        p_prev, alpha, m_i, l_i = _softmax_operand(s, m_i, l_i, qk_scale, k_start, S_K, EVEN_K, dtype, p_layout)

    # Kept blocks ascend: only the last kept block's tiles (packed keys: the last tile) can reach past S_K,
    # so only they mask keys.
    MASKED_TILES: gl.constexpr = 1 if LAYOUT_BK == PACKED_KEYS else LAYOUT_BK // BLOCK_N
    unmasked = n_tiles
    if not EVEN_K:
        unmasked = gl.maximum(n_tiles - MASKED_TILES, 1)
    acc, m_i, l_i, p_prev = _attend_tile_range(1, unmasked, acc, m_i, l_i, p_prev, q_tile, k_ring, v_ring, k_ready,
                                               k_empty, v_ready, v_empty, idx_row, stride_ik, S_K, qk_scale,
                                               LAYOUT_BK, True)  # fmt: skip
    if not EVEN_K:
        acc, m_i, l_i, p_prev = _attend_tile_range(unmasked, n_tiles, acc, m_i, l_i, p_prev, q_tile, k_ring, v_ring,
                                                   k_ready, k_empty, v_ready, v_empty, idx_row, stride_ik, S_K,
                                                   qk_scale, LAYOUT_BK, False)  # fmt: skip

    if n_tiles > 0:
        acc = _issue_register_pv(p_prev, v_ring, v_ready, n_tiles - 1, acc, LAYOUT_BK)
        acc = warpgroup_mma_wait(0, deps=[acc])
    return acc, m_i, l_i


@gluon.jit
def _attend_tile_range(first, end, acc, m_i, l_i, p_prev, q_tile, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty,
                       idx_row, stride_ik, S_K, qk_scale, LAYOUT_BK: gl.constexpr, EVEN_K: gl.constexpr):  # fmt: skip
    """Tiles ``first`` .. ``end - 1`` of :func:`_attend_kept_tiles`' loop (``first >= 1``): per tile ``t``, ``S`` of
    ``t`` and the ``P V`` of ``t - 1`` (``p_prev``) issued back to back, the softmax of ``t`` (keys at or past
    ``S_K`` masked unless ``EVEN_K``) while ``P V`` runs. Returns the running output, row max and row sum, and
    the last tile's P."""
    ROWS: gl.constexpr = q_tile.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[3]
    STAGES: gl.constexpr = k_ring.shape[0]
    dtype: gl.constexpr = k_ring.dtype
    s_layout: gl.constexpr = warpgroup_mma_layout(BLOCK_N, 16)
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = p_prev.type.layout
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    for t in range(first, end):
        s = _issue_scores(q_tile, k_ring, k_ready, t, s_zero, LAYOUT_BK)
        acc = _issue_register_pv(p_prev, v_ring, v_ready, t - 1, acc, LAYOUT_BK)
        k_start = _tile_start(idx_row, stride_ik, t, LAYOUT_BK, BLOCK_N)
        s = warpgroup_mma_wait(1, deps=[s])
        mbarrier.arrive(k_empty.index(t % STAGES), count=1)
        p_next, alpha, m_i, l_i = _softmax_operand(s, m_i, l_i, qk_scale, k_start, S_K, EVEN_K, dtype, p_layout)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(v_empty.index((t - 1) % STAGES), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_prev = p_next
    return acc, m_i, l_i, p_prev


@gluon.jit
def _normalise(acc, m_i, l_i):
    """Output ``acc / l`` and natural-log LSE of a finished row block; rows that kept nothing get 0 and ``-inf``."""
    empty_row = l_i == 0.0
    l_safe = gl.where(empty_row, 1.0, l_i)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, acc.type.layout)), 1)
    lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    return out, lse


@gluon.jit
def _row_tokens(perm_row, stride_ps, start, S_Q, ROWS: gl.constexpr, layout: gl.constexpr):
    """Tokens ``perm_row[start ..]`` of ``ROWS`` kernel-order rows (int64, in ``layout``) and which are below ``S_Q``."""
    rows = start + gl.arange(0, ROWS, layout=layout)
    ok = rows < S_Q
    token = gl.load(perm_row + rows.to(gl.int64) * stride_ps, mask=ok, other=0).to(gl.int64)
    return token, ok


@gluon.jit
def _load_permuted_q(q_tile, q_base, stride_qs, perm_row, stride_ps, start, S_Q):
    """Kernel-order query rows ``start ..`` of one head into ``q_tile`` ``[ROWS, D]`` (shared memory), through
    registers: row ``r`` is token ``perm_row[r]`` of ``q_base``; rows at or past ``S_Q`` are zeros. Ends
    fenced for the tensor cores' async proxy and with the warpgroup synchronised."""
    ROWS: gl.constexpr = q_tile.shape[0]
    D: gl.constexpr = q_tile.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])  # 16-byte vectors
    token, ok = _row_tokens(perm_row, stride_ps, start, S_Q, ROWS, gl.SliceLayout(1, layout))
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    q = gl.load(q_base + gl.expand_dims(token * stride_qs, 1) + gl.expand_dims(dims, 0), mask=gl.expand_dims(ok, 1),
                other=0.0)  # fmt: skip
    q_tile.store(q)
    fence_async_shared()
    gl.thread_barrier()  # every warp's rows are in shared memory before the warpgroup's GEMMs read them


@gluon.jit
def _store_permuted(out, lse, q_tile, o_base, stride_os, lse_base, perm_row, stride_ps, start, S_Q):
    """O rows and LSE entries of kernel-order query rows ``start ..`` to their tokens ``perm_row[r]`` (pointer
    stores, rows at or past ``S_Q`` dropped). O goes through ``q_tile`` (shared memory no longer read) to be
    stored in 16-byte vectors."""
    ROWS: gl.constexpr = q_tile.shape[0]
    D: gl.constexpr = q_tile.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [4, 1], [1, 0])  # 16-byte vectors
    q_tile.store(out.to(q_tile.dtype))
    gl.thread_barrier()  # the warpgroup's rows are all in shared memory before any warp reads them back
    rows_out = q_tile.load(layout)
    token, ok = _row_tokens(perm_row, stride_ps, start, S_Q, ROWS, gl.SliceLayout(1, layout))
    dims = gl.arange(0, D, layout=gl.SliceLayout(0, layout))
    gl.store(o_base + gl.expand_dims(token * stride_os, 1) + gl.expand_dims(dims, 0), rows_out,
             mask=gl.expand_dims(ok, 1))  # fmt: skip
    lse_layout: gl.constexpr = lse.type.layout
    lse_token, lse_ok = _row_tokens(perm_row, stride_ps, start, S_Q, ROWS, lse_layout)
    gl.store(lse_base + lse_token, lse, mask=lse_ok)


@gluon.jit
def _consumer(o_desc, LSE, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready, v_empty,
              idx_row, stride_ik, n_tiles, off_b, off_h, off_m, pid_bh, S_Q, S_K, qk_scale,
              LAYOUT_BK: gl.constexpr, EVEN_K: gl.constexpr, WG: gl.constexpr, PERMUTE_Q: gl.constexpr,
              q_base, stride_qs, o_base, stride_os, perm_row, stride_ps):  # fmt: skip
    """Consumer warpgroup ``WG``: query rows ``off_m + WG * 64`` .. + 64 against every kept tile
    (:func:`_attend_kept_tiles`), then LSE and, through its Q rows' shared memory, O (TMA store).
    ``PERMUTE_Q``: it gathers its Q rows itself (:func:`_load_permuted_q`; the producer loads no Q) and
    stores O and LSE (``LSE`` then this head's row) to their tokens (:func:`_store_permuted`)."""
    ROWS: gl.constexpr = o_desc.block_type.shape[2]
    HEAD_DIM: gl.constexpr = o_desc.block_type.shape[3]
    q_rows = q_smem.index(WG)
    q_tile = q_rows.reshape([ROWS, HEAD_DIM])
    if PERMUTE_Q:
        if n_tiles > 0:
            _load_permuted_q(q_tile, q_base, stride_qs, perm_row, stride_ps, off_m + WG * ROWS, S_Q)
    else:
        if n_tiles > 0:
            mbarrier.wait(q_bar, 0)
    acc, m_i, l_i = _attend_kept_tiles(q_tile, k_ring, v_ring, k_ready, k_empty, v_ready, v_empty, idx_row,
                                       stride_ik, n_tiles, S_K, qk_scale, LAYOUT_BK, EVEN_K)  # fmt: skip
    out, lse = _normalise(acc, m_i, l_i)
    if PERMUTE_Q:
        _store_permuted(out, lse, q_tile, o_base, stride_os, LSE, perm_row, stride_ps,
                        off_m + WG * ROWS, S_Q)  # fmt: skip
    else:
        rows = off_m + WG * ROWS + gl.arange(0, ROWS, layout=lse.type.layout)
        gl.store(LSE + pid_bh.to(gl.int64) * S_Q + rows, lse, mask=rows < S_Q)
        q_tile.store(out.to(o_desc.dtype))  # this warpgroup's Q rows are no longer read
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [off_b, off_h, off_m + WG * ROWS, 0], q_rows)
        tma.store_wait(0)


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    """The Q barrier and, per ring slot, the K and V ready barriers (one arrival: the producer's) and
    empty barriers (one arrival per consumer warpgroup), initialised and fenced."""
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=CONSUMERS)
        mbarrier.init(v_empty.index(i), count=CONSUMERS)
    fence_async_shared()
    return q_bar, k_ready, k_empty, v_ready, v_empty


@gluon.jit
def _block_sparse_fwd_gluon(
    q_desc, k_desc, v_desc, o_desc, LSE, COUNTS, INDICES,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq, stride_ik,
    H, S_Q, S_K, qk_scale,
    LAYOUT_BQ: gl.constexpr,
    LAYOUT_BK: gl.constexpr,
    EVEN_K: gl.constexpr,
    CONSUMERS: gl.constexpr,
    STAGES: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    PRODUCER_REGS: gl.constexpr,
    PERMUTE_Q: gl.constexpr = False,
    Q=None, O=None, Q_PERM=None,
    stride_qb=None, stride_qh=None, stride_qs=None,
    stride_ob=None, stride_oh=None, stride_os=None,
    stride_pb=None, stride_ph=None, stride_ps=None,
    stride_lb=None, stride_lh=None,
):  # fmt: skip
    """One program: ``CONSUMERS * 64`` query rows of one (batch, head) against the kept kv blocks of their q block.

    Launched with ``num_warps=4`` (the first consumer warpgroup); a second consumer warpgroup (when
    ``CONSUMERS`` is 2) and the producer warp are worker partitions. Descriptors are 4-D over
    ``(B, H, S, D)`` with blocks ``(1, 1, 64, D)`` (q, o) and ``(1, 1, BLOCK_N, D)`` (k, v); LSE is
    contiguous fp32 ``(B, H, S_Q)``; ``qk_scale`` is softmax scale * log2(e).

    ``PERMUTE_Q``: kernel-order query row ``i`` is token ``Q_PERM[b, h, i]`` (int32/int64 ``(B, H, S_Q)``, any
    strides): the consumers gather their Q rows from ``Q`` and store O rows to ``O`` (both ``(B, H, S_Q, D)``
    with a unit last stride, strides given) and LSE entries at those tokens (LSE ``(B, H, S_Q)`` fp32 with
    a unit last stride, batch and head strides given); ``q_desc`` and ``o_desc`` then only give the tile
    type and are not read. Without it those arguments stay ``None``.
    """
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    ROWS: gl.constexpr = q_desc.block_type.shape[2]
    SUB_N: gl.constexpr = LAYOUT_BK // BLOCK_N
    dtype: gl.constexpr = q_desc.dtype

    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_m = pid_m * (CONSUMERS * ROWS)
    q_block = pid_m // (LAYOUT_BQ // (CONSUMERS * ROWS))

    q_smem = gl.allocate_shared_memory(dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar, k_ready, k_empty, v_ready, v_empty = _ring_barriers(STAGES, CONSUMERS)

    count = gl.load(COUNTS + off_b.to(gl.int64) * stride_cb + off_h * stride_ch + q_block * stride_cq)
    idx_row = INDICES + off_b.to(gl.int64) * stride_ib + off_h * stride_ih + q_block * stride_iq
    n_tiles = count * SUB_N
    if PERMUTE_Q:
        q_base = Q + off_b.to(gl.int64) * stride_qb + off_h.to(gl.int64) * stride_qh
        o_base = O + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
        perm_row = Q_PERM + off_b.to(gl.int64) * stride_pb + off_h.to(gl.int64) * stride_ph
        row_strides = (stride_qs, stride_os, stride_ps)
        lse_ptr = LSE + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh
    else:  # constexpr placeholders: the partitions take no None
        q_base = 0
        o_base = 0
        perm_row = 0
        row_strides = (0, 0, 0)
        lse_ptr = LSE
    if CONSUMERS == 2:
        gl.warp_specialize([
            (_consumer, (o_desc, lse_ptr, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready, v_empty,
                         idx_row, stride_ik, n_tiles, off_b, off_h, off_m, pid_bh, S_Q, S_K, qk_scale,
                         LAYOUT_BK, EVEN_K, 0, PERMUTE_Q, q_base, row_strides[0], o_base, row_strides[1],
                         perm_row, row_strides[2])),
            (_consumer, (o_desc, lse_ptr, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready, v_empty,
                         idx_row, stride_ik, n_tiles, off_b, off_h, off_m, pid_bh, S_Q, S_K, qk_scale,
                         LAYOUT_BK, EVEN_K, 1, PERMUTE_Q, q_base, row_strides[0], o_base, row_strides[1],
                         perm_row, row_strides[2])),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready, v_empty,
                         idx_row, stride_ik, n_tiles, off_b, off_h, off_m, LAYOUT_BK, False, not PERMUTE_Q)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip
    else:
        gl.warp_specialize([
            (_consumer, (o_desc, lse_ptr, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready, v_empty,
                         idx_row, stride_ik, n_tiles, off_b, off_h, off_m, pid_bh, S_Q, S_K, qk_scale,
                         LAYOUT_BK, EVEN_K, 0, PERMUTE_Q, q_base, row_strides[0], o_base, row_strides[1],
                         perm_row, row_strides[2])),
            (_producer, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, q_bar, k_ready, k_empty, v_ready, v_empty,
                         idx_row, stride_ik, n_tiles, off_b, off_h, off_m, LAYOUT_BK, False, not PERMUTE_Q)),
        ], [1], [PRODUCER_REGS])  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------

_REGISTERS_PER_SM = 65536


def launch_registers(consumers: int) -> int:
    """Per-thread register cap at launch (``maxnreg``) for ``consumers`` warpgroups and the producer warp.

    The warps are padded to whole warpgroups (``consumers + 1``), and ``setmaxnreg`` then moves
    registers from the producer's warpgroup to the consumers. Two consumers (384 threads) share the
    register file of one SM; one consumer (256 threads) gets half of it, so that two programs fit on
    an SM.
    """
    threads = (consumers + 1) * 4 * 32
    programs_per_sm = 2 if consumers == 1 else 1
    return min(255, _REGISTERS_PER_SM // (threads * programs_per_sm)) // 8 * 8


@cache  # built once per tile shape: a launch needs two to four
def tile_shared_layout(rows: int, columns: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The swizzled shared layout of a ``(1, 1, rows, columns)`` tile of ``dtype``: what TMA writes and
    ``warpgroup_mma`` reads."""
    return gl.NVMMASharedLayout.get_default_for([1, 1, rows, columns], _GL_DTYPES[dtype])


def _descriptor(t: Tensor, rows: int, columns: int | None = None) -> TensorDescriptor:
    """4-D TMA descriptor of a ``(B, H, S, D)`` view with ``(1, 1, rows, columns)`` blocks (``columns``
    defaults to all ``D``)."""
    columns = t.shape[3] if columns is None else columns
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, columns],
                            tile_shared_layout(rows, columns, t.dtype))  # fmt: skip


def launch_gluon_block_sparse(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, block_q: int, block_k: int, scale: float,
    out: Tensor, lse: Tensor, tile: TileConfig | None = None, q_perm: Tensor | None = None,
) -> None:  # fmt: skip
    """Run the kernel into ``out`` ``(B, H, S_q, D)`` (TMA-readable strides) and ``lse`` (contiguous fp32 ``(B, H, S_q)``).

    Inputs must pass :func:`gluon_ineligibility` and be valid (shapes checked, layout values in range);
    ``tile`` (``block_m`` rows: 64 or 128, one consumer warpgroup per 64; ``block_n`` keys per K/V tile;
    ``num_stages`` ring slots) defaults to :func:`~sparse_compile.kernels.tile_configs.gluon_block_sparse_tile`.

    ``q_perm`` int32/int64 ``(B, H, S_q)`` (any strides): kernel-order query row ``i`` is token ``q_perm[b, h, i]``
    (the ``PERMUTE_Q`` kernel): q is then gathered in place and O/LSE scattered to token rows, so q and
    ``out`` need only a unit last stride and ``lse`` a unit last stride; k and v stay TMA-read in kernel order.
    """
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    tile = gluon_block_sparse_tile(block_q, block_k) if tile is None else tile
    if tile.block_m not in (CONSUMER_ROWS, 2 * CONSUMER_ROWS) or block_q % tile.block_m or block_k % tile.block_n:
        raise ValueError(f"{tile} must have block_m 64 or 128 and tile block_q={block_q} and block_k={block_k}")
    consumers = tile.block_m // CONSUMER_ROWS
    counts, indices = layout.counts, layout.indices
    grid = (cdiv(s_q, tile.block_m), b * h)
    if q_perm is None:
        q_desc, o_desc, permuted = _descriptor(q, CONSUMER_ROWS), _descriptor(out, CONSUMER_ROWS), {}
    else:
        if q.stride(3) != 1 or out.stride(3) != 1 or lse.stride(2) != 1:
            raise ValueError("with q_perm, q, out and lse need a unit last stride")
        q_desc = o_desc = _descriptor(k, CONSUMER_ROWS)  # the tile type only: Q and O go by pointer
        permuted = dict(
            PERMUTE_Q=True, Q=q, O=out, Q_PERM=q_perm,
            stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qs=q.stride(2),
            stride_ob=out.stride(0), stride_oh=out.stride(1), stride_os=out.stride(2),
            stride_pb=q_perm.stride(0), stride_ph=q_perm.stride(1), stride_ps=q_perm.stride(2),
            stride_lb=lse.stride(0), stride_lh=lse.stride(1),
        )  # fmt: skip
    with torch.cuda.device(q.device):
        _block_sparse_fwd_gluon[grid](
            q_desc, _descriptor(k, tile.block_n), _descriptor(v, tile.block_n),
            o_desc, lse, counts, indices,
            *counts.stride(), *indices.stride(),
            h, s_q, s_k, scale * LOG2E,
            LAYOUT_BQ=block_q, LAYOUT_BK=block_k, EVEN_K=s_k % block_k == 0, CONSUMERS=consumers,
            STAGES=tile.num_stages, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
            num_warps=4, maxnreg=launch_registers(consumers), **permuted,
        )  # fmt: skip
