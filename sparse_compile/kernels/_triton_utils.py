"""Tiny helpers shared by the Triton kernel modules: the interpreter fix, output-buffer checks, permutation strides."""

import torch
import triton.runtime.interpreter as _interpreter

_PATCH_FLAG = "_sparse_compile_scalar_index"


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


def check_out_buffer(name: str, buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    """Raise ``ValueError`` unless a caller-provided output buffer is contiguous with this shape, dtype and device."""
    if tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != device or not buf.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {shape} on {device}")


def _may_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` might share memory: ``False`` once every dim (by increasing stride)
    steps over the whole span of the smaller ones (true of any permutation of a contiguous tensor)."""
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < span:
            return True
        span += stride * (size - 1)
    return False


def check_strided_out_buffer(
    name: str, buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> None:
    """Raise ``ValueError`` unless a caller-provided output buffer has this shape, dtype and device and no
    overlapping elements (any strides otherwise: kernels write through them)."""
    if tuple(buf.shape) != shape or buf.dtype != dtype or buf.device != device or _may_overlap(buf):
        raise ValueError(f"{name} must be a {dtype} tensor of shape {shape} on {device} with non-overlapping strides")


def permutation_strides(perm: torch.Tensor | None) -> tuple[int, int, int]:
    """Strides of an expanded ``(B, H, S)`` token permutation; zeros (unused by the kernel) without one."""
    return (0, 0, 0) if perm is None else perm.stride()
