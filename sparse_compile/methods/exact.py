"""Exact attention: the reference every sparse method is measured against, and the dense path."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Full attention ``(B, H, S, Dv)`` through PyTorch's SDPA (the fastest backend it picks)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)
