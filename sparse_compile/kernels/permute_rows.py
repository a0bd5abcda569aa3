"""Rows of ``(B, H, S, D)`` tensors gathered by a token permutation: a memory-bound Triton kernel.

``gather_rows(xs, perm)`` returns, for each ``x`` of ``xs``, the contiguous ``out[b, h, i, :] =
x[b, h, perm[b, h, i], :]`` (token order into kernel order). One call moves one or two tensors that
share the permutation (e.g. k and v together) in one launch. The inputs have any strides (typically
``(B, S, H, D)`` storage viewed as ``(B, H, S, D)``); ``perm`` int32/int64 ``(B or 1, H or 1, S)`` may
broadcast its batch and head dims with stride 0. Outputs must not overlap the inputs (not checked).
A ``(B, H, S)`` tensor moves as rows of D = 1 (``x[..., None]``).

Each program moves ``BLOCK_ROWS`` rows of every tensor: it loads their ``BLOCK_ROWS`` permutation
entries once, then copies each tensor's ``BLOCK_ROWS x D`` tile with loads and stores coalesced along D
(the D elements of a row are contiguous in the usual layouts; 16 bytes per thread), both tensors' loads
before their stores. A copy is exact: the kernel never converts a value.

CUDA tensors run the kernel, CPU tensors the PyTorch path (``torch.gather``, the specification), or the
kernel under Triton's interpreter (:func:`interpreter_active`). Permutation values are not checked (no
host sync).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.common import (
    check_out_buffer,
    expand_permutation,
    interpreter_active,
    strided_tile_pointers,
)

MAX_ROW = 256
"""Most elements D of one row."""
TILE_ELEMENTS = 4096
"""Elements of one tensor a program moves: ``BLOCK_ROWS = TILE_ELEMENTS / BLOCK_D`` rows (32 rows of D = 128),
at most :data:`MAX_BLOCK_ROWS`."""
MAX_BLOCK_ROWS = 1024
"""Most rows per program (the cap for short rows: D <= 2)."""

__all__ = ["MAX_ROW", "gather_rows", "tile_shape"]


@triton.jit
def _permute_rows_kernel(
    perm, x0, out0, x1, out1,
    p_b, p_h, p_s,
    x0_b, x0_h, x0_s, x0_d, o0_b, o0_h, o0_s, o0_d,
    x1_b, x1_h, x1_s, x1_d, o1_b, o1_h, o1_s, o1_d,
    num_heads, seq_len,
    D: tl.constexpr, TWO: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Grid ``(cdiv(S, BLOCK_ROWS), B*H)``: ``out[b, h, i] = x[b, h, perm[b, h, i]]`` for ``(x0, out0)`` and,
    when ``TWO``, ``(x1, out1)``, all ``(B, H, S, D)`` with the strides given; perm ``(B, H, S)`` by its
    strides."""
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = (bh % num_heads).to(tl.int64)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    in_seq = rows < seq_len
    tokens = tl.load(perm + b * p_b + h * p_h + rows * p_s, mask=in_seq, other=0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = in_seq[:, None] & (cols < D)[None, :]
    rows0 = tl.load(strided_tile_pointers(x0, b, h, tokens, cols, x0_b, x0_h, x0_s, x0_d), mask=mask)
    if TWO:  # both tensors' loads are issued before either store
        rows1 = tl.load(strided_tile_pointers(x1, b, h, tokens, cols, x1_b, x1_h, x1_s, x1_d), mask=mask)
        tl.store(strided_tile_pointers(out1, b, h, rows, cols, o1_b, o1_h, o1_s, o1_d), rows1, mask=mask)
    tl.store(strided_tile_pointers(out0, b, h, rows, cols, o0_b, o0_h, o0_s, o0_d), rows0, mask=mask)


def _check_rows(xs: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` unless ``xs`` holds one or two ``(B, H, S, D)`` tensors, D in [1, MAX_ROW], of one
    shape, dtype and device."""
    if len(xs) not in (1, 2):
        raise ValueError(f"xs must hold 1 or 2 tensors, got {len(xs)}")
    first = xs[0]
    if first.dim() != 4:
        raise ValueError(f"xs[0] must be 4-D (B, H, S, D), got shape {tuple(first.shape)}")
    if not 1 <= first.shape[-1] <= MAX_ROW:
        raise ValueError(f"xs[0] rows must have 1 to {MAX_ROW} elements (D), got {first.shape[-1]}")
    for i, x in enumerate(xs[1:], 1):
        if x.shape != first.shape or x.dtype != first.dtype or x.device != first.device:
            raise ValueError(
                f"xs[{i}] must match xs[0] ({tuple(first.shape)}, {first.dtype}, {first.device}), "
                f"got {tuple(x.shape)}, {x.dtype}, {x.device}"
            )


def _checked_perm(xs: Sequence[Tensor], perm: Tensor) -> Tensor:
    """``perm`` expanded to ``(B, H, S)`` after checking it against ``xs``."""
    b, h, s, _ = xs[0].shape
    if perm.device != xs[0].device:
        raise ValueError(f"perm must be on xs' device {xs[0].device}, got {perm.device}")
    return expand_permutation(perm, "perm", b, h, s)


def _check_outs(xs: Sequence[Tensor], outs: Sequence[Tensor]) -> None:
    """Raise ``ValueError`` unless ``outs`` has one contiguous buffer of each x's shape, dtype and device."""
    if len(outs) != len(xs):
        raise ValueError(f"outs must hold one buffer per tensor of xs ({len(xs)}), got {len(outs)}")
    for i, (x, out) in enumerate(zip(xs, outs)):
        check_out_buffer(f"outs[{i}]", out, tuple(x.shape), x.dtype, x.device)


def _move_rows_torch(xs: Sequence[Tensor], perm: Tensor, outs: Sequence[Tensor]) -> None:
    """The PyTorch path and specification: ``torch.gather`` along S, perm ``(B, H, S)``."""
    index = perm.long()[..., None].expand(xs[0].shape)
    for x, out in zip(xs, outs):
        torch.gather(x, 2, index, out=out)


def tile_shape(d: int) -> tuple[int, int]:
    """``(BLOCK_ROWS, BLOCK_D)`` of one program for rows of ``d`` elements."""
    block_d = triton.next_power_of_2(d)
    return min(MAX_BLOCK_ROWS, TILE_ELEMENTS // block_d), block_d


def _launch(xs: Sequence[Tensor], perm: Tensor, outs: Sequence[Tensor]) -> None:
    """One kernel launch moving the rows of every tensor of ``xs`` into ``outs``; perm ``(B, H, S)``."""
    b, h, s, d = xs[0].shape
    block_rows, block_d = tile_shape(d)
    x1, out1 = (xs[1], outs[1]) if len(xs) == 2 else (xs[0], outs[0])
    with torch.cuda.device(perm.device) if perm.is_cuda else nullcontext():
        _permute_rows_kernel[(triton.cdiv(s, block_rows), b * h)](
            perm, xs[0], outs[0], x1, out1, *perm.stride(),
            *xs[0].stride(), *outs[0].stride(), *x1.stride(), *out1.stride(), h, s,
            D=d, TWO=len(xs) == 2, BLOCK_ROWS=block_rows, BLOCK_D=block_d,
        )  # fmt: skip


def _move_rows(xs: Sequence[Tensor], perm: Tensor, outs: Sequence[Tensor]) -> None:
    """The kernel on CUDA or under the interpreter, else the PyTorch path; nothing to do for empty tensors."""
    if xs[0].numel() == 0:
        return
    if xs[0].is_cuda or interpreter_active():
        _launch(xs, perm, outs)
    else:
        _move_rows_torch(xs, perm, outs)


def gather_rows(xs: Sequence[Tensor], perm: Tensor, outs: Optional[Sequence[Tensor]] = None) -> tuple[Tensor, ...]:
    """``out[b, h, i, :] = x[b, h, perm[b, h, i], :]`` for each x of ``xs`` (one or two ``(B, H, S, D)``
    tensors of one shape, dtype and device, any strides, D <= :data:`MAX_ROW`), in one launch.

    ``perm`` int32/int64 ``(B or 1, H or 1, S)``, a permutation of ``[0, S)`` per (b, h) (not checked).
    ``outs``: contiguous ``(B, H, S, D)`` buffers, one per x (default: new ones). Returns the outputs.
    Raises ``ValueError`` naming the argument on bad shapes, dtypes or devices.
    """
    _check_rows(xs)
    perm = _checked_perm(xs, perm)
    if outs is None:
        outs = tuple(torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in xs)
    _check_outs(xs, outs)
    _move_rows(xs, perm, outs)
    return tuple(outs)
