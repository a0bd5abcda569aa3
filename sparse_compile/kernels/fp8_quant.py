"""FP8 (e4m3) quantisation of attention inputs, SageAttention-style (pure PyTorch).

- K is *smoothed*: its per-(batch, head) mean over tokens ``k_mean`` ``(B, H, D)`` is subtracted.
  Every score of a query row then moves by the same ``scale * q . k_mean``, so the softmax (and O) is
  unchanged and the row's LSE drops by that amount; :func:`smoothing_lse_shift` gives it back.
- Q and the smoothed K are quantised per (batch, head, block of rows) (:func:`quantize_row_blocks`), V
  per (batch, head, channel) (:func:`quantize_channels`), each to ``float8_e4m3fn`` with fp32 scales
  ``amax * SCALE_PER_AMAX`` (about ``amax / 448``; an all-zero group gets scale 1), so
  ``x ~ x_fp8 * scale``: ``x / scale`` (a true division) cast to e4m3, rounding to nearest even.

Each tensor is quantised one head at a time, so no fp32 copy larger than one head's is ever held.

:func:`quantize_attention_inputs` does all of it for one call (:class:`Fp8Inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.common import cdiv

FP8_DTYPE = torch.float8_e4m3fn
"""The storage dtype of the quantised tensors."""
FP8_MAX = 448.0
"""Largest finite ``float8_e4m3fn`` value: a group's amax maps onto it."""
SCALE_PER_AMAX = 1.0 / FP8_MAX
"""A group's scale is its fp32 amax times this, rounded to fp32: a multiply, which torch computes the same
on every device (its CUDA division of a tensor by a Python scalar is this multiply, its CPU one a true
division, one ulp apart for about half the amaxes)."""


def _scale_of(amax: Tensor) -> Tensor:
    """fp32 scales ``amax * SCALE_PER_AMAX``, 1 where a group is all zeros."""
    amax = amax.float()
    return torch.where(amax > 0, amax * SCALE_PER_AMAX, 1.0)


def quantize_row_blocks(x: Tensor, block: int, mean: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``x`` ``(B, H, S, D)`` (less ``mean`` fp32 ``(B, H, D)`` when given) -> ``float8_e4m3fn``
    ``(B, H, S, D)`` (contiguous) and fp32 scales ``(B, H, cdiv(S, block))``, one per run of ``block``
    rows (the last run may be partial)."""
    b, h, s, d = x.shape
    n = cdiv(s, block)
    x_fp8 = torch.empty(b, h, s, d, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(b, h, n, dtype=torch.float32, device=x.device)
    for head in range(h):
        rows = x[:, head].float()
        if mean is not None:
            rows -= mean[:, head].unsqueeze(1)
        padded = F.pad(rows, (0, 0, 0, n * block - s)).view(b, n, block, d)
        scale[:, head] = _scale_of(padded.abs().amax(dim=(-1, -2)))
        x_fp8[:, head] = (padded / scale[:, head, :, None, None]).to(FP8_DTYPE).view(b, n * block, d)[:, :s]
    return x_fp8, scale


def dequantize_row_blocks(x_fp8: Tensor, scale: Tensor, block: int) -> Tensor:
    """Inverse of :func:`quantize_row_blocks`: fp32 ``(B, H, S, D)``."""
    rows = scale.repeat_interleave(block, dim=-1)[..., : x_fp8.shape[2]]
    return x_fp8.float() * rows.unsqueeze(-1)


def quantize_channels(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` ``(B, H, S, D)`` -> ``float8_e4m3fn`` ``(B, H, S, D)`` and fp32 scales ``(B, H, D)``, one per channel.

    The fp8 tensor is stored as a contiguous ``(B, H, D, S)`` (returned transposed): the layout the
    tensor cores want for the B operand of ``P V`` in fp8 (contiguous along the reduced keys).
    """
    b, h, s, d = x.shape
    x_fp8 = torch.empty(b, h, d, s, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(b, h, d, dtype=torch.float32, device=x.device)
    for head in range(h):
        rows = x[:, head].float()
        scale[:, head] = _scale_of(rows.abs().amax(dim=1))
        x_fp8[:, head] = (rows / scale[:, head].unsqueeze(1)).transpose(-1, -2).to(FP8_DTYPE)
    return x_fp8.transpose(-1, -2), scale


def dequantize_channels(x_fp8: Tensor, scale: Tensor) -> Tensor:
    """Inverse of :func:`quantize_channels`: fp32 ``(B, H, S, D)``."""
    return x_fp8.float() * scale.unsqueeze(2)


def key_mean(k: Tensor) -> Tensor:
    """``k`` ``(B, H, S_k, D)`` -> fp32 ``k_mean`` ``(B, H, D)``, its mean over tokens (accumulated in fp32)."""
    return k.mean(dim=2, dtype=torch.float32)


def smoothing_lse_shift(q: Tensor, k_mean: Tensor, scale: float) -> Tensor:
    """What smoothing K took off each row's natural-log LSE: fp32 ``scale * q . k_mean`` ``(B, H, S_q)``.

    ``q`` ``(B, H, S_q, D)``, ``k_mean`` ``(B, H, D)`` from :func:`key_mean`.
    """
    return torch.matmul(q.float(), k_mean.unsqueeze(-1)).squeeze(-1) * scale


# ------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def round_to_e4m3_grid(x):
    """fp32 ``x`` (``|x| <= 448``) rounded to the nearest e4m3 value (ties to even), still fp32, sign kept.

    Triton 3.6's interpreter casts fp32 to e4m3 wrongly when the rounding carries into the exponent
    (0.49 becomes 0.25); values already on the e4m3 grid it casts exactly. Normal range: round the fp32
    mantissa of ``|x|`` to 3 bits; subnormal range (below 2^-6, steps of 2^-9): an add and subtract of
    2^14; then ``x``'s sign bit back on (so ``-0.0`` and negatives that round to zero stay negative).
    """
    magnitude = tl.abs(x)
    bits = magnitude.to(tl.uint32, bitcast=True)
    rounded = bits + 0x7FFFF + ((bits >> 20) & 1)
    normal = ((rounded >> 20) << 20).to(tl.float32, bitcast=True)
    subnormal = (magnitude + 16384.0) - 16384.0
    on_grid = tl.where(magnitude < 0.015625, subnormal, normal).to(tl.uint32, bitcast=True)
    sign = (x.to(tl.uint32, bitcast=True) >> 31) << 31
    return (on_grid | sign).to(tl.float32, bitcast=True)


@triton.jit
def to_e4m3(x, EXACT_CAST: tl.constexpr):
    """fp32 ``x`` (``|x| <= 448``) cast to e4m3, rounding to nearest even. ``EXACT_CAST``: round onto the
    e4m3 grid first (:func:`round_to_e4m3_grid`, for the interpreter)."""
    if EXACT_CAST:
        x = round_to_e4m3_grid(x)
    return x.to(tl.float8e4nv)


@dataclass(frozen=True)
class Fp8Inputs:
    """q, k, v of one attention call in ``float8_e4m3fn`` with their fp32 scales.

    Attributes:
        q: ``(B, H, S_q, D)``, ``q ~ q_fp8 * q_scale`` of its row block.
        k: ``(B, H, S_k, D)``, ``k - k_mean ~ k_fp8 * k_scale`` of its row block.
        v: ``(B, H, S_k, D)`` stored as a contiguous ``(B, H, D, S_k)``, ``v ~ v_fp8 * v_scale`` of its channel.
        q_scale: ``(B, H, cdiv(S_q, block_q))``.
        k_scale: ``(B, H, cdiv(S_k, block_k))``.
        v_scale: ``(B, H, D)``.
        k_mean: ``(B, H, D)``, the mean over tokens taken off k.
        block_q: rows per q scale.
        block_k: rows per k scale.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    q_scale: Tensor
    k_scale: Tensor
    v_scale: Tensor
    k_mean: Tensor
    block_q: int
    block_k: int

    def dequantized(self) -> tuple[Tensor, Tensor, Tensor]:
        """fp32 ``(q, k - k_mean, v)`` as the fp8 tensors and scales hold them."""
        return (
            dequantize_row_blocks(self.q, self.q_scale, self.block_q),
            dequantize_row_blocks(self.k, self.k_scale, self.block_k),
            dequantize_channels(self.v, self.v_scale),
        )


def quantize_attention_inputs(q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int) -> Fp8Inputs:
    """Smooth K, then quantise Q per ``block_q`` rows, K per ``block_k`` rows and V per channel.

    q ``(B, H, S_q, D)``, k and v ``(B, H, S_k, D)``, any float dtype and strides.
    """
    k_mean = key_mean(k)
    q_fp8, q_scale = quantize_row_blocks(q, block_q)
    k_fp8, k_scale = quantize_row_blocks(k, block_k, mean=k_mean)
    v_fp8, v_scale = quantize_channels(v)
    return Fp8Inputs(q_fp8, k_fp8, v_fp8, q_scale, k_scale, v_scale, k_mean, block_q, block_k)
