"""Block scoring and selection in plain PyTorch: the specification of :mod:`block_select`.

These are deliberately simple (loops over blocks and rows) and serve as the test oracle and the
CPU path of the Triton kernels. Shapes:

- ``q`` ``(B, H, S_q, D)``, ``k`` ``(B, H, S_k, D)``; ``NQ = ceil(S_q / block_q)``, ``NK = ceil(S_k / block_k)``.
- A selection is a CSR layout: ``counts`` int32 ``(B, H, NQ)`` and ``indices`` int32 ``(B, H, NQ, MAXK)``,
  the first ``count`` entries of a row valid and ascending, the rest 0 (the layout of
  :mod:`sparse_compile.kernels.block_sparse`).

No function allocates O(S_q * S_k) memory: the exact passes work one query block (or ``block`` rows)
at a time.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def cdiv(a: int, b: int) -> int:
    """Ceil division of non-negative ints."""
    return (a + b - 1) // b


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale`` if given, else ``1 / sqrt(head_dim)`` (SDPA's default)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


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


def mean_pool_blocks_reference(x: Tensor, block: int) -> Tensor:
    """Mean of each block of ``block`` tokens: ``(B, H, S, D)`` -> ``(B, H, ceil(S / block), D)`` fp32.

    The last block may be partial and is averaged over its real tokens.
    """
    check_block("block", block)
    means = [x[:, :, i : i + block].float().mean(dim=2) for i in range(0, x.shape[2], block)]
    if not means:
        return x.new_zeros((*x.shape[:2], 0, x.shape[3]), dtype=torch.float32)
    return torch.stack(means, dim=2)


def block_sizes(seq_len: int, block: int, device: torch.device | str = "cpu") -> Tensor:
    """Token count of each of the ``ceil(seq_len / block)`` blocks, int64 ``(NB,)``."""
    starts = torch.arange(0, seq_len, block, device=device)
    return (seq_len - starts).clamp(max=block)


def estimate_block_scores_reference(
    q: Tensor, k: Tensor, block_q: int, block_k: int, scale: float | None = None
) -> Tensor:
    """Estimated attention mass of each (q block, kv block), fp32 ``(B, H, NQ, NK)``; rows sum to 1.

    ``softmax_j(scale * mean(q_i) . mean(k_j) + log(|block j|))``: the attention a pooled query row
    pays to the pooled key of block j, counted once per key token of the block.
    """
    check_qk(q, k)
    check_block("block_q", block_q)
    check_block("block_k", block_k)
    scale = default_scale(q.shape[-1], scale)
    q_pooled = mean_pool_blocks_reference(q, block_q)
    k_pooled = mean_pool_blocks_reference(k, block_k)
    logits = torch.einsum("bhqd,bhkd->bhqk", q_pooled, k_pooled) * scale
    logits = logits + block_sizes(k.shape[2], block_k, q.device).float().log()
    return torch.softmax(logits, dim=-1)


def _rows_to_layout(kept: list[list[int]], shape: tuple[int, ...], maxk: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """CSR layout from one ascending list of kept ids per row (rows in row-major order of ``shape``)."""
    counts = torch.tensor([len(row) for row in kept], dtype=torch.int32).reshape(shape)
    indices = torch.zeros((len(kept), maxk), dtype=torch.int32)
    for r, row in enumerate(kept):
        indices[r, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return counts.to(device), indices.reshape(*shape, maxk).to(device)


def _always_kept_list(always_kept: Tensor | None, nk: int) -> list[int]:
    if always_kept is None:
        return []
    if always_kept.dim() != 1:
        raise ValueError(f"always_kept must be 1-D, got shape {tuple(always_kept.shape)}")
    ids = [int(i) for i in always_kept.tolist()]
    if any(i < 0 or i >= nk for i in ids):
        raise ValueError(f"always_kept ids must lie in [0, {nk})")
    return ids


def select_topk_reference(scores: Tensor, k: int, always_kept: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per row the ``k`` highest-scoring blocks plus ``always_kept``, as a CSR layout.

    ``scores`` ``(..., NQ, NK)``. Returns counts int32 ``(..., NQ)`` and indices int32
    ``(..., NQ, MAXK)`` with ``MAXK = min(NK, k + len(always_kept))``.
    """
    nk = scores.shape[-1]
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    extra = _always_kept_list(always_kept, nk)
    kept = []
    for row in scores.reshape(-1, nk).tolist():
        order = sorted(range(nk), key=lambda j: -row[j])[: min(k, nk)]
        kept.append(sorted(set(order) | set(extra)))
    return _rows_to_layout(kept, tuple(scores.shape[:-1]), min(nk, k + len(extra)), scores.device)


def select_top_p_reference(
    probs: Tensor, top_p: float, min_blocks: int = 1, always_kept: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per row the fewest highest-probability blocks whose cumulative probability reaches ``top_p``.

    A block is kept while the probability mass of the blocks ranked above it is still below
    ``top_p``; at least ``min(min_blocks, NK)`` blocks are kept, plus ``always_kept``.
    ``probs`` ``(..., NQ, NK)``; returns counts ``(..., NQ)`` and indices ``(..., NQ, NK)`` int32.
    """
    nk = probs.shape[-1]
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1], got {top_p}")
    if min_blocks < 0:
        raise ValueError(f"min_blocks must be >= 0, got {min_blocks}")
    extra = _always_kept_list(always_kept, nk)
    kept = []
    for row in probs.reshape(-1, nk).float():
        values, order = torch.sort(row, descending=True, stable=True)
        mass_before = torch.nn.functional.pad(torch.cumsum(values, 0)[:-1], (1, 0))
        n = max(int((mass_before < top_p).sum()), min(min_blocks, nk))
        kept.append(sorted(set(order[:n].tolist()) | set(extra)))
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
    check_qk(q, k)
    check_block("block_q", block_q)
    check_block("block_k", block_k)
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must have shape {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
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
    check_qk(q, k)
    check_block("block", block)
    scale = default_scale(q.shape[-1], scale)
    k_f = k.float()
    chunks = [
        torch.logsumexp(torch.matmul(q[:, :, i : i + block].float(), k_f.transpose(-1, -2)) * scale, dim=-1)
        for i in range(0, q.shape[2], block)
    ]
    if not chunks:
        return q.new_zeros(q.shape[:3], dtype=torch.float32)
    return torch.cat(chunks, dim=2)
