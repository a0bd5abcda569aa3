"""The masked-softmax core of the PyTorch references: attention of query rows over the keys their
group keeps, where rows and keys fall into groups (layout blocks, or clusters) and a boolean matrix
says which key groups each row group keeps.

On the CPU the rows run through ATen's fused CPU attention with an additive ``-inf`` mask, elsewhere
as explicit fp32 softmax math; either way in chunks of rows whose scores stay within
:data:`SCORES_BUDGET_BYTES`, so no buffer grows as ``S_q * S_k``.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCORES_BUDGET_BYTES = 64 * 2**20
"""Largest fp32 (query row, key) buffer of one chunk of rows."""


def keep_matrix(counts: Tensor, indices: Tensor, num_groups: int) -> Tensor:
    """Boolean ``(B, H, NQ, num_groups)`` of a CSR layout (``counts`` ``(B, H, NQ)``, ``indices``
    ``(B, H, NQ, M)``, slots past a row's count ignored): whether row group i keeps key group j."""
    valid = torch.arange(indices.shape[-1], device=indices.device) < counts.unsqueeze(-1)
    idx = torch.where(valid, indices.long(), num_groups)  # invalid slots land in a dropped column
    keep = torch.zeros((*counts.shape, num_groups + 1), dtype=torch.bool, device=idx.device)
    return keep.scatter_(-1, idx, True)[..., :num_groups]


def all_finite(*tensors: Tensor) -> bool:
    """Whether every value of every tensor is finite (a host read on the GPU)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def softmax_attend(scores: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 scores ``(..., R, N)`` (``-inf`` on dropped keys) and values ``(..., N, D)`` -> O ``(..., R, D)``
    and the natural-log LSE ``(..., R)``; a row with every key dropped gets O 0 and LSE ``-inf``.
    ``scores`` is overwritten."""
    lse = torch.logsumexp(scores, dim=-1)
    p = scores.sub_(torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1)).exp_()  # exp(-inf) = 0 on dropped keys
    return torch.matmul(p, v), lse


def gather_rows(x: Tensor, tokens: Tensor) -> Tensor:
    """``x[b, h, tokens[b, h, r]]``: ``x`` ``(B, H, S, D)``, ``tokens`` int64 ``(B, H, R)`` -> ``(B, H, R, D)``."""
    return torch.gather(x, 2, tokens.unsqueeze(-1).expand(*tokens.shape, x.shape[-1]))


def _per_row(groups: Tensor, b: int, h: int) -> Tensor:
    """Group ids ``(S,)`` or ``(B, H, S)`` viewed as int64 ``(B, H, S)``."""
    return groups.long().expand(b, h, groups.shape[-1])


def grouped_attention(
    q: Tensor, k: Tensor, v: Tensor, group_keep: Tensor, row_groups: Tensor, key_groups: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Softmax attention of fp32 query rows ``q`` ``(B, H, R, D)`` over fp32 ``k``/``v`` ``(B, H, S_k, D)``,
    row ``r`` keeping key ``j`` iff ``group_keep[b, h, row_groups[r], key_groups[j]]``.

    ``group_keep`` bool ``(B, H, NQG, NKG)``; ``row_groups`` ``(R,)`` or ``(B, H, R)`` and ``key_groups``
    ``(S_k,)`` or ``(B, H, S_k)``, integer group ids. Returns O fp32 ``(B, H, R, D)`` and the natural-log
    LSE ``(B, H, R)``; a row that keeps nothing gets 0 and ``-inf``.
    """
    b, h, r, _ = q.shape
    s_k, n_key_groups = k.shape[2], group_keep.shape[-1]
    row_groups, key_groups = _per_row(row_groups, b, h), _per_row(key_groups, b, h)
    has_keys = torch.zeros(b, h, n_key_groups, dtype=torch.bool, device=q.device).scatter_(2, key_groups, True)
    chunk = max(1, SCORES_BUDGET_BYTES // max(1, 4 * b * h * s_k))
    outs, lses = [], []
    for first in range(0, r, chunk):
        rows = row_groups[:, :, first : first + chunk]
        kept = torch.gather(group_keep, 2, rows.unsqueeze(-1).expand(*rows.shape, n_key_groups))
        to_keys = key_groups.unsqueeze(2).expand(b, h, rows.shape[-1], s_k)
        q_rows = q[:, :, first : first + chunk]
        if q.device.type == "cpu":
            bias = torch.gather(torch.where(kept, 0.0, float("-inf")), 3, to_keys)
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q_rows, k, v, attn_mask=bias,
                                                                                scale=scale)  # fmt: skip
        else:
            scores = torch.matmul(q_rows, k.transpose(-1, -2)).mul_(scale)
            out, lse = softmax_attend(scores.masked_fill_(~torch.gather(kept, 3, to_keys), float("-inf")), v)
        empty = ~(kept & has_keys.unsqueeze(2)).any(dim=-1)
        outs.append(out.masked_fill(empty.unsqueeze(-1), 0.0))
        lses.append(lse.masked_fill(empty, float("-inf")))
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
