"""Where SVG2's time goes: each stage of one warm call timed on its own (GPU), with the permutation
folded into the cluster kernel.

Inputs are laid out as the backend's op receives them from diffusers: ``(B, H, S, D)`` views of
``(B, S, H, D)`` storage. Stages, in call order: k-means of the queries and of the keys (warm,
``kmeans_iters_step`` iterations), the two cluster permutations (``cluster_permutation``: index
tensors only), centroid scores + top-p selection + kept key tokens (``select_top_p_clusters``: the
centroid matmul and the fused Triton kernel), the cluster kernel reading Q/K/V and writing O/LSE
through the permutations, and the kept-density reduction. Then the whole
``Svg2Method._video_attention`` call and cuDNN dense SDPA on the same inputs, the overhead
(everything but the kernel) as a fraction of the whole call, and the selection stage as the torch
ops it replaced (``select_top_p_clusters_torch``). Each is timed eagerly and as a CUDA-graph replay
(GPU time: the small stages are launch-bound when timed alone, but inside a model the CPU queues
them while the GPU runs the previous layer). Last, every GPU kernel one warm call launches, with its
GPU time from ``torch.profiler`` (the profiler's per-kernel times add a little to each). Prints
markdown tables and writes them to ``$OUT/svg2_stages.md`` when ``OUT`` is set.

    python benchmarks/profile_svg2_stages.py [--shape NAME]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from common import SHAPES, bench_ms, graph_replay_ms, method_call, print_and_save, structured_qkv, token_major
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_compile.kernels.block_select import select_top_p_clusters, select_top_p_clusters_torch
from sparse_compile.kernels.kmeans import cluster_permutation, kmeans
from sparse_compile.kernels.varlen_block_sparse import varlen_block_sparse_attention
from sparse_compile.methods.svg2 import Svg2Method, kept_pair_fraction
from sparse_compile.methods.base import SiteCache
from sparse_compile.options import validate_options

SELECT_STAGE = "scores + top-p + kept tokens (fused kernel)"
UNFUSED_SELECT = "scores + top-p + kept tokens as torch ops (select_top_p_clusters_torch)"
KERNEL_STAGE = "cluster kernel, permutations folded"
CALL = "whole call (Svg2Method.video_attention)"
DENSE = "cuDNN dense SDPA"


def warm_method(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int]):
    """SVG2 with default options after one (cold) call, so its centroid cache is filled; and its site cache."""
    method = Svg2Method(validate_options({"method": "svg2"}))
    cache = SiteCache()
    method.attend(method_call(q, k, v, grid, cache))
    return method, cache


def stage_calls(
    method: Svg2Method, q, k, v, cache: SiteCache
) -> tuple[dict[str, Callable[[], object]], Callable[[], object]]:
    """One callable per stage of a warm ``_video_attention`` call on video-only ``(B, H, S, D)`` inputs,
    and the selection stage as unfused torch ops.

    Each stage runs on the previous stages' real outputs (computed once here), as in the call.
    """
    p = method.config
    cached = next(iter(cache.entries().values()))
    iters = p.kmeans_iters_step
    scale = q.shape[-1] ** -0.5
    cq = kmeans(q, p.q_clusters, iters, cached.query, seed=0)
    ck = kmeans(k, p.k_clusters, iters, cached.key, seed=1)
    q_perm, q_off = cluster_permutation(cq.labels, cq.sizes, cq.ranks)
    k_perm, k_off = cluster_permutation(ck.labels, ck.sizes, ck.ranks)
    min_blocks = method.min_kept_key_clusters(ck.sizes.shape[-1])

    def select():
        return select_top_p_clusters(cq.centroids, ck.centroids, ck.sizes, scale, p.top_p, min_blocks)

    def select_unfused():
        return select_top_p_clusters_torch(cq.centroids, ck.centroids, ck.sizes, scale, p.top_p, min_blocks)

    counts, indices, kept_tokens = select()
    stages = {
        "k-means queries": lambda: kmeans(q, p.q_clusters, iters, cached.query, seed=0),
        "k-means keys": lambda: kmeans(k, p.k_clusters, iters, cached.key, seed=1),
        "permutations (2 x cluster_permutation)": lambda: (cluster_permutation(cq.labels, cq.sizes, cq.ranks),
                                                           cluster_permutation(ck.labels, ck.sizes, ck.ranks)),
        SELECT_STAGE: select,
        KERNEL_STAGE: lambda: varlen_block_sparse_attention(q, k, v, q_off, k_off, counts, indices, q_perm=q_perm,
                                                            kv_perm=k_perm, scale=scale, return_lse=True),
        "kept density": lambda: kept_pair_fraction(cq.sizes, kept_tokens, q.shape[2]),
    }  # fmt: skip
    return stages, select_unfused


def whole_calls(method: Svg2Method, q, k, v, grid, cache: SiteCache) -> dict[str, Callable[[], object]]:
    """The whole warm SVG2 video attention, and cuDNN dense SDPA on the same inputs."""

    def video_attention():
        return method.video_attention(q, k, v, method_call(q, k, v, grid, cache))

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return {CALL: video_attention, DENSE: dense}


@dataclass(frozen=True)
class Timing:
    """One callable timed two ways: ``eager`` (do_bench of the Python call: what a caller that waits for
    it sees, launch cost included) and ``gpu`` (do_bench of a CUDA-graph replay of one call: the GPU
    time, what the call costs inside a model whose CPU runs ahead of the GPU); ``gpu`` is None when the
    call could not be captured (``note`` says why)."""

    eager: float
    gpu: float | None
    note: str = ""


def time_both(fn: Callable[[], object]) -> Timing:
    """:class:`Timing` of ``fn`` (median ms)."""
    eager = bench_ms(fn)
    try:
        gpu = graph_replay_ms(fn)
    except Exception as error:  # noqa: BLE001 - a call that cannot be captured is reported, not fatal
        torch.cuda.synchronize()
        return Timing(eager, None, f"not capturable: {type(error).__name__}: {str(error).splitlines()[0]}")
    return Timing(eager, gpu)


def report(stages: dict[str, Timing], whole: dict[str, Timing], unfused_select: Timing, header: str) -> str:
    """Markdown: per-stage eager and GPU ms with the GPU share of the whole call, then the whole call,
    dense, speedups and overhead both ways, and the selection stage unfused."""
    call, dense = whole[CALL], whole[DENSE]

    def gpu(t: Timing) -> str:
        return f"{t.gpu:.3f}" if t.gpu is not None else t.note

    def share(t: Timing) -> str:
        return f"{t.gpu / call.gpu:.1%}" if t.gpu is not None and call.gpu else "-"

    rows = [header, "", "| stage | eager ms | GPU ms (graph replay) | GPU share of the whole call |", "|---|---|---|---|"]
    rows += [f"| {name} | {t.eager:.3f} | {gpu(t)} | {share(t)} |" for name, t in stages.items()]
    gpu_sum = sum(t.gpu for t in stages.values() if t.gpu is not None)
    rows += [
        f"| sum of stages | {sum(t.eager for t in stages.values()):.3f} | {gpu_sum:.3f} | |",
        f"| {CALL} | {call.eager:.3f} | {gpu(call)} | 100% |",
        f"| {DENSE} | {dense.eager:.3f} | {gpu(dense)} | |",
        "",
        f"- speedup of SVG2 over cuDNN dense: {dense.eager / call.eager:.2f}x eager"
        + (f", {dense.gpu / call.gpu:.2f}x GPU time" if call.gpu and dense.gpu else ""),
        f"- overhead (whole call minus the kernel), eager: {1 - stages[KERNEL_STAGE].eager / call.eager:.1%} of the whole call"
        + (f"; GPU time: {1 - stages[KERNEL_STAGE].gpu / call.gpu:.1%}" if call.gpu and stages[KERNEL_STAGE].gpu else ""),
        f"- {UNFUSED_SELECT}: {unfused_select.eager:.3f} ms eager, {unfused_select.eager / stages[SELECT_STAGE].eager:.1f}x the fused stage",
    ]
    return "\n".join(rows)


def launch_table(call: Callable[[], object], reps: int = 10) -> str:
    """Markdown: each GPU kernel of one ``call`` (by name, truncated), launches and microseconds per call,
    from ``torch.profiler`` over ``reps`` calls after warm-up; with the kernel count and summed time."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:80], []).append(e.device_time)
    rows = [f"GPU kernels of one warm call: {len(kernels) / reps:.0f} launches, "
            f"{sum(e.device_time for e in kernels) / reps / 1000:.3f} ms summed", "",
            "| kernel | launches per call | us per call |", "|---|---|---|"]  # fmt: skip
    for name, times in sorted(by_name.items(), key=lambda item: -sum(item[1])):
        rows.append(f"| `{name}` | {len(times) / reps:.0f} | {sum(times) / reps:.1f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default=next(iter(SHAPES)))
    args = parser.parse_args(argv)
    heads, grid = SHAPES[args.shape]
    q, k, v = (token_major(x) for x in structured_qkv(heads, math.prod(grid)))
    method, cache = warm_method(q, k, v, grid)
    stages, select_unfused = stage_calls(method, q, k, v, cache)
    stage_times = {name: time_both(fn) for name, fn in stages.items()}
    unfused_select = time_both(select_unfused)
    calls = whole_calls(method, q, k, v, grid, cache)
    whole = {name: time_both(fn) for name, fn in calls.items()}
    header = (f"{args.shape}, (B, S, H, D) storage; torch {torch.__version__}, triton {triton.__version__}, "
              f"{torch.cuda.get_device_name()}")  # fmt: skip
    table = report(stage_times, whole, unfused_select, header) + "\n\n" + launch_table(calls[CALL])
    print_and_save(table, "svg2_stages.md")


if __name__ == "__main__":
    main()
