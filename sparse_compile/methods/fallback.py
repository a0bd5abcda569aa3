"""Calls a sparse method cannot take: the block kernels' limits and non-finite inputs, each with its reason."""

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


def storage_order(t: torch.Tensor) -> torch.Tensor:
    """``t``'s dims permuted by descending stride: a contiguous view of a dense tensor in any layout
    (e.g. ``(B, S, H, D)`` for a ``(B, H, S, D)`` view of ``(B, S, H, D)`` storage), so a reduction over
    every element reads it in place (``torch.aminmax`` clones a non-contiguous input)."""
    return t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def nonfinite_problem(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why a call whose q, k or v hold NaN or Inf runs dense, or ``None`` when all are finite.

    With a non-finite key or value, dense attention's result depends on every query's score with
    that key, which a sparse pattern may not compute: such a call runs dense, so it gives exactly
    what dense attention gives. Costs one pass over the inputs (the min and max of each tensor,
    0-d results: no copy, NaN propagates through both) and one host read of six values.
    """
    named = [(name, t) for name, t in (("query", query), ("key", key), ("value", value)) if t.numel() > 0]
    if not named:
        return None
    bounds = torch.stack([bound.float() for _, t in named for bound in torch.aminmax(storage_order(t))])
    finite = torch.isfinite(bounds).view(len(named), 2).all(-1).tolist()
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if not bad:
        return None
    return f"{', '.join(bad)} {'holds' if len(bad) == 1 else 'hold'} NaN or Inf (dense attention defines the result)"
