"""The per-call finiteness check of q, k and v on the GPU: the Triton kernel against the PyTorch path.

Every sparse call reads whether its q, k and v are finite (a call holding NaN or Inf runs dense). Per shape,
bf16 q, k, v as diffusers hands them ((B, S, H, D) storage viewed as (B, H, S, D)): the median time of the
PyTorch path (each tensor's min and max) and of the kernel (one launch over the three), and the bandwidth
each reaches reading the three tensors once; the flags are checked equal first, clean and with one NaN.
One run prints a markdown table and writes it to ``$OUT/finite_check.md`` when ``OUT`` is set.

    python benchmarks/bench_finite_check.py
"""

from __future__ import annotations

import argparse

import torch
import triton
from common import SHAPES, bench_ms, print_and_save

from sparse_compile.kernels.finite_check import finite_flags_of, finite_flags_reference

HEAD_DIM = 128


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    rows = ["| shape | PyTorch path ms | kernel ms | kernel vs PyTorch | PyTorch GB/s | kernel GB/s |",
            "|---|---|---|---|---|---|"]
    for name, (heads, grid) in SHAPES.items():
        seq = grid[0] * grid[1] * grid[2]
        qkv = [torch.randn(1, seq, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3)]  # fmt: skip
        assert finite_flags_of(qkv).tolist() == finite_flags_reference(qkv).tolist() == [1, 1, 1]
        qkv[1][0, heads - 1, seq - 1, 3] = float("nan")
        assert finite_flags_of(qkv).tolist() == finite_flags_reference(qkv).tolist() == [1, 0, 1]
        qkv[1][0, heads - 1, seq - 1, 3] = 0.0
        torch_ms = bench_ms(lambda: finite_flags_reference(qkv))
        kernel_ms = bench_ms(lambda: finite_flags_of(qkv))
        gigabytes = sum(t.numel() * t.element_size() for t in qkv) / 1e9
        rows.append(f"| {name} | {torch_ms:.3f} | {kernel_ms:.3f} | {torch_ms / kernel_ms:.2f}x | "
                    f"{gigabytes / torch_ms * 1e3:.0f} | {gigabytes / kernel_ms * 1e3:.0f} |")
        print(rows[-1], flush=True)
    print_and_save("\n".join(rows), "finite_check.md")


if __name__ == "__main__":
    main()
