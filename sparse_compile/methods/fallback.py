"""Calls a sparse method cannot take: the block kernels' limits and non-finite inputs, each with its reason."""

from __future__ import annotations

import torch

from sparse_compile.kernels.common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS
from sparse_compile.kernels.finite_check import finite_flags_of
from sparse_compile.methods.call import AttentionCall
from sparse_compile.methods.text_tokens import MASKED_VIDEO_KEYS, video_keys_kept


def block_kernel_problem(query: torch.Tensor, value: torch.Tensor) -> str | None:
    """Why the block kernels cannot take these ``(B, H, S, D)`` tensors, or ``None``."""
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} is not one of the block kernels' {SUPPORTED_DTYPES}"
    if query.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {query.shape[-1]} is not one of the block kernels' {SUPPORTED_HEAD_DIMS}"
    if value.shape[-1] != query.shape[-1]:
        return f"value head dim {value.shape[-1]} differs from the query head dim {query.shape[-1]}"
    return None


def finite_flags(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """The names of the non-empty tensors among q, k and v, and whether each holds only finite values:
    an int64 ``(len(names),)`` of 0/1 on their device, not read (:func:`finite_flags_of`)."""
    named = [(name, t) for name, t in (("query", query), ("key", key), ("value", value)) if t.numel() > 0]
    if not named:
        return [], torch.zeros(0, dtype=torch.int64, device=query.device)
    return [name for name, _ in named], finite_flags_of([t for _, t in named])


def nonfinite_reason(names: list[str], finite: list[int]) -> str | None:
    """Why a call runs dense, given :func:`finite_flags` read on the host, or ``None`` when all are finite."""
    bad = [name for name, ok in zip(names, finite) if not ok]
    if not bad:
        return None
    return f"{', '.join(bad)} {'holds' if len(bad) == 1 else 'hold'} NaN or Inf (dense attention defines the result)"


def input_checks(call: AttentionCall) -> tuple[list[str], torch.Tensor]:
    """What a call's one host read checks, not read yet: the names of the non-empty tensors among q, k and v, then
    ``"attn_mask"`` for a key-padding mask, and an int64 0/1 flag each on their device: the tensor holds only
    finite values (:func:`finite_flags`), the mask keeps every video key (:func:`video_keys_kept`).

    With a non-finite key or value, dense attention's result depends on every query's score with that key,
    which a sparse pattern may not compute: such a call runs dense, so it gives exactly what dense gives.
    """
    names, flags = finite_flags(call.query, call.key, call.value)
    if call.attn_mask is not None:
        names, flags = names + ["attn_mask"], torch.cat([flags, video_keys_kept(call.attn_mask, call.layout).view(1)])
    return names, flags


def input_problem(names: list[str], read: list[int]) -> str | None:
    """Why a call runs dense given :func:`input_checks`' flags read on the host (the mask's reason first), or
    ``None``."""
    flags = dict(zip(names, read))
    if not flags.pop("attn_mask", 1):
        return MASKED_VIDEO_KEYS
    return nonfinite_reason(list(flags), list(flags.values()))
