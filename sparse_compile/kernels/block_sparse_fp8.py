"""Fixed-block block-sparse attention with FP8 (e4m3) tensor-core math: Triton kernel, entry and reference.

:func:`block_sparse_attention_fp8` takes the layout of
:func:`~sparse_compile.kernels.block_sparse.block_sparse_attention` (no token permutations) and fp16/bf16
q, k, v. It quantises them (:mod:`~sparse_compile.kernels.fp8_quant`: K smoothed by its mean over
tokens, Q and K per layout block of rows, V per channel), then runs :func:`_block_sparse_fp8_fwd`, the
fixed-block kernel's grid, layout walk and base-2 online softmax with:

- ``S = Q K^T`` on e4m3 operands with fp32 accumulation, rescaled by ``q_scale * k_scale`` of the tile's
  q and kv blocks;
- the running row max kept an *integer* (base 2, rounded up), so ``P = 2^(S - m)`` lies in ``(0, 1]``,
  every rescale of the accumulator is a power of two and the e4m3 rounding of ``448 P`` does not depend
  on the order the tiles come in: the kernel equals :func:`block_sparse_attention_fp8_reference` up to
  fp32 rounding;
- ``448 P`` (the row's largest entry lands in ``[224, 448]``, the top of e4m3's range) cast to e4m3 for
  ``P V`` against e4m3 V, each tile's product added to an fp32 accumulator in registers (not carried
  through the MMA's own accumulator); O is divided by ``448 l`` and multiplied by V's per-channel scale
  at the end.

The row LSE the kernel writes is that of the smoothed scores; the entry adds back the shift
(:attr:`~sparse_compile.kernels.fp8_quant.Fp8Inputs.lse_shift`), so the returned LSE is the true one.

:func:`block_sparse_attention_fp8_gluon` runs the same computation in the Gluon kernel of
:mod:`~sparse_compile.kernels.gluon_block_sparse_fp8` (sm_90 only), :func:`block_sparse_attention_fp8_triton`
in the Triton kernel; :func:`block_sparse_attention_fp8` runs the one :func:`fp8_kernel_choice` picks.
"""

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.block_sparse import _load_rows, _output_buffers, _tile_start, validate_inputs
from sparse_compile.kernels.block_sparse_reference import expand_layout
from sparse_compile.kernels.common import (
    LOG2E,
    attention_output_like,
    cdiv,
    cuda_capability,
    default_scale,
    interpreter_active,
)
from sparse_compile.kernels.fp8_quant import (
    FP8_MAX,
    quantize_attention_inputs,
    scaled_probabilities_e4m3,
    to_e4m3,
)
from sparse_compile.kernels.gluon_block_sparse_fp8 import (
    V_KEY_MULTIPLE,
    fp8_gluon_ineligibility,
    launch_gluon_block_sparse_fp8,
)
from sparse_compile.kernels.masked_reference import SCORES_BUDGET_BYTES, keep_matrix
from sparse_compile.kernels.tile_configs import TileConfig, fp8_block_sparse_tile, interpreter_block_sparse_tile

__all__ = [
    "block_sparse_attention_fp8",
    "block_sparse_attention_fp8_gluon",
    "block_sparse_attention_fp8_reference",
    "block_sparse_attention_fp8_triton",
    "check_fp8_inputs",
    "fp8_kernel_choice",
    "fp8_problem",
]

FP8_INPUT_DTYPES = (torch.float16, torch.bfloat16)
"""q/k/v dtypes the FP8 entry quantises."""
FP8_HEAD_DIMS = (64, 128)
"""Head dims of the FP8 kernel."""
FP8_MIN_BLOCK = 32
"""Smallest layout block (``block_q``, ``block_k``): an e4m3 ``tl.dot`` reduces over at least 32 keys."""
FP8_CAPABILITY = (8, 9)
"""Oldest CUDA capability with e4m3 tensor cores (Ada; Hopper and later)."""


def fp8_problem(q: Tensor, block_q: int, block_k: int) -> str | None:
    """Why the FP8 kernel cannot take q's dtype, head dim, device or the layout blocks (a sentence naming
    the argument), or ``None``. Shapes are checked by :func:`~sparse_compile.kernels.block_sparse.validate_inputs`."""
    if q.dtype not in FP8_INPUT_DTYPES:
        return f"q, k, v dtype must be float16 or bfloat16 for the fp8 kernel, got {q.dtype}"
    if q.shape[-1] not in FP8_HEAD_DIMS:
        return f"head dim D must be one of {FP8_HEAD_DIMS} for the fp8 kernel, got {q.shape[-1]}"
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if block < FP8_MIN_BLOCK:
            return f"{name} must be at least {FP8_MIN_BLOCK} for the fp8 kernel, got {block}"
    if q.device.type == "cuda":
        capability = torch.cuda.get_device_capability(q.device)
        if capability < FP8_CAPABILITY:
            return f"q's device must be sm_89 or newer for e4m3 tensor cores, got sm_{capability[0]}{capability[1]}"
    elif not interpreter_active():
        return f"q must be a CUDA tensor, or TRITON_INTERPRET=1 set before triton is imported (got {q.device})"
    return None


def check_fp8_inputs(q: Tensor, block_q: int, block_k: int) -> None:
    """Raise ``ValueError`` with :func:`fp8_problem`'s sentence when there is one."""
    problem = fp8_problem(q, block_q, block_k)
    if problem is not None:
        raise ValueError(problem)


# ------------------------------------------------------------------------------------------------
# Triton kernel
# ------------------------------------------------------------------------------------------------


@triton.jit
def _fp8_tile(
    q, k_src, v_src, k_scales, idx_row, stride_ik, t, offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
    S_K, q_scale, m_i, l_i, acc,
    LAYOUT_BK: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, EXACT_P_CAST: tl.constexpr,
):  # fmt: skip
    """One kv tile ``t`` of the q block: e4m3 scores, the integer-max online-softmax step, e4m3 ``P V``.

    ``q_scale`` is the q block's scale times softmax scale * log2(e); ``m_i`` the running row max (an
    integer, base 2), ``l_i`` the row sum of ``2^(s - m)``, ``acc`` the sum of ``e4m3(448 P) V_fp8``.
    ``MASKED``: keys past S_K read as 0 and score ``-inf``. ``EXACT_P_CAST``: round ``448 P`` onto the
    e4m3 grid before the cast (:func:`~sparse_compile.kernels.fp8_quant.to_e4m3`, for the interpreter).
    """
    start_n = _tile_start(idx_row, stride_ik, t, True, LAYOUT_BK, BLOCK_N)
    k = _load_rows(k_src, k_src, start_n, offs_n, offs_d, stride_kn, stride_kd, 0, S_K, False, False, MASKED)
    s = tl.dot(q, tl.trans(k)) * (q_scale * tl.load(k_scales + start_n // LAYOUT_BK))
    if MASKED:
        s = tl.where((start_n + offs_n)[None, :] < S_K, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.math.ceil(tl.max(s, 1)))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(v_src, v_src, start_n, offs_n, offs_d, stride_vn, stride_vd, 0, S_K, False, False, MASKED)
    # A fresh accumulator per tile, added in fp32 registers: Hopper's e4m3 MMAs accumulate with fewer
    # mantissa bits than fp32, an error that would grow over a row's thousands of keys.
    acc = acc * alpha[:, None] + tl.dot(to_e4m3(p * 448.0, EXACT_P_CAST), v)
    return m_new, l_i, acc


@triton.jit
def _block_sparse_fp8_fwd(
    Q, K, V, Q_SCALE, K_SCALE, V_SCALE, O, LSE, COUNTS, INDICES,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_cb, stride_ch, stride_cq,
    stride_ib, stride_ih, stride_iq, stride_ik,
    H, S_Q, S_K, NQ, NK, qk_scale,
    HEAD_DIM: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    EVEN_K: tl.constexpr,
    EXACT_P_CAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one (batch, head) against the kept kv blocks of their q block.

    Grid: (cdiv(S_Q, BLOCK_M), B * H). Q, K, V e4m3 with any strides (V best contiguous along keys);
    Q_SCALE ``(B, H, NQ)``, K_SCALE ``(B, H, NK)`` and V_SCALE ``(B, H, HEAD_DIM)`` contiguous fp32; O any
    strides; LSE contiguous fp32 ``(B, H, S_Q)``, the natural-log LSE of the (smoothed) scores.
    ``qk_scale`` is softmax scale * log2(e).
    """
    SUB_N: tl.constexpr = LAYOUT_BK // BLOCK_N
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    q_block = pid_m // (LAYOUT_BQ // BLOCK_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < S_Q

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    q_scale = tl.load(Q_SCALE + pid_bh.to(tl.int64) * NQ + q_block) * qk_scale
    k_scales = K_SCALE + pid_bh.to(tl.int64) * NK
    k_src = K + off_b * stride_kb + off_h * stride_kh
    v_src = V + off_b * stride_vb + off_h * stride_vh

    count = tl.load(COUNTS + off_b * stride_cb + off_h * stride_ch + q_block * stride_cq)
    idx_row = INDICES + off_b * stride_ib + off_h * stride_ih + q_block * stride_iq
    n_tiles = count * SUB_N
    # Tiles [0, n_full) are whole; with EVEN_K false the kept last kv block (if partial) comes after.
    if EVEN_K:
        n_full = n_tiles
    else:
        last_block = tl.load(idx_row + (count - 1) * stride_ik, mask=count > 0, other=-1)
        n_full = n_tiles - (last_block == NK - 1).to(tl.int32) * SUB_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for t in range(0, n_full):
        m_i, l_i, acc = _fp8_tile(q, k_src, v_src, k_scales, idx_row, stride_ik, t, offs_n, offs_d, stride_kn,
                                  stride_kd, stride_vn, stride_vd, S_K, q_scale, m_i, l_i, acc, LAYOUT_BK, BLOCK_N,
                                  False, EXACT_P_CAST)  # fmt: skip
    for t in range(n_full, n_tiles):
        m_i, l_i, acc = _fp8_tile(q, k_src, v_src, k_scales, idx_row, stride_ik, t, offs_n, offs_d, stride_kn,
                                  stride_kd, stride_vn, stride_vd, S_K, q_scale, m_i, l_i, acc, LAYOUT_BK, BLOCK_N,
                                  True, EXACT_P_CAST)  # fmt: skip

    empty_row = l_i == 0.0
    l_safe = tl.where(empty_row, 1.0, l_i)
    v_scale = tl.load(V_SCALE + pid_bh.to(tl.int64) * HEAD_DIM + offs_d) * (1.0 / 448.0)
    out = acc / l_safe[:, None] * v_scale[None, :]
    lse = tl.where(empty_row, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_ptrs = O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * S_Q + offs_m, lse, mask=row_ok)


def block_sparse_attention_fp8(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    *,
    block_q: int = 128,
    block_k: int = 128,
    scale: Optional[float] = None,
    return_lse: bool = False,
    out: Optional[Tensor] = None,
    lse_out: Optional[Tensor] = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`block_sparse_attention_fp8_triton` (the arguments and results, less ``tile``) on the kernel
    :func:`fp8_kernel_choice` picks: the Gluon kernel on sm_90 where it takes the call, else Triton's (either
    entry checks the call)."""
    entry = (block_sparse_attention_fp8_gluon if fp8_kernel_choice(q, k, v, block_q, block_k) == "gluon"
             else block_sparse_attention_fp8_triton)  # fmt: skip
    return entry(q, k, v, kv_block_counts, kv_block_indices, block_q=block_q, block_k=block_k, scale=scale,
                 return_lse=return_lse, out=out, lse_out=lse_out)  # fmt: skip


def block_sparse_attention_fp8_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    *,
    block_q: int = 128,
    block_k: int = 128,
    scale: Optional[float] = None,
    return_lse: bool = False,
    tile: Optional[TileConfig] = None,
    out: Optional[Tensor] = None,
    lse_out: Optional[Tensor] = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention with e4m3 ``Q K^T`` and ``P V`` in the Triton kernel (CUDA sm_89+, or Triton's
    interpreter).

    q ``(B, H, S_q, D)``, k/v ``(B, H, S_k, D)``: fp16/bf16, D 64 or 128, any strides. Layout as
    :func:`~sparse_compile.kernels.block_sparse.block_sparse_attention` (``block_q``/``block_k`` powers
    of two in [32, 256]); ``scale`` defaults to 1/sqrt(D). Returns O ``(B, H, S_q, D)`` in q's dtype,
    token-major (:func:`~sparse_compile.kernels.common.attention_output_like`), and with ``return_lse``
    the fp32 natural-log LSE ``(B, H, S_q)`` of the attention scores (smoothing undone); rows whose q
    block keeps nothing give 0 and ``-inf``. ``tile`` fixes the launch (default
    :func:`~sparse_compile.kernels.tile_configs.fp8_block_sparse_tile`); ``out`` / ``lse_out`` are
    optional buffers as in :func:`~sparse_compile.kernels.block_sparse.block_sparse_attention_triton`.
    Raises ``ValueError`` naming the argument the kernel cannot take. Layout values are not checked.
    """
    lay = validate_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k)
    check_fp8_inputs(q, block_q, block_k)
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    out, lse_out = _output_buffers(q, v, out, lse_out)
    if out.numel() == 0:
        return (out, lse_out) if return_lse else out
    interpret = interpreter_active()
    if tile is None:
        tile = interpreter_block_sparse_tile(block_q, block_k) if interpret else fp8_block_sparse_tile(block_q, block_k)
    if block_q % tile.block_m or block_k % tile.block_n:
        raise ValueError(f"tile {tile} must tile block_q={block_q} and block_k={block_k}")
    scale = default_scale(d, scale)
    x = quantize_attention_inputs(q, k, v, block_q, block_k, v_key_multiple=V_KEY_MULTIPLE, scale=scale)
    grid = (cdiv(s_q, tile.block_m), b * h)
    args = (
        x.q, x.k, x.v, x.q_scale, x.k_scale, x.v_scale, out, lse_out, lay.counts, lay.indices,
        *x.q.stride(), *x.k.stride(), *x.v.stride(), *out.stride(), *lay.counts.stride(), *lay.indices.stride(),
        h, s_q, s_k, x.q_scale.shape[-1], x.k_scale.shape[-1], scale * LOG2E,
    )  # fmt: skip
    meta = dict(HEAD_DIM=d, LAYOUT_BQ=block_q, LAYOUT_BK=block_k, EVEN_K=s_k % block_k == 0,
                EXACT_P_CAST=interpret, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n)  # fmt: skip
    if interpret:
        _block_sparse_fp8_fwd[grid](*args, **meta)
    else:
        with torch.cuda.device(q.device):
            _block_sparse_fp8_fwd[grid](*args, **meta, num_warps=tile.num_warps, num_stages=tile.num_stages)
    lse_out.add_(x.lse_shift)
    return (out, lse_out) if return_lse else out


# ------------------------------------------------------------------------------------------------
# Gluon kernel (sm_90)
# ------------------------------------------------------------------------------------------------


def fp8_kernel_choice(
    q: Tensor, k: Tensor, v: Tensor, block_q: int, block_k: int, capability: Optional[tuple[int, int]] = None
) -> str:
    """Which FP8 kernel would run a valid call: ``"gluon"`` where
    :func:`~sparse_compile.kernels.gluon_block_sparse_fp8.fp8_gluon_ineligibility` finds no reason against
    it on a device of ``capability`` (default: q's device's, ``None`` off CUDA), else ``"triton"``."""
    capability = cuda_capability(q) if capability is None else capability
    return "gluon" if fp8_gluon_ineligibility(q, k, v, block_q, block_k, capability) is None else "triton"


def block_sparse_attention_fp8_gluon(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    *,
    block_q: int = 128,
    block_k: int = 128,
    scale: Optional[float] = None,
    return_lse: bool = False,
    tile: Optional[TileConfig] = None,
    out: Optional[Tensor] = None,
    lse_out: Optional[Tensor] = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`block_sparse_attention_fp8_triton` on the Gluon kernel (CUDA sm_90 only): the same arguments and results.

    Query layout blocks of 128 or 256 rows, key blocks of 64, 128 or 256; ``tile`` defaults to
    :func:`~sparse_compile.kernels.tile_configs.gluon_fp8_block_sparse_tile`. Raises ``ValueError``
    with the reason when the kernel cannot take the call
    (:func:`~sparse_compile.kernels.gluon_block_sparse_fp8.fp8_gluon_ineligibility`) or naming the
    argument it cannot take. Layout values are not checked.
    """
    lay = validate_inputs(q, k, v, kv_block_counts, kv_block_indices, block_q, block_k)
    reason = fp8_gluon_ineligibility(q, k, v, block_q, block_k, cuda_capability(q))
    if reason is not None:
        raise ValueError(reason)
    out, lse_out = _output_buffers(q, v, out, lse_out)
    if out.numel() == 0:
        return (out, lse_out) if return_lse else out
    scale = default_scale(q.shape[-1], scale)
    x = quantize_attention_inputs(q, k, v, block_q, block_k, v_key_multiple=V_KEY_MULTIPLE, scale=scale)
    launch_gluon_block_sparse_fp8(x, lay, scale, out, lse_out, tile)
    lse_out.add_(x.lse_shift)
    return (out, lse_out) if return_lse else out


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------


def block_sparse_attention_fp8_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_block_counts: Tensor,
    kv_block_indices: Tensor,
    *,
    block_q: int = 128,
    block_k: int = 128,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The specification of :func:`block_sparse_attention_fp8`, in PyTorch (any device, valid inputs).

    The same quantisation (:func:`~sparse_compile.kernels.fp8_quant.quantize_attention_inputs`),
    dequantised to fp32; the block-sparse softmax of those scores in base 2 with the row max rounded
    up to an integer ``m``; ``P = 2^(s - m)`` enters ``P V`` rounded as ``e4m3(448 P) / 448`` while the
    normaliser ``l`` and the LSE use P unrounded; the smoothing's LSE shift added back. Without the P
    rounding this is :func:`~sparse_compile.kernels.block_sparse_reference.block_sparse_attention_reference`
    on the dequantised inputs. Arguments and results as the kernel's entry; rows of query chunks whose
    scores fit :data:`~sparse_compile.kernels.masked_reference.SCORES_BUDGET_BYTES` at a time.
    """
    lay = expand_layout(q, k, kv_block_counts, kv_block_indices)
    b, h, s_q, d = q.shape
    s_k = k.shape[2]
    scale = default_scale(d, scale)
    x = quantize_attention_inputs(q, k, v, block_q, block_k, scale=scale)
    q_deq, k_deq, v_deq = x.dequantized()
    keep = keep_matrix(lay.counts, lay.indices, cdiv(s_k, block_k))  # (B, H, NQ, NK)
    key_blocks = torch.arange(s_k, device=q.device) // block_k
    out = attention_output_like(q, v)
    lse = torch.empty((b, h, s_q), dtype=torch.float32, device=q.device)
    chunk = max(1, SCORES_BUDGET_BYTES // (4 * b * h * s_k))
    for first in range(0, s_q, chunk):
        rows = torch.arange(first, min(first + chunk, s_q), device=q.device)
        kept = keep[:, :, rows // block_q][..., key_blocks]  # (B, H, R, S_k)
        s = torch.matmul(q_deq[:, :, rows], k_deq.transpose(-1, -2)).mul_(scale * LOG2E).masked_fill_(~kept, float("-inf"))
        m = s.amax(dim=-1).ceil()
        m = torch.where(torch.isinf(m), 0.0, m)
        p = torch.exp2(s - m.unsqueeze(-1))
        l = p.sum(dim=-1)
        p_fp8 = scaled_probabilities_e4m3(p)
        l_safe = torch.where(l == 0, 1.0, l)
        out[:, :, rows] = (torch.matmul(p_fp8, v_deq) / (FP8_MAX * l_safe.unsqueeze(-1))).to(q.dtype)
        lse[:, :, rows] = torch.where(l == 0, float("-inf"), (m + torch.log2(l_safe)) / LOG2E)
    lse.add_(x.lse_shift)
    return (out, lse) if return_lse else out
