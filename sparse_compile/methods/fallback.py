"""Run-time dense fallback of sparse methods: logged once per model and site, shown in the report."""

from __future__ import annotations

import logging

import torch

from sparse_compile.kernels.common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from sparse_compile.methods.base import AttentionCall, AttentionResult
from sparse_compile.methods.dense import dense_attention

logger = logging.getLogger("sparse_compile")


def block_kernel_problem(query: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why the block kernels cannot take these ``(B, H, S, D)`` tensors, or ``None``."""
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not one of the block kernels' {SUPPORTED_DTYPES}"
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {query.shape[-1]} is not one of the block kernels' {SUPPORTED_HEAD_DIMS}"
    if value.shape[-1] != query.shape[-1]:
        return f"value head dim {value.shape[-1]} differs from the query head dim {query.shape[-1]}"
    return None


def dense_fallback(call: AttentionCall, reason: str) -> AttentionResult:
    """Dense attention for a call the method cannot run sparse.

    The first fallback of a model at a site is logged as a warning; the reason is kept in the
    site state, so :func:`sparse_compile.report` shows the site as dense with it.
    """
    if call.state.fallback_reason is None:
        logger.warning("sparse_compile: %s runs dense: %s", call.site.module_path, reason)
    call.state.fallback_reason = reason
    return AttentionResult(dense_attention(call.query, call.key, call.value, call.attn_mask, call.scale), 1.0)
