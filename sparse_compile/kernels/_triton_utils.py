"""Tiny helpers shared by the Triton kernel modules: the interpreter fix and output-buffer checks."""

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
