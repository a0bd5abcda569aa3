"""Helpers shared by the kernel modules.

- What the kernels take: :data:`SUPPORTED_DTYPES` (q, k, v), :data:`SUPPORTED_HEAD_DIMS` (D),
  :data:`PERMUTATION_DTYPES` (token permutations).
- Small math: :func:`cdiv`, :func:`launch_group_size`, :data:`LOG2E`, :func:`default_scale`, :func:`dot_precision`.
- The output layout of the attention kernels and the backend's op (:func:`attention_output_like`),
  checks of caller-provided output buffers, permutation strides and orders.
- :func:`online_softmax_step`, the jitted base-2 online-softmax update of the attention kernels and
  of the full-attention LSE pass.
- :func:`interpreter_active`, and the fix that lets Triton's CPU interpreter run these kernels.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
import triton.runtime.interpreter as _interpreter
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
"""dtypes of q, k, v (and of the k-means and block-scoring inputs) the Triton kernels take."""
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
"""Head dims D the Triton kernels take."""
PERMUTATION_DTYPES = (torch.int32, torch.int64)
"""dtypes of the token permutations ``q_perm`` / ``kv_perm``."""
LOG2E = 1.4426950408889634
"""log2(e): kernels scale scores by ``scale * LOG2E`` and exponentiate in base 2."""


def cdiv(a: int, b: int) -> int:
    """Ceil division of non-negative ints."""
    return (a + b - 1) // b


def launch_group_size(count: int, item_bytes: int, budget_bytes: int) -> int:
    """Items per launch group when each of ``count`` items needs ``item_bytes`` of scratch and a group may
    take ``budget_bytes``: as many as fit (at least one), spread evenly over the fewest groups."""
    groups = cdiv(count, max(budget_bytes // max(item_bytes, 1), 1))
    return cdiv(count, groups)


def default_scale(head_dim: int, scale: float | None) -> float:
    """``scale`` if given, else ``1 / sqrt(head_dim)`` (SDPA's default)."""
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: true fp32 dots ("ieee") for fp32 inputs, else the tensor cores' native math."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_output_like(query: Tensor, value: Tensor) -> Tensor:
    """Uninitialised output ``(B, H, S, Dv)`` in query's dtype and device, laid out as a contiguous ``(B, S, H, Dv)``.

    ``query`` ``(B, H, S, D)``, ``value`` ``(B, H, S_k, Dv)``. That is the layout diffusers transposes
    an attention result back into, so the transpose and flatten after the backend's op are free views.
    """
    batch, heads, seq, _ = query.shape
    return query.new_empty((batch, seq, heads, value.shape[-1])).transpose(1, 2)


def check_out_buffer(name: str, buf: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Raise ``ValueError`` unless a caller-provided output buffer is contiguous with this shape, dtype and device."""
    if tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {shape} on {device}")


def _may_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` might share memory: ``False`` once every dim (by increasing stride)
    steps over the whole span of the smaller ones (true of any permutation of a contiguous tensor)."""
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def check_strided_out_buffer(
    name: str, buf: Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    """Raise ``ValueError`` unless a caller-provided output buffer has this shape, dtype and device and no
    overlapping elements (any strides otherwise: kernels write through them)."""
    if tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != device or _may_overlap(buf):
        raise ValueError(f"{name} must be a {dtype} tensor of shape {shape} on {device} with non-overlapping strides")


def permutation_strides(perm: Tensor | None) -> tuple[int, int, int]:
    """Strides of an expanded ``(B, H, S)`` token permutation; zeros (unused by the kernel) without one."""
    return (0, 0, 0) if perm is None else perm.stride()


def expand_batch_head(
    t: Tensor, name: str, b: int, h: int, tail: tuple[int | None, ...], dtypes: tuple[torch.dtype, ...]
) -> Tensor:
    """``t`` viewed as ``(b, h, *tail)``, its batch/head dims of size 1 broadcast with stride 0.

    ``t`` must be one of ``dtypes`` with shape ``(b or 1, h or 1, *tail)`` (``None`` in ``tail``: any
    size); else ``ValueError`` naming ``name``.
    """
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}, got {t.dtype}")
    if t.dim() != 2 + len(tail):
        raise ValueError(f"{name} must have {2 + len(tail)} dims (B, H, ...), got shape {tuple(t.shape)}")
    tail_ok = all(want is None or size == want for size, want in zip(t.shape[2:], tail))
    if not tail_ok or t.shape[0] not in (1, b) or t.shape[1] not in (1, h):
        want = ", ".join("*" if n is None else str(n) for n in tail)
        raise ValueError(f"{name} must have shape ({b} or 1, {h} or 1, {want}), got {tuple(t.shape)}")
    return t.expand(b, h, *t.shape[2:])


def expand_permutation(perm: Tensor | None, name: str, b: int, h: int, seq: int) -> Tensor | None:
    """A token permutation (int32/int64 ``(B or 1, H or 1, seq)``) expanded to ``(B, H, seq)``; ``None`` stays ``None``."""
    return None if perm is None else expand_batch_head(perm, name, b, h, (seq,), PERMUTATION_DTYPES)


def token_order(perm: Tensor | None, b: int, h: int, seq: int, device: torch.device) -> Tensor:
    """Token of every kernel-order row, int64 ``(B, H, seq)``: ``perm``, or the identity without one."""
    if perm is None:
        return torch.arange(seq, device=device).expand(b, h, seq)
    return perm.long()


def check_permutation_values(name: str, perm: Tensor | None) -> None:
    """Raise ``ValueError`` unless ``perm`` ``(B, H, S)`` (or ``None``) permutes ``[0, S)`` in every (batch, head).

    Reads the permutation (a device sync on GPU).
    """
    if perm is None:
        return
    identity = torch.arange(perm.shape[-1], dtype=perm.dtype, device=perm.device).expand_as(perm)
    if not torch.equal(perm.sort(dim=-1).values, identity):
        raise ValueError(f"{name} must be a permutation of [0, S) for every (batch, head)")


@triton.jit
def online_softmax_step(s, m_i, l_i, qk_scale, SCALED: tl.constexpr):
    """One online-softmax step over a scores tile ``s`` (BLOCK_M x BLOCK_N) in base 2.

    ``SCALED``: ``s`` already holds ``scores * qk_scale`` (``qk_scale`` unused); else ``s`` holds the
    raw scores and the step scales them (``qk_scale`` = softmax scale * log2(e)). ``m_i`` is the
    running row max in scaled units, ``l_i`` the running row sum of 2^(s - m). Returns the tile's
    unnormalised probabilities, the factor rescaling the old accumulator, and the new m and l.
    """
    if SCALED:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_i


_PATCH_FLAG = "_sparse_compile_scalar_index"


@triton.jit
def strided_tile_pointers(base, off_b, off_h, rows, cols, stride_b, stride_h, stride_s, stride_d):
    """Pointers ``(len(rows), len(cols))`` to ``base[off_b, off_h, rows, cols]`` of a strided ``(B, H, S, D)``
    tensor; int64 offsets."""
    rows = rows.to(tl.int64)
    return base + off_b * stride_b + off_h * stride_h + rows[:, None] * stride_s + cols[None, :] * stride_d


def patch_interpreter_scalar_index() -> None:
    """Let Triton 3.6's CPU interpreter use runtime scalars as ``range`` bounds under NumPy >= 2.4.

    The interpreter keeps scalars as shape-(1,) arrays and converts them with ``int(array)``, which
    NumPy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"), so any
    ``for i in range(0, n)`` with a runtime ``n`` fails. This wraps the interpreter's tensor patching
    to convert with ``.item()`` instead. Idempotent; affects the interpreter only.
    """
    original = _interpreter._patch_lang_tensor
    if getattr(original, _PATCH_FLAG, False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    setattr(patched, _PATCH_FLAG, True)
    _interpreter._patch_lang_tensor = patched


def cuda_capability(t: Tensor) -> tuple[int, int] | None:
    """``(major, minor)`` of a CUDA tensor's device; ``None`` for other devices."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else None


def interpreter_active() -> bool:
    """Whether this process runs Triton kernels in the CPU interpreter.

    Triton decides at decoration time: ``TRITON_INTERPRET=1`` must be set before ``triton`` is first
    imported, or its own library functions (``tl.sum``, ``tl.max``, ``tl.cdiv``) stay GPU-only JIT
    functions that the interpreter cannot call. Both the kernels and those must be interpreted.
    """
    return isinstance(online_softmax_step, InterpretedFunction) and isinstance(tl.cdiv, InterpretedFunction)


if interpreter_active():
    patch_interpreter_scalar_index()
