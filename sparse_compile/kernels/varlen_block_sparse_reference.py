"""Variable-block-size (cluster) sparse attention in plain PyTorch: the specification and CPU path.

SVG2 permutes tokens so that every k-means cluster is contiguous; blocks are then clusters of
varying (possibly zero) size. A *varlen layout* is:

- ``q_cluster_offsets``  int32 ``(B, H, NQC + 1)``: q cluster ``c`` is rows ``[off[c], off[c + 1])``,
  ``off[0] = 0``, ``off[NQC] = S_q``, non-decreasing (empty clusters allowed);
- ``kv_cluster_offsets`` int32 ``(B, H, NKC + 1)``: the same for the keys (``off[NKC] = S_k``);
- ``kv_cluster_counts``  int32 ``(B, H, NQC)``: how many kv clusters q cluster ``c`` keeps;
- ``kv_cluster_indices`` int32 ``(B, H, NQC, MAXK)``: their ids, the first ``count`` valid and
  strictly ascending; entries past ``count`` are ignored.

Optional *token permutations* fold the permutation into cluster order into the attention itself,
so q, k, v and O stay in token order:

- ``q_perm`` int32/int64 ``(B, H, S_q)``: row ``i`` of cluster order is token ``q_perm[b, h, i]`` of
  q, and its output and LSE land in row ``q_perm[b, h, i]`` of O and LSE;
- ``kv_perm`` int32/int64 ``(B, H, S_k)``: row ``j`` of cluster order is token ``kv_perm[b, h, j]``
  of k and v.

Each must be a permutation of ``[0, S)`` per (batch, head). Without a permutation, cluster order is
token order. The result with permutations equals the result without them on the gathered inputs
``q[b, h, q_perm[b, h]]`` (etc.), scattered back to token order.

The batch and head dims of the layout and permutation tensors may be 1 (shared by every batch /
head). Query rows whose cluster keeps no key get output 0 and LSE ``-inf``. O is ``(B, H, S_q, D)``
laid out *token-major*, as a contiguous ``(B, S_q, H, D)``
(:func:`~sparse_compile.kernels.common.attention_output_like`): the layout attention outputs have in
this package, which diffusers transposes back to ``(B, S, H * D)`` for free.

These functions assume valid inputs: :mod:`sparse_compile.kernels.varlen_block_sparse` checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_compile.kernels.common import attention_output_like, default_scale, token_order
from sparse_compile.kernels.masked_reference import all_finite, gather_rows, grouped_attention, keep_matrix

_ROW_CHUNK = 256  # query rows per matmul of the gathered path: memory O(_ROW_CHUNK * S_k)



@dataclass(frozen=True)
class VarlenLayout:
    """The four layout tensors of a varlen layout and the optional token permutations, expanded
    (stride 0) to the full ``(B, H, ...)``."""

    q_offsets: Tensor
    kv_offsets: Tensor
    counts: Tensor
    indices: Tensor
    q_perm: Tensor | None = None
    kv_perm: Tensor | None = None

    @property
    def num_q_clusters(self) -> int:
        return self.q_offsets.shape[-1] - 1

    @property
    def num_kv_clusters(self) -> int:
        return self.kv_offsets.shape[-1] - 1


def expand_varlen_layout(
    q: Tensor,
    k: Tensor,
    q_cluster_offsets: Tensor,
    kv_cluster_offsets: Tensor,
    kv_cluster_counts: Tensor,
    kv_cluster_indices: Tensor,
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
) -> VarlenLayout:
    """The layout and permutations of a valid call viewed (stride 0) as ``(B, H, ...)``; no checks."""
    b, h = q.shape[:2]

    def expand(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.expand(b, h, *t.shape[2:])

    return VarlenLayout(
        expand(q_cluster_offsets), expand(kv_cluster_offsets), expand(kv_cluster_counts),
        expand(kv_cluster_indices), expand(q_perm), expand(kv_perm),
    )  # fmt: skip


def token_cluster_ids(offsets: Tensor, seq_len: int) -> Tensor:
    """Cluster id of every token, int64 ``(B, H, S)``, from offsets ``(B, H, NC + 1)``."""
    tokens = torch.arange(seq_len, device=offsets.device).expand(*offsets.shape[:2], seq_len).contiguous()
    return torch.searchsorted(offsets[..., 1:].contiguous(), tokens.to(offsets.dtype), right=True)


def cluster_keep_matrix(layout: VarlenLayout) -> Tensor:
    """Boolean ``(B, H, NQC, NKC)``: whether q cluster i keeps kv cluster j."""
    return keep_matrix(layout.counts, layout.indices, layout.num_kv_clusters)


def varlen_layout_to_dense_mask(layout: VarlenLayout, s_q: int, s_k: int) -> Tensor:
    """Boolean keep-mask ``(B, H, S_q, S_k)`` of a layout (True = attend). O(S_q * S_k): small tests only."""
    keep = cluster_keep_matrix(layout)
    q_ids = token_cluster_ids(layout.q_offsets, s_q)  # (B, H, S_q)
    kv_ids = token_cluster_ids(layout.kv_offsets, s_k)  # (B, H, S_k)
    rows = torch.gather(keep, 2, q_ids.unsqueeze(-1).expand(*q_ids.shape, keep.shape[-1]))
    return torch.gather(rows, 3, kv_ids.unsqueeze(2).expand(*rows.shape[:3], s_k))


def kept_kv_tokens(kv_sizes: Tensor, counts: Tensor, indices: Tensor) -> Tensor:
    """Tokens in the kept kv blocks (or clusters) of every row of a CSR layout, int32 ``(B, H, NQ)``.

    ``kv_sizes`` integer ``(B, H, NK)``, ``counts`` ``(B, H, NQ)``, ``indices`` ``(B, H, NQ, M)``;
    index slots past a row's count are ignored, whatever they hold.
    """
    b, h, nq, m = indices.shape
    padded_sizes = torch.nn.functional.pad(kv_sizes.long(), (0, 1))  # ignored slots read the extra 0
    valid = torch.arange(m, device=indices.device) < counts.unsqueeze(-1)
    ids = torch.where(valid, indices.long(), kv_sizes.shape[-1]).reshape(b, h, nq * m)
    return torch.gather(padded_sizes, 2, ids).reshape(b, h, nq, m).sum(-1, dtype=torch.int32)


def varlen_kept_keys(layout: VarlenLayout) -> Tensor:
    """Kept key tokens per q cluster, int64 ``(B, H, NQC)``: total size of the kv clusters it keeps."""
    kv_sizes = layout.kv_offsets[..., 1:] - layout.kv_offsets[..., :-1]
    return kept_kv_tokens(kv_sizes, layout.counts, layout.indices).long()


def varlen_kept_pairs(layout: VarlenLayout) -> Tensor:
    """Kept (query, key) token pairs per head, int64 ``(B, H)``; divide by ``S_q * S_k`` for the density."""
    q_sizes = (layout.q_offsets[..., 1:] - layout.q_offsets[..., :-1]).long()
    return (q_sizes * varlen_kept_keys(layout)).sum(-1)


def _attend_rows(q_rows: Tensor, k_sel: Tensor, v_sel: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Dense fp32 attention of ``q_rows (R, D)`` over the gathered keys; returns (O (R, D), LSE (R,))."""
    scores = torch.matmul(q_rows.float(), k_sel.transpose(0, 1)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), v_sel), lse


def varlen_block_sparse_attention_reference(
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
    """Cluster-sparse attention in plain PyTorch (no O(S_q * S_k) buffer).

    q ``(B, H, S_q, D)`` and k/v ``(B, H, S_k, D)``, any strides: in cluster order, or in token order
    with ``q_perm`` ``(B, H, S_q)`` / ``kv_perm`` ``(B, H, S_k)``; the layout and permutations as in
    the module docstring (valid: not checked here). Returns O ``(B, H, S_q, D)`` in q's dtype,
    token-major (:func:`attention_output_like`) and, with ``return_lse``, the fp32 natural-log LSE ``(B, H, S_q)``
    (contiguous) of ``scale * q . k`` over the kept keys; both in q's row order. Finite inputs run as
    masked softmax over chunks of rows (:func:`~sparse_compile.kernels.masked_reference.grouped_attention`);
    others as the definition, each q cluster over its kept keys gathered (:func:`_gathered_reference`).
    """
    layout = expand_varlen_layout(
        q, k, q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices, q_perm, kv_perm
    )
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    if not all_finite(q, k, v):
        return _gathered_reference(q, k, v, layout, default_scale(d, scale), return_lse)
    q_tokens = token_order(layout.q_perm, b, h, s_q, q.device)
    kv_tokens = token_order(layout.kv_perm, b, h, s_k, q.device)
    rows_out, rows_lse = grouped_attention(
        gather_rows(q, q_tokens).float(), gather_rows(k, kv_tokens).float(), gather_rows(v, kv_tokens).float(),
        cluster_keep_matrix(layout), token_cluster_ids(layout.q_offsets, s_q), token_cluster_ids(layout.kv_offsets, s_k),
        default_scale(d, scale),
    )  # fmt: skip
    out = attention_output_like(q, v)
    out.scatter_(2, q_tokens.unsqueeze(-1).expand(b, h, s_q, v.shape[-1]), rows_out.to(q.dtype))
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device).scatter_(2, q_tokens, rows_lse)
    return (out, lse) if return_lse else out


def _gathered_reference(q: Tensor, k: Tensor, v: Tensor, layout: VarlenLayout, scale: float, return_lse: bool):
    """The definition, one (batch, head, q cluster) at a time over its kept keys gathered: only they take
    part, whatever the other keys hold (so non-finite values elsewhere do not leak in)."""
    b, h, s_q, _ = q.shape
    s_k = k.shape[2]
    out = attention_output_like(q, v).zero_()
    lse = torch.full((b, h, s_q), float("-inf"), dtype=torch.float32, device=q.device)
    keep = cluster_keep_matrix(layout)
    kv_ids = token_cluster_ids(layout.kv_offsets, s_k)
    q_tokens = token_order(layout.q_perm, b, h, s_q, q.device)
    kv_tokens = token_order(layout.kv_perm, b, h, s_k, q.device)
    for bi in range(b):
        for hi in range(h):
            bounds = layout.q_offsets[bi, hi].tolist()
            k_f, v_f = k[bi, hi].float(), v[bi, hi].float()
            for c in range(layout.num_q_clusters):
                kept = keep[bi, hi, c][kv_ids[bi, hi]].nonzero().squeeze(1)
                if kept.numel() == 0:
                    continue
                tokens = kv_tokens[bi, hi, kept]
                k_sel, v_sel = k_f[tokens], v_f[tokens]
                for r0 in range(bounds[c], bounds[c + 1], _ROW_CHUNK):
                    rows = q_tokens[bi, hi, r0 : min(r0 + _ROW_CHUNK, bounds[c + 1])]
                    o_rows, lse_rows = _attend_rows(q[bi, hi, rows], k_sel, v_sel, scale)
                    out[bi, hi, rows] = o_rows.to(q.dtype)
                    lse[bi, hi, rows] = lse_rows
    return (out, lse) if return_lse else out
