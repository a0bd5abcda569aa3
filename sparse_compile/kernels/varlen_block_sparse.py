"""Variable-block-size (cluster) sparse attention: Triton kernel, dispatch and custom op.

``varlen_block_sparse_attention(q, k, v, q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts,
kv_cluster_indices, q_perm=None, kv_perm=None)`` is attention where the rows of q cluster ``c``
attend only to the keys of the kv clusters it keeps. The layout format and the optional token
permutations (q, k, v and O in token order, the cluster order given by ``q_perm`` / ``kv_perm``)
are described in :mod:`sparse_compile.kernels.varlen_block_sparse_reference`, which is the
specification and the CPU path.

Kernel design (CUDA):

- *Query side.* Each q cluster is split into BLOCK_M-row tiles. A tile table (cluster id, first
  row) is built on the device with a handful of torch ops and no host sync: the grid is the upper
  bound ``ceil(S_q / BLOCK_M) + NQC`` tiles per head, and surplus programs exit at once. Tiles are
  ordered heaviest first (most kept keys) within each head to shorten the tail of the launch.
  Optionally (``VarlenConfig.tail_block_m``) a cluster's last rows, when they fill at most a
  smaller tile, run in a second launch of such tiles: less padding for the same kv work.
- *Key side.* kv clusters are small (~33 tokens at SVG2's 1000 clusters for S = 32760), so the kept
  clusters of a q cluster are *packed*: their tokens form one virtual sequence of ``total`` kept
  keys, read BLOCK_N at a time with per-row gathers. A prep kernel writes, per (b, h, q cluster),
  the prefix sum of the kept cluster sizes (``prefix[s]``: first virtual position of slot ``s``),
  ``delta[s] = kv_start(slot s) - prefix[s]``, and per kv tile ``j`` the slot holding position
  ``j * BLOCK_N`` (``tile_slot``). A tile's lanes then lie in slots ``[tile_slot[j], tile_slot[j+1]]``:
  when that span is at most ``window`` slots (the usual case) each lane counts the slot boundaries
  below it with ``window`` independent scalar loads; otherwise it binary-searches the span. A lane
  at virtual position ``p`` in slot ``s`` reads key ``p + delta[s]``. Only the last, partial tile
  of each q cluster is masked.
- *Permutations folded into the loads and stores* (``PERMUTE_Q`` / ``PERMUTE_KV``, compile-time
  flags: without a permutation the kernel is the one above). A q tile loads its BLOCK_M entries of
  ``q_perm`` and gathers those token rows of q (each row D contiguous elements, so every row load
  stays coalesced), then stores O and LSE to the same token rows. On the key side the virtual
  position resolves to a cluster-order row as above, and one more load, ``kv_perm[row]`` (contiguous
  within a kv cluster), gives the token row of k and v. So Q, K, V and O are never copied into
  cluster order and back: instead of gathers of Q, K and V and scatters of O and LSE (each a read
  and a write of the whole tensor) the kernel does one int load per q row and per kept key.
- Any strides for q, k, v and O (each a ``(B, H, S, D)`` view; the stride of D specialises to 1
  in practice), so the ``(B, S, H, D)`` storage of a diffusers attention call is read as is, and O
  is written token-major by default, the layout the backend's op returns without a copy.
- Online base-2 softmax in fp32; empty clusters give 0 and LSE ``-inf``.

Measured on an H100 (benchmarks/results/varlen_block_sparse.md): 2.1-2.4x the fixed-block kernel's
time at equal density on SVG2-like layouts (query padding 1.28 with the 64-row tail launch, plus the
key-side lookup and gathers, whose first loads Triton's pipeliner leaves synchronous:
results/varlen_notes.md); 1.26-1.30x on identical work (128-token clusters, one-step search).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from sparse_compile.kernels._triton_utils import (
    check_out_buffer,
    check_strided_out_buffer,
    patch_interpreter_scalar_index,
    permutation_strides,
)
from sparse_compile.kernels.varlen_block_sparse_reference import (
    VarlenLayout,
    check_varlen_layout_values,
    token_major_like,
    validate_varlen_inputs,
    varlen_block_sparse_attention_reference,
)

TRITON_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634
_PREP_CHUNK = 128  # kept-cluster slots per step of the prep kernel


@dataclass(frozen=True)
class VarlenConfig:
    """Tile shape and launch options of the attention kernel.

    ``tail_block_m`` > 0 splits off the last rows of each q cluster when they fill at most that many
    (``size % block_m`` in ``(0, tail_block_m]``): a second launch runs them in ``tail_block_m``-row
    tiles with ``tail_num_warps`` warps, so a 130-row cluster computes 128 + 32 rows, not 256.
    """

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    window: int = 8  # kept kv clusters a kv tile resolves by one compare (0: bounded binary search only)
    tail_block_m: int = 0  # 0: no tail launch
    tail_num_warps: int = 4

    def __post_init__(self) -> None:
        if self.window < 0 or self.window & (self.window - 1):
            raise ValueError(f"VarlenConfig.window must be 0 or a power of two, got {self.window}")
        tail = self.tail_block_m
        if tail and (tail < 16 or tail & (tail - 1) or tail >= self.block_m):
            raise ValueError(
                f"VarlenConfig.tail_block_m must be 0 or a power of two in [16, block_m={self.block_m}), got {tail}"
            )


def default_config(
    s_q: int, num_q_clusters: int, head_dim: int, element_size: int, s_k: int, num_kv_clusters: int
) -> VarlenConfig:
    """Tile config by mean cluster sizes and element size (H100 sweeps, benchmarks/results/varlen_block_sparse.md).

    Each q cluster pads its last tile (~BLOCK_M / 2 rows), yet 128-row tiles amortise the per-tile
    kv lookup over twice the rows: on SVG2-like layouts with ~110-row clusters (Wan 480p, 300 q
    clusters) 128x128 tiles, 8 warps, 3 stages were fastest at every density despite 1.56x padding
    against 1.28x for 64-row tiles. Remainders of at most 64 rows go to 64-row tiles (4 warps) in
    a second launch: on SVG2's own Wan layout (200 q clusters) the kernel took 4.08 ms instead of
    4.48 ms, on the synthetic 300-cluster layouts -2% to +2%. Below ~96 rows per cluster (unmeasured)
    and for fp32 inputs (twice the shared memory per tile) 64-row tiles. The slot window pays off when
    kv tiles span several small kv clusters (33-token clusters: 20% faster than the binary search
    alone); with kv clusters of a tile or more the one-step search was 13-16% faster than the window.
    More stages (4, 5) were 2% slower than 3.
    """
    mean_rows = s_q / max(num_q_clusters, 1)
    window = 0 if s_k / max(num_kv_clusters, 1) >= 128 else 8
    if head_dim <= 128 and element_size <= 2 and mean_rows >= 96:
        return VarlenConfig(128, 128, 8, 3, window, tail_block_m=64)
    if head_dim <= 128 and mean_rows >= 512:
        return VarlenConfig(128, 128, 8, 2, window)
    return VarlenConfig(64, 128, 4, 2, window)


@triton.jit
def _kv_prefix_kernel(
    counts_ptr, indices_ptr, kv_off_ptr, prefix_ptr, delta_ptr, total_ptr, tile_slot_ptr,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq, stride_is,
    num_heads, num_q_clusters, num_kv_clusters, maxk, max_tiles,
    CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, SEARCH_STEPS: tl.constexpr,
):
    """One program per (q cluster, batch * head): prefix sums of the kept kv cluster sizes and the tile slots.

    Writes ``prefix[0..count]`` (``prefix[count]`` = kept keys), ``delta[0..count)``, ``total`` and
    ``tile_slot[0..n_tiles]`` (``n_tiles = ceil(total / BLOCK_N)``): the slot holding virtual
    position ``j * BLOCK_N``, i.e. the largest ``s < count`` with ``prefix[s] <= j * BLOCK_N``
    (``count - 1`` for ``j = n_tiles``). Entries past those are left unwritten (never read).
    """
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    count = tl.load(counts_ptr + b * stride_cb + h * stride_ch + c * stride_cq)
    idx_row = indices_ptr + b * stride_ib + h * stride_ih + c * stride_iq
    kv_off = kv_off_ptr + bh.to(tl.int64) * (num_kv_clusters + 1)
    row = bh.to(tl.int64) * num_q_clusters + c
    prefix = prefix_ptr + row * (maxk + 1)
    delta = delta_ptr + row * maxk
    tile_slot = tile_slot_ptr + row * (max_tiles + 1)
    tl.store(prefix, 0)
    carry = count * 0
    for start in range(0, count, CHUNK):
        slots = start + tl.arange(0, CHUNK)
        ok = slots < count
        idx = tl.load(idx_row + slots * stride_is, mask=ok, other=0)
        first = tl.load(kv_off + idx, mask=ok, other=0)
        size = tl.load(kv_off + idx + 1, mask=ok, other=0) - first
        inclusive = tl.cumsum(size, 0) + carry
        tl.store(prefix + 1 + slots, inclusive, mask=ok)
        tl.store(delta + slots, first - (inclusive - size), mask=ok)
        carry += tl.sum(size, 0)
    tl.store(total_ptr + row, carry)
    tl.debug_barrier()  # the prefix written above is read back below by other threads of this program
    n_tiles = tl.cdiv(carry, BLOCK_N)
    for start in range(0, n_tiles + 1, CHUNK):
        tiles = start + tl.arange(0, CHUNK)
        pos = tiles * BLOCK_N
        lo = tl.zeros([CHUNK], tl.int32)
        hi = lo + count
        for _ in tl.static_range(SEARCH_STEPS):
            mid = (lo + hi) >> 1
            right = (tl.load(prefix + mid, mask=mid < hi, other=0) <= pos) & (mid < hi)
            lo = tl.where(right, mid, lo)
            hi = tl.where(right | (mid >= hi), hi, mid)
        tl.store(tile_slot + tiles, lo, mask=tiles <= n_tiles)


@triton.jit
def _tile_slots(pos, prefix, tile_slot, start,
                BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Slot of each virtual position ``pos`` (BLOCK_N of them, from ``start``): the largest ``s`` with ``prefix[s] <= pos``.

    The slots of a tile lie in ``[s0, s1]``, the table entries of this tile and the next one. When
    that span holds at most WINDOW slots every lane counts the boundaries below it in one vector
    compare (one round of loads); otherwise a binary search over the span, ``ceil(log2(span))``
    steps (a uniform branch).
    """
    j = start // BLOCK_N
    s0 = tl.load(tile_slot + j)
    s1 = tl.load(tile_slot + j + 1)
    if WINDOW > 0:
        if s1 - s0 <= WINDOW:
            slot = tl.zeros([BLOCK_N], tl.int32) + s0
            for ahead in tl.static_range(1, WINDOW + 1):  # independent scalar loads, one add per lane each
                bound = tl.load(prefix + s0 + ahead, mask=ahead <= s1 - s0, other=2147483647)
                slot += (bound <= pos).to(tl.int32)
        else:
            slot = _search_span(pos, prefix, s0, s1, BLOCK_N, SEARCH_STEPS)
    else:
        slot = _search_span(pos, prefix, s0, s1, BLOCK_N, SEARCH_STEPS)
    return slot


@triton.jit
def _search_span(pos, prefix, s0, s1, BLOCK_N: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Binary search of each lane's slot in ``[s0, s1]`` (``prefix[s0] <= pos``): ``ceil(log2(s1 + 1 - s0))`` steps."""
    slot = tl.zeros([BLOCK_N], tl.int32) + s0
    hi = slot * 0 + s1 + 1
    for step in tl.static_range(SEARCH_STEPS):
        if (1 << step) < s1 + 1 - s0:  # a uniform branch: narrow spans take few steps
            mid = (slot + hi) >> 1
            right = tl.load(prefix + mid) <= pos
            slot = tl.where(right, mid, slot)
            hi = tl.where(right, hi, mid)
    return slot


@triton.jit
def _tile_tokens(start, total, prefix, delta, tile_slot, kv_perm, stride_ps,
                 BLOCK_N: tl.constexpr, WINDOW: tl.constexpr, SEARCH_STEPS: tl.constexpr, PERMUTE_KV: tl.constexpr):
    """k / v rows of the kept keys at virtual positions [start, start + BLOCK_N); row 0 past ``total``.

    PERMUTE_KV: the kv row of cluster-order position ``r`` is token ``kv_perm[r * stride_ps]`` of k / v.
    """
    pos = start + tl.arange(0, BLOCK_N)
    slot = _tile_slots(pos, prefix, tile_slot, start, BLOCK_N, WINDOW, SEARCH_STEPS)
    token = tl.where(pos < total, pos + tl.load(delta + slot), 0)
    if PERMUTE_KV:
        token = tl.load(kv_perm + token * stride_ps).to(tl.int32)
    return token


@triton.jit
def _attend_tile(
    q, k_base, v_base, token, stride_ks, stride_kd, stride_vs, stride_vd, start, total, qk_scale, m_i, l_i, acc, dims,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold the BLOCK_N keys at k / v rows ``token`` (virtual positions [start, start + BLOCK_N)) into (m_i, l_i, acc).

    MASKED: positions from ``total`` on are not keys.
    """
    k = tl.load(k_base + token[:, None] * stride_ks + dims[None, :] * stride_kd)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where((start + tl.arange(0, BLOCK_N) < total)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + token[:, None] * stride_vs + dims[None, :] * stride_vd)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _varlen_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_perm_ptr, kv_perm_ptr,
    tile_cluster_ptr, tile_row_ptr, q_off_ptr, counts_ptr, prefix_ptr, delta_ptr, tile_slot_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_qpb, stride_qph, stride_qps,
    stride_kpb, stride_kph, stride_kps,
    stride_cb, stride_ch, stride_cq,
    num_heads, num_q_clusters, maxk, max_kv_tiles, num_tiles, s_q, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
    PERMUTE_Q: tl.constexpr, PERMUTE_KV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (tile slot, batch * head): BLOCK_M rows of one q cluster over its kept keys.

    q, k, v and O have any strides; LSE is contiguous fp32 (B, H, S_q). PERMUTE_Q: cluster-order
    row ``r`` is token ``q_perm[r]`` of q, O and LSE (rows are gathered and results scattered by
    token); PERMUTE_KV likewise for k and v (``kv_perm_ptr`` is unused, and may be None, without).
    Tile slots whose table entry is ``num_q_clusters`` (the surplus of the upper-bound grid) exit at once.
    """
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    table = bh.to(tl.int64) * num_tiles + tile
    cluster = tl.load(tile_cluster_ptr + table)
    if cluster < num_q_clusters:
        b = (bh // num_heads).to(tl.int64)
        h = (bh % num_heads).to(tl.int64)
        rows = tl.load(tile_row_ptr + table) + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.load(q_off_ptr + bh.to(tl.int64) * (num_q_clusters + 1) + cluster + 1)
        if PERMUTE_Q:
            q_tokens = tl.load(q_perm_ptr + b * stride_qpb + h * stride_qph + rows * stride_qps,
                               mask=row_ok, other=0).to(tl.int32)
        else:
            q_tokens = rows
        if PERMUTE_KV:
            kv_perm = kv_perm_ptr + b * stride_kpb + h * stride_kph
        else:
            kv_perm = kv_perm_ptr
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + q_tokens[:, None] * stride_qs + dims[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        count = tl.load(counts_ptr + b * stride_cb + h * stride_ch + cluster * stride_cq)
        slot_row = bh.to(tl.int64) * num_q_clusters + cluster
        prefix = prefix_ptr + slot_row * (maxk + 1)
        delta = delta_ptr + slot_row * maxk
        tile_slot = tile_slot_ptr + slot_row * (max_kv_tiles + 1)
        total = tl.load(prefix + count)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        n_full = (total // BLOCK_N) * BLOCK_N
        for start in range(0, n_full, BLOCK_N):
            token = _tile_tokens(start, total, prefix, delta, tile_slot, kv_perm, stride_kps,
                                 BLOCK_N, WINDOW, SEARCH_STEPS, PERMUTE_KV)
            m_i, l_i, acc = _attend_tile(q, k_base, v_base, token, stride_ks, stride_kd, stride_vs, stride_vd,
                                         start, total, qk_scale, m_i, l_i, acc, dims, BLOCK_N, False, DOT_PRECISION)
        if n_full < total:
            token = _tile_tokens(n_full, total, prefix, delta, tile_slot, kv_perm, stride_kps,
                                 BLOCK_N, WINDOW, SEARCH_STEPS, PERMUTE_KV)
            m_i, l_i, acc = _attend_tile(q, k_base, v_base, token, stride_ks, stride_kd, stride_vs, stride_vd,
                                         n_full, total, qk_scale, m_i, l_i, acc, dims, BLOCK_N, True, DOT_PRECISION)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_rows = o_ptr + b * stride_ob + h * stride_oh + q_tokens[:, None] * stride_os
        tl.store(o_rows + dims[None, :] * stride_od, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(lse_ptr + bh.to(tl.int64) * s_q + q_tokens, lse, mask=row_ok)


if isinstance(_varlen_fwd_kernel, InterpretedFunction):  # TRITON_INTERPRET=1 before triton's import
    patch_interpreter_scalar_index()


@dataclass(frozen=True)
class _KvPrefix:
    """Prep-kernel outputs, per (b*h, q cluster): prefix (.., MAXK+1), delta (.., MAXK), total kept keys,
    tile_slot (.., max_tiles + 1): the slot of the first key of each BLOCK_N-key tile, and the last slot."""

    prefix: Tensor
    delta: Tensor
    total: Tensor
    tile_slot: Tensor

    @property
    def max_tiles(self) -> int:
        return self.tile_slot.shape[-1] - 1


def _flat_offsets(offsets: Tensor) -> Tensor:
    """Expanded ``(B, H, N + 1)`` offsets as a contiguous int32 ``(B * H, N + 1)``."""
    return offsets.reshape(-1, offsets.shape[-1]).contiguous()


def _search_steps(maxk: int) -> int:
    """Binary-search steps that resolve a slot among ``maxk`` kept clusters: ``ceil(log2(maxk))``."""
    return max(maxk - 1, 0).bit_length()


def _kv_prefix(layout: VarlenLayout, kv_off: Tensor, s_k: int, block_n: int) -> _KvPrefix:
    """Run the prep kernel over every (b, h, q cluster) for kv tiles of ``block_n`` keys."""
    b, h, nqc, maxk = layout.indices.shape
    device = kv_off.device
    max_tiles = triton.cdiv(s_k, block_n)  # kept clusters are distinct: at most S_k kept keys
    prefix = torch.empty((b * h, nqc, maxk + 1), dtype=torch.int32, device=device)
    delta = torch.empty((b * h, nqc, max(maxk, 1)), dtype=torch.int32, device=device)
    total = torch.empty((b * h, nqc), dtype=torch.int32, device=device)
    tile_slot = torch.empty((b * h, nqc, max_tiles + 1), dtype=torch.int32, device=device)
    if nqc > 0:
        _kv_prefix_kernel[(nqc, b * h)](
            layout.counts, layout.indices, kv_off, prefix, delta, total, tile_slot,
            *layout.counts.stride(), *layout.indices.stride(),
            h, nqc, layout.num_kv_clusters, maxk, max_tiles,
            CHUNK=_PREP_CHUNK, BLOCK_N=block_n, SEARCH_STEPS=_search_steps(maxk),
        )  # fmt: skip
    return _KvPrefix(prefix, delta, total, tile_slot)


def _split_rows(q_off: Tensor, config: VarlenConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Each q cluster's rows for the main launch and for the tail launch: ``(first row, row count)``,
    int32 ``(B*H, NQC)`` each. The tail is ``size % block_m`` when that is in ``(0, tail_block_m]``, else
    empty (so every main launch's tiles but a cluster's last are full, and that one ends at the cluster's end).
    """
    first, sizes = q_off[:, :-1], q_off[:, 1:] - q_off[:, :-1]
    remainder = sizes % config.block_m
    tail = torch.where((remainder > 0) & (remainder <= config.tail_block_m), remainder, 0)
    return (first, sizes - tail), (first + sizes - tail, tail)


def _tile_table(first_row: Tensor, rows: Tensor, total: Tensor, block_m: int, num_tiles: int) -> tuple[Tensor, Tensor]:
    """Tile table of the upper-bound grid: q cluster id and first row per tile slot, int32 ``(B*H, T)``.

    Cluster ``c`` of head ``bh`` covers ``rows[bh, c]`` rows from ``first_row[bh, c]`` in
    ``ceil(rows / block_m)`` tiles. Slot ``t`` holds the t-th heaviest tile (most kept keys first);
    slots past the real tile count hold cluster id ``NQC`` (exit at once). All device ops, no host sync.
    """
    nqc = rows.shape[-1]
    tiles = (rows + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, dim=1)
    slots = torch.arange(num_tiles, device=rows.device).expand(rows.shape[0], num_tiles).contiguous()
    cluster = torch.searchsorted(tile_end, slots, right=True)  # (BH, T), NQC past the last tile
    real = cluster < nqc
    safe = cluster.clamp_max(max(nqc - 1, 0))
    first_slot = (tile_end - tiles).gather(1, safe)
    tile_rows = first_row.gather(1, safe) + (slots - first_slot) * block_m
    work = torch.where(real, total.gather(1, safe), -1)
    order = torch.argsort(work, dim=1, descending=True, stable=True)
    return cluster.gather(1, order).int(), tile_rows.gather(1, order).int()


def varlen_block_sparse_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_cluster_offsets: Tensor,
    kv_cluster_offsets: Tensor,
    kv_cluster_counts: Tensor,
    kv_cluster_indices: Tensor,
    *,
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
    scale: float | None = None,
    config: VarlenConfig | None = None,
    out: Tensor | None = None,
    lse_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); returns (O, LSE).

    Arguments as :func:`varlen_block_sparse_attention`; D must be one of ``TRITON_HEAD_DIMS``; q, k, v
    are read through their strides (no copies). ``config`` fixes the tile shape (default
    :func:`default_config`). ``out`` ``(B, H, S_q, D)`` in q's dtype with any non-overlapping strides
    (default: a new token-major tensor) and ``lse_out`` ``(B, H, S_q)`` contiguous fp32 are optional
    buffers; every element is written. Layout and permutation values are not checked (no host sync):
    :func:`check_varlen_layout_values` does that.
    """
    layout = validate_varlen_inputs(
        q, k, v, q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices, q_perm, kv_perm
    )
    b, h, s_q, d = q.shape
    if d not in TRITON_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {TRITON_HEAD_DIMS} on the Triton path, got {d}")
    out = token_major_like(q) if out is None else out
    lse_out = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device) if lse_out is None else lse_out
    check_strided_out_buffer("out", out, (b, h, s_q, d), q.dtype, q.device)
    check_out_buffer("lse_out", lse_out, (b, h, s_q), torch.float32, q.device)
    nqc, maxk = layout.num_q_clusters, layout.indices.shape[-1]
    if out.numel() == 0 and lse_out.numel() == 0:
        return out, lse_out
    config = config or default_config(s_q, nqc, d, q.element_size(), k.shape[2], layout.num_kv_clusters)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q_off = _flat_offsets(layout.q_offsets)
    kv = _kv_prefix(layout, _flat_offsets(layout.kv_offsets), k.shape[2], config.block_n)
    main, tail = _split_rows(q_off, config)
    launches = [(main, config.block_m, config.num_warps, triton.cdiv(s_q, config.block_m) + nqc)]
    if config.tail_block_m:
        launches.append((tail, config.tail_block_m, config.tail_num_warps, nqc))  # at most one tail tile per cluster
    for (first_row, rows), block_m, num_warps, num_tiles in launches:
        tile_cluster, tile_row = _tile_table(first_row, rows, kv.total, block_m, num_tiles)
        _varlen_fwd_kernel[(num_tiles, b * h)](
            q, k, v, out, lse_out, layout.q_perm, layout.kv_perm,
            tile_cluster, tile_row, q_off, layout.counts, kv.prefix, kv.delta, kv.tile_slot,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            *permutation_strides(layout.q_perm), *permutation_strides(layout.kv_perm),
            *layout.counts.stride(),
            h, nqc, maxk, kv.max_tiles, num_tiles, s_q, scale * _LOG2E,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=config.block_n, WINDOW=config.window,
            SEARCH_STEPS=_search_steps(maxk),
            PERMUTE_Q=layout.q_perm is not None, PERMUTE_KV=layout.kv_perm is not None,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    return out, lse_out


@torch.library.custom_op("sparse_compile::varlen_block_sparse_attention", mutates_args=())
def _varlen_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_cluster_offsets: Tensor,
    kv_cluster_offsets: Tensor,
    kv_cluster_counts: Tensor,
    kv_cluster_indices: Tensor,
    scale: float,
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Custom op: (O token-major (B, H, S_q, D) in q's dtype, LSE contiguous fp32 (B, H, S_q))."""
    layout_args = (q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices)
    if q.is_cuda:
        return varlen_block_sparse_attention_triton(q, k, v, *layout_args, q_perm=q_perm, kv_perm=kv_perm, scale=scale)
    return varlen_block_sparse_attention_reference(
        q, k, v, *layout_args, q_perm=q_perm, kv_perm=kv_perm, scale=scale, return_lse=True
    )


@_varlen_op.register_fake
def _varlen_fake(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_cluster_offsets: Tensor,
    kv_cluster_offsets: Tensor,
    kv_cluster_counts: Tensor,
    kv_cluster_indices: Tensor,
    scale: float,
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    validate_varlen_inputs(
        q, k, v, q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices, q_perm, kv_perm
    )
    b, h, s_q, _ = q.shape
    return token_major_like(q), q.new_empty((b, h, s_q), dtype=torch.float32)


def varlen_block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_cluster_offsets: Tensor,
    kv_cluster_offsets: Tensor,
    kv_cluster_counts: Tensor,
    kv_cluster_indices: Tensor,
    *,
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cluster-sparse attention through the ``sparse_compile::varlen_block_sparse_attention`` op.

    q ``(B, H, S_q, D)``, k/v ``(B, H, S_k, D)``, fp16/bf16/fp32, any strides: in cluster order, or in
    token order with the permutations ``q_perm`` ``(B, H, S_q)`` / ``kv_perm`` ``(B, H, S_k)`` (int32
    or int64; row ``i`` of cluster order is token ``perm[b, h, i]``), which the kernel folds into its
    loads and stores. ``q_cluster_offsets`` int32 ``(B, H, NQC + 1)``, ``kv_cluster_offsets`` int32
    ``(B, H, NKC + 1)``, ``kv_cluster_counts`` int32 ``(B, H, NQC)``, ``kv_cluster_indices`` int32
    ``(B, H, NQC, MAXK)`` (batch/head dims of the layout and permutations may be 1); ``scale``
    defaults to 1/sqrt(D). Returns O ``(B, H, S_q, D)`` in q's dtype, token-major
    (:func:`token_major_like`), in q's row order, plus the fp32 natural-log LSE ``(B, H, S_q)``
    when ``return_lse``. Shapes are checked here (``ValueError``); layout and permutation *values*
    on the CPU path only (:func:`check_varlen_layout_values` checks them anywhere, at the cost of a sync).
    """
    validate_varlen_inputs(
        q, k, v, q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices, q_perm, kv_perm
    )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out, lse = torch.ops.sparse_compile.varlen_block_sparse_attention(
        q, k, v, q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices, scale,
        q_perm, kv_perm,
    )  # fmt: skip
    return (out, lse) if return_lse else out


__all__ = [
    "TRITON_HEAD_DIMS",
    "VarlenConfig",
    "check_varlen_layout_values",
    "default_config",
    "token_major_like",
    "varlen_block_sparse_attention",
    "varlen_block_sparse_attention_triton",
]
