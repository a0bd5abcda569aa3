"""Variable-block-size (cluster) sparse attention: Triton kernel, dispatch and custom op.

On sm_90 the op runs the Gluon kernel of :mod:`sparse_compile.kernels.gluon_varlen_block_sparse` on the same
prep kernel, tile tables and kept-rows buffers (:func:`varlen_kernel_choice`); the Triton kernel below keeps
every other CUDA device and the interpreter tests.

``varlen_block_sparse_attention(q, k, v, q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts,
kv_cluster_indices, q_perm=None, kv_perm=None)`` is attention where the rows of q cluster ``c``
attend only to the keys of the kv clusters it keeps. The layout format and the optional token
permutations (q, k, v and O in token order, the cluster order given by ``q_perm`` / ``kv_perm``)
are described in :mod:`sparse_compile.kernels.varlen_block_sparse_reference`, which is the
specification and the CPU path.

Kernel design (CUDA):

- *Query side.* Each q cluster is split into BLOCK_M-row tiles. A tile table (cluster id, first
  row per program; :mod:`sparse_compile.kernels.varlen_tiles`, one small Triton launch, no host
  sync) maps the upper-bound grid of ``ceil(S_q / BLOCK_M) + NQC`` tiles per head onto them, heaviest
  first (most kept keys) within each head to shorten the tail of the launch; surplus programs exit
  at once. Optionally (``VarlenConfig.tail_block_m``) a cluster's last rows, when they fill at most
  a smaller tile, run in a second launch of such tiles: less padding for the same kv work.
- *Key side: the kept rows, materialised.* kv clusters are small (S_k / NKC tokens, tens for
  SVG2's cluster counts), so the kept clusters of a q cluster are *packed*: their tokens form one
  sequence of ``total`` kept keys, read BLOCK_N at a time. A prep kernel (one program per q
  cluster) writes that sequence as the k/v token row of every kept key (``kv_perm`` applied), so
  the attention loop loads BLOCK_N row numbers with one contiguous vector load, then gathers those
  rows of k and v: a chain of two loads, both of which Triton's software pipeliner issues a tile
  ahead. Only the last, partial tile of each q cluster is masked. The rows buffer is one flat int32
  buffer; each (pair, q cluster) list starts at an offset (int64, one per list) that both kernels
  read. *Ragged*, when the caller gives ``kept_rows_total`` (a bound of all q clusters' kept keys,
  which the host learns only by reading the selection) and it fits :func:`rows_budget_bytes`: the
  lists are packed back to back (offsets = exclusive cumsum of the kept keys, in (pair, cluster)
  order) and every (batch, head) pair runs in one launch group. *Ragged in groups* when the total does
  not fit but the caller gives each pair's bound (``pair_kept_rows``): consecutive pairs whose bounds fit
  the budget share a launch group and one reused buffer. *Padded* otherwise: every list gets
  ``max_kept_keys`` slots (default ``S_k``), and above the budget the pairs run in groups that reuse
  one buffer (:func:`kept_rows_plan`).
- *Permutations folded into the loads and stores* (``PERMUTE_Q``, and ``kv_perm`` in the kept rows):
  a q tile loads its BLOCK_M entries of ``q_perm`` and gathers those token rows of q (each row D
  contiguous elements, so every row load stays coalesced), then stores O and LSE to the same token
  rows. So Q, K, V and O are never copied into cluster order and back: instead of gathers of Q, K
  and V and scatters of O and LSE (each a read and a write of the whole tensor) the kernel does one
  int load per q row and per kept key.
- Any strides for q, k, v and O (each a ``(B, H, S, D)`` view; the stride of D specialises to 1
  in practice), so the ``(B, S, H, D)`` storage of a diffusers attention call is read as is, and O
  is written token-major by default, the layout the backend's op returns without a copy.
- Online base-2 softmax in fp32 (:func:`~sparse_compile.kernels.common.online_softmax_step`);
  empty clusters give 0 and LSE ``-inf``.
- Tile shapes, warps and pipeline stages: :func:`~sparse_compile.kernels.tile_configs.varlen_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.common import (
    LOG2E,
    SUPPORTED_DTYPES,
    SUPPORTED_HEAD_DIMS,
    attention_output_like,
    check_out_buffer,
    check_permutation_values,
    check_strided_out_buffer,
    cuda_capability,
    default_scale,
    dot_precision,
    expand_batch_head,
    expand_permutation,
    interpreter_active,
    launch_group_size,
    online_softmax_step,
    permutation_strides,
    token_order,
)
from sparse_compile.kernels.gluon_varlen_block_sparse import gluon_varlen_ineligibility, launch_gluon_varlen
from sparse_compile.kernels.tile_configs import (
    KEPT_ROWS_KEYS,
    KEPT_ROWS_SLOTS,
    GLUON_VARLEN_CONFIG,
    TileConfig,
    VarlenConfig,
    max_shared_memory,
    varlen_config,
)
from sparse_compile.kernels.varlen_block_sparse_reference import (
    VarlenLayout,
    varlen_block_sparse_attention_reference,
    varlen_kept_keys,
)
from sparse_compile.kernels.varlen_tiles import tile_tables

ROWS_BUDGET_SHARE = 0.5
"""Largest kept-rows buffer of one launch group, as a share of the call's output bytes
(:func:`rows_budget_bytes`); more (batch, head) pairs run in several groups. With q, k, v and O of
one size, dense attention's peak is the inputs plus O, 4 O, and a peak within 1.2x of it leaves
0.8 O for everything the cluster path holds besides O while the kernel runs. Besides the kept rows
that is, per (batch, head) and token: the LSE (4 bytes), the two int64 permutations (16) and
k-means' int32 labels and ranks of queries and keys (16), 36 bytes against O's 2 D (bf16): 0.14 O
at D = 128 (HunyuanVideo, Wan), 0.28 O at D = 64. Half of O for the rows keeps the peak at most
1 + (0.5 + 0.14) / 4 = 1.16x dense at D = 128 and 1.195x at D = 64. A share of the call's own size
holds that ratio on every GPU and at every resolution; at Wan 480p (12 heads, 32760 tokens, 200 q
clusters) it is 50 MB, which a ragged buffer of all heads fits up to a mean kept density of 0.16."""


# ------------------------------------------------------------------------------------------------
# Input checks
# ------------------------------------------------------------------------------------------------


def validate_varlen_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_cluster_offsets: Tensor,
    kv_cluster_offsets: Tensor,
    kv_cluster_counts: Tensor,
    kv_cluster_indices: Tensor,
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
) -> VarlenLayout:
    """Check shapes, dtypes and devices (no device sync); return the layout expanded to ``(B, H, ...)``.

    Raises ``ValueError`` naming the offending argument. :func:`check_varlen_layout_values` checks
    the values.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be one of {SUPPORTED_DTYPES}, got {t.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, h, _, d = q.shape
    if k.shape != v.shape or tuple(k.shape[:2]) != (b, h) or k.shape[3] != d:
        raise ValueError(f"k and v must have shape ({b}, {h}, S_k, {d}), got k {tuple(k.shape)}, v {tuple(v.shape)}")
    layout = (q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices)
    if any(t.device != q.device for t in (k, v, *layout, *(p for p in (q_perm, kv_perm) if p is not None))):
        raise ValueError("q, k, v, the four layout tensors and the permutations must be on one device")
    q_off = expand_batch_head(q_cluster_offsets, "q_cluster_offsets", b, h, (None,), (torch.int32,))
    kv_off = expand_batch_head(kv_cluster_offsets, "kv_cluster_offsets", b, h, (None,), (torch.int32,))
    if q_off.shape[-1] < 1 or kv_off.shape[-1] < 1:
        raise ValueError("cluster offsets need at least one entry (NC + 1 >= 1)")
    nqc = q_off.shape[-1] - 1
    counts = expand_batch_head(kv_cluster_counts, "kv_cluster_counts", b, h, (None,), (torch.int32,))
    if counts.shape[-1] != nqc:
        raise ValueError(f"kv_cluster_counts must have NQC = {nqc} entries per head, got {counts.shape[-1]}")
    indices = expand_batch_head(kv_cluster_indices, "kv_cluster_indices", b, h, (None, None), (torch.int32,))
    if indices.shape[2] != nqc:
        raise ValueError(f"kv_cluster_indices must be (B, H, NQC={nqc}, MAXK), got {tuple(kv_cluster_indices.shape)}")
    q_perm = expand_permutation(q_perm, "q_perm", b, h, q.shape[2])
    kv_perm = expand_permutation(kv_perm, "kv_perm", b, h, k.shape[2])
    return VarlenLayout(q_off, kv_off, counts, indices, q_perm, kv_perm)


def _check_offsets(name: str, offsets: Tensor, seq_len: int) -> None:
    if bool((offsets[..., 0] != 0).any()) or bool((offsets[..., -1] != seq_len).any()):
        raise ValueError(f"{name} must start at 0 and end at the sequence length {seq_len}")
    if bool((offsets[..., 1:] < offsets[..., :-1]).any()):
        raise ValueError(f"{name} must be non-decreasing")


def check_varlen_layout_values(layout: VarlenLayout, s_q: int, s_k: int) -> None:
    """Raise ``ValueError`` unless offsets, counts and indices are consistent (reads them: a device sync)."""
    _check_offsets("q_cluster_offsets", layout.q_offsets, s_q)
    _check_offsets("kv_cluster_offsets", layout.kv_offsets, s_k)
    maxk = layout.indices.shape[-1]
    counts = layout.counts
    if bool((counts < 0).any()) or bool((counts > maxk).any()):
        raise ValueError(f"kv_cluster_counts must lie in [0, MAXK={maxk}]")
    valid = torch.arange(maxk, device=counts.device) < counts.unsqueeze(-1)
    idx = layout.indices
    if bool(((idx < 0) | (idx >= layout.num_kv_clusters))[valid].any()):
        raise ValueError(f"kept kv cluster ids must lie in [0, NKC={layout.num_kv_clusters})")
    if bool((idx[..., 1:] <= idx[..., :-1])[valid[..., 1:]].any()):
        raise ValueError("kept kv cluster ids must be strictly ascending")
    check_permutation_values("q_perm", layout.q_perm)
    check_permutation_values("kv_perm", layout.kv_perm)


def validate_kept_rows_args(
    layout: VarlenLayout, kept_keys: Tensor | None, max_kept_keys: int | None, kept_rows_total: int | None,
    pair_kept_rows: list[int] | None = None,
) -> Tensor | None:
    """Check the kept-rows bounds' types, ``pair_kept_rows``' length and ``kept_keys``' shape, dtype and device
    (no device sync); return ``kept_keys`` expanded to ``(B, H, NQC)``. Raises ``ValueError`` naming the argument."""
    b, h, nqc, _ = layout.indices.shape
    bounds = [("max_kept_keys", max_kept_keys), ("kept_rows_total", kept_rows_total)]
    if pair_kept_rows is not None:
        if len(pair_kept_rows) != b * h:
            raise ValueError(f"pair_kept_rows must hold one bound per (batch, head) pair, {b * h}, "
                             f"got {len(pair_kept_rows)}")  # fmt: skip
        bounds += [(f"pair_kept_rows[{i}]", bound) for i, bound in enumerate(pair_kept_rows)]
    for name, bound in bounds:
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 0):
            raise ValueError(f"{name} must be None or an int >= 0, got {bound!r}")
    if kept_keys is None:
        return None
    if kept_keys.device != layout.indices.device:
        raise ValueError(f"kept_keys must be on the layout's device {layout.indices.device}, got {kept_keys.device}")
    return expand_batch_head(kept_keys, "kept_keys", b, h, (nqc,), (torch.int32, torch.int64))


def check_kept_rows_values(
    layout: VarlenLayout, kept_keys: Tensor | None, max_kept_keys: int | None, kept_rows_total: int | None,
    pair_kept_rows: list[int] | None = None,
) -> None:
    """Raise ``ValueError`` unless ``kept_keys`` (``(B, H, NQC)``) are the layout's kept keys per q cluster,
    ``max_kept_keys`` bounds every q cluster's, ``kept_rows_total`` their sum and ``pair_kept_rows`` each
    (batch, head) pair's (reads them: a device sync)."""
    kept = varlen_kept_keys(layout)
    if kept_keys is not None and not torch.equal(kept_keys.long(), kept):
        raise ValueError("kept_keys must hold each q cluster's kept keys: the sizes of its kept kv clusters summed")
    most = int(kept.max()) if kept.numel() else 0
    if max_kept_keys is not None and max_kept_keys < most:
        raise ValueError(f"max_kept_keys={max_kept_keys} is below the most keys a q cluster keeps, {most}")
    kept_sum = int(kept.sum())
    if kept_rows_total is not None and kept_rows_total < kept_sum:
        raise ValueError(f"kept_rows_total={kept_rows_total} is below the kept keys of all q clusters, {kept_sum}")
    if pair_kept_rows is not None:
        for i, (bound, actual) in enumerate(zip(pair_kept_rows, kept.flatten(0, 1).sum(-1).tolist())):
            if bound < actual:
                raise ValueError(f"pair_kept_rows[{i}]={bound} is below the kept keys of that pair's q clusters, {actual}")


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _kept_rows_kernel(
    counts_ptr, indices_ptr, kv_off_ptr, kv_perm_ptr, total_ptr, starts_ptr, rows_ptr,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq, stride_is,
    stride_kpb, stride_kph, stride_kps,
    bh_start, num_heads, num_q_clusters, num_kv_clusters, capacity,
    SLOTS: tl.constexpr, KEYS: tl.constexpr, PERMUTE_KV: tl.constexpr,
):
    """One program per (q cluster, batch * head of the group): the k/v token row of each kept key.

    The kept clusters' keys, in slot order, form positions ``0 .. total - 1`` of the cluster's list,
    which starts at ``rows_ptr + starts[list]`` (list = pair of the group * NQC + cluster). SLOTS kept
    clusters at a time: their first positions are a running exclusive cumsum of their sizes, and a
    (SLOTS, KEYS) tile writes key ``j`` of slot ``s`` (cluster-order row ``kv_start(s) + j``, through
    ``kv_perm`` with PERMUTE_KV) to position ``first position of s + j``, KEYS keys of every slot per
    step. Also writes ``total``: the list's kept keys, or where the buffer (``capacity`` elements) ends inside
    the list, the positions that fit (none past its end are written), so the attention kernel reads only
    written rows.
    """
    c = tl.program_id(0)
    local = tl.program_id(1)
    bh = local + bh_start
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    count = tl.load(counts_ptr + b * stride_cb + h * stride_ch + c * stride_cq)
    idx_row = indices_ptr + b * stride_ib + h * stride_ih + c * stride_iq
    kv_off = kv_off_ptr + bh.to(tl.int64) * (num_kv_clusters + 1)
    row = local.to(tl.int64) * num_q_clusters + c
    list_start = tl.load(starts_ptr + row)
    rows = rows_ptr + list_start
    room = capacity - list_start
    carry = count * 0
    for start in range(0, count, SLOTS):
        slots = start + tl.arange(0, SLOTS)
        ok = slots < count
        idx = tl.load(idx_row + slots * stride_is, mask=ok, other=0)
        first = tl.load(kv_off + idx, mask=ok, other=0)
        size = tl.load(kv_off + idx + 1, mask=ok, other=0) - first
        place = tl.cumsum(size, 0) - size + carry
        for j0 in range(0, tl.max(size, 0), KEYS):
            j = j0 + tl.arange(0, KEYS)
            key = j[None, :] < size[:, None]
            token = first[:, None] + j[None, :]
            if PERMUTE_KV:
                token = tl.load(kv_perm_ptr + b * stride_kpb + h * stride_kph + token * stride_kps,
                                mask=key, other=0).to(tl.int32)
            position = place[:, None] + j[None, :]
            tl.store(rows + position, token, mask=key & (position < room))
        carry += tl.sum(size, 0)
    tl.store(total_ptr + row, tl.minimum(carry, tl.maximum(room, 0)))


@triton.jit
def _attend_tile(
    q, k_base, v_base, token, stride_ks, stride_kd, stride_vs, stride_vd, start, total, qk_scale, m_i, l_i, acc, dims,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold the BLOCK_N keys at k / v rows ``token`` (positions [start, start + BLOCK_N)) into (m_i, l_i, acc).

    MASKED: positions from ``total`` on are not keys.
    """
    k = tl.load(k_base + token[:, None] * stride_ks + dims[None, :] * stride_kd)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where((start + tl.arange(0, BLOCK_N) < total)[None, :], s, float("-inf"))
    p, alpha, m_new, l_i = online_softmax_step(s, m_i, l_i, qk_scale, True)
    v = tl.load(v_base + token[:, None] * stride_vs + dims[None, :] * stride_vd)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _varlen_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, q_perm_ptr,
    tile_cluster_ptr, tile_row_ptr, q_off_ptr, total_ptr, starts_ptr, rows_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_qpb, stride_qph, stride_qps,
    bh_start, num_heads, num_q_clusters, num_tiles, s_q, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PERMUTE_Q: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (tile slot, batch * head of the group): BLOCK_M rows of one q cluster over its kept keys.

    q, k, v and O have any strides; LSE is contiguous fp32 (B, H, S_q). PERMUTE_Q: cluster-order
    row ``r`` is token ``q_perm[r]`` of q, O and LSE (rows are gathered and results scattered by
    token). The kept keys' k / v rows (from ``rows_ptr + starts[list]``) and their number come from
    :func:`_kept_rows_kernel`. Tile
    slots whose table entry is ``num_q_clusters`` (the surplus of the upper-bound grid) exit at once.
    """
    tile = tl.program_id(0)
    local = tl.program_id(1)
    bh = local + bh_start
    table = local.to(tl.int64) * num_tiles + tile
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
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + q_tokens[:, None] * stride_qs + dims[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        kept = local.to(tl.int64) * num_q_clusters + cluster
        total = tl.load(total_ptr + kept)
        kept_rows = rows_ptr + tl.load(starts_ptr + kept)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        n_full = (total // BLOCK_N) * BLOCK_N
        for start in range(0, n_full, BLOCK_N):
            token = tl.load(kept_rows + start + tl.arange(0, BLOCK_N))
            m_i, l_i, acc = _attend_tile(q, k_base, v_base, token, stride_ks, stride_kd, stride_vs, stride_vd,
                                         start, total, qk_scale, m_i, l_i, acc, dims, BLOCK_N, False, DOT_PRECISION)
        if n_full < total:
            pos = n_full + tl.arange(0, BLOCK_N)
            token = tl.load(kept_rows + pos, mask=pos < total, other=0)
            m_i, l_i, acc = _attend_tile(q, k_base, v_base, token, stride_ks, stride_kd, stride_vs, stride_vd,
                                         n_full, total, qk_scale, m_i, l_i, acc, dims, BLOCK_N, True, DOT_PRECISION)
        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_rows = o_ptr + b * stride_ob + h * stride_oh + q_tokens[:, None] * stride_os
        tl.store(o_rows + dims[None, :] * stride_od, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(lse_ptr + bh.to(tl.int64) * s_q + q_tokens, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------
# Launch
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeptRowsPlan:
    """Where the kept-rows lists of a call lie, launch group by launch group.

    ``groups``: each launch group's first (batch, head) pair and number of pairs, in order; ``starts`` int64:
    the first int32 element of each group-local (pair, q cluster) list, for every pair ``(B * H * NQC,)``,
    or, when ``shared``, ``(G * NQC,)`` for the largest group and the same in every group; ``size``: int32
    elements of the buffer the largest group uses.
    """

    groups: tuple[tuple[int, int], ...]
    starts: Tensor
    size: int
    shared: bool

    def group_starts(self, first: int, pairs: int, nqc: int) -> Tensor:
        """The ``starts`` of the lists of pairs ``first .. first + pairs - 1``, ``(pairs * NQC,)``."""
        return self.starts[: pairs * nqc] if self.shared else self.starts[first * nqc: (first + pairs) * nqc]


def ragged_groups(pair_rows: list[int], budget_rows: int) -> tuple[tuple[int, int], ...]:
    """Consecutive ``(first pair, pairs)`` groups whose ``pair_rows`` sum to at most ``budget_rows`` each (a pair
    over it forms a group alone): as few groups as packing each one full needs, with the largest group's sum
    as small as that many groups allow (so the last group is not left nearly empty)."""
    groups = _packed_groups(pair_rows, budget_rows)
    if not groups or max(pair_rows) > budget_rows:
        return groups
    low, high = max(max(pair_rows), -(-sum(pair_rows) // len(groups))), budget_rows
    while low < high:  # the smallest cap that packs into as few groups
        cap = (low + high) // 2
        low, high = (low, cap) if len(_packed_groups(pair_rows, cap)) <= len(groups) else (cap + 1, high)
    return _packed_groups(pair_rows, low)


def _packed_groups(pair_rows: list[int], cap: int) -> tuple[tuple[int, int], ...]:
    """Consecutive groups, each filled with pairs while their ``pair_rows`` sum stays within ``cap``."""
    groups, first, used = [], 0, 0
    for pair, rows in enumerate(pair_rows):
        if pair > first and used + rows > cap:
            groups.append((first, pair - first))
            first, used = pair, 0
        used += rows
    if pair_rows:
        groups.append((first, len(pair_rows) - first))
    return tuple(groups)


def _flat_offsets(offsets: Tensor) -> Tensor:
    """Expanded ``(B, H, N + 1)`` offsets as a contiguous int32 ``(B * H, N + 1)``."""
    return offsets.reshape(-1, offsets.shape[-1]).contiguous()


def rows_budget_bytes(q: Tensor) -> int:
    """Bytes the kept-rows buffer of a call on q ``(B, H, S_q, D)`` may take: :data:`ROWS_BUDGET_SHARE`
    of its output's, ``B * H * S_q * D`` elements of q's dtype."""
    return int(ROWS_BUDGET_SHARE * q.numel() * q.element_size())


def kept_rows_plan(
    layout: VarlenLayout,
    s_k: int,
    budget_bytes: int,
    *,
    kept_keys: Tensor | None = None,
    max_kept_keys: int | None = None,
    kept_rows_total: int | None = None,
    pair_kept_rows: list[int] | None = None,
) -> KeptRowsPlan:
    """The kept-rows buffer of a call with ``layout`` (``(B, H, ...)``) and ``s_k`` keys; no host sync.

    Ragged when ``kept_rows_total`` (a bound of the kept keys of all q clusters together) is given and
    ``4 * kept_rows_total`` fits ``budget_bytes``: one group of every pair, each list right after the
    previous one, at the exclusive cumsum of ``kept_keys`` ``(B, H, NQC)`` (each q cluster's kept keys;
    computed from the layout when ``None``). Else, with ``pair_kept_rows`` (a bound of each (batch, head)
    pair's kept keys, ``B * H`` ints), ragged in groups: consecutive pairs whose bounds fit the budget
    together (:func:`ragged_groups`), each pair's lists after the kept keys of the pairs before it in its group
    (device arithmetic only, so the plan is CUDA-graph capturable).
    Else padded: ``max_kept_keys`` (default ``S_k``) elements per list and as many pairs per group as fit
    the budget (at least one); a pair's bound never exceeds its padded room, so ragged groups hold at least
    as many pairs.
    """
    b, h, nqc, _ = layout.indices.shape
    pairs, device = b * h, layout.indices.device
    if kept_rows_total is not None and 4 * kept_rows_total <= budget_bytes:
        kept = (varlen_kept_keys(layout) if kept_keys is None else kept_keys).reshape(-1)
        return KeptRowsPlan(((0, pairs),), kept.cumsum(0, dtype=torch.int64) - kept, kept_rows_total, shared=False)
    if pair_kept_rows is not None:
        groups = ragged_groups(pair_kept_rows, budget_bytes // 4)
        kept = (varlen_kept_keys(layout) if kept_keys is None else kept_keys).reshape(pairs, nqc).long()
        pair_kept = kept.sum(1)
        bases = [pair_kept[first:first + count].cumsum(0) - pair_kept[first:first + count] for first, count in groups]
        starts = (torch.cat(bases) if bases else pair_kept)[:, None] + kept.cumsum(1) - kept
        size = max(sum(pair_kept_rows[first:first + count]) for first, count in groups) if groups else 0
        return KeptRowsPlan(groups, starts.reshape(-1), size, shared=False)
    rows_stride = s_k if max_kept_keys is None else max(1, min(s_k, max_kept_keys))
    group = launch_group_size(pairs, nqc * rows_stride * 4, budget_bytes)
    starts = torch.arange(group * nqc, dtype=torch.int64, device=device) * rows_stride
    groups = tuple((first, min(group, pairs - first)) for first in range(0, pairs, group))
    return KeptRowsPlan(groups, starts, group * nqc * rows_stride, shared=True)


def _kept_rows(layout: VarlenLayout, kv_off: Tensor, starts: Tensor, bh_start: int, group: int, rows: Tensor) -> Tensor:
    """Run the prep kernel over every q cluster of (batch, head) pairs ``bh_start .. bh_start + group - 1``,
    writing each (pair, q cluster) list from ``rows[starts[list]]`` (``starts`` int64 ``(group * NQC,)``,
    each list's room at least its kept keys, else the positions past ``rows`` are dropped); returns the kept
    keys per q cluster (those written, where ``rows`` ends inside a list), int32 ``(group, NQC)``."""
    _, h, nqc, _ = layout.indices.shape
    total = torch.empty((group, nqc), dtype=torch.int32, device=kv_off.device)
    if nqc > 0:
        _kept_rows_kernel[(nqc, group)](
            layout.counts, layout.indices, kv_off, layout.kv_perm, total, starts, rows,
            *layout.counts.stride(), *layout.indices.stride(), *permutation_strides(layout.kv_perm),
            bh_start, h, nqc, layout.num_kv_clusters, rows.numel(),
            SLOTS=KEPT_ROWS_SLOTS, KEYS=KEPT_ROWS_KEYS, PERMUTE_KV=layout.kv_perm is not None,
        )  # fmt: skip
    return total


@dataclass(frozen=True)
class _PreparedCall:
    """A checked call: its expanded layout, the O and LSE buffers, the flat q and kv offsets, and the
    kept-rows plan with its buffer."""

    layout: VarlenLayout
    out: Tensor
    lse: Tensor
    q_off: Tensor
    kv_off: Tensor
    plan: KeptRowsPlan
    rows: Tensor

    def kept_row_groups(self) -> Iterator[tuple[int, int, Tensor, Tensor]]:
        """Per launch group: its first (batch, head) pair, its pairs, its kept keys per q cluster (int32
        ``(G, NQC)``) once the prep kernel has written its lists, and where its lists start (int64 ``(G * NQC,)``)."""
        nqc = self.layout.num_q_clusters
        for bh_start, size in self.plan.groups:
            starts = self.plan.group_starts(bh_start, size, nqc)
            yield bh_start, size, _kept_rows(self.layout, self.kv_off, starts, bh_start, size, self.rows), starts


def _prepare_call(
    q: Tensor, k: Tensor, v: Tensor, layout_args: tuple[Tensor, ...], q_perm: Tensor | None, kv_perm: Tensor | None,
    out: Tensor | None, lse_out: Tensor | None, max_kept_keys: int | None, kept_keys: Tensor | None,
    kept_rows_total: int | None, pair_kept_rows: list[int] | None,
) -> _PreparedCall:  # fmt: skip
    """Check a call's inputs and buffers (default O token-major, LSE contiguous fp32) and plan its kept rows."""
    layout = validate_varlen_inputs(q, k, v, *layout_args, q_perm, kv_perm)
    kept_keys = validate_kept_rows_args(layout, kept_keys, max_kept_keys, kept_rows_total, pair_kept_rows)
    b, h, s_q, d = q.shape
    out = attention_output_like(q, v) if out is None else out
    lse_out = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device) if lse_out is None else lse_out
    check_strided_out_buffer("out", out, (b, h, s_q, d), q.dtype, q.device)
    check_out_buffer("lse_out", lse_out, (b, h, s_q), torch.float32, q.device)
    plan = kept_rows_plan(layout, k.shape[2], rows_budget_bytes(q), kept_keys=kept_keys, max_kept_keys=max_kept_keys,
                          kept_rows_total=kept_rows_total, pair_kept_rows=pair_kept_rows)  # fmt: skip
    rows = torch.empty(max(plan.size, 1), dtype=torch.int32, device=q.device)
    return _PreparedCall(layout, out, lse_out, _flat_offsets(layout.q_offsets), _flat_offsets(layout.kv_offsets), plan,
                         rows)  # fmt: skip


def _launches(config: VarlenConfig) -> list[tuple[bool, TileConfig]]:
    """The main launch's tile and, when ``config`` has one, the tail launch's: ``(is_tail, tile)``."""
    launches = [(False, TileConfig(config.block_m, config.block_n, config.num_warps, config.num_stages))]
    if config.tail_block_m:
        launches.append((True, TileConfig(config.tail_block_m, config.tail_block_n or config.block_n,
                                          config.tail_num_warps, config.tail_num_stages or config.num_stages)))  # fmt: skip
    return launches


@dataclass(frozen=True)
class _GroupTables:
    """One launch group's prep results: its first (batch, head) pair and pairs, its kept keys per q cluster
    (int32 ``(G, NQC)``), where its lists start (int64 ``(G * NQC,)``) and its main (and tail) tile tables."""

    bh_start: int
    size: int
    total: Tensor
    starts: Tensor
    main: tuple[Tensor, Tensor]
    tail: tuple[Tensor, Tensor] | None


def _group_tables(call: _PreparedCall, s_q: int, config: VarlenConfig) -> Iterator[_GroupTables]:
    """Per launch group: the prep kernel, then the tile tables."""
    for bh_start, size, total, starts in call.kept_row_groups():
        main, tail = tile_tables(call.q_off, total, bh_start, s_q, config.block_m, config.tail_block_m)
        yield _GroupTables(bh_start, size, total, starts, main, tail)


def _kernel_q_perm(q: Tensor, call: _PreparedCall, gluon: bool) -> Tensor | None:
    """The q permutation the attention kernel reads: the call's, or for the Gluon kernel the identity without one."""
    b, h, s_q, _ = q.shape
    q_perm = call.layout.q_perm
    return token_order(q_perm, b, h, s_q, q.device) if gluon and q_perm is None else q_perm


def _attend_group(
    q: Tensor, k: Tensor, v: Tensor, call: _PreparedCall, group: _GroupTables, config: VarlenConfig, scale: float,
    gluon: bool, q_perm: Tensor | None,
) -> None:  # fmt: skip
    """The main (and tail) launches of the Gluon or the Triton attention kernel over one launch group, reading q
    through ``q_perm`` (:func:`_kernel_q_perm`)."""
    out, lse_out, layout = call.out, call.lse, call.layout
    _, h, s_q, d = q.shape
    for is_tail, tile in _launches(config):
        tile_cluster, tile_row = group.tail if is_tail else group.main
        num_tiles = tile_cluster.shape[1]
        if gluon:
            launch_gluon_varlen(q, k, v, out, lse_out, q_perm, tile_cluster, tile_row, call.q_off, group.total,
                                group.starts, call.rows, group.bh_start, group.size, scale, tile)  # fmt: skip
            continue
        _varlen_fwd_kernel[(num_tiles, group.size)](
            q, k, v, out, lse_out, q_perm,
            tile_cluster, tile_row, call.q_off, group.total, group.starts, call.rows,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *permutation_strides(q_perm),
            group.bh_start, h, layout.num_q_clusters, num_tiles, s_q, scale * LOG2E,
            HEAD_DIM=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, PERMUTE_Q=q_perm is not None,
            DOT_PRECISION=dot_precision(q.dtype),
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )  # fmt: skip


def _attend_groups(
    q: Tensor, k: Tensor, v: Tensor, call: _PreparedCall, groups: Iterable[_GroupTables], config: VarlenConfig,
    scale: float, gluon: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The attention kernel over each launch group of ``groups`` in turn (:func:`_attend_group`); returns the
    call's (O, LSE)."""
    q_perm = _kernel_q_perm(q, call, gluon)
    for group in groups:
        _attend_group(q, k, v, call, group, config, scale, gluon, q_perm)
    return call.out, call.lse


def _is_empty(call: _PreparedCall) -> bool:
    """Whether the call has nothing to write (no output and no LSE elements)."""
    return call.out.numel() == 0 and call.lse.numel() == 0


def _default_config(q: Tensor, call: _PreparedCall, gluon: bool) -> VarlenConfig:
    """The tiles a call runs without a ``config``: :data:`~sparse_compile.kernels.tile_configs.GLUON_VARLEN_CONFIG`
    for the Gluon kernel, else :func:`~sparse_compile.kernels.tile_configs.varlen_config` of its shape and device."""
    if gluon:
        return GLUON_VARLEN_CONFIG
    return varlen_config(q.shape[2], call.layout.num_q_clusters, q.shape[-1], q.element_size(),
                         max_shared_memory(q.device))  # fmt: skip


def _run_call(
    q: Tensor, k: Tensor, v: Tensor, call: _PreparedCall, config: VarlenConfig, scale: float, gluon: bool
) -> tuple[Tensor, Tensor]:
    """Per launch group: the prep kernel, the tile tables, then the main (and tail) launches of the Gluon or the
    Triton attention kernel. An empty call launches nothing."""
    if _is_empty(call):
        return call.out, call.lse
    return _attend_groups(q, k, v, call, _group_tables(call, q.shape[2], config), config, scale, gluon)


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
    max_kept_keys: int | None = None,
    kept_keys: Tensor | None = None,
    kept_rows_total: int | None = None,
    pair_kept_rows: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); returns (O, LSE).

    Arguments as :func:`varlen_block_sparse_attention`; D must be one of ``SUPPORTED_HEAD_DIMS``; q, k,
    v are read through their strides (no copies). ``config`` fixes the tile shape (default
    :func:`~sparse_compile.kernels.tile_configs.varlen_config`). ``out`` ``(B, H, S_q, D)`` in q's dtype with any non-overlapping strides
    (default: a new token-major tensor) and ``lse_out`` ``(B, H, S_q)`` contiguous fp32 are optional
    buffers; every element is written. ``max_kept_keys``, ``kept_keys`` and ``kept_rows_total`` size the
    kept-rows buffer (:func:`kept_rows_plan`); values that understate the kept keys are undefined
    behaviour. Layout, permutation and bound values are not checked (no host sync):
    :func:`check_varlen_layout_values` and :func:`check_kept_rows_values` do that.
    """
    d = q.shape[-1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS} on the Triton path, got {d}")
    layout_args = (q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices)
    call = _prepare_call(q, k, v, layout_args, q_perm, kv_perm, out, lse_out, max_kept_keys, kept_keys,
                         kept_rows_total, pair_kept_rows)  # fmt: skip
    config = config or _default_config(q, call, gluon=False)
    return _run_call(q, k, v, call, config, default_scale(d, scale), gluon=False)


def varlen_block_sparse_attention_gluon(
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
    max_kept_keys: int | None = None,
    kept_keys: Tensor | None = None,
    kept_rows_total: int | None = None,
    pair_kept_rows: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the Gluon cluster kernel (sm_90; :mod:`~sparse_compile.kernels.gluon_varlen_block_sparse`) with the
    Triton prep kernels; returns (O, LSE). Arguments as :func:`varlen_block_sparse_attention_triton`; ``config``
    defaults to :data:`~sparse_compile.kernels.tile_configs.GLUON_VARLEN_CONFIG` (block_m 64 or 128 per launch).
    Raises ``ValueError`` with the reason when the kernel cannot take the call
    (:func:`~sparse_compile.kernels.gluon_varlen_block_sparse.gluon_varlen_ineligibility`)."""
    layout_args = (q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices)
    call = _prepare_call(q, k, v, layout_args, q_perm, kv_perm, out, lse_out, max_kept_keys, kept_keys,
                         kept_rows_total, pair_kept_rows)  # fmt: skip
    reason = gluon_varlen_ineligibility(q, k, v, cuda_capability(q), call.out)
    if reason is not None:
        raise ValueError(reason)
    config = config or _default_config(q, call, gluon=True)
    return _run_call(q, k, v, call, config, default_scale(q.shape[-1], scale), gluon=True)


def varlen_kernel_choice(q: Tensor, k: Tensor, v: Tensor, capability: tuple[int, int] | None = None) -> str:
    """Which implementation the op runs for valid inputs: ``"gluon"``, ``"triton"`` or ``"reference"``.

    On a CUDA device of ``capability`` (default: q's device's): the Gluon kernel when it takes the call (the
    op's O is token-major, a unit last stride), else the Triton kernel. Off CUDA: the Triton kernel under
    Triton's interpreter, else the reference.
    """
    capability = cuda_capability(q) if capability is None else capability
    if capability is None:
        return "triton" if interpreter_active() else "reference"
    if gluon_varlen_ineligibility(q, k, v, capability) is None:
        return "gluon"
    return "triton"


@dataclass(frozen=True)
class StagedVarlenCall:
    """A cluster-kernel call whose prep kernels ran before its caller read the kept keys
    (:func:`stage_varlen_call`); :func:`run_staged_call` launches its attention kernel. ``capacity``: the
    kept-rows buffer's elements; the staged lists are whole only when all q clusters' kept keys fit it."""

    call: _PreparedCall
    groups: tuple[_GroupTables, ...]
    config: VarlenConfig
    scale: float
    gluon: bool
    geometry: tuple[tuple[torch.Size, tuple[int, ...]], ...]

    @property
    def capacity(self) -> int:
        return self.call.rows.numel()


def stage_varlen_call(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_cluster_offsets: Tensor,
    kv_cluster_offsets: Tensor,
    kv_cluster_counts: Tensor,
    kv_cluster_indices: Tensor,
    *,
    kept_keys: Tensor,
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
    scale: float | None = None,
) -> StagedVarlenCall | None:
    """The first half of :func:`varlen_block_sparse_attention` (same arguments, ``return_lse``), launched
    before the caller knows the kept-key bounds, so it needs no host read: the prep kernel writes every
    (batch, head) pair's lists back to back (at the exclusive cumsum of ``kept_keys``) into one buffer of
    :func:`rows_budget_bytes`, dropping positions past it, and the tile tables follow. Once the caller has
    read that all q clusters' kept keys fit ``capacity``, :func:`run_staged_call` gives what the op gives;
    otherwise its lists are cut short (the kernels read only what was written) and its result is not the
    op's: drop it (it holds the buffer: free it before calling the op).
    ``None`` where the op runs its reference (off CUDA without Triton's interpreter)."""
    kernel = varlen_kernel_choice(q, k, v)
    if kernel == "reference":
        return None
    layout_args = (q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices)
    capacity = rows_budget_bytes(q) // 4
    call = _prepare_call(q, k, v, layout_args, q_perm, kv_perm, None, None, None, kept_keys, capacity, None)
    gluon = kernel == "gluon"
    config = _default_config(q, call, gluon)
    groups = () if _is_empty(call) else tuple(_group_tables(call, q.shape[2], config))
    return StagedVarlenCall(call, groups, config, default_scale(q.shape[-1], scale), gluon, _geometry(q, k, v))


def _geometry(*tensors: Tensor) -> tuple[tuple[torch.Size, tuple[int, ...]], ...]:
    """Each tensor's shape and strides."""
    return tuple((t.shape, t.stride()) for t in tensors)


def run_staged_call(staged: StagedVarlenCall, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The attention kernel of a staged call on q, k, v of the shapes and strides it was staged with (its
    prep depends on the layout only): (O token-major ``(B, H, S_q, D)``, LSE fp32 ``(B, H, S_q)``), as
    :func:`varlen_block_sparse_attention` gives them when all q clusters' kept keys fit ``staged.capacity``
    (else the lists cut at the buffer's end: safe to run before the caller knows, then dropped)."""
    if _geometry(q, k, v) != staged.geometry:
        raise ValueError("run_staged_call takes the q, k and v the call was staged with (shapes and strides)")
    return _attend_groups(q, k, v, staged.call, staged.groups, staged.config, staged.scale, staged.gluon)


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
    max_kept_keys: int | None = None,
    kept_keys: Tensor | None = None,
    kept_rows_total: int | None = None,
    pair_kept_rows: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Custom op: (O token-major (B, H, S_q, D) in q's dtype, LSE contiguous fp32 (B, H, S_q))."""
    layout_args = (q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices)
    if q.is_cuda:
        gluon = varlen_kernel_choice(q, k, v) == "gluon"
        run = varlen_block_sparse_attention_gluon if gluon else varlen_block_sparse_attention_triton
        return run(q, k, v, *layout_args, q_perm=q_perm, kv_perm=kv_perm, scale=scale, max_kept_keys=max_kept_keys,
                   kept_keys=kept_keys, kept_rows_total=kept_rows_total, pair_kept_rows=pair_kept_rows)
    layout = validate_varlen_inputs(q, k, v, *layout_args, q_perm, kv_perm)
    kept_keys = validate_kept_rows_args(layout, kept_keys, max_kept_keys, kept_rows_total, pair_kept_rows)
    check_varlen_layout_values(layout, q.shape[2], k.shape[2])
    check_kept_rows_values(layout, kept_keys, max_kept_keys, kept_rows_total, pair_kept_rows)
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
    max_kept_keys: int | None = None,
    kept_keys: Tensor | None = None,
    kept_rows_total: int | None = None,
    pair_kept_rows: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    layout = validate_varlen_inputs(
        q, k, v, q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices, q_perm, kv_perm
    )
    validate_kept_rows_args(layout, kept_keys, max_kept_keys, kept_rows_total, pair_kept_rows)
    b, h, s_q, _ = q.shape
    return attention_output_like(q, v), q.new_empty((b, h, s_q), dtype=torch.float32)


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
    max_kept_keys: int | None = None,
    kept_keys: Tensor | None = None,
    kept_rows_total: int | None = None,
    pair_kept_rows: list[int] | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Cluster-sparse attention through the ``sparse_compile::varlen_block_sparse_attention`` op.

    q ``(B, H, S_q, D)``, k/v ``(B, H, S_k, D)``, fp16/bf16/fp32, any strides: in cluster order, or in
    token order with the permutations ``q_perm`` ``(B, H, S_q)`` / ``kv_perm`` ``(B, H, S_k)`` (int32
    or int64; row ``i`` of cluster order is token ``perm[b, h, i]``), which the kernel folds into its
    loads and stores. ``q_cluster_offsets`` int32 ``(B, H, NQC + 1)``, ``kv_cluster_offsets`` int32
    ``(B, H, NKC + 1)``, ``kv_cluster_counts`` int32 ``(B, H, NQC)``, ``kv_cluster_indices`` int32
    ``(B, H, NQC, MAXK)`` (batch/head dims of the layout and permutations may be 1); ``scale``
    defaults to 1/sqrt(D). Returns O ``(B, H, S_q, D)`` in q's dtype, token-major
    (:func:`attention_output_like`), in q's row order, plus the fp32 natural-log LSE ``(B, H, S_q)``
    when ``return_lse``. What the caller knows of the kept keys (the host learns it only by reading
    the selection) shrinks the GPU kernel's kept-rows buffer, so more (batch, head) pairs share a
    launch (:func:`kept_rows_plan`): ``max_kept_keys``, a bound of any q cluster's kept keys;
    ``kept_rows_total``, a bound of all q clusters' kept keys together, which makes the buffer ragged;
    ``pair_kept_rows``, a bound of each (batch, head) pair's (``B * H`` ints), which keeps it ragged in
    launch groups when the total is over the budget;
    ``kept_keys`` int32/int64 ``(B or 1, H or 1, NQC)``, each q cluster's kept keys (the sizes of its
    kept kv clusters summed), saves computing them for the ragged buffer.
    Shapes are checked by the op (``ValueError``); layout, permutation and bound *values* on the CPU
    path only (:func:`check_varlen_layout_values` and :func:`check_kept_rows_values` check them
    anywhere, at the cost of a sync).
    """
    scale = default_scale(q.shape[-1], scale)
    out, lse = torch.ops.sparse_compile.varlen_block_sparse_attention(
        q, k, v, q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices, scale,
        q_perm, kv_perm, max_kept_keys, kept_keys, kept_rows_total, pair_kept_rows,
    )  # fmt: skip
    return (out, lse) if return_lse else out


__all__ = [
    "ROWS_BUDGET_SHARE",
    "KeptRowsPlan",
    "StagedVarlenCall",
    "check_kept_rows_values",
    "check_varlen_layout_values",
    "kept_rows_plan",
    "rows_budget_bytes",
    "run_staged_call",
    "stage_varlen_call",
    "validate_kept_rows_args",
    "validate_varlen_inputs",
    "varlen_block_sparse_attention",
    "varlen_block_sparse_attention_gluon",
    "varlen_block_sparse_attention_triton",
    "varlen_kernel_choice",
]
