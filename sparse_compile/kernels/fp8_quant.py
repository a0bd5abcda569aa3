"""FP8 (e4m3) quantisation of attention inputs, SageAttention-style: the PyTorch specification and Triton kernels.

- K is *smoothed*: its per-(batch, head) mean over tokens ``k_mean`` ``(B, H, D)`` is subtracted.
  Every score of a query row then moves by the same ``scale * q . k_mean``, so the softmax (and O) is
  unchanged and the row's LSE drops by that amount; :func:`smoothing_lse_shift` gives it back (the
  kernels compute it in Q's quantisation pass, with no fp32 copy of Q).
- Q and the smoothed K are quantised per (batch, head, block of rows) (:func:`quantize_row_blocks`), V
  per (batch, head, channel) (:func:`quantize_channels`), each to ``float8_e4m3fn`` with fp32 scales
  ``amax * SCALE_PER_AMAX`` (about ``amax / 448``; an all-zero group gets scale 1), so
  ``x ~ x_fp8 * scale``: ``x / scale`` (a true division) cast to e4m3, rounding to nearest even.

The PyTorch functions are the specification; they quantise one head at a time, so no fp32 copy larger
than one head's is ever held. :func:`quantize_row_blocks_triton` (one launch) and
:func:`quantize_channels_triton` (two: the channel amax by atomic max, then the cast) give the same e4m3
bits and scales on CUDA and under Triton's interpreter. The kernels divide with ``div_rn`` (Triton's
``/`` is approximate on the GPU) and under the interpreter round onto the e4m3 grid before the cast
(:func:`round_to_e4m3_grid`).

:func:`quantize_attention_inputs` does all of it for one call (:class:`Fp8Inputs`): the kernels on CUDA
tensors and under the interpreter, the PyTorch functions otherwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.common import (
    SUPPORTED_DTYPES,
    cdiv,
    check_out_buffer,
    check_strided_out_buffer,
    default_scale,
    interpreter_active,
    strided_tile_pointers,
)
from sparse_compile.kernels.tile_configs import FP8_CHANNEL_TOKENS, fp8_quant_warps

FP8_DTYPE = torch.float8_e4m3fn
"""The storage dtype of the quantised tensors."""
FP8_MAX = 448.0
"""Largest finite ``float8_e4m3fn`` value: a group's amax maps onto it."""
SCALE_PER_AMAX = 1.0 / FP8_MAX
"""A group's scale is its fp32 amax times this, rounded to fp32: a multiply, which torch computes the same
on every device (its CUDA division of a tensor by a Python scalar is this multiply, its CPU one a true
division, one ulp apart for about half the amaxes)."""
_SCALE_PER_AMAX = tl.constexpr(SCALE_PER_AMAX)
""":data:`SCALE_PER_AMAX` for the kernels."""


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
            rows = rows - mean[:, head].unsqueeze(1)  # not in place: .float() of fp32 x is x itself
        padded = F.pad(rows, (0, 0, 0, n * block - s)).view(b, n, block, d)
        scale[:, head] = _scale_of(padded.abs().amax(dim=(-1, -2)))
        x_fp8[:, head] = (padded / scale[:, head, :, None, None]).to(FP8_DTYPE).view(b, n * block, d)[:, :s]
    return x_fp8, scale


def dequantize_row_blocks(x_fp8: Tensor, scale: Tensor, block: int) -> Tensor:
    """Inverse of :func:`quantize_row_blocks`: fp32 ``(B, H, S, D)``."""
    rows = scale.repeat_interleave(block, dim=-1)[..., : x_fp8.shape[2]]
    return x_fp8.float() * rows.unsqueeze(-1)


def channels_first_fp8(b: int, h: int, s: int, d: int, device: torch.device, key_multiple: int = 1) -> Tensor:
    """An empty e4m3 ``(B, H, S, D)`` stored channels first: a ``(B, H, D, S_pad)`` buffer (contiguous,
    ``S_pad`` = ``S`` rounded up to ``key_multiple``) cut to ``S`` keys and transposed. A multiple of 16
    gives 16-byte strides, as TMA needs."""
    s_pad = cdiv(s, key_multiple) * key_multiple
    return torch.empty(b, h, d, s_pad, dtype=FP8_DTYPE, device=device)[..., :s].transpose(-1, -2)


def quantize_channels(x: Tensor, key_multiple: int = 1) -> tuple[Tensor, Tensor]:
    """``x`` ``(B, H, S, D)`` -> ``float8_e4m3fn`` ``(B, H, S, D)`` and fp32 scales ``(B, H, D)``, one per channel.

    The fp8 tensor is stored channels first (:func:`channels_first_fp8`, keys padded to ``key_multiple``):
    the layout the tensor cores want for the B operand of ``P V`` in fp8 (contiguous along the reduced keys).
    """
    b, h, s, d = x.shape
    x_fp8 = channels_first_fp8(b, h, s, d, x.device, key_multiple).transpose(-1, -2)
    scale = torch.empty(b, h, d, dtype=torch.float32, device=x.device)
    for head in range(h):
        rows = x[:, head].float()
        scale[:, head] = _scale_of(rows.abs().amax(dim=1))
        x_fp8[:, head] = (rows / scale[:, head].unsqueeze(1)).transpose(-1, -2).to(FP8_DTYPE)
    return x_fp8.transpose(-1, -2), scale


def dequantize_channels(x_fp8: Tensor, scale: Tensor) -> Tensor:
    """Inverse of :func:`quantize_channels`: fp32 ``(B, H, S, D)``."""
    return x_fp8.float() * scale.unsqueeze(2)


def scaled_probabilities_e4m3(p: Tensor) -> Tensor:
    """fp32 probabilities ``p`` (any shape, in ``[0, 1]``) as the kernels feed them to ``P V``: times
    :data:`FP8_MAX`, rounded to e4m3, back in fp32 (still times :data:`FP8_MAX`)."""
    return (p * FP8_MAX).to(FP8_DTYPE).float()


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


@triton.jit
def _scale_of_amax(amax):
    """fp32 scales of fp32 ``amax`` (any shape) as :func:`_scale_of` computes them."""
    return tl.where(amax > 0, amax * _SCALE_PER_AMAX, 1.0)


@triton.jit
def _quantize_row_blocks_kernel(
    X, MEAN, X_FP8, SCALE, DOT_WITH, DOT_OUT,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_mb, stride_mh, stride_md,
    stride_ob, stride_oh, stride_os, stride_od,
    stride_db, stride_dh, stride_dd,
    H, S, NUM_BLOCKS,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    COLUMNS: tl.constexpr,
    SMOOTH: tl.constexpr,
    ROW_DOT: tl.constexpr,
    EXACT_CAST: tl.constexpr,
):  # fmt: skip
    """One program: run ``pid(0)`` of BLOCK rows of one (batch, head), grid (NUM_BLOCKS, B * H).

    X ``(B, H, S, HEAD_DIM)`` and X_FP8 (e4m3, same shape) any strides; MEAN fp32 ``(B, H, HEAD_DIM)``
    any strides, taken off X with SMOOTH; SCALE contiguous fp32 ``(B, H, NUM_BLOCKS)``. With ROW_DOT, the
    fp32 dot of each row of X (before smoothing) with DOT_WITH fp32 ``(B, H, HEAD_DIM)`` (any strides) goes
    to DOT_OUT, contiguous fp32 ``(B, H, S)``. The tile is
    ROWS x COLUMNS, BLOCK and HEAD_DIM rounded up to powers of two; rows past the run or past S and
    columns past HEAD_DIM count as zeros.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_r = tl.arange(0, ROWS)
    rows = pid_n * BLOCK + offs_r
    cols = tl.arange(0, COLUMNS)
    col_ok = cols < HEAD_DIM
    ok = ((offs_r < BLOCK) & (rows < S))[:, None] & col_ok[None, :]
    src = strided_tile_pointers(X, off_b, off_h, rows, cols, stride_xb, stride_xh, stride_xs, stride_xd)
    x = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    if ROW_DOT:
        vec = tl.load(DOT_WITH + off_b * stride_db + off_h * stride_dh + cols * stride_dd, mask=col_ok, other=0.0)
        tl.store(DOT_OUT + pid_bh.to(tl.int64) * S + rows, tl.sum(x * vec[None, :], axis=1),
                 mask=(offs_r < BLOCK) & (rows < S))
    if SMOOTH:
        mean = tl.load(MEAN + off_b * stride_mb + off_h * stride_mh + cols * stride_md, mask=col_ok, other=0.0)
        x = tl.where(ok, x - mean[None, :], 0.0)
    scale = _scale_of_amax(tl.max(tl.abs(x)))
    tl.store(SCALE + pid_bh.to(tl.int64) * NUM_BLOCKS + pid_n, scale)
    dst = strided_tile_pointers(X_FP8, off_b, off_h, rows, cols, stride_ob, stride_oh, stride_os, stride_od)
    tl.store(dst, to_e4m3(tl.math.div_rn(x, scale), EXACT_CAST), mask=ok)


@triton.jit
def _channel_amax_kernel(
    X, AMAX,
    stride_xb, stride_xh, stride_xs, stride_xd,
    H, S,
    HEAD_DIM: tl.constexpr,
    TOKENS: tl.constexpr,
    COLUMNS: tl.constexpr,
):  # fmt: skip
    """One program: ``|x|``'s max per channel over TOKENS tokens of one (batch, head), atomically maxed
    into AMAX, grid (cdiv(S, TOKENS), B * H).

    X ``(B, H, S, HEAD_DIM)`` any strides; AMAX contiguous fp32 ``(B, H, HEAD_DIM)``, zeros before the
    first program (every amax is >= 0). The tile is TOKENS x COLUMNS (HEAD_DIM rounded up to a power of two).
    """
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows = pid_s * TOKENS + tl.arange(0, TOKENS)
    cols = tl.arange(0, COLUMNS)
    col_ok = cols < HEAD_DIM
    src = strided_tile_pointers(X, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64), rows, cols,
                         stride_xb, stride_xh, stride_xs, stride_xd)  # fmt: skip
    x = tl.load(src, mask=(rows < S)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tl.atomic_max(AMAX + pid_bh.to(tl.int64) * HEAD_DIM + cols, tl.max(tl.abs(x), 0), mask=col_ok, sem="relaxed")


@triton.jit
def _quantize_channels_kernel(
    X, AMAX, X_FP8, SCALE,
    stride_xb, stride_xh, stride_xs, stride_xd,
    stride_ob, stride_oh, stride_os, stride_od,
    H, S, S_STORE,
    HEAD_DIM: tl.constexpr,
    TOKENS: tl.constexpr,
    COLUMNS: tl.constexpr,
    EXACT_CAST: tl.constexpr,
):  # fmt: skip
    """One program: TOKENS tokens of one (batch, head) divided by their channels' scales and cast to
    e4m3, grid (cdiv(S, TOKENS) or 1, B * H); the first program of each (batch, head) writes its scales.

    X ``(B, H, S, HEAD_DIM)`` any strides; X_FP8 (e4m3) any strides over ``S_STORE >= S`` tokens, those past
    S written as zeros (a channels-first X_FP8 with S_STORE a multiple of 16 gets whole 16-byte stores
    along its tokens, not one store per byte); AMAX (from :func:`_channel_amax_kernel`) and SCALE
    contiguous fp32 ``(B, H, HEAD_DIM)``.
    """
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    rows = pid_s * TOKENS + tl.arange(0, TOKENS)
    cols = tl.arange(0, COLUMNS)
    col_ok = cols < HEAD_DIM
    channels = pid_bh.to(tl.int64) * HEAD_DIM + cols
    scale = _scale_of_amax(tl.load(AMAX + channels, mask=col_ok, other=0.0))
    tl.store(SCALE + channels, scale, mask=col_ok & (pid_s == 0))
    src = strided_tile_pointers(X, off_b, off_h, rows, cols, stride_xb, stride_xh, stride_xs, stride_xd)
    x = tl.load(src, mask=(rows < S)[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    dst = strided_tile_pointers(X_FP8, off_b, off_h, rows, cols, stride_ob, stride_oh, stride_os, stride_od)
    stored = (rows < S_STORE)[:, None] & col_ok[None, :]
    tl.store(dst, to_e4m3(tl.math.div_rn(x, scale[None, :]), EXACT_CAST), mask=stored)


def _check_kernel_input(x: Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a float16, bfloat16 or float32 ``(B, H, S, D)`` tensor."""
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (B, H, S, D), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32 for the Triton quantisation, got {x.dtype}")


def _check_head_vectors(name: str, vectors: Tensor, x: Tensor) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``vectors`` is fp32 ``(B, H, D)`` on ``x``'s device."""
    b, h, _, d = x.shape
    if vectors.shape != (b, h, d) or vectors.dtype != torch.float32 or vectors.device != x.device:
        raise ValueError(f"{name} must be a float32 tensor of shape {(b, h, d)} on {x.device}, got "
                         f"{vectors.dtype} {tuple(vectors.shape)} on {vectors.device}")


def _fp8_out(out: Tensor | None, x: Tensor, channels_first: bool, key_multiple: int = 1) -> Tensor:
    """``out`` checked (e4m3 ``x.shape``, any non-overlapping strides), or a new one: contiguous, or with
    ``channels_first`` stored channels first with keys padded to ``key_multiple`` (:func:`channels_first_fp8`)."""
    if out is not None:
        check_strided_out_buffer("out", out, tuple(x.shape), FP8_DTYPE, x.device)
        return out
    b, h, s, d = x.shape
    if channels_first:
        return channels_first_fp8(b, h, s, d, x.device, key_multiple)
    return torch.empty(b, h, s, d, dtype=FP8_DTYPE, device=x.device)


def _scale_out(scale_out: Tensor | None, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """``scale_out`` checked (contiguous fp32 of ``shape``), or a new one."""
    if scale_out is not None:
        check_out_buffer("scale_out", scale_out, shape, torch.float32, device)
        return scale_out
    return torch.empty(shape, dtype=torch.float32, device=device)


def _launch_device(x: Tensor) -> contextlib.AbstractContextManager:
    """The context to launch the kernels on ``x``'s device: its CUDA device, or nothing under the
    interpreter; ``ValueError`` for other devices."""
    if x.is_cuda:
        return torch.cuda.device(x.device)
    if not interpreter_active():
        raise ValueError(
            f"x must be a CUDA tensor, or TRITON_INTERPRET=1 set before triton is imported (got {x.device})"
        )
    return contextlib.nullcontext()


def quantize_row_blocks_triton(
    x: Tensor,
    block: int,
    mean: Tensor | None = None,
    *,
    out: Tensor | None = None,
    scale_out: Tensor | None = None,
    dot_with: Tensor | None = None,
    dot_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`quantize_row_blocks` in one Triton launch (CUDA, or Triton's interpreter): the same e4m3
    values and scales.

    ``x`` float16/bfloat16/float32 ``(B, H, S, D)``, any strides; ``mean`` fp32 ``(B, H, D)``, any
    strides; ``block`` any positive run length. ``out``: e4m3 ``(B, H, S, D)`` with non-overlapping
    strides (default contiguous); ``scale_out``: contiguous fp32 ``(B, H, cdiv(S, block))``; both are
    written whole and returned. With ``dot_with`` (fp32 ``(B, H, D)``, any strides) the same pass writes
    each row's fp32 dot with it (before ``mean`` is taken off) into ``dot_out`` (contiguous fp32
    ``(B, H, S)``, required then), with no second read of ``x``. Raises ``ValueError`` naming the argument
    it cannot take.
    """
    _check_kernel_input(x)
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    b, h, s, d = x.shape
    if mean is not None:
        _check_head_vectors("mean", mean, x)
    if (dot_with is None) != (dot_out is None):
        raise ValueError("dot_with and dot_out must be given together")
    if dot_with is not None:
        _check_head_vectors("dot_with", dot_with, x)
        check_out_buffer("dot_out", dot_out, (b, h, s), torch.float32, x.device)
    num_blocks = cdiv(s, block)
    out = _fp8_out(out, x, channels_first=False)
    scale_out = _scale_out(scale_out, (b, h, num_blocks), x.device)
    rows, columns = triton.next_power_of_2(block), triton.next_power_of_2(d)
    mean_strides = (0, 0, 0) if mean is None else mean.stride()
    dot_strides = (0, 0, 0) if dot_with is None else dot_with.stride()
    with _launch_device(x):
        _quantize_row_blocks_kernel[(num_blocks, b * h)](
            x, x if mean is None else mean, out, scale_out, x if dot_with is None else dot_with,
            scale_out if dot_out is None else dot_out, *x.stride(), *mean_strides, *out.stride(), *dot_strides,
            h, s, num_blocks, HEAD_DIM=d, BLOCK=block, ROWS=rows, COLUMNS=columns, SMOOTH=mean is not None,
            ROW_DOT=dot_with is not None, EXACT_CAST=interpreter_active(), num_warps=fp8_quant_warps(rows * columns),
        )  # fmt: skip
    return out, scale_out


def quantize_channels_triton(
    x: Tensor, *, out: Tensor | None = None, scale_out: Tensor | None = None, key_multiple: int = 1
) -> tuple[Tensor, Tensor]:
    """:func:`quantize_channels` in two Triton launches (CUDA, or Triton's interpreter): the same e4m3
    values and scales.

    ``x`` float16/bfloat16/float32 ``(B, H, S, D)``, any strides. ``out``: e4m3 ``(B, H, S, D)`` with
    non-overlapping strides (default stored channels first, keys padded to ``key_multiple``, as
    :func:`quantize_channels` returns, the padding keys written as zeros); ``scale_out``: contiguous fp32
    ``(B, H, D)``; both are written whole and returned. Raises ``ValueError`` naming the argument it
    cannot take.
    """
    _check_kernel_input(x)
    if not isinstance(key_multiple, int) or key_multiple < 1:
        raise ValueError(f"key_multiple must be a positive int, got {key_multiple!r}")
    b, h, s, d = x.shape
    s_store = s if out is not None else cdiv(s, key_multiple) * key_multiple  # the tokens out's storage holds
    out = _fp8_out(out, x, channels_first=True, key_multiple=key_multiple)
    scale_out = _scale_out(scale_out, (b, h, d), x.device)
    amax = torch.zeros((b, h, d), dtype=torch.float32, device=x.device)
    columns = triton.next_power_of_2(d)
    meta = dict(HEAD_DIM=d, TOKENS=FP8_CHANNEL_TOKENS, COLUMNS=columns,
                num_warps=fp8_quant_warps(FP8_CHANNEL_TOKENS * columns))  # fmt: skip
    with _launch_device(x):
        # the amax pass reads the S tokens; the cast writes every token the storage holds (zeros past S)
        _channel_amax_kernel[(max(cdiv(s, FP8_CHANNEL_TOKENS), 1), b * h)](x, amax, *x.stride(), h, s, **meta)
        _quantize_channels_kernel[(max(cdiv(s_store, FP8_CHANNEL_TOKENS), 1), b * h)](
            x, amax, out, scale_out, *x.stride(), *out.stride(), h, s, s_store, EXACT_CAST=interpreter_active(), **meta
        )
    return out, scale_out


@dataclass(frozen=True)
class Fp8Inputs:
    """q, k, v of one attention call in ``float8_e4m3fn`` with their fp32 scales.

    Attributes:
        q: ``(B, H, S_q, D)``, ``q ~ q_fp8 * q_scale`` of its row block.
        k: ``(B, H, S_k, D)``, ``k - k_mean ~ k_fp8 * k_scale`` of its row block.
        v: ``(B, H, S_k, D)`` stored channels first (:func:`channels_first_fp8`), ``v ~ v_fp8 * v_scale`` of its channel.
        q_scale: ``(B, H, cdiv(S_q, block_q))``.
        k_scale: ``(B, H, cdiv(S_k, block_k))``.
        v_scale: ``(B, H, D)``.
        k_mean: ``(B, H, D)``, the mean over tokens taken off k.
        lse_shift: ``(B, H, S_q)``, ``scale * q . k_mean``: what the smoothing takes off each row's
            natural-log LSE (:func:`smoothing_lse_shift`).
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
    lse_shift: Tensor
    block_q: int
    block_k: int

    def dequantized(self) -> tuple[Tensor, Tensor, Tensor]:
        """fp32 ``(q, k - k_mean, v)`` as the fp8 tensors and scales hold them."""
        return (
            dequantize_row_blocks(self.q, self.q_scale, self.block_q),
            dequantize_row_blocks(self.k, self.k_scale, self.block_k),
            dequantize_channels(self.v, self.v_scale),
        )


def quantize_attention_inputs(
    q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int, v_key_multiple: int = 1, scale: float | None = None
) -> Fp8Inputs:
    """Smooth K, then quantise Q per ``block_q`` rows, K per ``block_k`` rows and V per channel.

    q ``(B, H, S_q, D)``, k and v ``(B, H, S_k, D)``, any strides; ``scale`` the softmax scale (default
    ``D ** -0.5``) of the LSE shift. CUDA tensors and any tensors under Triton's interpreter take the
    kernels (float16, bfloat16 or float32; the LSE shift comes from Q's quantisation pass, against
    ``scale * k_mean``), other tensors the PyTorch functions (any float dtype): the same fp8 values and
    scales, the LSE shift to fp32 rounding. V's keys are padded to ``v_key_multiple`` in storage
    (:func:`channels_first_fp8`).
    """
    scale = default_scale(q.shape[-1], scale)
    k_mean = key_mean(k)
    if q.is_cuda or interpreter_active():
        lse_shift = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        q_fp8, q_scale = quantize_row_blocks_triton(q, block_q, dot_with=k_mean * scale, dot_out=lse_shift)
        k_fp8, k_scale = quantize_row_blocks_triton(k, block_k, mean=k_mean)
        v_fp8, v_scale = quantize_channels_triton(v, key_multiple=v_key_multiple)
    else:
        lse_shift = smoothing_lse_shift(q, k_mean, scale)
        q_fp8, q_scale = quantize_row_blocks(q, block_q)
        k_fp8, k_scale = quantize_row_blocks(k, block_k, mean=k_mean)
        v_fp8, v_scale = quantize_channels(v, key_multiple=v_key_multiple)
    return Fp8Inputs(q_fp8, k_fp8, v_fp8, q_scale, k_scale, v_scale, k_mean, lse_shift, block_q, block_k)
