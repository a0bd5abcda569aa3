"""Where the FP8 path's error comes from: each rounding alone and all together, on the CPU.

The FP8 kernels round three things: Q and K (e4m3 per run of rows, K smoothed by its mean), V (e4m3 per
channel) and P (``e4m3(448 P) / 448`` as it enters ``P V``). This script rounds them with the package's own
quantisers (:mod:`sparse_compile.kernels.fp8_quant`), one at a time and together, and for comparison in
8-bit integers, which Hopper's tensor cores take at the e4m3 rate: Q and K INT8 per run of rows
(SageAttention's format for ``Q K^T``), V INT8 per channel, P UINT8 per row and run of keys; it prints the relative L2 error of
the output against exact fp32 attention over every key. Two inputs: Gaussian q, k, v (near-uniform
attention, as ``bench_block_sparse.py`` times) and the same with q and k scaled by 3 (concentrated).
Writes ``fp8_error_budget.md`` to ``$OUT`` when it is set.

    python benchmarks/fp8_error_budget.py [--seq 4096] [--heads 2] [--block 128]
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
from common import print_and_save, rel_l2
from torch import Tensor

from sparse_compile.kernels.common import LOG2E
from sparse_compile.kernels.fp8_quant import (
    FP8_MAX,
    dequantize_channels,
    dequantize_row_blocks,
    key_mean,
    quantize_channels,
    quantize_row_blocks,
    scaled_probabilities_e4m3,
)

INT8_MAX = 127.0
UINT8_MAX = 255.0


def e4m3_row_blocks(x: Tensor, block: int, mean: Tensor | None = None) -> Tensor:
    """``x`` (less ``mean``) rounded through e4m3 per run of ``block`` rows, as fp32."""
    return dequantize_row_blocks(*quantize_row_blocks(x, block, mean), block)


def int8_row_blocks(x: Tensor, block: int) -> Tensor:
    """``x`` ``(B, H, S, D)`` rounded to INT8 with one symmetric scale per run of ``block`` rows, as fp32."""
    b, h, s, d = x.shape
    runs = x.float().view(b, h, s // block, block, d)
    scale = runs.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-30) / INT8_MAX
    return (runs / scale).round().mul(scale).view(b, h, s, d)


def int8_channels(x: Tensor) -> Tensor:
    """``x`` ``(B, H, S, D)`` rounded to INT8 with one symmetric scale per (batch, head, channel), as fp32."""
    scale = x.float().abs().amax(dim=2, keepdim=True).clamp_min(1e-30) / INT8_MAX
    return (x.float() / scale).round().mul(scale)


def p_e4m3(p: Tensor) -> Tensor:
    """Probabilities in ``[0, 1]`` as the FP8 kernels round them: ``e4m3(448 P) / 448``."""
    return scaled_probabilities_e4m3(p) / FP8_MAX


def p_uint8_tiles(p: Tensor, tile: int) -> Tensor:
    """Probabilities ``(B, H, S_q, S_k)`` rounded to UINT8 with one scale per row and run of ``tile`` keys (the
    run's largest entry maps to 255; a kernel would fold the scale into that tile's ``P V`` per row)."""
    b, h, s_q, s_k = p.shape
    runs = p.view(b, h, s_q, s_k // tile, tile)
    top = runs.amax(dim=-1, keepdim=True).clamp_min(1e-30)
    return ((runs / top) * UINT8_MAX).round().div(UINT8_MAX).mul(top).view(b, h, s_q, s_k)


def attention(q: Tensor, k: Tensor, v: Tensor, round_p: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """fp32 softmax attention in base 2 with the row max rounded up (the kernels' convention), ``P`` rounded
    by ``round_p`` in ``P V`` (the normaliser unrounded, as in the kernels)."""
    s = q @ k.transpose(-1, -2) * (LOG2E / math.sqrt(q.shape[-1]))
    p = torch.exp2(s - s.amax(dim=-1, keepdim=True).ceil())
    pv = p if round_p is None else round_p(p)
    return (pv @ v) / p.sum(dim=-1, keepdim=True)


def roundings(block: int) -> dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]]:
    """Per row of the table: (q, k, v) fp32 -> the output with that row's roundings."""

    def qk_e4m3(q, k):
        return e4m3_row_blocks(q, block), e4m3_row_blocks(k, block, key_mean(k))

    def v_e4m3(v):
        return dequantize_channels(*quantize_channels(v))

    def p_uint8(p):
        return p_uint8_tiles(p, block)

    def qk_int8(q, k):
        return int8_row_blocks(q, block), int8_row_blocks(k - key_mean(k).unsqueeze(2), block)

    return {
        "Q, K e4m3 per block (K smoothed)": lambda q, k, v: attention(*qk_e4m3(q, k), v),
        "V e4m3 per channel": lambda q, k, v: attention(q, k, v_e4m3(v)),
        "P e4m3": lambda q, k, v: attention(q, k, v, p_e4m3),
        "**Q, K, V and P e4m3 (the FP8 kernels)**": lambda q, k, v: attention(*qk_e4m3(q, k), v_e4m3(v), p_e4m3),
        "Q, K INT8 per block": lambda q, k, v: attention(*qk_int8(q, k), v),
        "Q, K INT8 per block; V, P e4m3": lambda q, k, v: attention(*qk_int8(q, k), v_e4m3(v), p_e4m3),
        "V INT8 per channel": lambda q, k, v: attention(q, k, int8_channels(v)),
        "P UINT8 per row and key block": lambda q, k, v: attention(q, k, v, p_uint8),
        "**Q, K, V INT8, P UINT8 (both GEMMs 8-bit integer)**":
            lambda q, k, v: attention(*qk_int8(q, k), int8_channels(v), p_uint8),
    }


def error_table(seq: int, heads: int, block: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Per rounding: rel. L2 vs exact attention on Gaussian inputs and on concentrated ones (q, k x 3)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq, 128, generator=gen) for _ in range(3))
    inputs = [(q, k, v), (3 * q, 3 * k, v)]
    exact = [attention(*x) for x in inputs]
    return {name: tuple(rel_l2(fn(*x), want) for x, want in zip(inputs, exact))
            for name, fn in roundings(block).items()}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=4096, help="tokens (a multiple of --block)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--block", type=int, default=128, help="rows per Q / K scale")
    args = parser.parse_args(argv)
    if args.seq % args.block:
        parser.error(f"--seq must be a multiple of --block ({args.block}), got {args.seq}")
    table = error_table(args.seq, args.heads, args.block)
    rows = [f"FP8 error budget: {args.heads} heads x {args.seq} tokens, D 128, blocks of {args.block} rows, dense layout; "
            "rel. L2 of O vs exact fp32 attention", "",
            "| rounded | Gaussian q, k, v | q, k x 3 (concentrated) |", "|---|---|---|"]  # fmt: skip
    rows += [f"| {name} | {gauss:.2e} | {peaked:.2e} |" for name, (gauss, peaked) in table.items()]
    print_and_save("\n".join(rows), "fp8_error_budget.md")
    return table


if __name__ == "__main__":
    main()
