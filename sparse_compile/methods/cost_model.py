"""The cost model ``method="auto"`` chooses by: block-sparse and cluster kernels vs dense SDPA on this device.

A block-sparse call over ``B*H`` heads costs ``launch + pair_time * kept_pairs`` and dense SDPA
``dense_pair_time * B*H*Sv^2`` (pairs: computed (query, key) token pairs, kept blocks counted
whole). On CUDA the three numbers are measured once per process, device, dtype, head dim and block
size (:func:`measured_costs`): ``triton.testing.do_bench`` medians of the block-sparse kernel at
kept densities 1/8 and 1/2 (banded layouts) and of ``F.scaled_dot_product_attention`` at
``B=1, H=8, S=16384``, each the fastest of :data:`CALIBRATION_REPEATS` interleaved repeats
(:func:`fastest_seconds`); the two sparse points give ``pair_time`` (slope) and ``launch`` (intercept).
Elsewhere (the CPU reference path, whose timings say nothing about a GPU) the nominal model
:data:`NOMINAL_COSTS` is used: kept pairs 1.25x as expensive as dense ones, no launch cost.

The cluster candidate (:class:`ClusterCosts`) costs ``launch + pair_time * kept_pairs`` on the
cluster (varlen) kernel plus ``clustering_time`` per (head, video token) for the k-means of its
queries and keys. On CUDA :func:`measured_cluster_costs` times them once per process, device, dtype,
head dim and k-means setting, at the same ``B=1, H=8, S=16384``: ``do_bench`` medians of the varlen
kernel with folded random permutations at kept densities 1/8 and 1/2 (equal clusters, a band of key
clusters per query cluster: slope and intercept as above) and of both k-means and their permutations.
svg2's guard runs a head dense past the cluster kernel's own break-even density
(:func:`cluster_guard_density`), not the block kernel's.
Elsewhere :func:`nominal_cluster_costs`: a kept pair :data:`CLUSTER_PAIR_RATIO` times a block pair
(the H100 measured the cluster kernel 1.52-1.58x the fixed kernel at equal density, RESULTS.md
"Cluster (varlen) kernel"), no launch cost, and a k-means iteration of a token priced by its flops:
one ``D``-dot per centroid against a kept pair's two (``q.k`` and ``p.v``).

Sparse must win by :data:`GUARD_MARGIN`: the model leaves out the work around the kernel (the
head copies of a call that mixes sparse and dense heads, the text merge, Python), which on the
toy DiT's small heads turned a predicted win at 0.78 kept density into 0.94x cuDNN.
:func:`calibration_lines` lists what this process measured (``sparse_compile.report`` prints them).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_compile.kernels.block_sparse import block_sparse_attention
from sparse_compile.kernels.kmeans import cluster_permutation, kmeans
from sparse_compile.kernels.varlen_block_sparse import varlen_block_sparse_attention
from sparse_compile.kernels.varlen_block_sparse_reference import kept_kv_tokens

_CALIBRATION_HEADS = 8
_CALIBRATION_TOKENS = 16384
_CALIBRATION_DENSITIES = (0.125, 0.5)
GUARD_MARGIN = 0.85
CALIBRATION_REPEATS = 3
GUARD_BLOCK = 64
"""Block size of the block-kernel calibration whose dense pair time the cluster guard compares with."""
CLUSTER_PAIR_RATIO = 1.5


@dataclass(frozen=True)
class KernelCosts:
    """Seconds (or nominal units) per kept pair of the block-sparse kernel, per call, and per dense pair."""

    pair_time: float
    launch: float
    dense_pair_time: float

    @property
    def break_even_density(self) -> float:
        """Kept density above which a head runs dense: where its sparse time passes
        :data:`GUARD_MARGIN` of its dense time (launch cost aside)."""
        return GUARD_MARGIN * self.dense_pair_time / self.pair_time

    def dense_limit(self, dense_pairs: float) -> float:
        """The time sparse work over ``dense_pairs`` video pairs must stay under:
        :data:`GUARD_MARGIN` of dense SDPA's."""
        return GUARD_MARGIN * self.dense_pair_time * dense_pairs

    def block_time(self, kept_pairs: float) -> float:
        """One block-sparse call computing ``kept_pairs``."""
        return self.launch + self.pair_time * kept_pairs


NOMINAL_COSTS = KernelCosts(pair_time=1.25, launch=0.0, dense_pair_time=1.0)


@dataclass(frozen=True)
class ClusterCosts:
    """The cluster candidate's costs, in the units of the device's :class:`KernelCosts`: per kept pair
    and per call of the cluster kernel, and per (head, video token) of one k-means of queries and keys."""

    pair_time: float
    launch: float
    clustering_time: float

    def call_time(self, kept_pairs: float, clustering: float) -> float:
        """One cluster-kernel call computing ``kept_pairs``, plus the ``clustering`` time charged to it."""
        return self.launch + self.pair_time * kept_pairs + clustering

    def break_even_density(self, dense_pair_time: float) -> float:
        """Kept density above which a head clustered already runs dense: where this kernel's time for it
        passes :data:`GUARD_MARGIN` of dense SDPA's (launch cost aside)."""
        return GUARD_MARGIN * dense_pair_time / self.pair_time


def _banded_layout(rows: int, columns: int, kept: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts int32 ``(1, 1, rows)`` and ascending indices int32 ``(1, 1, rows, kept)``: row ``i`` keeps
    ``kept`` consecutive of ``columns`` column ids around ``i * columns / rows``."""
    centre = torch.arange(rows, device=device) * columns // rows
    first = (centre - kept // 2).clamp(0, columns - kept)
    indices = (first[:, None] + torch.arange(kept, device=device)).to(torch.int32)
    counts = torch.full((rows,), kept, dtype=torch.int32, device=device)
    return counts.view(1, 1, -1), indices.view(1, 1, rows, kept)


def equal_cluster_offsets(tokens: int, clusters: int, device: torch.device) -> torch.Tensor:
    """Offsets int32 ``(1, 1, clusters + 1)`` of ``clusters`` contiguous clusters of (nearly) equal size."""
    return (torch.arange(clusters + 1, device=device) * tokens // clusters).to(torch.int32).view(1, 1, -1)


def banded_cluster_layout(
    tokens: int, q_clusters: int, k_clusters: int, density: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A calibration layout of the cluster kernel: equal clusters, each query cluster keeping a band of
    ``round(density * k_clusters)`` key clusters. Returns q and kv offsets, counts, indices and the
    kept (query, key) pairs per head."""
    kept = max(1, round(density * k_clusters))
    q_offsets = equal_cluster_offsets(tokens, q_clusters, device)
    k_offsets = equal_cluster_offsets(tokens, k_clusters, device)
    counts, indices = _banded_layout(q_clusters, k_clusters, kept, device)
    kept_keys = kept_kv_tokens(k_offsets.diff(), counts, indices)
    return q_offsets, k_offsets, counts, indices, int((q_offsets.diff() * kept_keys).sum())


def fastest_seconds(fns: Sequence[Callable[[], object]]) -> list[float]:
    """Each of ``fns`` timed :data:`CALIBRATION_REPEATS` times, interleaved (``do_bench`` medians), in
    seconds: the fastest of each one's repeats, so a transient slowdown of one repeat does not skew the
    ratios the guard decides by."""
    from triton.testing import do_bench

    best = [math.inf] * len(fns)
    for _ in range(CALIBRATION_REPEATS):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e-3)
    return best


def line_fit(pairs: Sequence[float], times: Sequence[float]) -> tuple[float, float]:
    """Slope (seconds per kept pair) and intercept (launch, at least 0) of two timed points. Where the
    points do not give a positive slope (the same kept pairs, as when a layout of one or two clusters
    keeps everything at both densities, or timing noise), all of the slower time is charged to its
    pairs: no launch, so the sparse path never looks cheaper than it was timed."""
    pair_time = (times[1] - times[0]) / (pairs[1] - pairs[0]) if pairs[1] != pairs[0] else 0.0
    if pair_time > 0:
        return pair_time, max(0.0, times[0] - pair_time * pairs[0])
    slow = max(range(2), key=lambda i: times[i] / pairs[i])
    return times[slow] / pairs[slow], 0.0


_measured_kernels: dict[tuple[torch.device, torch.dtype, int, int], KernelCosts] = {}
_measured_clusters: dict[tuple[torch.device, torch.dtype, int, int, int, int], ClusterCosts] = {}


def measured_costs(device: torch.device, dtype: torch.dtype, head_dim: int, block: int) -> KernelCosts:
    """:class:`KernelCosts` timed on a CUDA ``device`` (once per process and arguments; module doc)."""
    key = (device, dtype, head_dim, block)
    if key not in _measured_kernels:
        shape = (1, _CALIBRATION_HEADS, _CALIBRATION_TOKENS, head_dim)
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
        n_blocks = _CALIBRATION_TOKENS // block
        kept = [max(1, round(density * n_blocks)) for density in _CALIBRATION_DENSITIES]
        layouts = [_banded_layout(n_blocks, n_blocks, n, device) for n in kept]
        calls = [functools.partial(block_sparse_attention, q, k, v, *layout, block_q=block, block_k=block)
                 for layout in layouts]  # fmt: skip
        *times, dense_s = fastest_seconds([*calls, functools.partial(F.scaled_dot_product_attention, q, k, v)])
        pair_time, launch = line_fit([_CALIBRATION_HEADS * n_blocks * n * block * block for n in kept], times)
        _measured_kernels[key] = KernelCosts(pair_time=pair_time, launch=launch,
                                             dense_pair_time=dense_s / (_CALIBRATION_HEADS * _CALIBRATION_TOKENS**2))
    return _measured_kernels[key]


def measured_cluster_costs(
    device: torch.device, dtype: torch.dtype, head_dim: int, q_clusters: int, k_clusters: int, iters: int
) -> ClusterCosts:
    """:class:`ClusterCosts` timed on a CUDA ``device`` (once per process and arguments; module doc)."""
    key = (device, dtype, head_dim, q_clusters, k_clusters, iters)
    if key not in _measured_clusters:
        shape = (1, _CALIBRATION_HEADS, _CALIBRATION_TOKENS, head_dim)
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
        q_perm, k_perm = (torch.randperm(_CALIBRATION_TOKENS, device=device, generator=gen).view(1, 1, -1)
                          for _ in range(2))  # fmt: skip
        layouts = [banded_cluster_layout(_CALIBRATION_TOKENS, q_clusters, k_clusters, density, device)
                   for density in _CALIBRATION_DENSITIES]  # fmt: skip
        calls = [functools.partial(varlen_block_sparse_attention, q, k, v, q_off, k_off, counts, indices,
                                   q_perm=q_perm, kv_perm=k_perm,
                                   max_kept_keys=int(kept_kv_tokens(k_off.diff(), counts, indices).max()))
                 for q_off, k_off, counts, indices, _ in layouts]  # fmt: skip

        def cluster_both() -> None:
            for x, clusters, seed in ((q, q_clusters, 0), (k, k_clusters, 1)):
                clustering = kmeans(x, clusters, iters, seed=seed)
                cluster_permutation(clustering.labels, clustering.sizes, clustering.ranks)

        *times, clustering_s = fastest_seconds([*calls, cluster_both])
        pair_time, launch = line_fit([_CALIBRATION_HEADS * layout[-1] for layout in layouts], times)
        _measured_clusters[key] = ClusterCosts(pair_time=pair_time, launch=launch,
                                               clustering_time=clustering_s / (_CALIBRATION_HEADS * _CALIBRATION_TOKENS))
    return _measured_clusters[key]


def calibration_lines() -> tuple[str, ...]:
    """One line per cost measurement this process made, with the break-even kept density it gives
    (the cluster kernel's from the dense pair time measured beside the block kernel's)."""
    dense = {key[:3]: costs.dense_pair_time for key, costs in _measured_kernels.items()}
    lines = [f"{_describe(*key[:3])}: block kernel, {key[3]}-token blocks, break-even kept density "
             f"{costs.break_even_density:.2f}" for key, costs in _measured_kernels.items()]  # fmt: skip
    lines += [f"{_describe(*key[:3])}: cluster kernel, {key[3]} x {key[4]} clusters, break-even kept density "
              f"{clusters.break_even_density(dense[key[:3]]):.2f}"
              for key, clusters in _measured_clusters.items() if key[:3] in dense]  # fmt: skip
    return tuple(lines)


def _describe(device: torch.device, dtype: torch.dtype, head_dim: int) -> str:
    return f"{device} {str(dtype).removeprefix('torch.')} head dim {head_dim}"


def nominal_cluster_costs(q_clusters: int, k_clusters: int, iters: int) -> ClusterCosts:
    """:class:`ClusterCosts` in :data:`NOMINAL_COSTS`' units (module doc): ``iters * (q_clusters +
    k_clusters) / 2`` dense pairs per (head, token) of k-means."""
    return ClusterCosts(
        pair_time=CLUSTER_PAIR_RATIO * NOMINAL_COSTS.pair_time,
        launch=0.0,
        clustering_time=iters * (q_clusters + k_clusters) / 2 * NOMINAL_COSTS.dense_pair_time,
    )


def cluster_costs(
    device: torch.device, dtype: torch.dtype, head_dim: int, q_clusters: int, k_clusters: int, iters: int
) -> ClusterCosts:
    """The cluster candidate's costs on ``device``: measured on CUDA, nominal elsewhere."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return measured_cluster_costs(torch.device("cuda", index), dtype, head_dim, q_clusters, k_clusters, iters)
    return nominal_cluster_costs(q_clusters, k_clusters, iters)


def guard_costs(device: torch.device, dtype: torch.dtype, head_dim: int, block: int) -> KernelCosts | None:
    """The costs the break-even guard of a single method uses: measured on CUDA; ``None`` elsewhere
    (the reference path keeps every method as chosen)."""
    return kernel_costs(device, dtype, head_dim, block) if device.type == "cuda" else None


def kernel_costs(device: torch.device, dtype: torch.dtype, head_dim: int, block: int) -> KernelCosts:
    """The cost model for calls on ``device``: measured on CUDA, :data:`NOMINAL_COSTS` elsewhere."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return measured_costs(torch.device("cuda", index), dtype, head_dim, block)
    return NOMINAL_COSTS


def cluster_guard_density(
    device: torch.device, dtype: torch.dtype, head_dim: int, q_clusters: int, k_clusters: int, iters: int
) -> float | None:
    """The kept density past which svg2's guard runs a head dense: the cluster kernel's break-even against
    dense SDPA, measured on CUDA; ``None`` elsewhere (the reference path keeps every head sparse)."""
    if device.type != "cuda":
        return None
    dense_pair_time = kernel_costs(device, dtype, head_dim, GUARD_BLOCK).dense_pair_time
    return cluster_costs(device, dtype, head_dim, q_clusters, k_clusters, iters).break_even_density(dense_pair_time)
