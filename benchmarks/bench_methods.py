"""Sparse methods on the GPU: speed (all stages included) vs cuDNN dense SDPA, and error vs dense.

Inputs are *structured*: per head, queries and keys are noisy copies of a few dozen shared
"semantic" centres, so attention concentrates on a subset of keys as in a trained video DiT
(random Q/K give near-uniform attention, where any top-p keeps almost everything).

For each shape and method setting: kept density, relative L2 error of the output vs dense,
and the time of the whole method call in steady state (for SVG2: warm-started k-means,
selection, permutation, cluster kernel, inverse permutation; for SVG: with its cached head
profile; for radial: with its cached static layout; for AdaSpa: between searches, reusing its
indices). For SVG2 also the cluster kernel alone on
the same layout and the overhead share (everything but the kernel). One run prints a markdown
table and writes it to ``$OUT/methods.md`` when ``OUT`` is set.

    PYTHONPATH=. python benchmarks/bench_methods.py
"""

from __future__ import annotations

import argparse
import os
from typing import Callable

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_compile.kernels.block_select import select_top_p_clusters
from sparse_compile.kernels.kmeans import cluster_permutation
from sparse_compile.kernels.varlen_block_sparse import varlen_block_sparse_attention
from sparse_compile.methods import METHODS
from sparse_compile.methods.base import AttentionCall, TokenLayout
from sparse_compile.methods.svg2 import Svg2Method
from sparse_compile.options import validate_options
from sparse_compile.runtime.session import SiteState, StepInfo

SHAPES = {
    "Wan 480p (H=12, S=32760)": (12, (21, 30, 52)),
    "HunyuanVideo 720p (H=24, S=118800)": (24, (33, 45, 80)),
}


class _Site:
    module_path = "bench"


def graph_replay_ms(fn: Callable[[], object]) -> float:
    """GPU time of ``fn`` without its Python launch cost: median ms (``do_bench``) of a CUDA-graph replay
    of one call, captured after one eager warm-up call. Raises if the call cannot be captured (a host sync)."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, return_mode="median")


def print_and_save(text: str, filename: str) -> None:
    """Print a result table and, when the ``OUT`` environment variable names a folder, write it to
    ``$OUT/filename`` (ending in one newline)."""
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], filename), "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")


def token_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, S, D)`` copied into ``(B, S, H, D)`` storage, viewed back as ``(B, H, S, D)``."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def structured_qkv(heads: int, seq: int, dim: int = 128, centres: int = 48, seed: int = 0):
    """q, k, v ``(1, heads, seq, dim)`` bf16 with queries and keys near shared per-head centres."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    basis = torch.randn(1, heads, centres, dim, device="cuda", generator=g) * 1.5
    q_assign = torch.randint(0, centres, (1, heads, seq), device="cuda", generator=g)
    k_assign = torch.randint(0, centres, (1, heads, seq), device="cuda", generator=g)
    pick = lambda a: torch.gather(basis, 2, a.unsqueeze(-1).expand(-1, -1, -1, dim))  # noqa: E731
    q = pick(q_assign) + 0.5 * torch.randn(1, heads, seq, dim, device="cuda", generator=g)
    k = pick(k_assign) + 0.5 * torch.randn(1, heads, seq, dim, device="cuda", generator=g)
    v = torch.randn(1, heads, seq, dim, device="cuda", generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


def make_call(q, k, v, grid, state) -> AttentionCall:
    layout = TokenLayout(*grid, text_tokens=0, text_first=False)
    return AttentionCall(query=q, key=k, value=v, attn_mask=None, scale=None, layout=layout,
                         step=StepInfo(step=1, branch=0, generation=0), site=_Site(), state=state)


def kernel_only_ms(method: Svg2Method, q, k, v, state) -> float:
    """The cluster kernel alone (permutations folded into its loads and stores), on the warm method's layout."""
    clusters_q, clusters_k = method._cluster(q, k, make_call(q, k, v, (1, 1, q.shape[2]), state))
    q_perm, q_off = cluster_permutation(clusters_q.labels, clusters_q.sizes, clusters_q.ranks)
    k_perm, k_off = cluster_permutation(clusters_k.labels, clusters_k.sizes, clusters_k.ranks)
    min_blocks = method.min_kept_key_clusters(clusters_k.sizes.shape[-1])
    counts, indices, _ = select_top_p_clusters(clusters_q.centroids, clusters_k.centroids, clusters_k.sizes,
                                               q.shape[-1] ** -0.5, method.params["top_p"], min_blocks)  # fmt: skip
    return triton.testing.do_bench(
        lambda: varlen_block_sparse_attention(q, k, v, q_off, k_off, counts, indices, q_perm=q_perm, kv_perm=k_perm,
                                              return_lse=True),
        return_mode="median",
    )


SETTINGS = [
    {"method": "svg2", "top_p": 0.8},
    {"method": "svg2", "top_p": 0.9},
    {"method": "svg2", "top_p": 0.95},
    {"method": "svg", "density": 0.25},
    {"method": "svg", "density": 0.125},
    {"method": "radial"},
    {"method": "adaspa", "density": 0.25},
    {"method": "adaspa", "density": 0.125},
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    rows = ["| shape | method | kept density | rel. L2 vs dense | cuDNN dense ms | method ms | speedup vs cuDNN | SVG2 kernel ms | SVG2 overhead share |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name in args.shapes:
        heads, grid = SHAPES[name]
        seq = grid[0] * grid[1] * grid[2]
        q, k, v = structured_qkv(heads, seq)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            dense_ms = triton.testing.do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                               return_mode="median")
        for setting in SETTINGS:
            method = METHODS[setting["method"]](validate_options(setting))
            state = SiteState()
            method.attend(make_call(q, k, v, grid, state))  # cold start: clustering, profiling, layouts
            result = method.attend(make_call(q, k, v, grid, state))
            assert torch.isfinite(result.output).all()
            rel = ((result.output.float() - dense.float()).norm() / dense.float().norm()).item()
            ms = triton.testing.do_bench(lambda: method.attend(make_call(q, k, v, grid, state)), return_mode="median")
            extra = "| - | - |"
            if isinstance(method, Svg2Method):
                kernel_ms = kernel_only_ms(method, q, k, v, state)
                extra = f"| {kernel_ms:.2f} | {1 - kernel_ms / ms:.1%} |"
            label = ", ".join(f"{key}={value}" for key, value in setting.items())
            rows.append(f"| {name} | {label} | {float(result.kept_density):.3f} | {rel:.3e} | {dense_ms:.2f} | "
                        f"{ms:.2f} | {dense_ms / ms:.2f}x {extra}")
            print(rows[-1], flush=True)
    print_and_save("\n".join(rows), "methods.md")


if __name__ == "__main__":
    main()
