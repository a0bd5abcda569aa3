"""The fixed-block kernel as the methods call it, in the ``precision`` the options ask for."""

from __future__ import annotations

from torch import Tensor

from sparse_compile.kernels.block_sparse import block_sparse_attention
from sparse_compile.kernels.block_sparse_fp8 import block_sparse_attention_fp8, fp8_problem


def fixed_block_attention(
    q: Tensor, k: Tensor, v: Tensor, counts: Tensor, indices: Tensor, block: int, scale: float, precision: str
) -> tuple[Tensor, Tensor]:
    """Video q, k, v ``(B, H, Sv, D)`` through the fixed-block layout (counts int32 ``(B, H, N)``,
    indices ``(B, H, N, MAXK)``) -> (O ``(B, H, Sv, D)`` in q's dtype, LSE fp32 ``(B, H, Sv)``).

    ``precision`` ``"fp8"``: the e4m3 kernel where it takes the call (fp16/bf16, head dim 64 or 128,
    blocks of 32 or more, a GPU with e4m3 tensor cores: :func:`~sparse_compile.kernels.block_sparse_fp8.fp8_problem`),
    else, like ``"native"``, the kernel in q's dtype.
    """
    if precision == "fp8" and fp8_problem(q, block, block) is None:
        return block_sparse_attention_fp8(q, k, v, counts, indices, block_q=block, block_k=block, scale=scale,
                                          return_lse=True)  # fmt: skip
    return block_sparse_attention(q, k, v, counts, indices, block_q=block, block_k=block, scale=scale, return_lse=True)
