"""Block scoring and selection for block-sparse attention.

Estimated masses from pooled rows (:func:`pooled_block_scores`, SVG2's centroids) and exact block
masses (AdaSpa's search pass) of every (q block, kv block), and the selections that turn scores into
the CSR layout consumed by :func:`sparse_compile.kernels.block_sparse.block_sparse_attention`:

- ``counts`` int32 ``(B, H, NQ)``: kept kv blocks per q block;
- ``indices`` int32 ``(B, H, NQ, MAXK)``: their ids, the first ``count`` ascending, the rest 0.

The exact passes (:func:`attention_lse`, :func:`block_mass_with_lse`) are Triton kernels on CUDA
(S^2 compute, O(NQ * NK) memory) and the chunked references of :mod:`block_select_reference`
elsewhere; both are registered as ``sparse_compile::`` custom ops. Pooling and selection are a
handful of batched torch ops on ``(B, H, NQ, NK)`` tensors (no host sync). Inputs are checked here;
the references assume valid inputs.

SVG2's cluster-pair selection, :func:`select_top_p_clusters` (centroid scores, top-p selection,
CSR layout and kept key tokens), is those torch ops on CPU (:func:`select_top_p_clusters_torch`,
the specification) and on CUDA one cuBLAS matmul plus one fused Triton kernel
(:func:`select_top_p_clusters_triton`): one program per row holds the row's probabilities in
registers, finds the top-p threshold by a binary search over their values (no sort) and writes
its CSR row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.block_select_reference import (
    attention_lse_reference,
    block_mass_with_lse_reference,
)
from sparse_compile.kernels.common import (
    LOG2E,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    cdiv,
    check_out_buffer,
    default_scale,
    dot_precision,
    online_softmax_step,
)
from sparse_compile.kernels.tile_configs import attention_lse_config, block_mass_config, top_p_selection_warps
from sparse_compile.kernels.varlen_block_sparse_reference import kept_kv_tokens

MAX_TRITON_BLOCK_Q = 128
MAX_TRITON_CLUSTERS = 8192  # key clusters a row of the fused selection kernel holds in registers


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def check_block(name: str, block: int) -> None:
    """Raise ``ValueError`` unless ``block`` is a positive int."""
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"{name} must be a positive int, got {block!r}")


def check_qk(q: Tensor, k: Tensor) -> None:
    """Raise ``ValueError`` unless q ``(B, H, S_q, D)`` and k ``(B, H, S_k, D)`` match and are floating."""
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share B, H and D")
    if q.device != k.device:
        raise ValueError(f"q and k must be on one device, got {q.device} and {k.device}")


def _check_lse(q: Tensor, lse: Tensor) -> None:
    """Raise ``ValueError`` unless ``lse`` is fp32 ``(B, H, S_q)`` of q ``(B, H, S_q, D)``."""
    if lse.shape != q.shape[:3] or lse.dtype != torch.float32:
        raise ValueError(f"lse must be fp32 of shape {tuple(q.shape[:3])}, got {lse.dtype} {tuple(lse.shape)}")


# ----------------------------------------------------------------------------------------------
# Estimated scores from pooled rows (torch ops)
# ----------------------------------------------------------------------------------------------


def pooled_block_scores(q_pooled: Tensor, k_pooled: Tensor, kv_sizes: Tensor, scale: float) -> Tensor:
    """Estimated attention mass per (q block, kv block) from pooled rows, fp32 ``(B, H, NQ, NK)``.

    ``softmax_j(scale * q_pooled_i . k_pooled_j + log(kv_sizes_j))``: blocks (or clusters) of
    ``kv_sizes`` tokens whose members all look like their mean. ``q_pooled`` ``(B, H, NQ, D)``,
    ``k_pooled`` ``(B, H, NK, D)``, ``kv_sizes`` broadcastable to ``(B, H, NK)``; empty kv
    blocks (size 0) get probability 0. Used with centroids and cluster sizes for SVG2 too.
    """
    logits = torch.matmul(q_pooled.float(), k_pooled.float().transpose(-1, -2)) * scale
    log_sizes = kv_sizes.float().log()  # log(0) = -inf: an empty block is never attended
    return torch.softmax(logits + log_sizes.unsqueeze(-2), dim=-1)


# ----------------------------------------------------------------------------------------------
# Selection (torch ops, no host sync)
# ----------------------------------------------------------------------------------------------


def keep_mask_to_layout(mask: Tensor, maxk: int | None = None) -> tuple[Tensor, Tensor]:
    """CSR layout of a boolean keep mask ``(..., NQ, NK)``.

    Returns counts int32 ``(..., NQ)`` and indices int32 ``(..., NQ, MAXK)`` (``MAXK = maxk`` or NK):
    each row's kept ids ascending, then zeros. ``maxk`` must be at least every row's count (rows
    with more keep their ``maxk`` lowest ids).
    """
    nk = mask.shape[-1]
    maxk = nk if maxk is None else maxk
    counts = mask.sum(dim=-1, dtype=torch.int32).clamp_max(maxk)
    slot = torch.where(mask, mask.cumsum(dim=-1) - 1, maxk).clamp_max(maxk)  # maxk = dummy column
    ids = torch.arange(nk, dtype=torch.int32, device=mask.device).expand(mask.shape)
    indices = torch.zeros((*mask.shape[:-1], maxk + 1), dtype=torch.int32, device=mask.device)
    return counts, indices.scatter_(-1, slot, ids)[..., :maxk]


def _check_top_p(top_p: float, min_blocks: int) -> None:
    """Raise ``ValueError`` unless ``top_p`` lies in [0, 1] and ``min_blocks >= 0``."""
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1], got {top_p}")
    if min_blocks < 0:
        raise ValueError(f"min_blocks must be >= 0, got {min_blocks}")


def select_top_p(probs: Tensor, top_p: float, min_blocks: int = 1) -> tuple[Tensor, Tensor]:
    """Per row the fewest highest-probability blocks whose cumulative probability reaches ``top_p``.

    A block is kept while the mass of the blocks ranked above it is below ``top_p``; at least
    ``min(min_blocks, NK)`` per row. ``probs`` ``(..., NQ, NK)``; returns
    counts int32 ``(..., NQ)`` and indices int32 ``(..., NQ, NK)`` (ascending, then zeros).
    """
    _check_top_p(top_p, min_blocks)
    nk = probs.shape[-1]
    values, order = torch.sort(probs.float(), dim=-1, descending=True, stable=True)
    mass_before = torch.nn.functional.pad(torch.cumsum(values, dim=-1)[..., :-1], (1, 0))
    n_keep = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp_min(min(min_blocks, nk))
    kept_rank = torch.arange(nk, device=probs.device) < n_keep
    mask = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device).scatter_(-1, order, kept_rank)
    return keep_mask_to_layout(mask)


# ----------------------------------------------------------------------------------------------
# SVG2 cluster pairs: scores, top-p selection and kept key tokens (torch ops, the specification)
# ----------------------------------------------------------------------------------------------


class ClusterSelection(NamedTuple):
    """Top-p key clusters of every query cluster, as a CSR layout, and the key tokens they hold.

    ``counts`` int32 ``(B, H, NQ)``; ``indices`` int32 ``(B, H, NQ, NK)``, the kept key-cluster
    ids ascending, then zeros; ``kept_tokens`` int32 ``(B, H, NQ)``, the summed sizes of the
    kept key clusters.
    """

    counts: Tensor
    indices: Tensor
    kept_tokens: Tensor


def _check_cluster_inputs(q_centroids: Tensor, k_centroids: Tensor, k_sizes: Tensor) -> None:
    """Raise ``ValueError`` unless centroids ``(B, H, NQ, D)``, ``(B, H, NK >= 1, D)`` and integer sizes ``(B, H, NK)`` match."""
    check_qk(q_centroids, k_centroids)
    if k_centroids.shape[2] == 0:
        raise ValueError("k_centroids must hold at least one cluster")
    if k_sizes.shape != k_centroids.shape[:3] or k_sizes.dtype.is_floating_point or k_sizes.dtype == torch.bool:
        raise ValueError(
            f"k_sizes must be an integer tensor of shape {tuple(k_centroids.shape[:3])}, "
            f"got {k_sizes.dtype} {tuple(k_sizes.shape)}"
        )
    if k_sizes.device != k_centroids.device:
        raise ValueError(f"k_sizes must be on {k_centroids.device}, got {k_sizes.device}")


def select_top_p_clusters_torch(
    q_centroids: Tensor, k_centroids: Tensor, k_sizes: Tensor, scale: float, top_p: float, min_blocks: int = 1
) -> ClusterSelection:
    """:func:`select_top_p_clusters` as batched torch ops: the specification and the CPU path.

    :func:`pooled_block_scores` of the centroids and sizes, :func:`select_top_p` of those
    probabilities, and :func:`kept_kv_tokens` of the layout.
    """
    _check_cluster_inputs(q_centroids, k_centroids, k_sizes)
    probs = pooled_block_scores(q_centroids, k_centroids, k_sizes, scale)
    counts, indices = select_top_p(probs, top_p, min_blocks)
    return ClusterSelection(counts, indices, kept_kv_tokens(k_sizes, counts, indices))


# ----------------------------------------------------------------------------------------------
# Triton kernels: full-attention LSE and exact block mass
# ----------------------------------------------------------------------------------------------


@triton.jit
def _lse_tile(q, k_base, stride_ks, start, s_k, qk_scale, m_i, l_i, dims,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold keys [start, start + BLOCK_N) into the running row max ``m_i`` and sum ``l_i`` (log2 units)."""
    cols = start + tl.arange(0, BLOCK_N)
    if MASKED:
        k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :], mask=(cols < s_k)[:, None], other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where((cols < s_k)[None, :], s, float("-inf"))
    _, _, m_new, l_i = online_softmax_step(s, m_i, l_i, qk_scale, True)
    return m_new, l_i


@triton.jit
def _attention_lse_kernel(
    q_ptr, k_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    num_heads, s_q, s_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (BLOCK_M query rows, batch * head): LSE of scale * q . k over all keys."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + dims[None, :],
                mask=(rows < s_q)[:, None], other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    n_full = (s_k // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        m_i, l_i = _lse_tile(q, k_base, stride_ks, start, s_k, qk_scale, m_i, l_i, dims,
                             BLOCK_N, False, DOT_PRECISION)
    if n_full < s_k:
        m_i, l_i = _lse_tile(q, k_base, stride_ks, n_full, s_k, qk_scale, m_i, l_i, dims,
                             BLOCK_N, True, DOT_PRECISION)
    lse = tl.where(l_i > 0, (m_i + tl.log2(l_i)) / 1.4426950408889634, float("-inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * s_q + rows, lse, mask=rows < s_q)


@triton.jit
def _block_mass_kernel(
    q_ptr, k_ptr, lse_ptr, out_ptr,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_lb, stride_lh, stride_ls,
    num_heads, s_q, s_k, num_kv_blocks, qk_scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (q block, batch * head): sum of exp(scale * q . k - lse) over each kv block.

    The q block (BLOCK_Q <= BLOCK_M rows) stays in registers; the keys stream through in
    BLOCK_N tiles, ``SUB = ceil(BLOCK_K / BLOCK_N)`` tiles per kv block, one flat loop.
    """
    SUB: tl.constexpr = (BLOCK_K + BLOCK_N - 1) // BLOCK_N
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    row0 = qb * BLOCK_Q
    n_rows = tl.minimum(s_q - row0, BLOCK_Q)
    local = tl.arange(0, BLOCK_M)
    rows = row0 + local
    row_ok = local < n_rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + rows * stride_ls, mask=row_ok, other=float("inf"))
    # log2 units; rows that attend nothing (lse = -inf) and padding rows get +inf: zero mass.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    out_row = out_ptr + (bh.to(tl.int64) * tl.cdiv(s_q, BLOCK_Q) + qb) * num_kv_blocks
    inv_rows = 1.0 / n_rows.to(tl.float32)
    total = tl.zeros([], tl.float32)
    for t in range(0, num_kv_blocks * SUB):
        kb = t // SUB
        sub = t % SUB
        in_block = sub * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = kb * BLOCK_K + in_block
        col_ok = (in_block < BLOCK_K) & (cols < s_k)
        k = tl.load(k_base + cols[:, None] * stride_ks + dims[None, :], mask=col_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None]
        p = tl.where(col_ok[None, :], tl.exp2(s), 0.0)
        total = tl.where(sub == 0, 0.0, total) + tl.sum(tl.sum(p, 1), 0)
        tl.store(out_row + kb, total * inv_rows, mask=sub == SUB - 1)


@triton.jit
def _cluster_probs(logits, sizes, scale):
    """``softmax(scale * logits + log(sizes))`` of one row; clusters (and padding) of size 0 get 0."""
    x = tl.where(sizes > 0, logits * scale + tl.log(tl.maximum(sizes, 1).to(tl.float32)), float("-inf"))
    e = tl.exp(x - tl.max(x, 0))
    return tl.math.div_rn(e, tl.sum(e, 0))


@triton.jit
def _is_kept(above, probs, top_p, min_blocks):
    """Whether top-p keeps a block ranked right below the blocks flagged ``above``, and how many those are.

    Kept iff their mass is below ``top_p`` or fewer than ``min_blocks`` of them; a reduction over the row.
    """
    n_above = tl.sum(above.to(tl.int32), 0)
    return (tl.sum(tl.where(above, probs, 0.0), 0) < top_p) | (n_above < min_blocks), n_above


@triton.jit
def _threshold_bits(bits, probs, num_k, top_p, min_blocks):
    """fp32 bits ``P`` of the lowest probability top-p keeps (``0x3F800001``, above the bits of 1.0,
    when it keeps nothing): every block above ``P`` is kept, and some of those tied at ``P``.

    ``bits`` are the row's probability bits (-1 for padding; non-negative fp32 bits order like the
    floats). "Keep the block of bits ``t``" (:func:`_is_kept` of the blocks above ``t``) only turns
    true as ``t`` grows: binary search for the smallest such ``t`` over ``[lo, hi]`` (``hi`` kept,
    ``lo - 1`` not), stopping once that range holds at most one block: that block's bits (kept
    like ``hi``, the blocks above both being the same), so ~log2(num_k) steps rather than 31.
    """
    lo = tl.zeros([], tl.int32)
    hi = tl.full([], 0x3F800001, tl.int32)
    n_from_lo = tl.zeros([], tl.int32) + num_k  # blocks with bits >= lo
    n_above_hi = tl.zeros([], tl.int32)  # blocks with bits > hi
    while (lo < hi) & (n_from_lo - n_above_hi > 1):
        mid = (lo + hi) >> 1
        kept, n_above = _is_kept(bits > mid, probs, top_p, min_blocks)
        hi = tl.where(kept, mid, hi)
        n_above_hi = tl.where(kept, n_above, n_above_hi)
        lo = tl.where(kept, lo, mid + 1)
        n_from_lo = tl.where(kept, n_from_lo, n_above)
    only = tl.min(tl.where(bits >= lo, bits, 0x7FFFFFFF), 0)  # the one block in [lo, hi], if one
    keeps_any = (top_p > 0) | (min_blocks > 0)  # the initial hi is kept (by nothing above it) iff this
    return tl.where((n_from_lo - n_above_hi == 1) & keeps_any, only, hi)


@triton.jit
def _last_kept_tie(bits, ids, p_bits, probs, top_p, min_blocks, NK_PAD: tl.constexpr, LOG2_NK_PAD: tl.constexpr):
    """Largest id ``J`` such that the blocks tied at probability bits ``p_bits`` with ids <= ``J`` are kept.

    Ties rank by id, so the block with id ``j`` sits right below the blocks above ``p_bits`` and the
    ties with smaller ids; binary search over ``j`` (``p_bits`` itself is kept: ``J`` >= its first id).
    """
    lo = tl.zeros([], tl.int32)
    hi = tl.full([], NK_PAD, tl.int32)
    for _ in range(LOG2_NK_PAD):
        mid = (lo + hi) >> 1
        kept, _ = _is_kept((bits > p_bits) | ((bits == p_bits) & (ids < mid)), probs, top_p, min_blocks)
        lo = tl.where(kept, mid, lo)
        hi = tl.where(kept, hi, mid)
    return lo


@triton.jit
def _select_top_p_clusters_kernel(
    logits_ptr, sizes_ptr, counts_ptr, indices_ptr, kept_tokens_ptr,
    stride_sb, stride_sh, stride_sk,
    num_heads, num_q, num_k, scale, top_p, min_blocks,
    NK_PAD: tl.constexpr, LOG2_NK_PAD: tl.constexpr,
):
    """One program per (batch * head, query cluster) row: top-p key clusters as a CSR row.

    The row's ``num_k <= NK_PAD`` probabilities stay in registers; no sort: top-p keeps every
    cluster above a probability threshold (:func:`_threshold_bits`) and, among clusters tied at it,
    those up to an id (:func:`_last_kept_tie`, searched only when there are ties). A cumsum over the
    kept flags gives their slots in the ascending CSR row.
    """
    row = tl.program_id(0).to(tl.int64)
    bh = row // num_q
    b = bh // num_heads
    h = bh % num_heads
    ids = tl.arange(0, NK_PAD)
    valid = ids < num_k
    sizes = tl.load(sizes_ptr + b * stride_sb + h * stride_sh + ids * stride_sk, mask=valid, other=0).to(tl.int32)
    logits = tl.load(logits_ptr + row * num_k + ids, mask=valid, other=0.0)
    probs = _cluster_probs(logits, sizes, scale)
    bits = tl.where(valid, probs.to(tl.int32, bitcast=True), -1)
    p_bits = _threshold_bits(bits, probs, num_k, top_p, min_blocks)
    last_tie = tl.full([], NK_PAD, tl.int32)
    if tl.sum((bits == p_bits).to(tl.int32), 0) > 1:
        last_tie = _last_kept_tie(bits, ids, p_bits, probs, top_p, min_blocks, NK_PAD, LOG2_NK_PAD)
    kept = (bits > p_bits) | ((bits == p_bits) & (ids <= last_tie))
    n_keep = tl.sum(kept.to(tl.int32), 0)
    slots = tl.cumsum(kept.to(tl.int32), 0) - 1
    out_row = indices_ptr + row * num_k
    tl.store(out_row + slots, ids, mask=kept)
    tl.store(out_row + ids, tl.zeros_like(ids), mask=valid & (ids >= n_keep))
    tl.store(counts_ptr + row, n_keep)
    tl.store(kept_tokens_ptr + row, tl.sum(tl.where(kept, sizes, 0), 0))


# ----------------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------------


def _check_triton_inputs(q: Tensor, k: Tensor) -> None:
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype:
        raise ValueError(f"q and k must share a dtype among {SUPPORTED_DTYPES}, got {q.dtype} and {k.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS}, got {q.shape[-1]}")


def _unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself if its last dim is contiguous, else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_lse_triton(q: Tensor, k: Tensor, scale: float, block: int = 128, out: Tensor | None = None) -> Tensor:
    """Triton full-attention LSE, fp32 ``(B, H, S_q)``; ``block`` query rows per program.

    ``out`` (optional) is a contiguous fp32 ``(B, H, S_q)`` buffer that is fully overwritten.
    Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    check_qk(q, k)
    return _launch_attention_lse(q, k, scale, block, out)


def _launch_attention_lse(q: Tensor, k: Tensor, scale: float, block: int, out: Tensor | None = None) -> Tensor:
    """:func:`attention_lse_triton` for checked q and k: the Triton path's own limits, then the launch."""
    _check_triton_inputs(q, k)
    if block not in (16, 32, 64, 128):
        raise ValueError(f"block must be 16, 32, 64 or 128 on the Triton path, got {block}")
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    b, h, s_q, d = q.shape
    if out is None:
        out = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    if s_q == 0:
        return out
    tile = attention_lse_config(block, d)
    _attention_lse_kernel[(cdiv(s_q, tile.block_m), b * h)](
        q, k, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        h, s_q, k.shape[2], scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out


def block_mass_triton(
    q: Tensor, k: Tensor, lse: Tensor, block_q: int, block_k: int, scale: float, out: Tensor | None = None
) -> Tensor:
    """Triton exact block mass, fp32 ``(B, H, NQ, NK)`` (see :func:`block_mass_with_lse`).

    Needs ``block_q <= 128``. ``out`` (optional) is a contiguous fp32 ``(B, H, NQ, NK)`` buffer that
    is fully overwritten. Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    check_qk(q, k)
    check_block("block_q", block_q)
    check_block("block_k", block_k)
    _check_lse(q, lse)
    return _launch_block_mass(q, k, lse, block_q, block_k, scale, out)


def _launch_block_mass(
    q: Tensor, k: Tensor, lse: Tensor, block_q: int, block_k: int, scale: float, out: Tensor | None = None
) -> Tensor:
    """:func:`block_mass_triton` for checked inputs: the Triton path's own limits, then the launch."""
    _check_triton_inputs(q, k)
    if block_q > MAX_TRITON_BLOCK_Q:
        raise ValueError(f"block_q must be <= {MAX_TRITON_BLOCK_Q} on the Triton path, got {block_q}")
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    b, h, s_q, d = q.shape
    nq, nk = cdiv(s_q, block_q), cdiv(k.shape[2], block_k)
    if out is None:
        out = torch.empty((b, h, nq, nk), dtype=torch.float32, device=q.device)
    if nq == 0 or nk == 0:
        return out.zero_()
    tile = block_mass_config(block_q, block_k, d)
    _block_mass_kernel[(nq, b * h)](
        q, k, lse, out,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2),
        h, s_q, k.shape[2], nk, scale * LOG2E,
        BLOCK_Q=block_q, BLOCK_K=block_k,
        HEAD_DIM=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out


def _new_selection(b: int, h: int, nq: int, nk: int, device: torch.device) -> ClusterSelection:
    """Uninitialised :class:`ClusterSelection` buffers."""
    counts = torch.empty((b, h, nq), dtype=torch.int32, device=device)
    indices = torch.empty((b, h, nq, nk), dtype=torch.int32, device=device)
    return ClusterSelection(counts, indices, torch.empty_like(counts))


def _check_selection_buffers(out: ClusterSelection, b: int, h: int, nq: int, nk: int, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``out`` holds contiguous int32 buffers of a selection's shapes on ``device``."""
    for name, buf, shape in (("counts", out.counts, (b, h, nq)), ("indices", out.indices, (b, h, nq, nk)),
                             ("kept_tokens", out.kept_tokens, (b, h, nq))):  # fmt: skip
        check_out_buffer(f"out.{name}", buf, shape, torch.int32, device)


def select_top_p_clusters_triton(
    q_centroids: Tensor,
    k_centroids: Tensor,
    k_sizes: Tensor,
    scale: float,
    top_p: float,
    min_blocks: int = 1,
    out: ClusterSelection | None = None,
) -> ClusterSelection:
    """:func:`select_top_p_clusters` as a cuBLAS matmul (the centroid dots) and one Triton kernel.

    Needs ``NK <= MAX_TRITON_CLUSTERS``. ``out`` (optional) holds contiguous int32 buffers of
    the result's shapes, fully overwritten. Runs on CUDA, or on CPU tensors under
    ``TRITON_INTERPRET=1``.
    """
    _check_cluster_inputs(q_centroids, k_centroids, k_sizes)
    _check_top_p(top_p, min_blocks)
    b, h, nq, _ = q_centroids.shape
    nk = k_centroids.shape[2]
    if nk > MAX_TRITON_CLUSTERS:
        raise ValueError(f"at most {MAX_TRITON_CLUSTERS} key clusters on the Triton path, got {nk}")
    if out is None:
        out = _new_selection(b, h, nq, nk, q_centroids.device)
    _check_selection_buffers(out, b, h, nq, nk, q_centroids.device)
    if out.counts.numel() == 0:
        return out
    logits = torch.matmul(q_centroids.float(), k_centroids.float().transpose(-1, -2))  # contiguous (B, H, NQ, NK)
    nk_pad = triton.next_power_of_2(nk)
    _select_top_p_clusters_kernel[(b * h * nq,)](
        logits, k_sizes, out.counts, out.indices, out.kept_tokens,
        k_sizes.stride(0), k_sizes.stride(1), k_sizes.stride(2),
        h, nq, nk, float(scale), float(top_p), min(min_blocks, nk),
        NK_PAD=nk_pad, LOG2_NK_PAD=nk_pad.bit_length() - 1, num_warps=top_p_selection_warps(nk_pad),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# Custom ops and public entry points
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("sparse_compile::attention_lse", mutates_args=())
def _attention_lse_op(q: Tensor, k: Tensor, scale: float, block: int) -> Tensor:
    """Custom op body; :func:`attention_lse` checked the inputs."""
    if q.is_cuda:
        return _launch_attention_lse(q, k, scale, block)
    return attention_lse_reference(q, k, scale, block).contiguous()


@_attention_lse_op.register_fake
def _attention_lse_fake(q: Tensor, k: Tensor, scale: float, block: int) -> Tensor:
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("sparse_compile::block_mass_with_lse", mutates_args=())
def _block_mass_op(q: Tensor, k: Tensor, lse: Tensor, block_q: int, block_k: int, scale: float) -> Tensor:
    """Custom op body; :func:`block_mass_with_lse` checked the inputs."""
    if q.is_cuda and block_q <= MAX_TRITON_BLOCK_Q:
        return _launch_block_mass(q, k, lse, block_q, block_k, scale)
    return block_mass_with_lse_reference(q, k, lse, block_q, block_k, scale).contiguous()


@_block_mass_op.register_fake
def _block_mass_fake(q: Tensor, k: Tensor, lse: Tensor, block_q: int, block_k: int, scale: float) -> Tensor:
    b, h, s_q, _ = q.shape
    return q.new_empty((b, h, cdiv(s_q, block_q), cdiv(k.shape[2], block_k)), dtype=torch.float32)


def attention_lse(q: Tensor, k: Tensor, scale: float | None = None, block: int = 128) -> Tensor:
    """Full-attention row LSE ``log(sum_t exp(scale * q_r . k_t))``, fp32 ``(B, H, S_q)``.

    q ``(B, H, S_q, D)``, k ``(B, H, S_k, D)``. ``block`` query rows per program / chunk (16, 32,
    64 or 128 on CUDA). CUDA: Triton kernel (QK^T compute only, O(S_q) memory); else the chunked
    reference. Op ``sparse_compile::attention_lse``.
    """
    check_qk(q, k)
    check_block("block", block)
    return torch.ops.sparse_compile.attention_lse(q, k, default_scale(q.shape[-1], scale), block)


def block_mass_with_lse(
    q: Tensor, k: Tensor, lse: Tensor, block_q: int, block_k: int, scale: float | None = None
) -> Tensor:
    """Exact attention mass of every (q block, kv block), fp32 ``(B, H, NQ, NK)``.

    ``mass[i, j] = sum_{r in q block i, t in kv block j} exp(scale * q_r . k_t - lse_r) / |q block i|``;
    with ``lse`` ``(B, H, S_q)`` the full-attention LSE (:func:`attention_lse`, or one cached from
    an earlier dense step), every row sums to 1. Rows with LSE ``-inf`` contribute nothing. CUDA
    with ``block_q <= 128``: one Triton pass over K per q block; else the chunked reference.
    Op ``sparse_compile::block_mass_with_lse``.
    """
    check_qk(q, k)
    check_block("block_q", block_q)
    check_block("block_k", block_k)
    _check_lse(q, lse)
    return torch.ops.sparse_compile.block_mass_with_lse(q, k, lse, block_q, block_k, default_scale(q.shape[-1], scale))


def select_top_p_clusters(
    q_centroids: Tensor, k_centroids: Tensor, k_sizes: Tensor, scale: float, top_p: float, min_blocks: int = 1
) -> ClusterSelection:
    """SVG2's cluster pairs: per query cluster, the top-p key clusters and the key tokens they hold.

    Per row (batch, head, query cluster i): ``probs = softmax_j(scale * cq_i . ck_j + log(size_j))``
    (size 0: probability 0), then :func:`select_top_p` of ``probs`` with ``top_p`` and
    ``min_blocks``. ``q_centroids`` ``(B, H, NQ, D)`` and ``k_centroids`` ``(B, H, NK, D)`` (fp32),
    ``k_sizes`` integer ``(B, H, NK)``, each row with a cluster of positive size. Returns a
    :class:`ClusterSelection`. CUDA with ``NK <= MAX_TRITON_CLUSTERS``: the fused Triton path
    (:func:`select_top_p_clusters_triton`), else the torch ops (:func:`select_top_p_clusters_torch`);
    neither syncs with the host. The paths round the probabilities and sum them in different
    orders, so a row whose cumulative mass lands within rounding of ``top_p`` (or whose last kept
    and first dropped blocks are within rounding of a tie) may differ by that one block.
    """
    if q_centroids.is_cuda and k_centroids.shape[2] <= MAX_TRITON_CLUSTERS:
        return select_top_p_clusters_triton(q_centroids, k_centroids, k_sizes, scale, top_p, min_blocks)
    return select_top_p_clusters_torch(q_centroids, k_centroids, k_sizes, scale, top_p, min_blocks)


__all__ = [
    "ClusterSelection",
    "attention_lse",
    "block_mass_with_lse",
    "check_block",
    "check_qk",
    "keep_mask_to_layout",
    "kept_kv_tokens",
    "pooled_block_scores",
    "select_top_p",
    "select_top_p_clusters",
]
