"""``method="dense"``: exact attention through PyTorch's SDPA (the fastest backend it picks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparse_compile.methods.base import AttentionCall, AttentionMethod, AttentionResult


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """Full attention ``(B, H, S, Dv)``; the reference every sparse method is measured against."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, scale=scale)


class DenseMethod(AttentionMethod):
    """Computes every (query, key) pair: the baseline, and the path of dense steps and layers."""

    name = "dense"
    is_sparse = False

    def attend(self, call: AttentionCall) -> AttentionResult:
        output = dense_attention(call.query, call.key, call.value, call.attn_mask, call.scale)
        return AttentionResult(output=output, kept_density=1.0)
