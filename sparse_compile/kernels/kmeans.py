"""Batched k-means for Sparse VideoGen2 (Triton) and the cluster permutation.

``kmeans(x, num_clusters, iters, init_centroids=None, *, seed=0)`` clusters the ``S`` vectors of
every (batch, head) of ``x`` ``(B, H, S, D)``; ``cluster_permutation(labels, sizes, ranks)`` orders
the tokens cluster by cluster. The definitions (distance, ties to the lowest index, empty clusters,
the last pass and its labels, seeding, ``num_clusters`` in ``[1, S]``) are those of
:mod:`sparse_compile.kernels.kmeans_reference`, which is the specification and the path for CPU
tensors and for head dims outside ``SUPPORTED_HEAD_DIMS``; inputs are checked here. Neither path
reads a device value on the host: a call is a fixed sequence of launches.

Kernel design (CUDA), per iteration two launches:

- *Assignment + accumulation* (``_assign_kernel``), one program per ``BLOCK_S`` tokens of one
  (b, h): the x tile stays in registers while the centroids stream through in ``BLOCK_K``
  chunks, ``score = x . c^T - ||c||^2 / 2`` on the tensor cores (centroids pre-cast to x's dtype,
  fp32 accumulation; fp32 inputs use exact fp32 dots) with a running max / argmax. The epilogue
  writes the labels and, still holding the tile, adds each token into its cluster's count and its
  two fixed-point parts (:func:`~sparse_compile.kernels.kmeans_reference.fixed_point_terms`, at the
  head's scale from its largest magnitude, ``_head_amax_kernel`` once per call) with relaxed fp32
  ``atomic_add``: integer-valued sums below 2**23, exact in any order.
- *Finalize* (``_finalize_kernel``) over the ``B*H*K`` centroid rows: mean where the count is
  positive (in fp64, as :func:`~sparse_compile.kernels.kmeans_reference.update_reference`), else the
  old centroid; writes the fp32 centroid, its copy in x's dtype for the next dot and ``||c||^2 / 2``
  (of that copy, so the argmax is exact for the centroids the dot sees), and, before another
  iteration, zeroes the sums and counts; after the last one the counts stay: they are the sizes of
  the returned labels.

A call is ``2 * iters + 1`` launches (a first finalize that copies the initial centroids, in any
float dtype, into the fp32 buffer and zeroes the counts and sums, then the iterations;
``iters=0``: one assignment that only counts), the seeding gather on a cold start, with iterations
the scale pass (a zeroed max, one launch, the scales in torch ops) and the ranks (a zeroed count
buffer, two launches and a cumsum): the centroid, count and sum buffers are written by a kernel
before they are read. Subsampled
iterations (``sample_stride``) are the same kernels on a strided view of x, with their own label
buffers. The reuse rule adds, after the first finalize, one *probe* launch
(``_probe_kernel``: the assignment of every ``probe_stride``-th token, counting per (b, h) the tokens
whose label changes against the previous labels); every later assignment and finalize reads that
count and leaves a settled (b, h) alone (no dots, no updates, no scale pass reading its tokens): the first
finalize zeroes the count (no memset) and has already copied the previous centroids, the last assignment's
programs of a settled (b, h) copy the previous labels and sizes (the reference's
:func:`~sparse_compile.kernels.kmeans_reference.keep_settled`, with no launch of its own) and the rank pass
its previous ranks.
There is no assignment after the last update (the reference's definition): each iteration is one
pass over x. Fusing the update into the assignment's epilogue saves a second read of x and a
per-iteration sort of the labels; its cost is ``2 * B*H * S * D`` relaxed fp32 atomics spread over
``K * D`` addresses per head. The assignment tile is
:data:`~sparse_compile.kernels.tile_configs.KMEANS_TILE`. The ranks (token order within a cluster, the
reference's :func:`~sparse_compile.kernels.kmeans_reference.cluster_ranks_reference`) come from the last
labels by :func:`stable_ranks_triton` (integer counts per tile of tokens, their cumsum, then each tile
sorted by label), so a call's outputs do not depend on the order programs run in.

The cluster permutation is then a counting sort: a token's place is its cluster's offset plus its
rank, in one Triton scatter whose programs each sum their head's cluster sizes into the offsets.

Trade-off: with 16-bit x, labels are exact argmins for the centroids *rounded to x's dtype* (near-ties
may differ from the fp32 reference).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.common import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, dot_precision, interpreter_active
from sparse_compile.kernels.kmeans_reference import (
    Clustering,
    Reuse,
    change_limit,
    cluster_offsets,
    cluster_permutation_reference,
    cluster_ranks_reference,
    fine_factor,
    initial_centroids,
    kmeans_objective,
    kmeans_reference,
    sample_stride_for,
    scales_for,
)
from sparse_compile.kernels.tile_configs import (
    AMAX_TOKENS,
    INTERPRETER_RANK_TOKENS,
    KMEANS_FINALIZE_ELEMENTS,
    KMEANS_TILE,
    PERMUTATION_TOKENS,
    RANK_TOKENS,
    TileConfig,
)

_ROUNDING = tl.constexpr(12582912.0)
"""1.5 * 2**23: added to and taken from an fp32 below 2**22 in magnitude, rounds it to an integer, half to even."""


def check_kmeans_inputs(
    x: Tensor, num_clusters: int, iters: int, init_centroids: Tensor | None, sample_stride: int = 1,
    reuse: Reuse | None = None,
) -> None:  # fmt: skip
    """Raise ``ValueError`` unless the arguments of :func:`kmeans` are valid (no sync)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, H, S, D), got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    b, h, s, d = x.shape
    for name, value in (("num_clusters", num_clusters), ("iters", iters), ("sample_stride", sample_stride)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not 1 <= num_clusters <= s:
        raise ValueError(f"num_clusters must lie in [1, S={s}], got {num_clusters}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    if sample_stride < 1:
        raise ValueError(f"sample_stride must be >= 1, got {sample_stride}")
    if reuse is not None:
        if init_centroids is not None:
            raise ValueError("pass init_centroids or reuse (whose previous centroids are the warm start), not both")
        check_reuse(x, num_clusters, reuse)
        init_centroids = reuse.previous.centroids
    if init_centroids is None:
        return
    if tuple(init_centroids.shape) != (b, h, num_clusters, d) or not init_centroids.dtype.is_floating_point:
        raise ValueError(
            f"init_centroids must be a floating (B, H, K, D) = {(b, h, num_clusters, d)} tensor, "
            f"got {init_centroids.dtype} {tuple(init_centroids.shape)}"
        )
    if init_centroids.device != x.device:
        raise ValueError(f"init_centroids must be on x's device {x.device}, got {init_centroids.device}")


def check_reuse(x: Tensor, num_clusters: int, reuse: Reuse) -> None:
    """Raise ``ValueError`` unless ``reuse`` fits ``x`` ``(B, H, S, D)`` and ``num_clusters``."""
    b, h, s, _ = x.shape
    if not (isinstance(reuse.tolerance, (int, float)) and 0 <= reuse.tolerance <= 1):
        raise ValueError(f"reuse.tolerance must be a number in [0, 1], got {reuse.tolerance!r}")
    if not isinstance(reuse.probe_stride, int) or isinstance(reuse.probe_stride, bool) or reuse.probe_stride < 1:
        raise ValueError(f"reuse.probe_stride must be an int >= 1, got {reuse.probe_stride!r}")
    previous = reuse.previous
    for name, t, shape in (("labels", previous.labels, (b, h, s)), ("ranks", previous.ranks, (b, h, s)),
                           ("sizes", previous.sizes, (b, h, num_clusters))):  # fmt: skip
        if tuple(t.shape) != shape or t.dtype != torch.int32 or t.device != x.device:
            raise ValueError(f"reuse.previous.{name} must be int32 {shape} on {x.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")  # fmt: skip


def check_permutation_inputs(labels: Tensor, sizes: Tensor, ranks: Tensor) -> None:
    """Raise ``ValueError`` unless labels / ranks ``(B, H, S)`` and sizes ``(B, H, K)`` are integer and match."""
    for name, t in (("labels", labels), ("sizes", sizes), ("ranks", ranks)):
        if t.dim() != 3 or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name} must be a 3-D integer tensor, got {t.dtype} {tuple(t.shape)}")
    if labels.shape[:2] != sizes.shape[:2] or labels.device != sizes.device:
        raise ValueError(f"labels {tuple(labels.shape)} and sizes {tuple(sizes.shape)} must share B, H and device")
    if ranks.shape != labels.shape or ranks.device != labels.device:
        raise ValueError(f"ranks {tuple(ranks.shape)} must have the shape and device of labels {tuple(labels.shape)}")


@triton.jit
def _score_chunk(
    x, c_base, hn_base, k0, num_clusters, best, best_idx, dims,
    HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold centroids [k0, k0 + BLOCK_K) into the running best score and index of each token.

    Score ``x . c - hn`` (hn = ||c||^2 / 2); masked columns read hn = +inf (score -inf). Strict
    ``>`` across chunks and the leftmost argmax within one keep the lowest index on ties.
    """
    cols = k0 + tl.arange(0, BLOCK_K)
    c_ptrs = c_base + cols[:, None] * HEAD_DIM + dims[None, :]
    if MASKED:
        col_ok = cols < num_clusters
        c = tl.load(c_ptrs, mask=col_ok[:, None], other=0.0)
        hn = tl.load(hn_base + cols, mask=col_ok, other=float("inf"))
    else:
        c = tl.load(c_ptrs)
        hn = tl.load(hn_base + cols)
    score = tl.dot(x, tl.trans(c), input_precision=DOT_PRECISION) - hn[None, :]
    chunk_best, chunk_idx = tl.max(score, 1, return_indices=True, return_indices_tie_break_left=True)
    better = chunk_best > best
    return tl.where(better, chunk_best, best), tl.where(better, k0 + chunk_idx, best_idx)


@triton.jit
def _nearest(
    x, c_base, hn_base, k_end, num_clusters, dims,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, TAIL_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Index of each token's best centroid among ``[0, k_end)`` (``k_end`` is ``num_clusters``, or 0 to
    compute nothing): the full BLOCK_K chunks, then the last ``k_end % BLOCK_K`` in one masked chunk of
    TAIL_K (a power of two, at least that remainder)."""
    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_S], tl.int32)
    k_full = (k_end // BLOCK_K) * BLOCK_K
    for k0 in range(0, k_full, BLOCK_K):
        best, best_idx = _score_chunk(x, c_base, hn_base, k0, num_clusters, best, best_idx, dims,
                                      HEAD_DIM, BLOCK_K, False, DOT_PRECISION)
    if k_full < k_end:
        best, best_idx = _score_chunk(x, c_base, hn_base, k_full, num_clusters, best, best_idx, dims,
                                      HEAD_DIM, TAIL_K, True, DOT_PRECISION)
    return best_idx


@triton.jit
def _copy_settled(
    prev_labels_ptr, prev_sizes_ptr, labels_ptr, counts_ptr, bh, rows, rows_kept, sizes_kept, seq_len, num_clusters,
    BLOCK_S: tl.constexpr,
):
    """A settled (b, h)'s previous labels of ``rows`` (where ``rows_kept``) and, where ``sizes_kept``, its
    previous sizes into the counts, ``BLOCK_S`` clusters at a time."""
    token = bh * seq_len + rows
    tl.store(labels_ptr + token, tl.load(prev_labels_ptr + token, mask=rows_kept, other=0), mask=rows_kept)
    lanes = tl.arange(0, BLOCK_S)
    for k0 in range(0, tl.where(sizes_kept, num_clusters, 0), BLOCK_S):
        cluster = bh * num_clusters + k0 + lanes
        ok = k0 + lanes < num_clusters
        tl.store(counts_ptr + cluster, tl.load(prev_sizes_ptr + cluster, mask=ok, other=0), mask=ok)


@triton.jit
def _assign_kernel(
    x_ptr, c_ptr, hn_ptr, labels_ptr, counts_ptr, sums_ptr, changes_ptr, change_limit,
    prev_labels_ptr, prev_sizes_ptr,
    stride_xb, stride_xh, stride_xs,
    num_heads, seq_len, num_clusters, scales_ptr, fine,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, TAIL_K: tl.constexpr,
    ACCUMULATE: tl.constexpr, SKIP_SETTLED: tl.constexpr, KEEP_SETTLED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per (BLOCK_S tokens, batch * head): labels, counts and (ACCUMULATE) member sums.

    Centroids ``c`` (in x's dtype) contiguous ``(B*H, K, D)``, ``hn`` fp32 ``(B*H, K)``; labels int32
    ``(B*H, S)`` are written, counts int32 ``(B*H, K)`` and sums fp32 ``(B*H, K, 2, D)`` (each coordinate times
    its head's ``scales[bh]``, fp32 ``(B*H,)``, rounded half to even, and the remainder times ``fine`` rounded
    likewise) are added to (``sums_ptr`` and ``scales_ptr`` are not touched unless ACCUMULATE). With
    SKIP_SETTLED a (b, h) whose probe count ``changes[bh]`` is below ``change_limit`` (settled) reads, computes
    and adds nothing; with KEEP_SETTLED too its programs copy the previous labels (contiguous ``(B*H, S)``) of
    their tokens, and its first program the previous sizes (``(B*H, K)``) into the counts.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    rows = pid.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = rows < seq_len
    row_ok = in_range
    k_end = num_clusters
    if SKIP_SETTLED:
        active = tl.load(changes_ptr + bh) >= change_limit
        row_ok = in_range & active
        k_end = tl.where(active, num_clusters, 0)
        if KEEP_SETTLED:
            _copy_settled(prev_labels_ptr, prev_sizes_ptr, labels_ptr, counts_ptr, bh, rows, in_range & ~active,
                          (pid == 0) & ~active, seq_len, num_clusters, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + rows[:, None] * stride_xs + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    best_idx = _nearest(x, c_ptr + bh * num_clusters * HEAD_DIM, hn_ptr + bh * num_clusters, k_end, num_clusters,
                        dims, BLOCK_S, HEAD_DIM, BLOCK_K, TAIL_K, DOT_PRECISION)
    tl.store(labels_ptr + bh * seq_len + rows, best_idx, mask=row_ok)
    cluster = bh * num_clusters + best_idx
    tl.atomic_add(counts_ptr + cluster, tl.full([BLOCK_S], 1, tl.int32), mask=row_ok, sem="relaxed")
    if ACCUMULATE:
        scaled = x.to(tl.float32) * tl.load(scales_ptr + bh)
        whole = (scaled + _ROUNDING) - _ROUNDING  # |scaled| < 2**22: rounded half to even
        remainder = ((scaled - whole) * fine + _ROUNDING) - _ROUNDING
        parts = sums_ptr + (cluster[:, None] * 2) * HEAD_DIM + dims[None, :]
        tile_ok = tl.broadcast_to(row_ok[:, None], (BLOCK_S, HEAD_DIM))
        tl.atomic_add(parts, whole, mask=tile_ok, sem="relaxed")
        tl.atomic_add(parts + HEAD_DIM, remainder, mask=tile_ok, sem="relaxed")


@triton.jit
def _probe_kernel(
    x_ptr, c_ptr, hn_ptr, prev_labels_ptr, changes_ptr,
    stride_xb, stride_xh, stride_xs, stride_lb, stride_lh, stride_ls,
    num_heads, seq_len, num_clusters,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, TAIL_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program per (BLOCK_S probe tokens, batch * head): adds to ``changes[bh]`` (int32 ``(B*H,)``)
    the tokens whose best centroid differs from their previous label (``(B, H, S)`` view, any strides)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // num_heads
    h = bh % num_heads
    rows = pid.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    row_ok = rows < seq_len
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(x_ptr + b * stride_xb + h * stride_xh + rows[:, None] * stride_xs + dims[None, :],
                mask=row_ok[:, None], other=0.0)
    best_idx = _nearest(x, c_ptr + bh * num_clusters * HEAD_DIM, hn_ptr + bh * num_clusters, num_clusters,
                        num_clusters, dims, BLOCK_S, HEAD_DIM, BLOCK_K, TAIL_K, DOT_PRECISION)
    previous = tl.load(prev_labels_ptr + b * stride_lb + h * stride_lh + rows * stride_ls, mask=row_ok, other=0)
    changed = tl.sum((row_ok & (best_idx != previous)).to(tl.int32), 0)
    tl.atomic_add(changes_ptr + bh, changed, sem="relaxed")


@triton.jit
def _finalize_kernel(
    src_ptr, c_ptr, low_ptr, hn_ptr, sums_ptr, counts_ptr, units_ptr, inv_fine, changes_ptr, change_limit,
    total_rows, num_clusters,
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, FROM_SUMS: tl.constexpr, ZERO_COUNTS: tl.constexpr,
    ZERO_SUMS: tl.constexpr, WRITE_LOW: tl.constexpr, SKIP_SETTLED: tl.constexpr, ZERO_CHANGES: tl.constexpr,
):
    """One program per BLOCK_R centroid rows of the flat ``(B*H*K, D)`` buffers.

    ``c = src`` (the initial centroids, any float dtype, or ``c`` itself), then with FROM_SUMS
    ``c = (whole + fine * inv_fine) / count * units[row // K]`` (the two parts of the fp32 sums
    ``(B*H*K, 2, D)``, fp32 ``units`` ``(B*H,)`` the inverse scales; in fp64) where count > 0; written to ``c``
    in fp32. ZERO_COUNTS / ZERO_SUMS then zero the counts / sums for the next assignment (after reading them).
    Always: ``low = c`` in the dot dtype (stored if WRITE_LOW, i.e. when it is not ``c`` itself) and
    ``hn = ||low||^2 / 2`` in fp32.
    With SKIP_SETTLED the rows of a settled (b, h) (``changes[row // num_clusters] < change_limit``)
    are left as they are; ZERO_CHANGES zeroes ``changes`` (int32 ``(B*H,)``) for the probe that follows.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < total_rows
    if ZERO_CHANGES:
        head_first = row_ok & (rows % num_clusters == 0)
        tl.store(changes_ptr + rows // num_clusters, tl.zeros([BLOCK_R], tl.int32), mask=head_first)
    if SKIP_SETTLED:
        row_ok = row_ok & (tl.load(changes_ptr + rows // num_clusters, mask=row_ok, other=0) >= change_limit)
    dims = tl.arange(0, HEAD_DIM)
    offs = rows[:, None] * HEAD_DIM + dims[None, :]
    tile_ok = tl.broadcast_to(row_ok[:, None], (BLOCK_R, HEAD_DIM))
    c = tl.load(src_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
    if FROM_SUMS:
        count = tl.load(counts_ptr + rows, mask=row_ok, other=0)
        parts = sums_ptr + (rows[:, None] * 2) * HEAD_DIM + dims[None, :]
        whole = tl.load(parts, mask=tile_ok, other=0.0).to(tl.float64)
        total = whole + tl.load(parts + HEAD_DIM, mask=tile_ok, other=0.0).to(tl.float64) * inv_fine  # a power of 2
        unit = tl.load(units_ptr + rows // num_clusters, mask=row_ok, other=1.0).to(tl.float64)
        means = total / tl.maximum(count, 1).to(tl.float64)[:, None] * unit[:, None]  # div.rn.f64
        c = tl.where((count > 0)[:, None], means.to(tl.float32), c)
    tl.store(c_ptr + offs, c, mask=tile_ok)
    if ZERO_COUNTS:
        tl.store(counts_ptr + rows, tl.zeros([BLOCK_R], tl.int32), mask=row_ok)
    if ZERO_SUMS:
        parts = sums_ptr + (rows[:, None] * 2) * HEAD_DIM + dims[None, :]
        tl.store(parts, tl.zeros([BLOCK_R, HEAD_DIM], tl.float32), mask=tile_ok)
        tl.store(parts + HEAD_DIM, tl.zeros([BLOCK_R, HEAD_DIM], tl.float32), mask=tile_ok)
    low = c.to(low_ptr.dtype.element_ty)
    if WRITE_LOW:
        tl.store(low_ptr + offs, low, mask=tile_ok)
    low_f = low.to(tl.float32)
    tl.store(hn_ptr + rows, 0.5 * tl.sum(low_f * low_f, 1), mask=row_ok)


@triton.jit
def _permutation_kernel(
    labels_ptr, ranks_ptr, sizes_ptr, offsets_ptr, perm_ptr, seq_len, num_clusters, BLOCK: tl.constexpr,
    CLUSTERS_PAD: tl.constexpr,
):
    """One program per (BLOCK tokens, batch * head): ``perm[offsets[label] + rank] = token``.

    labels, ranks contiguous ``(B*H, S)`` (any integer dtype), offsets int32 ``(B*H, K + 1)``, perm
    int64 ``(B*H, S)``. With ``CLUSTERS_PAD`` >= K (a power of two) each program sums its head's sizes (contiguous ``(B*H, K)``)
    into the offsets itself and the first one writes them; with 0 the offsets are read (written before).
    """
    bh = tl.program_id(1).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = tokens < seq_len
    label = tl.load(labels_ptr + bh * seq_len + tokens, mask=ok, other=0)
    rank = tl.load(ranks_ptr + bh * seq_len + tokens, mask=ok, other=0)
    offsets = offsets_ptr + bh * (num_clusters + 1)
    if CLUSTERS_PAD > 0:
        clusters = tl.arange(0, CLUSTERS_PAD)
        sizes = tl.load(sizes_ptr + bh * num_clusters + clusters, mask=clusters < num_clusters, other=0).to(tl.int32)
        ends = tl.cumsum(sizes, 0)
        first = tl.gather(ends - sizes, label.to(tl.int32), 0)
        if tl.program_id(0) == 0:
            tl.store(offsets + clusters + 1, ends, mask=clusters < num_clusters)
            tl.store(offsets, 0)
    else:
        first = tl.load(offsets + label, mask=ok, other=0)
    tl.store(perm_ptr + bh * seq_len + first + rank, tokens.to(tl.int64), mask=ok)


@triton.jit
def _tile_counts_kernel(labels_ptr, counts_ptr, changes_ptr, change_limit, seq_len, num_clusters, num_tiles,
                        TOKENS: tl.constexpr, SKIP_SETTLED: tl.constexpr):  # fmt: skip
    """One program per (TOKENS tokens, batch * head): adds to ``counts`` (int32 ``(B*H, num_tiles, K)``, zeros
    before) how many of its tokens carry each label (labels int32 contiguous ``(B*H, S)``); with SKIP_SETTLED
    a settled (b, h) (``changes[bh] < change_limit``) reads and adds nothing."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    tokens = tile * TOKENS + tl.arange(0, TOKENS)
    ok = tokens < seq_len
    if SKIP_SETTLED:
        ok = ok & (tl.load(changes_ptr + bh) >= change_limit)
    label = tl.load(labels_ptr + bh * seq_len + tokens, mask=ok, other=0)
    tl.atomic_add(counts_ptr + (bh * num_tiles + tile) * num_clusters + label, tl.full([TOKENS], 1, tl.int32),
                  mask=ok, sem="relaxed")  # fmt: skip


@triton.jit
def _max_of(a, b):
    return tl.maximum(a, b)


@triton.jit
def _stable_rank_kernel(labels_ptr, before_ptr, ranks_ptr, changes_ptr, change_limit, prev_ranks_ptr, seq_len,
                        num_clusters, num_tiles, TOKENS: tl.constexpr, SKIP_SETTLED: tl.constexpr):  # fmt: skip
    """One program per (TOKENS tokens, batch * head): each token's rank, the tokens of its label in earlier tiles
    (``before`` int32 ``(B*H, num_tiles, K)``) plus those earlier in its own tile: the tile sorted by (label,
    token), a token's place after the first of its label. Labels and ranks int32 contiguous ``(B*H, S)``. With
    SKIP_SETTLED a settled (b, h) (``changes[bh] < change_limit``) copies its tokens' previous ranks
    (``prev_ranks``, contiguous ``(B*H, S)``): its labels are the previous ones."""
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    place = tl.arange(0, TOKENS)
    in_range = tile * TOKENS + place < seq_len
    if SKIP_SETTLED:
        if tl.load(changes_ptr + bh) < change_limit:
            slots = bh * seq_len + tile * TOKENS + place
            tl.store(ranks_ptr + slots, tl.load(prev_ranks_ptr + slots, mask=in_range, other=0), mask=in_range)
            return
    # tokens past S get label K: they sort after every token of the tile
    label = tl.load(labels_ptr + bh * seq_len + tile * TOKENS + place, mask=in_range, other=num_clusters)
    order = tl.sort(label * TOKENS + place)
    sorted_label = order // TOKENS
    previous = tl.gather(sorted_label, tl.maximum(place - 1, 0), 0)
    first = tl.associative_scan(tl.where((place == 0) | (sorted_label != previous), place, 0), 0, _max_of)
    token = tile * TOKENS + order % TOKENS
    ok = token < seq_len
    before = tl.load(before_ptr + (bh * num_tiles + tile) * num_clusters + sorted_label, mask=ok, other=0)
    tl.store(ranks_ptr + bh * seq_len + token, before + place - first, mask=ok)


MAX_RANKED_CLUSTERS = 4096
"""Most clusters :func:`stable_ranks_triton` counts per tile of tokens; more: the reference (a sort)."""


def stable_ranks_triton(labels: Tensor, sizes: Tensor, settled: _Settled | None = None) -> Tensor:
    """:func:`~sparse_compile.kernels.kmeans_reference.cluster_ranks_reference` (each token's rank: the earlier
    tokens with its label) in two Triton launches and a cumsum, on CUDA or under ``TRITON_INTERPRET=1``.

    ``labels`` int32 contiguous ``(B, H, S)``, ``sizes`` ``(B, H, K)`` their counts. Integer counts only: the
    same ranks on every run. ``settled`` heads, whose labels are the previous clustering's, get its ranks
    copied. More than :data:`MAX_RANKED_CLUSTERS` clusters take the reference. Holds
    ``B*H * cdiv(S, RANK_TOKENS) * K`` int32 tile counts (11 MB at K = 1000 and HunyuanVideo 720p's 24 heads).
    """
    b, h, s = labels.shape
    k = sizes.shape[-1]
    if k > MAX_RANKED_CLUSTERS or labels.numel() == 0:
        return cluster_ranks_reference(labels, sizes)
    tokens = INTERPRETER_RANK_TOKENS if interpreter_active() else RANK_TOKENS
    num_tiles = triton.cdiv(s, tokens)
    counts = torch.zeros((b * h, num_tiles, k), dtype=torch.int32, device=labels.device)
    changes, limit = _skip_args(settled, counts)
    previous = labels if settled is None else settled.previous.ranks
    skip = settled is not None
    _tile_counts_kernel[(num_tiles, b * h)](labels, counts, changes, limit, s, k, num_tiles, TOKENS=tokens,
                                            SKIP_SETTLED=skip)  # fmt: skip
    before = counts.cumsum(1, dtype=torch.int32).sub_(counts)
    ranks = torch.empty((b, h, s), dtype=torch.int32, device=labels.device)
    _stable_rank_kernel[(num_tiles, b * h)](labels, before, ranks, changes, limit, previous, s, k, num_tiles,
                                            TOKENS=tokens, SKIP_SETTLED=skip)  # fmt: skip
    return ranks


@triton.jit
def _head_amax_kernel(x_ptr, amax_ptr, changes_ptr, change_limit, stride_xb, stride_xh, stride_xs, num_heads,
                      seq_len, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, SKIP_SETTLED: tl.constexpr):  # fmt: skip
    """One program per (BLOCK_S tokens, batch * head): their largest magnitude, maxed into ``amax[bh]`` (fp32
    ``(B*H,)``, zeros before; a max, so the same in any order). With SKIP_SETTLED a settled (b, h)
    (``changes[bh] < change_limit``) reads nothing and keeps 0."""
    bh = tl.program_id(1).to(tl.int64)
    if SKIP_SETTLED:
        if tl.load(changes_ptr + bh) < change_limit:
            return
    rows = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(x_ptr + (bh // num_heads) * stride_xb + (bh % num_heads) * stride_xh + rows[:, None] * stride_xs
                + dims[None, :], mask=(rows < seq_len)[:, None], other=0.0)  # fmt: skip
    tl.atomic_max(amax_ptr + bh, tl.max(tl.max(tl.abs(x.to(tl.float32)), 1), 0), sem="relaxed")


def _head_amax(x: Tensor, settled: _Settled | None) -> Tensor:
    """fp32 ``(B, H)``: each head's largest magnitude of ``x`` ``(B, H, S, D)`` (unit last stride), one launch;
    0 for the ``settled`` heads (which accumulate nothing)."""
    b, h, s, d = x.shape
    amax = torch.zeros((b, h), dtype=torch.float32, device=x.device)
    changes, limit = _skip_args(settled, amax)
    _head_amax_kernel[(triton.cdiv(s, AMAX_TOKENS), b * h)](
        x, amax, changes, limit, x.stride(0), x.stride(1), x.stride(2), h, s, HEAD_DIM=d, BLOCK_S=AMAX_TOKENS,
        SKIP_SETTLED=settled is not None,
    )  # fmt: skip
    return amax


@dataclass(frozen=True)
class _Workspace:
    """Device buffers of one call, all written before they are read: fp32 ``centroids``, ``low``
    (their copy in x's dtype, or the same tensor for fp32 x) ``(B, H, K, D)``, ``half_norms`` fp32 and
    ``counts`` int32 ``(B, H, K)``, ``sums`` fp32 ``(B, H, K, 2, D)`` (two fixed-point parts), the heads'
    ``scales`` and their inverses ``units`` fp32 ``(B, H)`` (``counts`` itself until :func:`_with_scales`
    sets them; all three when no iteration accumulates: then never read or written) and the fine parts'
    weight ``fine`` for x's length."""

    centroids: Tensor
    low: Tensor
    half_norms: Tensor
    counts: Tensor
    sums: Tensor
    scales: Tensor
    units: Tensor
    fine: float


MAX_SUMMED_CLUSTERS = 4096
"""Most clusters whose offsets each program of the permutation scatter sums itself (one register vector)."""


def _workspace(x: Tensor, centroids: Tensor, iters: int) -> _Workspace:
    b, h, k, d = centroids.shape
    low = centroids if x.dtype == torch.float32 else torch.empty((b, h, k, d), dtype=x.dtype, device=x.device)
    counts = torch.empty((b, h, k), dtype=torch.int32, device=x.device)
    half_norms = torch.empty((b, h, k), dtype=torch.float32, device=x.device)
    fine = fine_factor(x.shape[2])
    sums = counts if iters == 0 else torch.empty((b, h, k, 2, d), dtype=torch.float32, device=x.device)
    return _Workspace(centroids, low, half_norms, counts, sums, counts, counts, fine)


def _with_scales(ws: _Workspace, x: Tensor, settled: _Settled | None) -> _Workspace:
    """``ws`` with the heads' fixed-point scales for the sums of ``x`` (:func:`scales_for` of each head's largest
    magnitude; after the probe, so the ``settled`` heads, which accumulate nothing, are not read)."""
    scales = scales_for(_head_amax(x, settled), x.shape[2])
    return replace(ws, scales=scales, units=1.0 / scales)


@dataclass(frozen=True)
class _Settled:
    """The reuse probe's device state: int32 ``changes`` ``(B*H,)`` (probe tokens that changed cluster,
    zeroed by the first finalize), the host int ``limit`` (a (b, h) with ``changes < limit`` is settled) and
    the ``previous`` clustering, labels, sizes and ranks contiguous, that a settled (b, h) keeps."""

    changes: Tensor
    limit: int
    previous: Clustering


def _skip_args(settled: _Settled | None, unused: Tensor) -> tuple[Tensor, int]:
    """The ``(changes, change_limit)`` kernel arguments of ``settled``; without it ``unused`` (a tensor their
    ``SKIP_SETTLED=False`` variant never reads) and 0."""
    return (unused, 0) if settled is None else (settled.changes, settled.limit)


def _finalize(
    ws: _Workspace, src: Tensor, from_sums: bool, zero_sums: bool, settled: _Settled | None = None,
    zero_changes: Tensor | None = None,
) -> None:  # fmt: skip
    """Launch ``_finalize_kernel`` over every centroid row: centroids from ``src`` (contiguous
    ``(B, H, K, D)``, ``ws.centroids`` itself after an iteration) or the sums, counts zeroed unless this
    is the last finalize (``from_sums`` without ``zero_sums``), sums zeroed with ``zero_sums``; the rows
    of ``settled`` heads untouched; ``zero_changes`` (the probe's counts, ``(B*H,)``) zeroed."""
    b, h, k, d = ws.centroids.shape
    block_r = KMEANS_FINALIZE_ELEMENTS // d
    changes, limit = _skip_args(settled, zero_changes if zero_changes is not None else ws.counts)
    _finalize_kernel[(triton.cdiv(b * h * k, block_r),)](
        src, ws.centroids, ws.low, ws.half_norms, ws.sums, ws.counts, ws.units, 1.0 / ws.fine, changes, limit,
        b * h * k, k, HEAD_DIM=d, BLOCK_R=block_r, FROM_SUMS=from_sums, ZERO_COUNTS=zero_sums or not from_sums,
        ZERO_SUMS=zero_sums, WRITE_LOW=ws.low is not ws.centroids, SKIP_SETTLED=settled is not None,
        ZERO_CHANGES=zero_changes is not None,
    )  # fmt: skip


def _tail_chunk(num_clusters: int, block_k: int) -> int:
    """Width of the assignment's last, masked centroid chunk: the remainder ``K % block_k`` rounded up to a
    power of two of at least 16 (the dot's minimum), not ``block_k``: K = 200 in 64-wide chunks computes
    3 * 64 + 16 columns, not 4 * 64."""
    return min(block_k, max(16, triton.next_power_of_2(num_clusters % block_k)))


def _assign(
    x: Tensor, ws: _Workspace, labels: Tensor, config: TileConfig, accumulate: bool, settled: _Settled | None = None,
    keep_settled: bool = False,
) -> None:  # fmt: skip
    """Launch ``_assign_kernel`` over every (token tile, batch * head) of ``x`` (any ``(B, H, S', D)``
    view; labels ``(B, H, S')``): ``config.block_m`` tokens x ``config.block_n`` centroids per step;
    ``settled`` heads skipped, or with ``keep_settled`` given their previous labels and sizes."""
    b, h, s, d = x.shape
    previous = settled.previous if keep_settled and settled is not None else None
    _assign_kernel[(triton.cdiv(s, config.block_m), b * h)](
        x, ws.low, ws.half_norms, labels, ws.counts, ws.sums, *_skip_args(settled, ws.counts),
        *((labels, ws.counts) if previous is None else (previous.labels, previous.sizes)),
        x.stride(0), x.stride(1), x.stride(2),
        h, s, ws.centroids.shape[2], ws.scales, ws.fine,
        HEAD_DIM=d, BLOCK_S=config.block_m, BLOCK_K=config.block_n,
        TAIL_K=_tail_chunk(ws.centroids.shape[2], config.block_n), ACCUMULATE=accumulate,
        SKIP_SETTLED=settled is not None, KEEP_SETTLED=previous is not None, DOT_PRECISION=dot_precision(x.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def _probe(x: Tensor, ws: _Workspace, reuse: Reuse, changes: Tensor, config: TileConfig) -> _Settled:
    """Launch ``_probe_kernel`` on every ``reuse.probe_stride``-th token against the centroids in ``ws``
    (the previous ones), adding to ``changes`` (zeroed int32 ``(B*H,)``) the per-head count of changed labels."""
    b, h, _, d = x.shape
    probe = x[:, :, :: reuse.probe_stride]
    previous = reuse.previous.labels[:, :, :: reuse.probe_stride]
    num_clusters = ws.centroids.shape[2]
    _probe_kernel[(triton.cdiv(probe.shape[2], config.block_m), b * h)](
        probe, ws.low, ws.half_norms, previous, changes,
        probe.stride(0), probe.stride(1), probe.stride(2), previous.stride(0), previous.stride(1), previous.stride(2),
        h, probe.shape[2], num_clusters,
        HEAD_DIM=d, BLOCK_S=config.block_m, BLOCK_K=config.block_n, TAIL_K=_tail_chunk(num_clusters, config.block_n),
        DOT_PRECISION=dot_precision(x.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    last = reuse.previous
    kept = Clustering(last.centroids, *(t.contiguous() for t in (last.labels, last.sizes, last.ranks)))
    return _Settled(changes, change_limit(reuse.tolerance, probe.shape[2]), kept)


def _lloyd(x: Tensor, ws: _Workspace, iters: int, config: TileConfig, settled: _Settled | None, last: bool) -> Tensor:
    """``iters`` iterations on ``x`` (a ``(B, H, S', D)`` view) from the centroids in ``ws`` (counts and
    sums zeroed): labels int32 ``(B, H, S')``. ``last``: the final finalize keeps the counts (the sizes of
    the labels) and the last assignment gives ``settled`` heads their previous labels and sizes; otherwise
    the counts and sums are zeroed for the next pass."""
    b, h, s, _ = x.shape
    labels = torch.empty((b, h, s), dtype=torch.int32, device=x.device)
    if iters == 0:
        _assign(x, ws, labels, config, accumulate=False, settled=settled, keep_settled=last)
    for i in range(iters):
        _assign(x, ws, labels, config, accumulate=True, settled=settled, keep_settled=last and i == iters - 1)
        _finalize(ws, ws.centroids, from_sums=True, zero_sums=i < iters - 1 or not last, settled=settled)
    return labels


def kmeans_triton(
    x: Tensor,
    num_clusters: int,
    iters: int,
    init_centroids: Tensor | None = None,
    *,
    seed: int = 0,
    sample_stride: int = 1,
    reuse: Reuse | None = None,
    config: TileConfig | None = None,
) -> Clustering:
    """k-means with the Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``).

    Arguments and result as :func:`kmeans`; D must be one of ``SUPPORTED_HEAD_DIMS``. ``config``
    fixes the assignment tile (``block_m`` tokens x ``block_n`` centroids; default
    :data:`~sparse_compile.kernels.tile_configs.KMEANS_TILE`). ``init_centroids`` is not modified.
    With ``reuse`` the probe runs first and every later kernel skips the settled heads, whose outputs
    are then the previous ones (copied by the last assignment, no sync). Every output is the same on every run.
    """
    check_kmeans_inputs(x, num_clusters, iters, init_centroids, sample_stride, reuse)
    b, h, s, d = x.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim must be one of {SUPPORTED_HEAD_DIMS} on the Triton path, got {d}")
    if b * h == 0:  # nothing to launch over
        return kmeans_reference(x, num_clusters, iters, init_centroids, seed=seed, sample_stride=sample_stride,
                                reuse=reuse)  # fmt: skip
    x = x if x.stride(-1) == 1 else x.contiguous()
    config = config or KMEANS_TILE
    stride = sample_stride_for(s, num_clusters, sample_stride) if iters > 1 else 1
    if reuse is not None:
        init_centroids = reuse.previous.centroids
    if init_centroids is None:
        src = centroids = initial_centroids(x[:, :, ::stride], num_clusters, seed)
    else:
        src = init_centroids.contiguous()
        centroids = torch.empty((b, h, num_clusters, d), dtype=torch.float32, device=x.device)
    ws = _workspace(x, centroids, iters)
    changes = None if reuse is None else torch.empty((b * h,), dtype=torch.int32, device=x.device)
    _finalize(ws, src, from_sums=False, zero_sums=iters > 0, zero_changes=changes)
    settled = None if reuse is None else _probe(x, ws, reuse, changes, config)
    if iters > 0:
        ws = _with_scales(ws, x, settled)
    if stride > 1:
        _lloyd(x[:, :, ::stride], ws, iters - 1, config, settled, last=False)
        labels = _lloyd(x, ws, 1, config, settled, last=True)
    else:
        labels = _lloyd(x, ws, iters, config, settled, last=True)
    ranks = stable_ranks_triton(labels, ws.counts, settled)
    if reuse is None:
        return Clustering(ws.centroids, labels, ws.counts, ranks)
    return Clustering(ws.centroids, labels, ws.counts, ranks, (settled.changes < settled.limit).view(b, h))


def kmeans(
    x: Tensor,
    num_clusters: int,
    iters: int,
    init_centroids: Tensor | None = None,
    *,
    seed: int = 0,
    sample_stride: int = 1,
    reuse: Reuse | None = None,
) -> Clustering:
    """Lloyd's k-means of each (batch, head)'s tokens, ``iters`` iterations (one pass over x each).

    ``x`` ``(B, H, S, D)`` fp16/bf16/fp32, any strides; ``1 <= num_clusters <= S`` (else
    ``ValueError``); ``init_centroids`` ``(B, H, K, D)`` (fp32, e.g. the previous step's; not
    modified) or ``None`` for the seeded stratified initialisation. ``sample_stride`` >= 1: the first
    ``iters - 1`` iterations on every ``sample_stride``-th token only; ``reuse``: keep the previous
    clustering of the heads whose probe tokens stayed in their clusters (both:
    :mod:`~sparse_compile.kernels.kmeans_reference`). Returns :class:`Clustering`:
    centroids fp32 ``(B, H, K, D)`` (each the mean of its cluster's tokens, for ``iters >= 1``),
    labels int32 ``(B, H, S)``, sizes int32 ``(B, H, K)``, ranks int32 ``(B, H, S)`` (for
    :func:`cluster_permutation`), and with ``reuse`` the settled heads. CUDA tensors with D in
    ``SUPPORTED_HEAD_DIMS`` run the Triton kernels, anything else the reference; neither syncs with the host.
    """
    if x.is_cuda and x.shape[-1] in SUPPORTED_HEAD_DIMS:
        return kmeans_triton(x, num_clusters, iters, init_centroids, seed=seed, sample_stride=sample_stride,
                             reuse=reuse)  # fmt: skip
    check_kmeans_inputs(x, num_clusters, iters, init_centroids, sample_stride, reuse)
    return kmeans_reference(x, num_clusters, iters, init_centroids, seed=seed, sample_stride=sample_stride,
                            reuse=reuse)  # fmt: skip


def cluster_permutation_triton(labels: Tensor, sizes: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`cluster_permutation` as one Triton scatter whose programs also sum the offsets, up to
    :data:`MAX_SUMMED_CLUSTERS` clusters (more: the offsets' cumsum first), on CUDA or CPU tensors under
    ``TRITON_INTERPRET=1``; ``S < 2**31``."""
    check_permutation_inputs(labels, sizes, ranks)
    b, h, s = labels.shape
    k = sizes.shape[-1]
    perm = torch.empty((b, h, s), dtype=torch.int64, device=labels.device)
    if not perm.numel():
        return perm, cluster_offsets(sizes)
    summed = k <= MAX_SUMMED_CLUSTERS
    offsets = torch.empty((b, h, k + 1), dtype=torch.int32, device=labels.device) if summed else cluster_offsets(sizes)
    _permutation_kernel[(triton.cdiv(s, PERMUTATION_TOKENS), b * h)](
        labels.contiguous(), ranks.contiguous(), sizes.contiguous(), offsets, perm, s, k, BLOCK=PERMUTATION_TOKENS,
        CLUSTERS_PAD=max(triton.next_power_of_2(k), 16) if summed else 0,
    )  # fmt: skip
    return perm, offsets


def cluster_permutation(labels: Tensor, sizes: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """Token order grouping each cluster, and the cluster offsets; no host sync.

    ``labels`` ``(B, H, S)``, ``sizes`` ``(B, H, K)`` and ``ranks`` ``(B, H, S)`` integer, as returned by
    :func:`kmeans` (a cluster's ranks are ``0 .. size - 1``). Returns ``perm`` int64 ``(B, H, S)``,
    token ``t`` at place ``offsets[labels[t]] + ranks[t]`` (with :func:`kmeans`'s stable ranks the
    tokens of a cluster ascend), and ``offsets`` int32 ``(B, H, K + 1)`` (:func:`cluster_offsets`).
    CUDA tensors take :func:`cluster_permutation_triton`, others :func:`cluster_permutation_reference`.
    """
    if labels.is_cuda:
        return cluster_permutation_triton(labels, sizes, ranks)
    check_permutation_inputs(labels, sizes, ranks)
    return cluster_permutation_reference(labels, sizes, ranks)


__all__ = [
    "Clustering",
    "Reuse",
    "check_reuse",
    "check_kmeans_inputs",
    "check_permutation_inputs",
    "cluster_permutation",
    "cluster_permutation_reference",
    "cluster_permutation_triton",
    "cluster_ranks_reference",
    "kmeans",
    "kmeans_objective",
    "kmeans_reference",
    "kmeans_triton",
    "stable_ranks_triton",
]
