"""What SVG2's per-call host read needs of a cluster selection, gathered into one int64 vector in one launch.

:func:`selection_summary` takes the query cluster sizes and the key tokens each query cluster keeps
(``(B, H, Kq)`` each, as the selection writes them), the flags the read also carries, the sequence length
and the break-even kept fraction, and returns (without reading anything on the host):

- ``values`` int64 ``(n + 2 H + B H)``: the ``n`` flags; per head 1 where its kept fraction passes the break-even
  in some batch element; per head the most keys one of its q clusters keeps (over the batch); per (batch
  element, head), row-major, the keys all its q clusters keep;
- ``head_fraction`` fp32 ``(B, H)``: the share of the ``S x S`` pairs each (batch element, head) keeps.

:func:`selection_summary_reference` is the specification (a dozen torch ops) and the path off CUDA outside
Triton's interpreter; the Triton kernel runs one program per head over its batch elements and q clusters.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.common import interpreter_active

BLOCK = 1024
"""q clusters a program sums at a time."""

__all__ = ["selection_summary", "selection_summary_reference"]


def head_kept_fraction(q_sizes: Tensor, kept_tokens: Tensor, seq: int) -> Tensor:
    """Fraction of the ``seq x seq`` pairs a cluster layout keeps per (batch, head): fp32 ``(B, H)``.

    ``q_sizes`` ``(B, H, Kq)`` integer; ``kept_tokens`` ``(B, H, Kq)`` integer, the key tokens each
    query cluster keeps. Sums in int64.
    """
    return (kept_tokens.long() * q_sizes).sum(-1).float() / (seq * seq)


def _check(q_sizes: Tensor, kept_tokens: Tensor, flags: Tensor) -> None:
    """Raise ``ValueError`` unless the arguments fit :func:`selection_summary`."""
    if q_sizes.dim() != 3 or q_sizes.shape != kept_tokens.shape or q_sizes.shape[2] == 0:
        raise ValueError(f"q_sizes and kept_tokens must both be (B, H, Kq) with Kq >= 1, got "
                         f"{tuple(q_sizes.shape)} and {tuple(kept_tokens.shape)}")  # fmt: skip
    for name, t in (("q_sizes", q_sizes), ("kept_tokens", kept_tokens)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    if flags.dim() != 1 or flags.dtype != torch.int64:
        raise ValueError(f"flags must be a 1-D int64 tensor, got {flags.dtype} {tuple(flags.shape)}")
    if not q_sizes.device == kept_tokens.device == flags.device:
        raise ValueError("q_sizes, kept_tokens and flags must share a device")


def selection_summary_reference(
    q_sizes: Tensor, kept_tokens: Tensor, seq: int, break_even: float, flags: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`selection_summary` in torch ops (the specification)."""
    _check(q_sizes, kept_tokens, flags)
    head_fraction = head_kept_fraction(q_sizes, kept_tokens, seq)
    kept = kept_tokens.long()
    values = torch.cat([flags, (head_fraction > break_even).any(dim=0).long(), kept.amax(dim=(0, 2)),
                        kept.sum(dim=2).flatten()])  # fmt: skip
    return values, head_fraction


@triton.jit
def _summary_kernel(
    sizes_ptr, kept_ptr, flags_ptr, values_ptr, fraction_ptr, batch, num_heads, num_q_clusters, num_flags,
    pairs, break_even, BLOCK: tl.constexpr,
):
    """Grid ``(H,)``: program ``h`` sums head ``h``'s q clusters (contiguous int32 ``(B, H, Kq)``) per batch element
    into ``fraction`` (fp32 ``(B, H)``) and ``values`` (int64, laid out as :func:`selection_summary` says); program 0
    also copies the ``num_flags`` flags. ``pairs``: ``S * S`` as fp32."""
    h = tl.program_id(0)
    lanes = tl.arange(0, BLOCK)
    if h == 0:
        tl.store(values_ptr + lanes, tl.load(flags_ptr + lanes, mask=lanes < num_flags, other=0),
                 mask=lanes < num_flags)  # fmt: skip
    passed = tl.full([], 0, tl.int32)
    most = tl.full([], 0, tl.int64)
    for b in range(batch):
        row = (b * num_heads + h).to(tl.int64) * num_q_clusters
        kept_sum = tl.zeros([BLOCK], tl.int64)
        weighted = tl.zeros([BLOCK], tl.int64)
        for c0 in range(0, num_q_clusters, BLOCK):
            ok = c0 + lanes < num_q_clusters
            kept = tl.load(kept_ptr + row + c0 + lanes, mask=ok, other=0).to(tl.int64)
            size = tl.load(sizes_ptr + row + c0 + lanes, mask=ok, other=0).to(tl.int64)
            kept_sum += kept
            weighted += kept * size
            most = tl.maximum(most, tl.max(kept, 0))
        fraction = tl.sum(weighted, 0).to(tl.float32) / pairs
        tl.store(fraction_ptr + b * num_heads + h, fraction)
        tl.store(values_ptr + num_flags + 2 * num_heads + b * num_heads + h, tl.sum(kept_sum, 0))
        passed = tl.maximum(passed, (fraction > break_even).to(tl.int32))
    tl.store(values_ptr + num_flags + h, passed.to(tl.int64))
    tl.store(values_ptr + num_flags + num_heads + h, most.to(tl.int64))


def selection_summary(
    q_sizes: Tensor, kept_tokens: Tensor, seq: int, break_even: float, flags: Tensor
) -> tuple[Tensor, Tensor]:
    """``(values, head_fraction)`` of a cluster selection (see the module doc); no host sync.

    ``q_sizes`` and ``kept_tokens`` int32 ``(B, H, Kq)``, ``Kq >= 1``; ``flags`` int64 ``(n,)``, ``n <= BLOCK``;
    ``seq`` the video tokens; ``break_even`` a kept fraction. CUDA, or CPU tensors under ``TRITON_INTERPRET=1``:
    one Triton launch; else :func:`selection_summary_reference`.
    """
    _check(q_sizes, kept_tokens, flags)
    device = q_sizes.device
    if not (device.type == "cuda" or interpreter_active()) or flags.numel() > BLOCK:
        return selection_summary_reference(q_sizes, kept_tokens, seq, break_even, flags)
    b, h, nqc = q_sizes.shape
    values = torch.empty(flags.numel() + 2 * h + b * h, dtype=torch.int64, device=device)
    head_fraction = torch.empty((b, h), dtype=torch.float32, device=device)
    if h > 0:
        _summary_kernel[(h,)](
            q_sizes.contiguous(), kept_tokens.contiguous(), flags, values, head_fraction, b, h, nqc, flags.numel(),
            float(seq * seq), float(break_even), BLOCK=BLOCK,
        )  # fmt: skip
    return values, head_fraction
