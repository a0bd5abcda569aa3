"""Sparse VideoGen's online profiling: is each head spatial or temporal?

For a few sampled query rows the exact attention row is computed over every video key, and
again with the keys each pattern drops masked out; the pattern whose output is closer (mean
squared error over the sampled rows and channels) to the full output wins, per (batch
element, head) — CFG batched as two may choose differently. Heads are processed in chunks of
at most ``_SCORE_BUDGET`` scores: memory is O(rows x Sv) per head, never O(Sv^2), every key is
read once, and the cost is three softmax-weighted sums per sampled row, against ``Sv`` rows for
the attention itself.

The masks are the token masks of the block layouts (:meth:`SvgPatterns.row_masks`), so the
profiled output of a row is the kernel's output for it. Scores and the probability-value
product run in the inputs' dtype (fp32 softmax); the choice is returned as a device tensor,
never read on the host.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from sparse_compile.methods.svg_patterns import SvgPatterns

_SCORE_BUDGET = 1 << 25  # fp32 scores per chunk of heads (128 MiB)
_ROW_SEED = 0


@functools.lru_cache(maxsize=32)
def sample_rows(num_video: int, count: int, device: torch.device) -> Tensor:
    """``min(count, num_video)`` distinct frame-major query rows, ascending, int64 on ``device``.

    The video is cut into that many equal strata (integer bounds) and each contributes one row at
    a fixed pseudo-random offset: spread over all frames and positions, the same on every call.
    """
    n = min(count, num_video)
    bounds = torch.arange(n + 1) * num_video // n
    offsets = torch.rand(n, generator=torch.Generator().manual_seed(_ROW_SEED), dtype=torch.float64)
    rows = bounds[:-1] + (offsets * (bounds[1:] - bounds[:-1])).long()
    return rows.to(device)


def _row_outputs(scores: Tensor, keep: Tensor | None, value: Tensor) -> Tensor:
    """Attention output of score rows ``(B, H, R, Sv)`` fp32 over the keys ``keep`` ``(R, Sv)`` allows (all: ``None``).

    ``value`` ``(B, H, Sv, Dv)``; returns fp32 ``(B, H, R, Dv)``. Every row keeps at least one key.
    """
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value).float()


def _head_errors(q: Tensor, k: Tensor, v: Tensor, rows: Tensor, keeps: tuple[Tensor, ...], scale: float) -> Tensor:
    """Mean squared error against full attention of each ``keeps`` mask ``(R, Sv)`` on ``rows``.

    Returns fp32 ``(B, H, len(keeps))``.
    """
    scores = torch.matmul(q[:, :, rows], k.transpose(-1, -2)).float() * scale
    full = _row_outputs(scores, None, v)
    return torch.stack([(_row_outputs(scores, keep, v) - full).square().mean(dim=(-2, -1)) for keep in keeps], dim=-1)


def pattern_errors(q: Tensor, k: Tensor, v: Tensor, patterns: SvgPatterns, rows: Tensor, scale: float) -> Tensor:
    """Mean squared error of the spatial and temporal outputs against full attention on ``rows``.

    Heads are processed in chunks (views, no copy of q/k/v) of at most ``_SCORE_BUDGET`` scores,
    so every key is read once per profile and memory is O(chunk heads x R x Sv).

    Args:
        q, k: ``(B, H, Sv, D)``; v ``(B, H, Sv, Dv)``: the video tokens, frame-major.
        rows: int64 ``(R,)`` frame-major query rows (:func:`sample_rows`).

    Returns:
        fp32 ``(B, H, 2)``: ``[..., 0]`` spatial, ``[..., 1]`` temporal.
    """
    batch, heads, tokens, _ = q.shape
    per_chunk = max(1, min(heads, _SCORE_BUDGET // (rows.numel() * tokens)))
    keeps = patterns.row_masks(rows)
    errors = torch.empty((batch, heads, 2), dtype=torch.float32, device=q.device)
    for b in range(batch):
        for h in range(0, heads, per_chunk):
            part = (slice(b, b + 1), slice(h, h + per_chunk))
            errors[part] = _head_errors(q[part], k[part], v[part], rows, keeps, scale)
    return errors


def classify_heads(q: Tensor, k: Tensor, v: Tensor, patterns: SvgPatterns, rows: Tensor, scale: float) -> Tensor:
    """Bool ``(B, H)``: True where the temporal pattern reproduces the sampled rows better (ties: spatial)."""
    errors = pattern_errors(q, k, v, patterns, rows, scale)
    return errors[..., 1] < errors[..., 0]
