"""What SVG2's per-call host read needs of a cluster selection, gathered into one int64 vector in one launch.

:func:`selection_summary` takes the query cluster sizes and the key tokens each query cluster keeps
(``(B, H, Kq)`` each, as the selection writes them), the flags the read also carries, the sequence length
and the break-even kept fraction, and returns, without reading anything on the host, int64 ``(n + 2 H + 2 B H)``:
the ``n`` flags; per head 1 where its kept fraction (its kept pairs over ``S * S``, in fp32) passes the break-even
in some batch element; per head the most keys one of its q clusters keeps (over the batch); per (batch element,
head), row-major, the keys all its q clusters keep; and per (batch element, head) the pairs it keeps.

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
) -> Tensor:
    """:func:`selection_summary` in torch ops (the specification)."""
    _check(q_sizes, kept_tokens, flags)
    kept = kept_tokens.long()
    pairs = (kept * q_sizes).sum(-1)
    passed = (pairs.float() / (seq * seq) > break_even).any(dim=0).long()
    return torch.cat([flags, passed, kept.amax(dim=(0, 2)), kept.sum(dim=2).flatten(), pairs.flatten()])


@triton.jit
def _summary_kernel(
    sizes_ptr, kept_ptr, flags_ptr, values_ptr, batch, num_heads, num_q_clusters, num_flags, all_pairs, break_even,
    BLOCK: tl.constexpr,
):
    """Grid ``(H,)``: program ``h`` sums head ``h``'s q clusters (contiguous int32 ``(B, H, Kq)``) per batch element
    into ``values`` (int64, laid out as :func:`selection_summary` says); program 0 also copies the ``num_flags``
    flags. ``all_pairs``: ``S * S`` as fp32."""
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
        pairs = tl.sum(weighted, 0)
        pair_values = values_ptr + num_flags + 2 * num_heads + b * num_heads + h
        tl.store(pair_values, tl.sum(kept_sum, 0))
        tl.store(pair_values + batch * num_heads, pairs)
        passed = tl.maximum(passed, (pairs.to(tl.float32) / all_pairs > break_even).to(tl.int32))
    tl.store(values_ptr + num_flags + h, passed.to(tl.int64))
    tl.store(values_ptr + num_flags + num_heads + h, most.to(tl.int64))


def selection_summary(q_sizes: Tensor, kept_tokens: Tensor, seq: int, break_even: float, flags: Tensor) -> Tensor:
    """The read vector of a cluster selection (see the module doc); no host sync.

    ``q_sizes`` and ``kept_tokens`` int32 ``(B, H, Kq)``, ``Kq >= 1``; ``flags`` int64 ``(n,)``; ``seq`` the video
    tokens; ``break_even`` a kept fraction. CUDA, or CPU tensors under ``TRITON_INTERPRET=1``: one Triton launch
    (up to ``BLOCK`` flags, one head or more); else :func:`selection_summary_reference`.
    """
    _check(q_sizes, kept_tokens, flags)
    b, h, nqc = q_sizes.shape
    device = q_sizes.device
    if not (device.type == "cuda" or interpreter_active()) or flags.numel() > BLOCK or h == 0:
        return selection_summary_reference(q_sizes, kept_tokens, seq, break_even, flags)
    values = torch.empty(flags.numel() + 2 * h + 2 * b * h, dtype=torch.int64, device=device)
    _summary_kernel[(h,)](
        q_sizes.contiguous(), kept_tokens.contiguous(), flags, values, b, h, nqc, flags.numel(), float(seq * seq),
        float(break_even), BLOCK=BLOCK,
    )  # fmt: skip
    return values
