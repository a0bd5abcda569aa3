"""Whether each of up to three tensors holds only finite values, in one memory-bound Triton launch.

:func:`finite_flags_of` returns int64 ``(n,)``: 1 where a tensor holds no NaN and no +-Inf, else 0, on the
tensors' device and not read (the caller reads it with whatever else it reads). The kernel takes tensors that
are dense in memory in some order of their dims (diffusers' ``(B, S, H, D)`` storage viewed as
``(B, H, S, D)`` included), reading each once as a flat array, ``BLOCK`` elements per program; a program
that meets a NaN or Inf stores 0 to its tensor's flag. Other tensors (e.g. slices of a packed qkv), and CPU
tensors outside Triton's interpreter, take the PyTorch path :func:`finite_flags_reference` (the
specification: each tensor's min and max, which NaN and Inf reach).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.common import interpreter_active

BLOCK = 8192
"""Elements one program checks (16 KiB of bf16)."""
MAX_TENSORS = 3
"""Most tensors one launch checks (q, k and v)."""

__all__ = ["finite_flags_of", "finite_flags_reference", "storage_order"]


def storage_order(t: Tensor) -> Tensor:
    """``t``'s dims permuted by descending stride: a contiguous view of a dense tensor in any layout
    (e.g. ``(B, S, H, D)`` for a ``(B, H, S, D)`` view of ``(B, S, H, D)`` storage), so a pass over
    every element reads it in place (``torch.aminmax`` clones a non-contiguous input)."""
    return t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def finite_flags_reference(tensors: Sequence[Tensor]) -> Tensor:
    """int64 ``(n,)``: whether each non-empty tensor holds only finite values (its min and max, 0-d results:
    no copy, NaN propagates through both)."""
    bounds = torch.stack([bound.float() for t in tensors for bound in torch.aminmax(storage_order(t))])
    return torch.isfinite(bounds).view(len(tensors), 2).all(-1).long()


@triton.jit
def _clear_if_nonfinite(x, n, block, flag, BLOCK: tl.constexpr):
    """Store 0 to ``flag`` when elements ``[block * BLOCK, ...)`` of the flat ``x`` (``n`` long) hold NaN or Inf."""
    offsets = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(x + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    bad = tl.max(((values != values) | (tl.abs(values) == float("inf"))).to(tl.int32), axis=0)
    if bad > 0:
        tl.store(flag, 0)


@triton.jit
def _finite_flags_kernel(x0, x1, x2, n0, n1, n2, flags, BLOCK: tl.constexpr):
    """Grid ``(cdiv(n0, BLOCK) + cdiv(n1, BLOCK) + cdiv(n2, BLOCK),)``: program ``p`` checks one block of the
    tensor its index falls in and clears that tensor's entry of ``flags`` (int64, set to 1 before) on a NaN or Inf."""
    pid = tl.program_id(0)
    blocks0 = tl.cdiv(n0, BLOCK)
    blocks1 = tl.cdiv(n1, BLOCK)
    if pid < blocks0:
        _clear_if_nonfinite(x0, n0, pid, flags, BLOCK)
    elif pid < blocks0 + blocks1:
        _clear_if_nonfinite(x1, n1, pid - blocks0, flags + 1, BLOCK)
    else:
        _clear_if_nonfinite(x2, n2, pid - blocks0 - blocks1, flags + 2, BLOCK)


def _flat(t: Tensor) -> Tensor | None:
    """``t``'s elements as a 1-D view in storage order, or ``None`` when they are not dense in memory."""
    ordered = storage_order(t)
    return ordered.view(-1) if ordered.is_contiguous() else None


def finite_flags_of(tensors: Sequence[Tensor]) -> Tensor:
    """int64 ``(n,)`` on the tensors' device: whether each of ``tensors`` (1 to 3 non-empty tensors of one
    device, floating point) holds only finite values. Not read."""
    if not 1 <= len(tensors) <= MAX_TENSORS:
        raise ValueError(f"tensors must hold 1 to {MAX_TENSORS} tensors, got {len(tensors)}")
    flat = [_flat(t) for t in tensors]
    device = tensors[0].device
    if not (device.type == "cuda" or interpreter_active()) or any(f is None for f in flat):
        return finite_flags_reference(tensors)
    flags = torch.ones(MAX_TENSORS, dtype=torch.int64, device=device)
    padded = flat + [flat[0]] * (MAX_TENSORS - len(flat))
    sizes = [f.numel() for f in flat] + [0] * (MAX_TENSORS - len(flat))
    grid = (sum(triton.cdiv(n, BLOCK) for n in sizes),)
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        _finite_flags_kernel[grid](*padded, *sizes, flags, BLOCK=BLOCK, num_warps=8)
    return flags[: len(tensors)]
