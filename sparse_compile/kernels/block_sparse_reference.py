"""Pure-PyTorch block-sparse attention: the specification of the Triton kernel and its CPU path.

A *layout* describes which (block_q x block_k) tiles of the attention matrix are kept:

- ``kv_block_counts``  int32 ``(B, H, NQ)``, ``NQ = ceil(S_q / block_q)``: how many kv blocks
  query block ``i`` keeps;
- ``kv_block_indices`` int32 ``(B, H, NQ, MAXK)``: the kept kv block ids (``NK = ceil(S_k / block_k)``),
  the first ``count`` entries valid, ascending, no duplicates; entries past ``count`` are ignored.

The batch and head dims of both layout tensors may be 1 or have stride 0 (one pattern shared by
several heads). Query rows of a block that keeps nothing get output 0 and LSE ``-inf``.

Blocks are runs of consecutive rows in *kernel order*. Optional token permutations, the same as
the variable-block kernel's (:mod:`~sparse_compile.kernels.varlen_block_sparse_reference`), let
q, k, v and O stay in token order while the layout is stated in another order:

- ``q_perm`` int32/int64 ``(B or 1, H or 1, S_q)``: row ``i`` of kernel order is token
  ``q_perm[b, h, i]`` of q, and its output and LSE land in row ``q_perm[b, h, i]`` of O and LSE;
- ``kv_perm`` int32/int64 ``(B or 1, H or 1, S_k)``: row ``j`` of kernel order is token
  ``kv_perm[b, h, j]`` of k and v.

Each must be a permutation of ``[0, S)`` per (batch, head); without one, kernel order is token
order. The result with permutations equals the result without them on the gathered inputs
``q[b, h, q_perm[b, h]]`` (etc.), scattered back to token order. O is ``(B, H, S_q, D)`` laid out
*token-major*, as a contiguous ``(B, S_q, H, D)`` (:func:`token_major_like`): the layout of the
backend op's output, so it is returned without a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_compile.kernels.varlen_block_sparse_reference import PERMUTATION_DTYPES, token_major_like

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


def cdiv(a: int, b: int) -> int:
    """Ceil division of non-negative ints."""
    return (a + b - 1) // b


def _check_block_size(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 16 or value > 256 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two in [16, 256], got {value!r}")


@dataclass(frozen=True)
class BlockLayout:
    """The layout tensors and optional token permutations of one call, expanded (stride 0) to ``(B, H, ...)``.

    Attributes:
        counts: int32 ``(B, H, NQ)``.
        indices: int32 ``(B, H, NQ, MAXK)``.
        q_perm: int32/int64 ``(B, H, S_q)`` or ``None``.
        kv_perm: int32/int64 ``(B, H, S_k)`` or ``None``.
    """

    counts: Tensor
    indices: Tensor
    q_perm: Tensor | None = None
    kv_perm: Tensor | None = None


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
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
) -> BlockLayout:
    """Check shapes, dtypes and devices; return the layout and permutations expanded to ``(B, H, ...)``.

    Raises ``ValueError`` with a message naming the offending argument. Index and permutation
    *values* are not checked here (that needs a device sync); :func:`check_layout_values` and
    :func:`check_permutation_values` do it.
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
    perms = [p for p in (q_perm, kv_perm) if p is not None]
    if any(t.device != q.device for t in (k, v, kv_block_counts, kv_block_indices, *perms)):
        raise ValueError("q, k, v, kv_block_counts, kv_block_indices and the permutations must be on one device")
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
    q_perm = _expand_permutation(q_perm, "q_perm", b, h, s_q)
    kv_perm = _expand_permutation(kv_perm, "kv_perm", b, h, k.shape[2])
    return BlockLayout(counts, indices, q_perm, kv_perm)


def _expand_permutation(perm: Tensor | None, name: str, b: int, h: int, seq: int) -> Tensor | None:
    """``perm`` (int32/int64 ``(B or 1, H or 1, seq)``) expanded to ``(B, H, seq)``; ``None`` stays ``None``."""
    if perm is None:
        return None
    if perm.dtype not in PERMUTATION_DTYPES:
        raise ValueError(f"{name} must be int32 or int64, got {perm.dtype}")
    return _expand_layout(perm, name, b, h, (seq,))


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


def check_permutation_values(name: str, perm: Tensor | None) -> None:
    """Raise ``ValueError`` unless ``perm`` ``(B, H, S)`` (or ``None``) permutes ``[0, S)`` in every (batch, head).

    Reads the permutation (a device sync on GPU); meant for tests and the reference path.
    """
    if perm is None:
        return
    identity = torch.arange(perm.shape[-1], dtype=perm.dtype, device=perm.device).expand_as(perm)
    if not torch.equal(perm.sort(dim=-1).values, identity):
        raise ValueError(f"{name} must be a permutation of [0, S) for every (batch, head)")


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


def _kept_kv_rows(indices: Tensor, counts: Tensor, block_k: int, s_k: int) -> tuple[Tensor, Tensor]:
    """Kernel-order kv rows ``(B, H, MAXK * block_k)`` of the kept kv blocks of one q block, and their validity mask."""
    maxk = indices.shape[-1]
    slot_valid = torch.arange(maxk, device=indices.device) < counts.unsqueeze(-1)  # (B, H, MAXK)
    rows = indices.long().unsqueeze(-1) * block_k + torch.arange(block_k, device=indices.device)
    valid = slot_valid.unsqueeze(-1) & (rows < s_k) & (rows >= 0)
    rows = torch.where(valid, rows, 0)
    return rows.flatten(-2), valid.flatten(-2)


def _token_order(perm: Tensor | None, b: int, h: int, seq: int, device: torch.device) -> Tensor:
    """Token of every kernel-order row, int64 ``(B, H, seq)``: ``perm``, or the identity without one."""
    if perm is None:
        return torch.arange(seq, device=device).expand(b, h, seq)
    return perm.long()


def _rows_of(x: Tensor, tokens: Tensor) -> Tensor:
    """``x[b, h, tokens[b, h, r]]``: ``x`` ``(B, H, S, D)``, ``tokens`` int64 ``(B, H, R)`` -> ``(B, H, R, D)``."""
    return torch.gather(x, 2, tokens.unsqueeze(-1).expand(*tokens.shape, x.shape[-1]))


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
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference output rows of the given query blocks only (fp32 math).

    Arguments as :func:`block_sparse_attention_reference`. Returns ``O (B, H, R, D)`` in q's dtype
    and ``LSE (B, H, R)`` fp32, where the R rows are the kernel-order rows of ``q_blocks`` in the
    order given (the last block may be partial); with ``q_perm`` row ``r`` of block ``i`` is token
    ``q_perm[b, h, i * block_q + r]``. Memory per block is O(B * H * block_q * MAXK * block_k).
    """
    lay = validate_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, q_perm, kv_perm)
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_tokens = _token_order(lay.q_perm, b, h, s_q, q.device)
    kv_tokens = _token_order(lay.kv_perm, b, h, s_k, q.device)
    outs, lses = [], []
    for qb in q_blocks:
        rows = slice(qb * block_q, min((qb + 1) * block_q, s_q))
        kv_rows, valid = _kept_kv_rows(lay.indices[:, :, qb], lay.counts[:, :, qb], block_k, s_k)
        tokens = torch.gather(kv_tokens, 2, kv_rows)
        k_sel = _rows_of(k, tokens).float()
        v_sel = _rows_of(v, tokens).float()
        scores = torch.matmul(_rows_of(q, q_tokens[:, :, rows]).float(), k_sel.transpose(-1, -2)) * scale
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
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention in plain PyTorch, one query block at a time (no O(S_q * S_k) buffer).

    q ``(B, H, S_q, D)``, k and v ``(B, H, S_k, D)`` (any strides), layout and optional permutations
    ``q_perm`` / ``kv_perm`` as in the module docstring (values are checked). Returns O
    ``(B, H, S_q, D)`` in q's dtype, token-major (:func:`token_major_like`), and with ``return_lse``
    the fp32 natural-log LSE ``(B, H, S_q)`` (contiguous) of ``scale * q . k`` over the kept keys;
    both in q's row order.
    """
    lay = validate_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k, q_perm, kv_perm)
    check_layout_values(lay.counts, lay.indices, cdiv(k.shape[2], block_k))
    check_permutation_values("q_perm", lay.q_perm)
    check_permutation_values("kv_perm", lay.kv_perm)
    b, h, s_q, d = q.shape
    out = token_major_like(q)
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    nq = cdiv(s_q, block_q)
    if nq > 0:
        rows_out, rows_lse = reference_q_blocks(
            q, k, v, lay.counts, lay.indices, list(range(nq)), block_q=block_q, block_k=block_k, scale=scale,
            q_perm=lay.q_perm, kv_perm=lay.kv_perm,
        )  # fmt: skip
        tokens = _token_order(lay.q_perm, b, h, s_q, q.device)
        out.scatter_(2, tokens.unsqueeze(-1).expand(b, h, s_q, d), rows_out)
        lse.scatter_(2, tokens, rows_lse)
    return (out, lse) if return_lse else out
