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
laid out *token-major*, as a contiguous ``(B, S_q, H, D)`` (:func:`token_major_like`): the layout
attention outputs have in this package, which diffusers transposes back to ``(B, S, H * D)`` for free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PERMUTATION_DTYPES = (torch.int32, torch.int64)
_ROW_CHUNK = 256  # query rows per matmul in the reference: memory O(_ROW_CHUNK * S_k)


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


def token_major_like(q: Tensor) -> Tensor:
    """Uninitialised ``(B, H, S, D)`` tensor in q's dtype and device, laid out as a contiguous ``(B, S, H, D)``."""
    b, h, s, d = q.shape
    return q.new_empty((b, s, h, d)).transpose(1, 2)


def _expand(
    t: Tensor, name: str, b: int, h: int, tail_dims: int, dtypes: tuple[torch.dtype, ...] = (torch.int32,)
) -> Tensor:
    """``t`` (one of ``dtypes``, ``(B or 1, H or 1, *tail)``) expanded to ``(B, H, *tail)``."""
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}, got {t.dtype}")
    if t.dim() != 2 + tail_dims:
        raise ValueError(f"{name} must have {2 + tail_dims} dims (B, H, ...), got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, b) or t.shape[1] not in (1, h):
        raise ValueError(f"{name} must have batch/head dims ({b} or 1, {h} or 1), got shape {tuple(t.shape)}")
    return t.expand(b, h, *t.shape[2:])


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
    q_off = _expand(q_cluster_offsets, "q_cluster_offsets", b, h, 1)
    kv_off = _expand(kv_cluster_offsets, "kv_cluster_offsets", b, h, 1)
    if q_off.shape[-1] < 1 or kv_off.shape[-1] < 1:
        raise ValueError("cluster offsets need at least one entry (NC + 1 >= 1)")
    nqc = q_off.shape[-1] - 1
    counts = _expand(kv_cluster_counts, "kv_cluster_counts", b, h, 1)
    if counts.shape[-1] != nqc:
        raise ValueError(f"kv_cluster_counts must have NQC = {nqc} entries per head, got {counts.shape[-1]}")
    indices = _expand(kv_cluster_indices, "kv_cluster_indices", b, h, 2)
    if indices.shape[2] != nqc:
        raise ValueError(f"kv_cluster_indices must be (B, H, NQC={nqc}, MAXK), got {tuple(kv_cluster_indices.shape)}")
    q_perm = _expand_permutation(q_perm, "q_perm", b, h, q.shape[2])
    kv_perm = _expand_permutation(kv_perm, "kv_perm", b, h, k.shape[2])
    return VarlenLayout(q_off, kv_off, counts, indices, q_perm, kv_perm)


def _expand_permutation(perm: Tensor | None, name: str, b: int, h: int, seq: int) -> Tensor | None:
    """``perm`` (int32/int64 ``(B or 1, H or 1, seq)``) expanded to ``(B, H, seq)``; ``None`` stays ``None``."""
    if perm is None:
        return None
    expanded = _expand(perm, name, b, h, 1, PERMUTATION_DTYPES)
    if expanded.shape[-1] != seq:
        raise ValueError(f"{name} must have {seq} entries per head (the sequence length), got {perm.shape[-1]}")
    return expanded


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
    for name, perm in (("q_perm", layout.q_perm), ("kv_perm", layout.kv_perm)):
        if perm is not None and not torch.equal(perm.sort(-1).values, _identity(perm)):
            raise ValueError(f"{name} must be a permutation of [0, S) for every (batch, head)")


def _identity(perm: Tensor) -> Tensor:
    """The identity permutation in ``perm``'s shape ``(B, H, S)`` and dtype."""
    return torch.arange(perm.shape[-1], dtype=perm.dtype, device=perm.device).expand_as(perm)


def token_cluster_ids(offsets: Tensor, seq_len: int) -> Tensor:
    """Cluster id of every token, int64 ``(B, H, S)``, from offsets ``(B, H, NC + 1)``."""
    tokens = torch.arange(seq_len, device=offsets.device).expand(*offsets.shape[:2], seq_len).contiguous()
    return torch.searchsorted(offsets[..., 1:].contiguous(), tokens.to(offsets.dtype), right=True)


def cluster_keep_matrix(layout: VarlenLayout) -> Tensor:
    """Boolean ``(B, H, NQC, NKC)``: whether q cluster i keeps kv cluster j."""
    nkc = layout.num_kv_clusters
    maxk = layout.indices.shape[-1]
    valid = torch.arange(maxk, device=layout.counts.device) < layout.counts.unsqueeze(-1)
    idx = torch.where(valid, layout.indices.long(), nkc)  # invalid slots land in a dropped column
    keep = torch.zeros((*layout.counts.shape, nkc + 1), dtype=torch.bool, device=idx.device)
    return keep.scatter_(-1, idx, True)[..., :nkc]


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


def _token_order(perm: Tensor | None, b: int, h: int, seq: int, device: torch.device) -> Tensor:
    """Token of every cluster-order row, int64 ``(B, H, seq)``: ``perm``, or the identity without one."""
    if perm is None:
        return torch.arange(seq, device=device).expand(b, h, seq)
    return perm.long()


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
    """Cluster-sparse attention, one (batch, head, q cluster) at a time (no O(S_q * S_k) buffer).

    q ``(B, H, S_q, D)`` and k/v ``(B, H, S_k, D)``, any strides: in cluster order, or in token order
    with ``q_perm`` ``(B, H, S_q)`` / ``kv_perm`` ``(B, H, S_k)``; the layout and permutations as in
    the module docstring (values are checked). Returns O ``(B, H, S_q, D)`` in q's dtype, token-major
    (:func:`token_major_like`) and, with ``return_lse``, the fp32 natural-log LSE ``(B, H, S_q)``
    (contiguous) of ``scale * q . k`` over the kept keys; both in q's row order.
    """
    layout = validate_varlen_inputs(
        q, k, v, q_cluster_offsets, kv_cluster_offsets, kv_cluster_counts, kv_cluster_indices, q_perm, kv_perm
    )
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    check_varlen_layout_values(layout, s_q, s_k)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    out = token_major_like(q).zero_()
    lse = torch.full((b, h, s_q), float("-inf"), dtype=torch.float32, device=q.device)
    keep = cluster_keep_matrix(layout)
    kv_ids = token_cluster_ids(layout.kv_offsets, s_k)
    q_tokens = _token_order(layout.q_perm, b, h, s_q, q.device)
    kv_tokens = _token_order(layout.kv_perm, b, h, s_k, q.device)
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
