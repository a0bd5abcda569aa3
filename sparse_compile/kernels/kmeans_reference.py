"""Batched k-means and cluster permutation in plain PyTorch: the specification of :mod:`kmeans`.

Sparse VideoGen2 clusters, per (batch, head), the ``S`` query (and separately key) vectors of one
attention call into ``K`` clusters and permutes the tokens so each cluster is contiguous.

Definitions (shared with the Triton path):

- Distance is squared Euclidean. A token's label is ``argmax_k (x . c_k - ||c_k||^2 / 2)``, which
  is ``argmin_k ||x - c_k||^2``, computed with fp32 accumulation. **Ties go to the lowest cluster
  index** (identical centroids: the first one takes every token, the others stay empty).
- One iteration = assignment, then update (centroid = mean of its members). An **empty cluster
  keeps its previous centroid** and has size 0, so no NaN ever appears. **Member sums are exact in
  any order** (:func:`fixed_point_terms`: each coordinate times its head's power-of-two scale, split into a
  rounded whole part and a rounded fine part, each an integer-valued fp32 small enough that ``S`` of them
  sum exactly), so every run and device gives the same centroids: the members' means to within
  ``2**-(2 * (23 - log2 S))`` of the head's largest coordinate. The result is the last
  iteration's labels and sizes with the centroids updated from them, so every returned centroid
  is the mean of exactly the tokens labelled with it (what SVG2's cluster-pair scores need), and
  ``iters`` iterations cost ``iters`` passes over the tokens (there is no extra assignment pass:
  a token's label is its argmin for the centroids *before* the last update). ``iters=0`` is one
  assignment against the initial centroids, which are returned unchanged.
- Without ``init_centroids`` the initial centroids are ``K`` tokens picked by stratified sampling
  (:func:`initial_centroids`): the sequence is cut into ``K`` equal segments and one token is
  drawn from each with a generator seeded by ``seed`` on ``x``'s device (deterministic per device;
  CPU and CUDA draw different tokens). Distinct segments give distinct tokens, and in video token
  order (frame-major) they spread over space and time.
- Each token also gets a **rank** within its cluster (``Clustering.ranks``), its place in the cluster
  order: the number of earlier tokens (in token order) with the same label (:func:`cluster_ranks_reference`).
- **Subsampled iterations** (``sample_stride`` r > 1): the first ``iters - 1`` iterations run on the
  tokens ``0, r, 2r, ...`` only (:func:`sample_stride_for`: r is lowered so the sample keeps at least
  ``num_clusters`` tokens; a cold start draws its initial centroids from the sample), the last one on
  all tokens, so the result's definition above is unchanged: labels of every token and centroids that
  are the means of their members. ``iters`` iterations then cost ``(iters - 1) / r + 1`` passes.
- **Reuse** (:class:`Reuse`: the previous call's clustering, a tolerance t and a probe stride p): the
  tokens ``0, p, 2p, ...`` are assigned to the previous centroids; a (batch, head) where fewer than
  ``ceil(t * probes)`` of them change cluster against the previous labels is *settled* and keeps the
  previous clustering unchanged (centroids, labels, sizes, ranks), the others run k-means warm-started
  from the previous centroids. ``t = 0`` never reuses, ``t = 1`` reuses unless every probe token moved. A settled head keeps being compared with the
  same labels, so it re-clusters once its tokens have drifted past the tolerance.
- ``num_clusters`` must lie in ``[1, S]``: callers clamp it (:func:`sparse_compile.kernels.kmeans.kmeans`
  raises ``ValueError`` otherwise). These functions assume valid inputs; the op module checks them.

Nothing here reads a device value on the host (no sync), and no step allocates O(S * K): the
assignment works ``chunk_rows`` token rows (over all heads together) at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CHUNK_ROWS = 4096  # token rows (summed over all heads) per assignment chunk of the reference
PART_BITS = 23
"""A fixed-point part of a coordinate is an integer of magnitude at most ``2**(PART_BITS - ceil(log2 S))``, so any
sum of ``S`` of them stays within ``2**PART_BITS``: exact in fp32 (24-bit significands) whatever the order."""


def sample_stride_for(seq_len: int, num_clusters: int, sample_stride: int) -> int:
    """The stride of the subsampled iterations: ``sample_stride`` lowered to ``seq_len // num_clusters``
    (at least 1), so that every ``r``-th token of ``seq_len`` still gives ``num_clusters`` tokens or more."""
    return max(1, min(sample_stride, seq_len // num_clusters))


def probe_count(seq_len: int, probe_stride: int) -> int:
    """Tokens ``0, p, 2p, ... < seq_len`` the reuse probe assigns."""
    return -(-seq_len // probe_stride)


def change_limit(tolerance: float, probes: int) -> int:
    """A head is settled when fewer than this many of its ``probes`` tokens change cluster: ``ceil(t * probes)``."""
    return math.ceil(tolerance * probes)


@dataclass(frozen=True)
class Clustering:
    """Result of :func:`kmeans`.

    ``centroids`` fp32 ``(B, H, K, D)``, the mean of each cluster's tokens (an empty cluster's
    previous centroid); ``labels`` int32 ``(B, H, S)``, the cluster of each token (its argmin for
    the centroids of the last assignment); ``sizes`` int32 ``(B, H, K)``, tokens per cluster (0 = empty);
    ``ranks`` int32 ``(B, H, S)``, each token's place within its cluster (``0 .. size - 1`` in token order,
    :func:`cluster_ranks_reference`), which :func:`sparse_compile.kernels.kmeans.cluster_permutation` uses;
    ``settled`` bool ``(B, H)`` with :class:`Reuse`: the heads that kept the previous clustering (else None).
    """

    centroids: Tensor
    labels: Tensor
    sizes: Tensor
    ranks: Tensor
    settled: Tensor | None = None


@dataclass(frozen=True)
class Reuse:
    """What :func:`kmeans_reference` (``reuse=``) needs to keep a head's previous clustering.

    ``previous``: the :class:`Clustering` of the previous call on the same site (its centroids are the
    warm start of the heads that re-cluster); ``tolerance`` in ``[0, 1]``: the share of probe tokens
    allowed to change cluster; ``probe_stride`` >= 1: every ``probe_stride``-th token is probed.
    """

    previous: Clustering
    tolerance: float
    probe_stride: int


def initial_centroids(x: Tensor, num_clusters: int, seed: int) -> Tensor:
    """Stratified seeding: token ``start_i + floor(u_i * len_i)`` of each of ``K`` equal segments.

    ``x`` ``(B, H, S, D)``, ``1 <= num_clusters <= S``; segment ``i`` is
    ``[floor(i S / K), floor((i + 1) S / K))`` and ``u`` ``(K,)`` is uniform from a generator on
    ``x``'s device seeded with ``seed``, the same for every batch element and head: a head's
    clustering depends on its own tokens only, not on which other heads share the call (heads
    split across GPUs by context parallelism cluster as on one GPU). Returns a new contiguous
    fp32 ``(B, H, K, D)``.
    """
    b, h, s, d = x.shape
    gen = torch.Generator(device=x.device).manual_seed(seed)
    u = torch.rand((num_clusters,), generator=gen, device=x.device, dtype=torch.float64)
    i = torch.arange(num_clusters, device=x.device)
    start = (i * s) // num_clusters
    length = ((i + 1) * s) // num_clusters - start
    index = start + torch.minimum((u * length).long(), length - 1)
    return torch.gather(x, 2, index.unsqueeze(-1).expand(b, h, num_clusters, d)).float()


def assign_reference(x: Tensor, centroids: Tensor, chunk_rows: int = CHUNK_ROWS) -> Tensor:
    """Label of every token, int32 ``(B, H, S)``: ``argmax_k (x . c_k - ||c_k||^2 / 2)``, lowest k on ties.

    ``x`` ``(B, H, S, D)``, ``centroids`` ``(B, H, K, D)`` (fp32 math). Scores are computed
    ``max(1, chunk_rows // (B * H))`` tokens per head at a time.
    """
    b, h, s, _ = x.shape
    c = centroids.float()
    half_norms = 0.5 * c.square().sum(-1).unsqueeze(-2)  # (B, H, 1, K)
    labels = torch.empty((b, h, s), dtype=torch.int32, device=x.device)
    step = max(1, chunk_rows // max(b * h, 1))
    for s0 in range(0, s, step):
        scores = torch.matmul(x[:, :, s0 : s0 + step].float(), c.transpose(-1, -2)) - half_norms
        labels[:, :, s0 : s0 + step] = scores.argmax(-1)  # first maximum: lowest cluster index
    return labels


def cluster_sizes(labels: Tensor, num_clusters: int) -> Tensor:
    """Tokens per cluster, int32 ``(B, H, K)``, from labels ``(B, H, S)``."""
    sizes = torch.zeros((*labels.shape[:2], num_clusters), dtype=torch.int32, device=labels.device)
    return sizes.scatter_add_(2, labels.long(), torch.ones_like(labels, dtype=torch.int32))


def _seq_bits(seq_len: int) -> int:
    """``ceil(log2 seq_len)``, at least 1."""
    return max(seq_len - 1, 1).bit_length()


def fine_factor(seq_len: int) -> float:
    """The weight of a fine part against its whole part, ``2**(PART_BITS - ceil(log2 S))``."""
    return 2.0 ** (PART_BITS - _seq_bits(seq_len))


def scales_for(largest: Tensor, seq_len: int) -> Tensor:
    """fp32 powers of two ``2**(PART_BITS - ceil(log2 S) - e)``, ``largest < 2**e`` (any shape; exponents clamped
    so each is a normal fp32; an all-zero head's ``e`` is 0): a coordinate times its scale is below the parts' bound."""
    _, e = torch.frexp(largest.float())
    exponent = (PART_BITS - _seq_bits(seq_len) - e.clamp(-100, 100)).clamp(-126, 126)
    return torch.ldexp(torch.ones_like(largest, dtype=torch.float32), exponent)


def fixed_point_scales(x: Tensor) -> Tensor:
    """fp32 ``(B, H)``: :func:`scales_for` each head's largest magnitude of ``x`` ``(B, H, S, D)``."""
    return scales_for(torch.linalg.vector_norm(x, ord=float("inf"), dim=(2, 3)), x.shape[2])


def fixed_point_terms(x: Tensor, scales: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    """fp32 ``(B, H, S', D)`` each: every coordinate of ``x`` ``(B, H, S', D)`` times its head's ``scales``
    ``(B, H)`` rounded to an integer (half to even), and the remainder times :func:`fine_factor` of ``seq_len``
    (the tokens the scales bound, ``>= S'``) rounded likewise."""
    scaled = x.float() * scales[:, :, None, None]
    whole = torch.round(scaled)
    return whole, scaled.sub_(whole).mul_(fine_factor(seq_len)).round_()


def add_fixed_point(parts: Tensor, index: Tensor, values: Tensor, scales: Tensor, seq_len: int) -> None:
    """Scatter-add (along dim 2) the fixed-point parts (:func:`fixed_point_terms`) of ``values`` ``(B, H, S', D)``
    into ``parts`` fp32 ``(2, B, H, K, D)`` at ``index`` ``(B, H, S', D)``: exact, so in any order the same bits."""
    for part, terms in zip(parts, fixed_point_terms(values, scales, seq_len)):
        part.scatter_add_(2, index, terms)


def fixed_point_sums(parts: Tensor, scales: Tensor, seq_len: int) -> Tensor:
    """fp64 ``(B, H, K, D)``: the sums that ``parts`` ``(2, B, H, K, D)`` (from :func:`add_fixed_point`) hold,
    ``(whole + fine / fine_factor) / scales``."""
    total = parts[0].double() + parts[1].double() * (1.0 / fine_factor(seq_len))
    return total * (1.0 / scales).double()[:, :, None, None]


def update_reference(
    x: Tensor, labels: Tensor, centroids: Tensor, scales: tuple[Tensor, int] | None = None
) -> Tensor:  # fmt: skip
    """New centroids, fp32 ``(B, H, K, D)``: the mean of each cluster's members (exact fixed-point sums, divided in
    fp64).

    ``x`` ``(B, H, S, D)``, ``labels`` ``(B, H, S)``, ``centroids`` ``(B, H, K, D)`` the previous
    ones, kept for empty clusters; ``scales``: the heads' scales ``(B, H)`` and the tokens they bound (default
    :func:`fixed_point_scales` of ``x`` and its ``S``).
    """
    b, h, k, d = centroids.shape
    scales, seq_len = (fixed_point_scales(x), x.shape[2]) if scales is None else scales
    parts = torch.zeros((2, b, h, k, d), dtype=torch.float32, device=x.device)
    add_fixed_point(parts, labels.long().unsqueeze(-1).expand(*labels.shape, d), x, scales, seq_len)
    counts = cluster_sizes(labels, k).unsqueeze(-1)
    means = (fixed_point_sums(parts, scales, seq_len) / counts.clamp_min(1).double()).float()
    return torch.where(counts > 0, means, centroids.float())


def lloyd_reference(x: Tensor, centroids: Tensor, iters: int, scales: tuple[Tensor, int]) -> tuple[Tensor, Tensor]:
    """``iters`` Lloyd iterations from fp32 ``centroids`` ``(B, H, K, D)``, member sums at ``scales`` (as
    :func:`update_reference` takes them): the centroids after the last update and the labels of the last
    assignment (``iters = 0``: the centroids and one assignment)."""
    labels = assign_reference(x, centroids)
    for i in range(iters):
        if i > 0:
            labels = assign_reference(x, centroids)
        centroids = update_reference(x, labels, centroids, scales)
    return centroids, labels


def settled_heads_reference(x: Tensor, reuse: Reuse) -> Tensor:
    """bool ``(B, H)``: fewer than :func:`change_limit` probe tokens changed cluster (see the module doc)."""
    stride = reuse.probe_stride
    probe = x[:, :, ::stride]
    changed = (assign_reference(probe, reuse.previous.centroids) != reuse.previous.labels[:, :, ::stride]).sum(-1)
    return changed < change_limit(reuse.tolerance, probe.shape[2])


def kmeans_reference(
    x: Tensor,
    num_clusters: int,
    iters: int,
    init_centroids: Tensor | None = None,
    *,
    seed: int = 0,
    sample_stride: int = 1,
    reuse: Reuse | None = None,
) -> Clustering:
    """Lloyd's k-means per (batch, head) with a fixed number of iterations (see the module docstring).

    ``x`` ``(B, H, S, D)`` fp16/bf16/fp32, any strides; ``init_centroids`` ``(B, H, K, D)`` floating
    (e.g. the previous step's centroids; not modified) or ``None`` for :func:`initial_centroids`
    (with ``reuse``: ``reuse.previous.centroids``). ``sample_stride``: the first ``iters - 1``
    iterations on every ``sample_stride``-th token (:func:`sample_stride_for`).
    """
    if reuse is not None:
        init_centroids = reuse.previous.centroids
    stride = sample_stride_for(x.shape[2], num_clusters, sample_stride) if iters > 1 else 1
    sample = x[:, :, ::stride]
    if init_centroids is None:
        centroids = initial_centroids(sample, num_clusters, seed)
    else:
        centroids = init_centroids.float().clone(memory_format=torch.contiguous_format)
    scales = (fixed_point_scales(x), x.shape[2])  # of every token: a sample's sums use them too
    if stride > 1:
        centroids, _ = lloyd_reference(sample, centroids, iters - 1, scales)
        centroids, labels = lloyd_reference(x, centroids, 1, scales)
    else:
        centroids, labels = lloyd_reference(x, centroids, iters, scales)
    sizes = cluster_sizes(labels, num_clusters)
    ranks = cluster_ranks_reference(labels, sizes)
    if reuse is None:
        return Clustering(centroids, labels, sizes, ranks)
    return keep_settled(Clustering(centroids, labels, sizes, ranks), reuse.previous, settled_heads_reference(x, reuse))


def keep_settled(clustering: Clustering, previous: Clustering, settled: Tensor) -> Clustering:
    """``clustering`` with the centroids, labels, sizes and ranks of the ``settled`` heads (bool ``(B, H)``)
    taken from ``previous``, and ``settled`` recorded."""
    keep = settled[:, :, None]
    return Clustering(torch.where(keep[..., None], previous.centroids, clustering.centroids),
                      torch.where(keep, previous.labels, clustering.labels),
                      torch.where(keep, previous.sizes, clustering.sizes),
                      torch.where(keep, previous.ranks, clustering.ranks), settled)  # fmt: skip


def kmeans_objective(x: Tensor, centroids: Tensor, labels: Tensor) -> Tensor:
    """Sum over tokens of ``||x - c_label||^2`` per (batch, head), fp64 ``(B, H)`` (O(S * D) memory)."""
    picked = torch.gather(centroids, 2, labels.long().unsqueeze(-1).expand(*labels.shape, x.shape[-1]))
    return (x.double() - picked.double()).square().sum((-2, -1))


def cluster_offsets(sizes: Tensor) -> Tensor:
    """int32 ``(B, H, K + 1)``: the exclusive cumsum of ``sizes`` ``(B, H, K)`` (0, ..., S); cluster ``k``
    occupies ``[offsets[k], offsets[k + 1])`` of the cluster order."""
    return F.pad(torch.cumsum(sizes, dim=-1, dtype=torch.int32), (1, 0))


def cluster_permutation_reference(labels: Tensor, sizes: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """Token order grouping each cluster, and the cluster offsets, in torch ops (the specification).

    ``labels`` ``(B, H, S)``, ``sizes`` ``(B, H, K)`` and ``ranks`` ``(B, H, S)`` integer (a cluster's
    ranks are ``0 .. size - 1``). Returns ``perm`` int64 ``(B, H, S)``, token ``t`` at place
    ``offsets[labels[t]] + ranks[t]``, and ``offsets`` int32 ``(B, H, K + 1)`` (:func:`cluster_offsets`).
    """
    offsets = cluster_offsets(sizes)
    place = offsets.gather(-1, labels.long()).long() + ranks
    tokens = torch.arange(labels.shape[-1], device=labels.device).expand(labels.shape)
    return torch.empty(labels.shape, dtype=torch.int64, device=labels.device).scatter_(-1, place, tokens), offsets


def cluster_ranks_reference(labels: Tensor, sizes: Tensor) -> Tensor:
    """Stable ranks, int32 ``(B, H, S)``: the number of earlier tokens (in token order) with the same label.

    ``labels`` ``(B, H, S)``, ``sizes`` ``(B, H, K)`` consistent with them. With these ranks the cluster
    permutation orders each cluster's tokens by token index.
    """
    s = labels.shape[-1]
    keys = labels.long() * s + torch.arange(s, device=labels.device)  # unique keys: stable by construction
    order = torch.argsort(keys, dim=-1)
    place = torch.empty_like(order).scatter_(-1, order, torch.arange(s, device=labels.device).expand_as(order))
    return (place - cluster_offsets(sizes).gather(-1, labels.long())).to(torch.int32)
