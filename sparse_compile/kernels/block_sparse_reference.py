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
*token-major*, as a contiguous ``(B, S_q, H, D)``
(:func:`~sparse_compile.kernels.common.attention_output_like`): the layout of the backend op's output,
so it is returned without a copy.

These functions assume valid inputs: :mod:`sparse_compile.kernels.block_sparse` checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_compile.kernels.common import attention_output_like, cdiv, default_scale, token_order
from sparse_compile.kernels.masked_reference import all_finite, gather_rows, grouped_attention, keep_matrix, softmax_attend


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


def expand_layout(
    q: Tensor,
    k: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    q_perm: Tensor | None = None,
    kv_perm: Tensor | None = None,
) -> BlockLayout:
    """The layout and permutations of a valid call viewed (stride 0) as ``(B, H, ...)``; no checks."""
    b, h, s_q, _ = q.shape
    s_k = k.shape[2]
    return BlockLayout(
        kv_block_counts.expand(b, h, kv_block_counts.shape[2]),
        kv_block_indices.expand(b, h, *kv_block_indices.shape[2:]),
        None if q_perm is None else q_perm.expand(b, h, s_q),
        None if kv_perm is None else kv_perm.expand(b, h, s_k),
    )


def layout_to_dense_mask(
    kv_block_counts: Tensor, kv_block_indices: Tensor, s_q: int, s_k: int, block_q: int, block_k: int
) -> Tensor:
    """Boolean keep-mask ``(B, H, S_q, S_k)`` of a layout (True = attend). O(S_q * S_k) memory: small tests only."""
    block_mask = keep_matrix(kv_block_counts, kv_block_indices, cdiv(s_k, block_k))
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
    ``q_perm[b, h, i * block_q + r]``.

    The definition: each q block attends to the rows of its kept kv blocks, gathered (only they take
    part, whatever the other keys hold). With finite q, k and v the same result comes from masked
    softmax over all keys (:func:`~sparse_compile.kernels.masked_reference.grouped_attention`), which is
    several times faster on the CPU; that path is taken then. Memory: fp32 copies of k and v (and of
    the rows of q) in kernel order, and one chunk of rows' scores.
    """
    lay = expand_layout(q, k, kv_block_counts, kv_block_indices, q_perm, kv_perm)
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    scale = default_scale(d, scale)
    q_tokens = token_order(lay.q_perm, b, h, s_q, q.device)
    kv_tokens = token_order(lay.kv_perm, b, h, s_k, q.device)
    if all_finite(q, k, v):
        rows = torch.cat([torch.arange(i * block_q, min((i + 1) * block_q, s_q), device=q.device) for i in q_blocks])
        block_keep = keep_matrix(lay.counts, lay.indices, cdiv(s_k, block_k))
        key_blocks = torch.arange(s_k, device=q.device) // block_k
        out, lse = grouped_attention(
            gather_rows(q, q_tokens[:, :, rows]).float(), gather_rows(k, kv_tokens).float(),
            gather_rows(v, kv_tokens).float(), block_keep, rows // block_q, key_blocks, scale,
        )  # fmt: skip
        return out.to(q.dtype), lse
    outs, lses = [], []
    for qb in q_blocks:
        rows = slice(qb * block_q, min((qb + 1) * block_q, s_q))
        kv_rows, valid = _kept_kv_rows(lay.indices[:, :, qb], lay.counts[:, :, qb], block_k, s_k)
        tokens = torch.gather(kv_tokens, 2, kv_rows)
        k_sel = gather_rows(k, tokens).float()
        v_sel = gather_rows(v, tokens).float()
        scores = torch.matmul(gather_rows(q, q_tokens[:, :, rows]).float(), k_sel.transpose(-1, -2)) * scale
        out, lse = softmax_attend(scores.masked_fill_(~valid.unsqueeze(-2), float("-inf")), v_sel)
        outs.append(out.to(q.dtype))
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
    """Block-sparse attention in plain PyTorch (:func:`reference_q_blocks` over every q block; no O(S_q * S_k) buffer).

    q ``(B, H, S_q, D)``, k and v ``(B, H, S_k, D)`` (any strides), layout and optional permutations
    ``q_perm`` / ``kv_perm`` as in the module docstring (valid: not checked here). Returns O
    ``(B, H, S_q, D)`` in q's dtype, token-major (:func:`attention_output_like`), and with ``return_lse``
    the fp32 natural-log LSE ``(B, H, S_q)`` (contiguous) of ``scale * q . k`` over the kept keys;
    both in q's row order.
    """
    lay = expand_layout(q, k, kv_block_counts, kv_block_indices, q_perm, kv_perm)
    b, h, s_q, d = q.shape
    out = attention_output_like(q, v)
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    nq = cdiv(s_q, block_q)
    if nq > 0:
        rows_out, rows_lse = reference_q_blocks(
            q, k, v, lay.counts, lay.indices, list(range(nq)), block_q=block_q, block_k=block_k, scale=scale,
            q_perm=lay.q_perm, kv_perm=lay.kv_perm,
        )  # fmt: skip
        tokens = token_order(lay.q_perm, b, h, s_q, q.device)
        out.scatter_(2, tokens.unsqueeze(-1).expand(b, h, s_q, d), rows_out)
        lse.scatter_(2, tokens, rows_lse)
    return (out, lse) if return_lse else out
