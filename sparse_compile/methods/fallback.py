"""What the block kernels cannot take: calls the block-sparse methods run dense, with the reason."""

from __future__ import annotations

import torch

from sparse_compile.kernels.common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS


def block_kernel_problem(query: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why the block kernels cannot take these ``(B, H, S, D)`` tensors, or ``None``."""
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not one of the block kernels' {SUPPORTED_DTYPES}"
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {query.shape[-1]} is not one of the block kernels' {SUPPORTED_HEAD_DIMS}"
    if value.shape[-1] != query.shape[-1]:
        return f"value head dim {value.shape[-1]} differs from the query head dim {query.shape[-1]}"
    return None
