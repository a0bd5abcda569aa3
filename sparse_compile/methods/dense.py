"""``method="dense"``: exact attention through PyTorch's SDPA at every call."""

from __future__ import annotations

from sparse_compile.methods.base import AttentionCall, AttentionMethod
from sparse_compile.methods.exact import dense_attention
from sparse_compile.registry import register_method

__all__ = ["DenseMethod", "dense_attention"]


@register_method
class DenseMethod(AttentionMethod):
    """Computes every (query, key) pair: the baseline. Every call runs dense SDPA."""

    name = "dense"
    is_sparse = False

    def keeps_every_pair(self, call: AttentionCall) -> bool:
        return True
