"""Block scoring and selection in plain PyTorch: the specification of :mod:`block_select`.

These are deliberately simple (loops over blocks and rows) and serve as the test oracle and the
CPU path of the Triton kernels. Shapes:

- ``q`` ``(B, H, S_q, D)``, ``k`` ``(B, H, S_k, D)``; ``NQ = ceil(S_q / block_q)``, ``NK = ceil(S_k / block_k)``.
- A selection is a CSR layout: ``counts`` int32 ``(B, H, NQ)`` and ``indices`` int32 ``(B, H, NQ, MAXK)``,
  the first ``count`` entries of a row valid and ascending, the rest 0 (the layout of
  :mod:`sparse_compile.kernels.block_sparse`).

No function allocates O(S_q * S_k) memory: the exact passes work one query block (or ``block`` rows)
at a time. These functions assume valid inputs: :mod:`sparse_compile.kernels.block_select` checks them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparse_compile.kernels.common import cdiv, default_scale


def block_sizes(seq_len: int, block: int, device: torch.device | str = "cpu") -> Tensor:
    """Token count of each of the ``ceil(seq_len / block)`` blocks, int64 ``(NB,)``."""
    starts = torch.arange(0, seq_len, block, device=device)
    return (seq_len - starts).clamp(max=block)


def _rows_to_layout(kept: list[list[int]], shape: tuple[int, ...], maxk: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """CSR layout from one ascending list of kept ids per row (rows in row-major order of ``shape``)."""
    counts = torch.tensor([len(row) for row in kept], dtype=torch.int32).reshape(shape)
    indices = torch.zeros((len(kept), maxk), dtype=torch.int32)
    for r, row in enumerate(kept):
        indices[r, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return counts.to(device), indices.reshape(*shape, maxk).to(device)


def select_top_p_reference(probs: Tensor, top_p: float, min_blocks: int = 1) -> tuple[Tensor, Tensor]:
    """Per row the fewest highest-probability blocks whose cumulative probability reaches ``top_p``.

    A block is kept while the probability mass of the blocks ranked above it is still below
    ``top_p``; at least ``min(min_blocks, NK)`` blocks are kept. ``probs`` ``(..., NQ, NK)``;
    returns counts ``(..., NQ)`` and indices ``(..., NQ, NK)`` int32.
    """
    nk = probs.shape[-1]
    kept = []
    for row in probs.reshape(-1, nk).float():
        values, order = torch.sort(row, descending=True, stable=True)
        mass_before = torch.nn.functional.pad(torch.cumsum(values, 0)[:-1], (1, 0))
        n = max(int((mass_before < top_p).sum()), min(min_blocks, nk))
        kept.append(sorted(order[:n].tolist()))
    return _rows_to_layout(kept, tuple(probs.shape[:-1]), nk, probs.device)


def masked_row_lse(lse: Tensor) -> Tensor:
    """LSE with ``-inf`` rows (nothing attended) replaced by ``+inf`` so that they contribute 0 mass."""
    return torch.where(torch.isneginf(lse), torch.inf, lse)


def block_mass_with_lse_reference(
    q: Tensor, k: Tensor, lse: Tensor, block_q: int, block_k: int, scale: float | None = None
) -> Tensor:
    """Exact attention mass of every (q block, kv block), fp32 ``(B, H, NQ, NK)``.

    ``mass[i, j] = sum_{r in block i, t in block j} exp(scale * q_r . k_t - lse_r) / |block i|``
    where ``lse`` ``(B, H, S_q)`` is each row's (natural-log) LSE; with the full-attention LSE every
    row sums to 1. Rows whose LSE is ``-inf`` contribute nothing. One q block at a time.
    """
    scale = default_scale(q.shape[-1], scale)
    s_q, s_k = q.shape[2], k.shape[2]
    nk = cdiv(s_k, block_k)
    k_f = k.float()
    lse_safe = masked_row_lse(lse.float())
    out = []
    for start in range(0, s_q, block_q):
        rows = slice(start, min(start + block_q, s_q))
        p = torch.exp(torch.matmul(q[:, :, rows].float(), k_f.transpose(-1, -2)) * scale - lse_safe[:, :, rows, None])
        per_key = p.sum(dim=2)  # (B, H, S_k)
        per_key = torch.nn.functional.pad(per_key, (0, nk * block_k - s_k))
        out.append(per_key.reshape(*per_key.shape[:2], nk, block_k).sum(-1) / (rows.stop - rows.start))
    if not out:
        return q.new_zeros((*q.shape[:2], 0, nk), dtype=torch.float32)
    return torch.stack(out, dim=2)


def attention_lse_reference(q: Tensor, k: Tensor, scale: float | None = None, block: int = 128) -> Tensor:
    """Full-attention row LSE ``log(sum_t exp(scale * q_r . k_t))``, fp32 ``(B, H, S_q)``.

    Works ``block`` query rows at a time; ``-inf`` when ``S_k == 0``.
    """
    scale = default_scale(q.shape[-1], scale)
    k_f = k.float()
    chunks = [
        torch.logsumexp(torch.matmul(q[:, :, i : i + block].float(), k_f.transpose(-1, -2)) * scale, dim=-1)
        for i in range(0, q.shape[2], block)
    ]
    if not chunks:
        return q.new_zeros(q.shape[:3], dtype=torch.float32)
    return torch.cat(chunks, dim=2)
