"""Where SVG2's time goes: each stage of one warm call timed on its own (GPU).

Stages, in call order: k-means of the queries and of the keys (warm, ``kmeans_iters_step``
iterations), the two cluster permutations, centroid scores + top-p selection, the gathers of
Q/K/V into cluster order, the cluster kernel, the scatter of O and LSE back, and the kept-density
computation. Prints a markdown table (ms and share of the sum) and writes it to
``$OUT/svg2_stages.md`` when ``OUT`` is set.

    PYTHONPATH=.:benchmarks python benchmarks/profile_svg2_stages.py
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.testing

from bench_methods import SHAPES, make_call, structured_qkv
from sparse_compile.kernels.block_select import pooled_block_scores, select_top_p
from sparse_compile.kernels.kmeans import cluster_permutation, kmeans
from sparse_compile.kernels.varlen_block_sparse import varlen_block_sparse_attention
from sparse_compile.methods.svg2 import Svg2Method, gather_tokens, kept_pair_fraction, scatter_tokens
from sparse_compile.options import validate_options
from sparse_compile.runtime.session import SiteState


def main() -> None:
    heads, grid = SHAPES["Wan 480p (H=12, S=32760)"]
    q, k, v = structured_qkv(heads, grid[0] * grid[1] * grid[2])
    method = Svg2Method(validate_options({"method": "svg2"}))
    state = SiteState()
    method.attend(make_call(q, k, v, grid, state))  # cold start fills the centroid cache
    p = method.params
    cached = next(iter(state.cache.values()))
    iters = p["kmeans_iters_step"]
    scale = q.shape[-1] ** -0.5

    cq = kmeans(q, p["q_clusters"], iters, cached.query, seed=0)
    ck = kmeans(k, p["k_clusters"], iters, cached.key, seed=1)
    q_perm, q_off = cluster_permutation(cq.labels, cq.sizes)
    k_perm, k_off = cluster_permutation(ck.labels, ck.sizes)
    probs = pooled_block_scores(cq.centroids, ck.centroids, ck.sizes, scale)
    min_blocks = max(1, math.ceil(p["min_kc_ratio"] * probs.shape[-1]))
    counts, indices = select_top_p(probs, p["top_p"], min_blocks=min_blocks)
    qp, kp, vp = gather_tokens(q, q_perm), gather_tokens(k, k_perm), gather_tokens(v, k_perm)
    out, lse = varlen_block_sparse_attention(qp, kp, vp, q_off, k_off, counts, indices, scale=scale, return_lse=True)

    stages = {
        "k-means queries": lambda: kmeans(q, p["q_clusters"], iters, cached.query, seed=0),
        "k-means keys": lambda: kmeans(k, p["k_clusters"], iters, cached.key, seed=1),
        "permutations (2)": lambda: (cluster_permutation(cq.labels, cq.sizes), cluster_permutation(ck.labels, ck.sizes)),
        "scores + top-p": lambda: select_top_p(pooled_block_scores(cq.centroids, ck.centroids, ck.sizes, scale),
                                               p["top_p"], min_blocks=min_blocks),
        "gathers Q/K/V": lambda: (gather_tokens(q, q_perm), gather_tokens(k, k_perm), gather_tokens(v, k_perm)),
        "cluster kernel": lambda: varlen_block_sparse_attention(qp, kp, vp, q_off, k_off, counts, indices,
                                                                scale=scale, return_lse=True),
        "scatter O + LSE": lambda: (scatter_tokens(out, q_perm), scatter_tokens(lse, q_perm)),
        "kept density": lambda: kept_pair_fraction(cq.sizes, ck.sizes, counts, indices, q.shape[2]),
    }
    times = {name: triton.testing.do_bench(fn, return_mode="median") for name, fn in stages.items()}
    whole = triton.testing.do_bench(lambda: method.attend(make_call(q, k, v, grid, state)), return_mode="median")
    total = sum(times.values())
    rows = [f"{torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", "",
            "| stage | ms | share of the stage sum |", "|---|---|---|"]
    rows += [f"| {name} | {ms:.3f} | {ms / total:.1%} |" for name, ms in times.items()]
    rows += [f"| sum of stages | {total:.3f} | |", f"| whole call (method.attend) | {whole:.3f} | |"]
    table = "\n".join(rows)
    print(table)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "svg2_stages.md"), "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
