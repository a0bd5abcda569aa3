"""Fixed-block kept-block attention forward for Hopper (sm_90), written in Gluon.

The same computation and layout as the Triton kernel of :mod:`sparse_compile.kernels.block_sparse`
(the specification is :mod:`~sparse_compile.kernels.block_sparse_reference`), for the inputs
:func:`gluon_eligible` accepts: fp16/bf16, head dim 64 or 128, layout blocks of 64, 128 or 256,
no token permutations, q/k/v readable by TMA. :mod:`~sparse_compile.kernels.block_sparse` dispatches
here on sm_90 and keeps the Triton kernel for every other device and input.

One program computes ``BLOCK_M`` query rows of one (batch, head) (grid ``(cdiv(S_q, BLOCK_M), B * H)``):

- Q, K and V are read by TMA through 4-D ``(B, H, S, D)`` descriptors (any strides with a unit last
  stride), so rows past ``S`` read as zeros; O is written by a TMA store that drops rows past ``S_q``.
- The K and V tiles of the kept blocks go through a ``STAGES``-deep shared-memory ring, one mbarrier
  per slot, issued ``STAGES`` tiles ahead of their use: tile ``t`` is the ``t % SUB_N``-th
  ``BLOCK_N``-key part of kept block ``indices[t // SUB_N]``.
- Both GEMMs are asynchronous ``warpgroup_mma``: ``S = Q K^T`` from shared memory, ``O += P V`` with P
  from registers. The loop issues the scores of tile ``t`` and the ``P V`` of tile ``t - 1`` together
  and runs the softmax of tile ``t`` while ``P V`` is still on the tensor cores.
- Online softmax in base 2 and fp32; keys past ``S_k`` (the last, partial kv block) are masked to
  ``-inf``. Rows whose q block keeps nothing get O = 0 and LSE = ``-inf``.
"""

from __future__ import annotations

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
_GL_DTYPES = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}


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


def gluon_ineligibility(
    q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int, capability: tuple[int, int] | None,
    has_permutation: bool,
) -> str | None:  # fmt: skip
    """Why the Gluon kernel cannot run this call (a sentence), or ``None`` when it can.

    ``capability`` is the CUDA device's ``(major, minor)``, ``None`` for tensors on another device.
    Shapes are assumed valid (:func:`~sparse_compile.kernels.block_sparse.validate_inputs`).
    """
    if capability != GLUON_CAPABILITY:
        return f"the Gluon kernel is built for sm_90 only (device capability {capability})"
    if q.dtype not in GLUON_DTYPES:
        return f"the Gluon kernel takes fp16/bf16 (got {q.dtype})"
    if q.shape[-1] not in GLUON_HEAD_DIMS:
        return f"the Gluon kernel takes head dim {GLUON_HEAD_DIMS} (got {q.shape[-1]})"
    if block_q not in GLUON_LAYOUT_BLOCKS or block_k not in GLUON_LAYOUT_BLOCKS:
        return f"the Gluon kernel takes layout blocks {GLUON_LAYOUT_BLOCKS} (got {block_q} x {block_k})"
    if has_permutation:
        return "the Gluon kernel reads tiles by TMA, which cannot gather permuted rows"
    if not all(tma_readable(t) for t in (q, k, v)):
        return "the Gluon kernel needs q/k/v with a unit last stride and 16-byte aligned base and strides"
    return None


def gluon_eligible(
    q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int, has_permutation: bool = False
) -> bool:
    """Whether the Gluon kernel runs this call: q on a CUDA sm_90 device and :func:`gluon_ineligibility` is ``None``."""
    capability = torch.cuda.get_device_capability(q.device) if q.is_cuda else None
    return gluon_ineligibility(q, k, v, block_q, block_k, capability, has_permutation) is None


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------


@gluon.jit
def _tile_start(idx_row, stride_ik, t, valid, LAYOUT_BK: gl.constexpr, BLOCK_N: gl.constexpr):
    """First key of kv tile ``t``: sub-tile ``t % SUB_N`` of kept block ``idx_row[t // SUB_N]`` (0 unless ``valid``)."""
    SUB_N: gl.constexpr = LAYOUT_BK // BLOCK_N
    kv_block = gl.load(idx_row + (t // SUB_N) * stride_ik, mask=valid, other=0)
    return kv_block * LAYOUT_BK + (t % SUB_N) * BLOCK_N


@gluon.jit
def _issue_kv_load(desc, bars, ring, slot, off_b, off_h, start, pred):
    """TMA-load the (BLOCK_N, D) tile at key ``start`` of head (off_b, off_h) into ring slot ``slot``, if ``pred``."""
    bar = bars.index(slot)
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [off_b, off_h, start, 0], bar, ring.index(slot), pred=pred)


@gluon.jit
def _softmax_step(s, m_i, l_i, qk_scale, k_start, S_K, EVEN_K: gl.constexpr, BLOCK_N: gl.constexpr,
                  s_layout: gl.constexpr):  # fmt: skip
    """Base-2 online softmax of raw scores ``s`` (BLOCK_M x BLOCK_N) of the tile at key ``k_start``.

    Keys at or past ``S_K`` are masked (only checked when not ``EVEN_K``). Returns the unnormalised
    probabilities, the factor rescaling the running output, and the new row max and row sum.
    """
    if not EVEN_K:
        if k_start + BLOCK_N > S_K:
            offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            s = gl.where(gl.expand_dims(k_start + offs_n < S_K, 0), s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_i


@gluon.jit
def _block_sparse_fwd_gluon(
    q_desc, k_desc, v_desc, o_desc, LSE, COUNTS, INDICES,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq, stride_ik,
    H, S_Q, S_K, qk_scale,
    LAYOUT_BQ: gl.constexpr,
    LAYOUT_BK: gl.constexpr,
    EVEN_K: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, head) against the kept kv blocks of their q block.

    Descriptors are 4-D over ``(B, H, S, D)`` with blocks ``(1, 1, BLOCK_M or BLOCK_N, D)``; LSE is
    contiguous fp32 ``(B, H, S_Q)``; ``qk_scale`` is softmax scale * log2(e).
    """
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[2]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[3]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    SUB_N: gl.constexpr = LAYOUT_BK // BLOCK_N
    dtype: gl.constexpr = q_desc.dtype

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16]
    )
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    tile_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype)

    pid_m = gl.program_id(0)
    pid_bh = gl.program_id(1)
    off_b = pid_bh // H
    off_h = pid_bh % H
    off_m = pid_m * BLOCK_M
    q_block = pid_m // (LAYOUT_BQ // BLOCK_M)

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()

    count = gl.load(COUNTS + off_b.to(gl.int64) * stride_cb + off_h * stride_ch + q_block * stride_cq)
    idx_row = INDICES + off_b.to(gl.int64) * stride_ib + off_h * stride_ih + q_block * stride_iq
    n_tiles = count * SUB_N

    mbarrier.expect(q_bar, q_desc.block_type.nbytes, pred=n_tiles > 0)
    tma.async_copy_global_to_shared(q_desc, [off_b, off_h, off_m, 0], q_bar, q_smem, pred=n_tiles > 0)
    for i in gl.static_range(STAGES):
        start = _tile_start(idx_row, stride_ik, i, i < n_tiles, LAYOUT_BK, BLOCK_N)
        _issue_kv_load(k_desc, k_bars, k_ring, i, off_b, off_h, start, i < n_tiles)
        _issue_kv_load(v_desc, v_bars, v_ring, i, off_b, off_h, start, i < n_tiles)

    q_tile = q_smem.reshape([BLOCK_M, HEAD_DIM])
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=row_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    p_prev = gl.zeros([BLOCK_M, BLOCK_N], dtype, layout=p_layout)

    if n_tiles > 0:
        # Tile 0: scores and softmax; its P V is issued with the scores of tile 1.
        mbarrier.wait(q_bar, 0)
        mbarrier.wait(k_bars.index(0), 0)
        k_tile = k_ring.index(0).reshape([BLOCK_N, HEAD_DIM])
        s = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s])
        k_start = _tile_start(idx_row, stride_ik, 0, True, LAYOUT_BK, BLOCK_N)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, k_start, S_K, EVEN_K, BLOCK_N, s_layout)
        p_prev = gl.convert_layout(p.to(dtype), p_layout)
        gl.thread_barrier()  # every warpgroup's read of K slot 0 is done before it is refilled
        start = _tile_start(idx_row, stride_ik, STAGES, STAGES < n_tiles, LAYOUT_BK, BLOCK_N)
        _issue_kv_load(k_desc, k_bars, k_ring, 0, off_b, off_h, start, STAGES < n_tiles)

    for t in range(1, n_tiles):
        slot = t % STAGES
        prev = (t - 1) % STAGES
        mbarrier.wait(k_bars.index(slot), (t // STAGES) & 1)
        k_tile = k_ring.index(slot).reshape([BLOCK_N, HEAD_DIM])
        s = warpgroup_mma(q_tile, k_tile.permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_bars.index(prev), ((t - 1) // STAGES) & 1)
        v_tile = v_ring.index(prev).reshape([BLOCK_N, HEAD_DIM])
        acc = warpgroup_mma(p_prev, v_tile, acc, is_async=True)
        k_start = _tile_start(idx_row, stride_ik, t, True, LAYOUT_BK, BLOCK_N)
        s = warpgroup_mma_wait(1, deps=[s])
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, qk_scale, k_start, S_K, EVEN_K, BLOCK_N, s_layout)
        p_next = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma_wait(0, deps=[acc])
        gl.thread_barrier()  # every warpgroup is done with K slot `slot` and V slot `prev` before the refill
        ahead = t + STAGES
        start = _tile_start(idx_row, stride_ik, ahead, ahead < n_tiles, LAYOUT_BK, BLOCK_N)
        _issue_kv_load(k_desc, k_bars, k_ring, slot, off_b, off_h, start, ahead < n_tiles)
        start = _tile_start(idx_row, stride_ik, ahead - 1, ahead - 1 < n_tiles, LAYOUT_BK, BLOCK_N)
        _issue_kv_load(v_desc, v_bars, v_ring, prev, off_b, off_h, start, ahead - 1 < n_tiles)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
        p_prev = p_next

    if n_tiles > 0:
        last = (n_tiles - 1) % STAGES
        mbarrier.wait(v_bars.index(last), ((n_tiles - 1) // STAGES) & 1)
        v_tile = v_ring.index(last).reshape([BLOCK_N, HEAD_DIM])
        acc = warpgroup_mma(p_prev, v_tile, acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc])

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    empty_row = l_i == 0.0
    l_safe = gl.where(empty_row, 1.0, l_i)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout)), 1)
    lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
    rows = off_m + gl.arange(0, BLOCK_M, layout=row_layout)
    gl.store(LSE + pid_bh.to(gl.int64) * S_Q + rows, lse, mask=rows < S_Q)

    gl.thread_barrier()  # every warpgroup's reads of Q are done before O overwrites it
    q_tile.store(out.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [off_b, off_h, off_m, 0], q_smem)
    tma.store_wait(0)


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------


def _descriptor(t: Tensor, rows: int) -> TensorDescriptor:
    """4-D TMA descriptor of a ``(B, H, S, D)`` view with ``(1, 1, rows, D)`` blocks."""
    block = [1, 1, rows, t.shape[3]]
    layout = gl.NVMMASharedLayout.get_default_for(block, _GL_DTYPES[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def launch_gluon_block_sparse(
    q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout, block_q: int, block_k: int, scale: float,
    out: Tensor, lse: Tensor, tile: TileConfig | None = None,
) -> None:  # fmt: skip
    """Run the kernel into ``out`` ``(B, H, S_q, D)`` (TMA-readable strides) and ``lse`` (contiguous fp32 ``(B, H, S_q)``).

    Inputs must be :func:`gluon_eligible` and valid (shapes checked, layout values in range);
    ``tile`` defaults to :func:`~sparse_compile.kernels.tile_configs.gluon_block_sparse_tile`.
    """
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    tile = gluon_block_sparse_tile(block_q, block_k, d) if tile is None else tile
    if block_q % tile.block_m or block_k % tile.block_n:
        raise ValueError(f"{tile} must tile block_q={block_q} and block_k={block_k}")
    counts, indices = layout.counts, layout.indices
    grid = (cdiv(s_q, tile.block_m), b * h)
    with torch.cuda.device(q.device):
        _block_sparse_fwd_gluon[grid](
            _descriptor(q, tile.block_m), _descriptor(k, tile.block_n), _descriptor(v, tile.block_n),
            _descriptor(out, tile.block_m), lse, counts, indices,
            *counts.stride(), *indices.stride(),
            h, s_q, s_k, scale * LOG2E,
            LAYOUT_BQ=block_q, LAYOUT_BK=block_k, EVEN_K=s_k % block_k == 0, STAGES=tile.num_stages,
            num_warps=tile.num_warps,
        )  # fmt: skip
