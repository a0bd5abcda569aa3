"""k-means assignment tiles for SVG2's two clusterings, Wan 480p shape (GPU).

On the structured synthetic queries and keys of the method benchmark (``common.structured_qkv``) (H=12, S=32760, D=128, bf16,
``(B, S, H, D)`` storage as diffusers passes them), warm-started from 50 cold iterations as in
steady state, for each assignment tile config and for the query (``q_clusters`` = 200) and key
(``k_clusters`` = 1000) clusterings, ``triton.testing.do_bench`` medians of

- one assignment pass alone (``iters=0``: labels and sizes, no update);
- SVG2's warm step (``iters=2``: two passes, each assignment + fused update, then finalize),

with the assignment's TFLOP/s (2 * B*H * S * K * D per pass) and the labels checked equal to the
reference's on two sampled heads (the 16-bit rounding of the centroids allows ~0.1% to differ).
Prints a markdown table and writes it to ``$OUT/kmeans.md`` when OUT is set.

    python benchmarks/bench_kmeans.py
"""

from __future__ import annotations

import argparse

import torch
import triton
from common import bench_ms, print_and_save, structured_qkv, token_major

from sparse_compile.kernels import kmeans as km
from sparse_compile.kernels.kmeans_reference import assign_reference
from sparse_compile.kernels.tile_configs import KMEANS_TILE, TileConfig

HEADS, SEQ, DIM = 12, 32760, 128
CLUSTERINGS = {"queries, 200 clusters": 200, "keys, 1000 clusters": 1000}
CONFIGS = (
    TileConfig(64, 64, 4, 1),
    TileConfig(64, 64, 4, 2),
    TileConfig(64, 128, 4, 2),
    TileConfig(128, 64, 4, 2),
    TileConfig(128, 64, 8, 2),
    TileConfig(128, 128, 8, 2),
    TileConfig(128, 128, 8, 3),
)


REP_MS = 200.0


def label_agreement(x: torch.Tensor, init: torch.Tensor, config: TileConfig) -> float:
    """Fraction of labels of one Triton assignment pass equal to the reference's, heads 0 and last."""
    got = km.kmeans_triton(x, init.shape[2], 0, init, config=config).labels
    heads = [0, x.shape[1] - 1]
    want = assign_reference(x[:, heads], init[:, heads])
    return float((got[:, heads] == want).float().mean())


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    q, k, _ = (token_major(t) for t in structured_qkv(HEADS, SEQ, DIM))
    inputs = {"queries, 200 clusters": q, "keys, 1000 clusters": k}
    lines = [
        f"# k-means assignment tiles, Wan 480p (B=1, H={HEADS}, S={SEQ}, D={DIM}) bf16, (B, S, H, D) storage",
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
        f"default config {KMEANS_TILE}",
        "",
        "| clustering | config (BLOCK_S, BLOCK_K, warps, stages) | one assignment pass ms | TFLOP/s | "
        "warm step (2 iterations) ms | labels equal to the reference |",
        "|---|---|---|---|---|---|",
    ]
    for name, clusters in CLUSTERINGS.items():
        x = inputs[name]
        init = km.kmeans(x, clusters, 50, seed=0).centroids  # steady state: warm centroids
        flop = 2 * HEADS * SEQ * clusters * DIM
        for cfg in CONFIGS:
            one = bench_ms(lambda: km.kmeans_triton(x, clusters, 0, init, config=cfg), rep_ms=REP_MS)
            step = bench_ms(lambda: km.kmeans_triton(x, clusters, 2, init, config=cfg), rep_ms=REP_MS)
            agree = label_agreement(x, init, cfg)
            lines.append(f"| {name} | {cfg.block_s}, {cfg.block_k}, {cfg.num_warps}, {cfg.num_stages} | {one:.3f} | "
                         f"{flop / one / 1e9:.0f} | {step:.3f} | {agree:.4f} |")  # fmt: skip
            print(lines[-1], flush=True)
    print_and_save("\n".join(lines), "kmeans.md")


if __name__ == "__main__":
    main()
