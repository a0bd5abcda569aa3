"""Where SVG2's time goes: each stage of one warm call timed on its own (GPU), with the permutation
folded into the cluster kernel.

Inputs are laid out as the backend's op receives them from diffusers: ``(B, H, S, D)`` views of
``(B, S, H, D)`` storage. Stages, in call order: k-means of the queries and of the keys (warm,
``kmeans_iters_step`` iterations), the two cluster permutations (``cluster_permutation``: index
tensors only), centroid scores + top-p selection + kept key tokens (``select_top_p_clusters``: the
centroid matmul and the fused Triton kernel), the cluster kernel reading Q/K/V and writing O/LSE
through the permutations, and the kept-density reduction. Then the whole
``Svg2Method._video_attention`` call and cuDNN dense SDPA on the same inputs, the overhead
(everything but the kernel) as a fraction of the whole call, the call as the backend makes it
(``Svg2Method.attend``: its break-even guard reads the device once; the kernel's prep, and once a site has
run it, the attention kernel too, are launched before that read), the kernel given the kept-key bounds the
read gives (one ragged kept-rows buffer for every head), and the selection stage as
the torch ops it replaced (``select_top_p_clusters_torch``). Each is timed eagerly and as a CUDA-graph replay
(GPU time: the small stages are launch-bound when timed alone, but inside a model the CPU queues
them while the GPU runs the previous layer). Last, every GPU kernel one warm call launches, with its
GPU time from ``torch.profiler`` (the profiler's per-kernel times add a little to each).

Before that, ``--settings`` compares k-means settings side by side (default: the old
``kmeans_iters_step=2`` without subsample or reuse, and the current defaults): per setting the GPU
time of k-means q + k, the whole call and the overhead share. With the reuse rule on, k-means is
timed twice: on the tokens its cached clustering came from (every head settled: only the probe
works) and against a clustering of the tokens shuffled (every head moved: the probe, then the
iterations); the whole call is the settled one, and the moved call's overhead share is derived from
it (whole call - settled k-means + moved k-means). Prints markdown tables and writes them to
``$OUT/svg2_stages.md`` when ``OUT`` is set.

    python benchmarks/profile_svg2_stages.py [--shape NAME] [--settings svg2@kmeans_iters_step=2,svg2]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from common import (
    SHAPES,
    bench_ms,
    graph_replay_ms,
    method_call,
    print_and_save,
    structured_qkv,
    token_major,
    warm_call_kernels,
)
from end_to_end.variants import split_variant
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_compile.kernels.block_select import select_top_p_clusters, select_top_p_clusters_torch
from sparse_compile.kernels.kmeans import Clustering, cluster_permutation
from sparse_compile.kernels.varlen_block_sparse import varlen_block_sparse_attention
from sparse_compile.methods.base import SiteCache
from sparse_compile.methods.svg2 import CachedClusters, Svg2Method, kept_pair_fraction
from sparse_compile.options import validate_options

SELECT_STAGE = "scores + top-p + kept tokens (fused kernel)"
UNFUSED_SELECT = "scores + top-p + kept tokens as torch ops (select_top_p_clusters_torch)"
KERNEL_STAGE = "cluster kernel, permutations folded"
CALL = "whole call (Svg2Method.video_attention)"
ATTEND = "whole call as the backend runs it (Svg2Method.attend: the guard's host read, the kernel staged before it)"
DENSE = "cuDNN dense SDPA"
KMEANS_Q, KMEANS_K = "k-means queries", "k-means keys"
OLD_SETTING = "svg2@kmeans_iters_step=2@kmeans_sample=1@kmeans_reuse=0"


def warm_method(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int, int], options: dict):
    """SVG2 with ``options`` after one (cold) call, so its clustering cache is filled; and its site cache."""
    method = Svg2Method(validate_options({"method": "svg2", **options}))
    cache = SiteCache()
    method.attend(method_call(q, k, v, grid, cache))
    return method, cache


def cached_clusters(cache: SiteCache) -> CachedClusters:
    """The clustering a warm call starts from (the site cache's entry of the first CFG branch)."""
    return cache.entries()[(CachedClusters, 0)]


def shuffled_clustering(x: torch.Tensor, clustering: Clustering) -> Clustering:
    """``clustering`` as if ``x``'s tokens had changed places: the same centroids, the labels, ranks
    (and so the probe's reference) of a random token order, so the reuse rule re-clusters every head."""
    perm = torch.randperm(x.shape[2], device=x.device, generator=torch.Generator(device=x.device).manual_seed(0))
    return Clustering(clustering.centroids, clustering.labels[:, :, perm], clustering.sizes, clustering.ranks[:, :, perm])


def kmeans_calls(method: Svg2Method, q, k, cached: CachedClusters, moved: bool) -> dict[str, Callable[[], object]]:
    """The warm k-means of queries and keys as the method runs them, from the cached clustering
    (``moved``: from :func:`shuffled_clustering` of it)."""
    previous_q = shuffled_clustering(q, cached.query) if moved else cached.query
    previous_k = shuffled_clustering(k, cached.key) if moved else cached.key
    n_q, n_k = previous_q.centroids.shape[2], previous_k.centroids.shape[2]
    return {KMEANS_Q: lambda: method.warm_clustering(q, n_q, previous_q),
            KMEANS_K: lambda: method.warm_clustering(k, n_k, previous_k)}  # fmt: skip


def stage_calls(
    method: Svg2Method, q, k, v, cache: SiteCache
) -> tuple[dict[str, Callable[[], object]], Callable[[], object], Callable[[], object]]:
    """One callable per stage of a warm ``_video_attention`` call on video-only ``(B, H, S, D)`` inputs,
    the selection stage as unfused torch ops, and the cluster kernel given the kept-key bounds ``attend``
    reads on the host and passes (the most keys one q cluster keeps, each (batch, head)'s and their sum:
    a ragged kept-rows buffer, so fewer launch groups than ``_video_attention``'s padded one).

    Each stage runs on the previous stages' real outputs (computed once here), as in the call.
    """
    p = method.config
    cached = cached_clusters(cache)
    scale = q.shape[-1] ** -0.5
    clustering = kmeans_calls(method, q, k, cached, moved=False)
    cq, ck = clustering[KMEANS_Q](), clustering[KMEANS_K]()
    q_perm, q_off = cluster_permutation(cq.labels, cq.sizes, cq.ranks)
    k_perm, k_off = cluster_permutation(ck.labels, ck.sizes, ck.ranks)
    min_blocks = method.min_kept_key_clusters(ck.sizes.shape[-1])

    def select():
        return select_top_p_clusters(cq.centroids, ck.centroids, ck.sizes, scale, p.top_p, min_blocks)

    def select_unfused():
        return select_top_p_clusters_torch(cq.centroids, ck.centroids, ck.sizes, scale, p.top_p, min_blocks)

    counts, indices, kept_tokens = select()
    stages = {
        **clustering,
        "permutations (2 x cluster_permutation)": lambda: (cluster_permutation(cq.labels, cq.sizes, cq.ranks),
                                                           cluster_permutation(ck.labels, ck.sizes, ck.ranks)),
        SELECT_STAGE: select,
        KERNEL_STAGE: lambda: varlen_block_sparse_attention(q, k, v, q_off, k_off, counts, indices, q_perm=q_perm,
                                                            kv_perm=k_perm, scale=scale, return_lse=True),
        "kept density": lambda: kept_pair_fraction(cq.sizes, kept_tokens, q.shape[2]),
    }  # fmt: skip
    kept = kept_tokens.long()
    pair_rows = kept.flatten(0, 1).sum(-1).tolist()
    bounds = dict(max_kept_keys=int(kept.max()), kept_rows_total=sum(pair_rows), pair_kept_rows=pair_rows)

    def bounded_kernel():
        return varlen_block_sparse_attention(q, k, v, q_off, k_off, counts, indices, q_perm=q_perm, kv_perm=k_perm,
                                             scale=scale, return_lse=True, kept_keys=kept_tokens, **bounds)

    return stages, select_unfused, bounded_kernel


def whole_calls(method: Svg2Method, q, k, v, grid, cache: SiteCache) -> dict[str, Callable[[], object]]:
    """The whole warm SVG2 video attention, the same call through ``attend`` (as the backend's op makes it:
    not capturable in a CUDA graph, its guard reads the device), and cuDNN dense SDPA on the same inputs."""

    def video_attention():
        return method.video_attention(q, k, v, method_call(q, k, v, grid, cache))

    def attend():
        return method.attend(method_call(q, k, v, grid, cache))

    def dense():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return {CALL: video_attention, ATTEND: attend, DENSE: dense}


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


def report(stages: dict[str, Timing], whole: dict[str, Timing], unfused_select: Timing, bounded_kernel: Timing,
           header: str) -> str:  # fmt: skip
    """Markdown: per-stage eager and GPU ms with the GPU share of the whole call, then the whole call,
    dense, speedups and overhead both ways, the call through ``attend`` and the kernel given its bounds, and
    the selection stage unfused."""
    call, attend, dense = whole[CALL], whole[ATTEND], whole[DENSE]

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
        f"- {ATTEND}: {attend.eager:.3f} ms eager, {dense.eager / attend.eager:.2f}x cuDNN dense",
        f"- {KERNEL_STAGE}, given the kept-key bounds attend passes: {bounded_kernel.eager:.3f} ms eager, "
        f"GPU {gpu(bounded_kernel)}",
        f"- {UNFUSED_SELECT}: {unfused_select.eager:.3f} ms eager, {unfused_select.eager / stages[SELECT_STAGE].eager:.1f}x the fused stage",
    ]
    return "\n".join(rows)


@dataclass(frozen=True)
class SettingTimes:
    """GPU ms of one setting's warm call (graph replays): k-means q + k settled and moved (equal without
    the reuse rule), the cluster kernel and the whole call (settled)."""

    kmeans_settled: float
    kmeans_moved: float
    kernel: float
    whole: float


def time_setting(q, k, v, grid, options: dict) -> SettingTimes:
    """:class:`SettingTimes` of SVG2 with ``options`` on these inputs."""
    method, cache = warm_method(q, k, v, grid, options)
    stages, _, _ = stage_calls(method, q, k, v, cache)
    cached = cached_clusters(cache)

    def gpu_ms(calls: dict[str, Callable[[], object]]) -> float:
        return sum(graph_replay_ms(fn) for fn in calls.values())

    settled = gpu_ms(kmeans_calls(method, q, k, cached, moved=False))
    moved = gpu_ms(kmeans_calls(method, q, k, cached, moved=True)) if method.config.kmeans_reuse > 0 else settled
    whole = graph_replay_ms(whole_calls(method, q, k, v, grid, cache)[CALL])
    return SettingTimes(settled, moved, graph_replay_ms(stages[KERNEL_STAGE]), whole)


def comparison(times: dict[str, SettingTimes]) -> str:
    """Markdown: one row per setting, GPU ms and the overhead share (whole call minus the kernel)."""
    rows = ["| setting | k-means q + k, settled / moved | cluster kernel | whole call | overhead share, "
            "settled / moved |", "|---|---|---|---|---|"]  # fmt: skip
    for name, t in times.items():
        moved_whole = t.whole - t.kmeans_settled + t.kmeans_moved
        rows.append(f"| {name} | {t.kmeans_settled:.3f} / {t.kmeans_moved:.3f} "
                    f"| {t.kernel:.3f} | {t.whole:.3f} | {1 - t.kernel / t.whole:.1%} / {1 - t.kernel / moved_whole:.1%} |")
    return "\n".join(rows)


def launch_table(call: Callable[[], object], reps: int = 10) -> str:
    """Markdown: each GPU kernel of one ``call`` (by name, truncated), launches and microseconds per call,
    from ``torch.profiler`` over ``reps`` calls after warm-up; with the kernel count and summed time."""
    kernels = warm_call_kernels(call, reps)
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
    parser.add_argument("--settings", default=OLD_SETTING + ",svg2",
                        help="comma-separated svg2 variants (svg2@option=value@...) compared side by side")
    args = parser.parse_args(argv)
    settings = {variant: split_variant(variant)[1] for variant in args.settings.split(",")}
    heads, grid = SHAPES[args.shape]
    q, k, v = (token_major(x) for x in structured_qkv(heads, math.prod(grid)))
    header = (f"{args.shape}, (B, S, H, D) storage; torch {torch.__version__}, triton {triton.__version__}, "
              f"{torch.cuda.get_device_name()}")  # fmt: skip
    side_by_side = comparison({name: time_setting(q, k, v, grid, options) for name, options in settings.items()})
    method, cache = warm_method(q, k, v, grid, {})
    stages, select_unfused, bounded_kernel = stage_calls(method, q, k, v, cache)
    stage_times = {name: time_both(fn) for name, fn in stages.items()}
    unfused_select, bounded_kernel_time = time_both(select_unfused), time_both(bounded_kernel)
    calls = whole_calls(method, q, k, v, grid, cache)
    whole = {name: time_both(fn) for name, fn in calls.items()}
    table = (f"{header}\n\nk-means settings, GPU ms (graph replays):\n\n{side_by_side}\n\n"
             f"Stage by stage at the defaults (a settled call where the reuse rule is on):\n\n"
             + report(stage_times, whole, unfused_select, bounded_kernel_time, header) + "\n\n"
             + launch_table(calls[CALL]))
    print_and_save(table, "svg2_stages.md")


if __name__ == "__main__":
    main()
