"""Sparse methods on the GPU: speed (all stages included) vs cuDNN dense SDPA, and error vs dense.

Inputs are *structured*: per head, queries and keys are noisy copies of a few dozen shared
"semantic" centres, so attention concentrates on a subset of keys as in a trained video DiT
(random Q/K give near-uniform attention, where any top-p keeps almost everything).

For each shape and method setting: kept density, relative L2 error of the output vs dense,
the GPU kernels' summed time of a call (so the share of the call the host's work leaves the GPU idle),
and the time of the whole method call in steady state (for SVG2: warm-started k-means,
selection, permutation, cluster kernel, inverse permutation; for SVG: with its cached head
profile; for radial: with its cached static layout; for AdaSpa: between searches, reusing its
indices). For SVG2 also the cluster kernel alone on
the same layout as the call runs it and the overhead share (everything but the kernel). One run prints a markdown
table and writes it to ``$OUT/methods.md`` when ``OUT`` is set.

    python benchmarks/bench_methods.py [--shapes NAME ...]
"""

from __future__ import annotations

import argparse

import torch
import triton
from common import METHOD_SETTINGS, SHAPES, bench_ms, kernel_ms, method_call, print_and_save, rel_l2, structured_qkv
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_compile.kernels.varlen_block_sparse import run_staged_call
from sparse_compile.methods import METHODS
from sparse_compile.methods.svg2 import Svg2Method
from sparse_compile.methods.base import SiteCache
from sparse_compile.options import validate_options


def kernel_only_ms(method: Svg2Method, q, k, v, grid, cache) -> float:
    """The cluster kernel alone as the call runs it, on the warm method's layout: its prep (staged before the
    guard's read) and the attention kernel, permutations folded into their loads and stores."""
    call = method_call(q, k, v, grid, cache)
    plan = method._plan(q, k, method._cluster(q, k, call), call.softmax_scale)
    staged = method._stage(q, k, v, plan, call.softmax_scale)
    kept = int(plan.selection.kept_tokens.long().sum())
    assert kept <= staged.capacity, f"the kept keys ({kept}) outgrow the staged buffer ({staged.capacity})"
    return bench_ms(lambda: run_staged_call(method._stage(q, k, v, plan, call.softmax_scale), q, k, v))



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    args = parser.parse_args(argv)
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    rows = ["| shape | method | kept density | rel. L2 vs dense | cuDNN dense ms | method ms | speedup vs cuDNN | "
            "GPU kernels ms | host-exposed share | SVG2 kernel ms | SVG2 overhead share |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.shapes:
        heads, grid = SHAPES[name]
        seq = grid[0] * grid[1] * grid[2]
        q, k, v = structured_qkv(heads, seq)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            dense_ms = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        for setting in METHOD_SETTINGS:
            method = METHODS[setting["method"]](validate_options(setting))
            state = SiteCache()
            method.attend(method_call(q, k, v, grid, state))  # cold start: clustering, profiling, layouts
            result = method.attend(method_call(q, k, v, grid, state))
            assert torch.isfinite(result.output).all()
            rel = rel_l2(result.output, dense)
            ms = bench_ms(lambda: method.attend(method_call(q, k, v, grid, state)))
            busy_ms = kernel_ms(lambda: method.attend(method_call(q, k, v, grid, state)))
            svg2_columns = "| - | - |"
            if isinstance(method, Svg2Method):
                svg2_kernel_ms = kernel_only_ms(method, q, k, v, grid, state)
                svg2_columns = f"| {svg2_kernel_ms:.2f} | {1 - svg2_kernel_ms / ms:.1%} |"
            label = ", ".join(f"{key}={value}" for key, value in setting.items())
            rows.append(f"| {name} | {label} | {float(result.kept_density):.3f} | {rel:.3e} | {dense_ms:.2f} | "
                        f"{ms:.2f} | {dense_ms / ms:.2f}x | {busy_ms:.2f} | {max(0.0, 1 - busy_ms / ms):.1%} "
                        f"{svg2_columns}")
            print(rows[-1], flush=True)
    print_and_save("\n".join(rows), "methods.md")


if __name__ == "__main__":
    main()
