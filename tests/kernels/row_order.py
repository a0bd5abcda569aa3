"""Rows of ``(B, H, S, ...)`` tensors moved between token order and a permuted kernel order, in PyTorch:
the kernel tests' references for calls that take a token permutation."""

from __future__ import annotations

import torch


def row_index(perm: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``perm`` ``(B or 1, H or 1, R)`` as a gather/scatter index of ``x``'s rows, ``x`` ``(B, H, S, ...)``."""
    perm = perm.long().expand(*x.shape[:2], perm.shape[-1])
    return perm.reshape(*perm.shape, *[1] * (x.dim() - 3)).expand(*perm.shape, *x.shape[3:])


def to_token_order(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``out[b, h, perm[b, h, i]] = x[b, h, i]``: rows of ``x`` ``(B, H, S, ...)`` in kernel order put back in
    token order, the inverse of gathering by ``perm`` ``(B or 1, H or 1, S)``."""
    return torch.empty_like(x).scatter_(2, row_index(perm, x), x)


def to_kernel_order(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[b, h, perm[b, h, i]]``: rows of ``x`` ``(B, H, S, ...)`` gathered into kernel order by ``perm``
    ``(B or 1, H or 1, R)`` (any ``R`` rows)."""
    return torch.gather(x, 2, row_index(perm, x))
