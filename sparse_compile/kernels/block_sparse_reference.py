"""Pure-PyTorch block-sparse attention: the specification of the Triton kernel and its CPU path.

A *layout* describes which (block_q x block_k) tiles of the attention matrix are kept:

- ``kv_block_counts``  int32 ``(B, H, NQ)``, ``NQ = ceil(S_q / block_q)``: how many kv blocks
  query block ``i`` keeps;
- ``kv_block_indices`` int32 ``(B, H, NQ, MAXK)``: the kept kv block ids (``NK = ceil(S_k / block_k)``),
  the first ``count`` entries valid, ascending, no duplicates; entries past ``count`` are ignored.

The batch and head dims of both layout tensors may be 1 or have stride 0 (one pattern shared by
several heads). Query rows of a block that keeps nothing get output 0 and LSE ``-inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def cdiv(a: int, b: int) -> int:
    """Ceil division of non-negative ints."""
    return (a + b - 1) // b


def _check_block_size(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 16 or value > 256 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [16, 256], got {value!r}")


def _expand_layout(t: Tensor, name: str, b: int, h: int, tail: tuple[int, ...]) -> Tensor:
    """Return ``t`` viewed as ``(b, h, *tail)``; batch/head dims of size 1 are broadcast with stride 0."""
    if t.dim() != 2 + len(tail):
        raise ValueError(f"{name} must have {2 + len(tail)} dims (B, H, ...), got shape {tuple(t.shape)}")
    if tuple(t.shape[2:]) != tail or t.shape[0] not in (1, b) or t.shape[1] not in (1, h):
        want = f"({b} or 1, {h} or 1, {', '.join(map(str, tail))})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t.expand(b, h, *tail)


def validate_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    block_q: int,
    block_k: int,
) -> tuple[Tensor, Tensor]:
    """Check shapes, dtypes and devices; return the layout tensors expanded to ``(B, H, NQ[, MAXK])``.

    Raises ``ValueError`` with a message naming the offending argument. Index *values* are not
    checked here (that needs a device sync); :func:`check_layout_values` does it.
    """
    _check_block_size("block_q", block_q)
    _check_block_size("block_k", block_k)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype must be one of {SUPPORTED_DTYPES}, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == kv_block_counts.device == kv_block_indices.device):
        raise ValueError("q, k, v, kv_block_counts and kv_block_indices must be on one device")
    b, h, s_q, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(
            f"k and v must have shape (B, H, S_k, D) = ({b}, {h}, S_k, {d}); got k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] == 0:
        raise ValueError("k and v must hold at least one key (S_k > 0)")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim D must be one of {SUPPORTED_HEAD_DIMS}, got {d}")
    for name, t in (("kv_block_counts", kv_block_counts), ("kv_block_indices", kv_block_indices)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    nq = cdiv(s_q, block_q)
    counts = _expand_layout(kv_block_counts, "kv_block_counts", b, h, (nq,))
    if kv_block_indices.dim() != 4:
        raise ValueError(f"kv_block_indices must be 4-D (B, H, NQ, MAXK), got shape {tuple(kv_block_indices.shape)}")
    indices = _expand_layout(kv_block_indices, "kv_block_indices", b, h, (nq, kv_block_indices.shape[3]))
    return counts, indices


def check_layout_values(kv_block_counts: Tensor, kv_block_indices: Tensor, num_kv_blocks: int) -> None:
    """Raise ``ValueError`` unless every count is in [0, MAXK] and the valid indices are ascending in [0, NK).

    Reads the layout (a device sync on GPU); meant for tests and the reference path.
    """
    maxk = kv_block_indices.shape[-1]
    if bool((kv_block_counts < 0).any()) or bool((kv_block_counts > maxk).any()):
        raise ValueError(f"kv_block_counts must lie in [0, MAXK={maxk}]")
    valid = torch.arange(maxk, device=kv_block_indices.device) < kv_block_counts.unsqueeze(-1)
    idx = kv_block_indices.long()
    if bool(((idx < 0) | (idx >= num_kv_blocks))[valid].any()):
        raise ValueError(f"kept kv block indices must lie in [0, NK={num_kv_blocks})")
    both_valid = valid[..., 1:]
    if bool((idx[..., 1:] <= idx[..., :-1])[both_valid].any()):
        raise ValueError("kept kv block indices must be strictly ascending")


def dense_block_layout(
    batch: int, heads: int, s_q: int, s_k: int, block_q: int, block_k: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Layout keeping every kv block (density 1.0): counts ``(B, H, NQ)`` = NK, indices ``(B, H, NQ, NK)`` = 0..NK-1.

    Both tensors are stride-0 expansions of one row (no O(B*H*NQ*NK) memory).
    """
    nq, nk = cdiv(s_q, block_q), cdiv(s_k, block_k)
    counts = torch.full((1, 1, 1), nk, dtype=torch.int32, device=device).expand(batch, heads, nq)
    indices = torch.arange(nk, dtype=torch.int32, device=device).view(1, 1, 1, nk).expand(batch, heads, nq, nk)
    return counts, indices


def layout_to_dense_mask(
    kv_block_counts: Tensor, kv_block_indices: Tensor, s_q: int, s_k: int, block_q: int, block_k: int
) -> Tensor:
    """Boolean keep-mask ``(B, H, S_q, S_k)`` of a layout (True = attend). O(S_q * S_k) memory: small tests only."""
    nk = cdiv(s_k, block_k)
    maxk = kv_block_indices.shape[-1]
    valid = torch.arange(maxk, device=kv_block_indices.device) < kv_block_counts.unsqueeze(-1)
    # Invalid slots scatter into an extra dummy column nk, dropped afterwards.
    idx = torch.where(valid, kv_block_indices.long(), nk)
    shape = (*kv_block_counts.shape, nk + 1)
    block_mask = torch.zeros(shape, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)[..., :nk]
    rows = block_mask.repeat_interleave(block_q, dim=-2)[..., :s_q, :]
    return rows.repeat_interleave(block_k, dim=-1)[..., :s_k]


def _gather_kv_tokens(
    indices: Tensor, counts: Tensor, block_k: int, s_k: int
) -> tuple[Tensor, Tensor]:
    """Token ids ``(B, H, MAXK * block_k)`` of the kept kv blocks of one q block, and their validity mask."""
    maxk = indices.shape[-1]
    slot_valid = torch.arange(maxk, device=indices.device) < counts.unsqueeze(-1)  # (B, H, MAXK)
    tokens = indices.long().unsqueeze(-1) * block_k + torch.arange(block_k, device=indices.device)
    valid = slot_valid.unsqueeze(-1) & (tokens < s_k) & (tokens >= 0)
    tokens = torch.where(valid, tokens, 0)
    return tokens.flatten(-2), valid.flatten(-2)


def reference_q_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    q_blocks: list[int],
    *,
    block_q: int,
    block_k: int,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference output rows of the given query blocks only (fp32 math).

    Returns ``O (B, H, R, D)`` in q's dtype and ``LSE (B, H, R)`` fp32, where the R rows are those of
    ``q_blocks`` in the order given (the last block may be partial). Memory per block is
    O(B * H * block_q * MAXK * block_k).
    """
    counts, indices = validate_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k)
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    outs, lses = [], []
    for qb in q_blocks:
        rows = slice(qb * block_q, min((qb + 1) * block_q, s_q))
        tokens, valid = _gather_kv_tokens(indices[:, :, qb], counts[:, :, qb], block_k, s_k)
        gather_idx = tokens.unsqueeze(-1).expand(b, h, tokens.shape[-1], d)
        k_sel = torch.gather(k, 2, gather_idx).float()
        v_sel = torch.gather(v, 2, gather_idx).float()
        scores = torch.matmul(q[:, :, rows].float(), k_sel.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~valid.unsqueeze(-2), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with nothing kept
        finite_lse = torch.where(torch.isinf(lse), 0.0, lse)
        p = torch.exp(scores - finite_lse.unsqueeze(-1))  # exp(-inf) = 0 on dropped keys
        outs.append(torch.matmul(p, v_sel).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def block_sparse_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    *,
    block_q: int,
    block_k: int,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention in plain PyTorch, one query block at a time (no O(S_q * S_k) buffer).

    q ``(B, H, S_q, D)``, k and v ``(B, H, S_k, D)`` (any strides), layout as in the module docstring.
    Returns O ``(B, H, S_q, D)`` contiguous in q's dtype, and with ``return_lse`` the fp32 natural-log
    LSE ``(B, H, S_q)`` of ``scale * q . k`` over the kept keys. The layout values are checked.
    """
    counts, indices = validate_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k)
    check_layout_values(counts, indices, cdiv(k.shape[2], block_k))
    nq = cdiv(q.shape[2], block_q)
    if nq == 0:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    else:
        out, lse = reference_q_blocks(
            q, k, v, counts, indices, list(range(nq)), block_q=block_q, block_k=block_k, scale=scale
        )
    return (out, lse) if return_lse else out
