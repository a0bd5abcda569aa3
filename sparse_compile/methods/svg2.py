"""``method="svg2"``: Sparse VideoGen2, semantic-aware permutation with cached centroids.

Per call, on the video tokens of each (batch element, head):

1. k-means on the queries (``q_clusters``) and, separately, on the keys (``k_clusters``);
   the first sparse call runs ``kmeans_iters_init`` iterations, later calls warm-start from
   the clustering cached for this model, site and CFG branch and run ``kmeans_iters_step``.
   With ``kmeans_during_dense`` the dense warm-up steps already cluster, so the first sparse
   step starts warm. Clusterings never outlive their generation: a new generation starts cold, so
   the same inputs give the same output in every generation. Cluster counts above the number of
   video tokens are clamped to it (logged once per site and token count): the token count is
   known only per call and differs between resolutions, so one setting must serve them all.

   Two options make this cheaper, both decided without reading a device value:

   - ``kmeans_sample`` f < 1: all iterations but the last run on every ``round(1 / f)``-th token
     (fewer where the sample would hold fewer tokens than clusters), the last on all tokens, so
     labels, sizes and centroids keep their meaning (every token labelled, centroids the means of
     their clusters). It shortens the cold start (``kmeans_iters_init``) and warm calls with more
     than one iteration.
   - ``kmeans_reuse`` t > 0, the reuse rule: on a warm call, every ``REUSE_PROBE_STRIDE``-th
     token is assigned to the cached centroids; a (batch element, head) whose probe tokens change
     cluster against the cached labels in fewer than a share t of cases keeps its cached clustering
     as it is, and the k-means kernels skip it (they read a per-head flag that the probe wrote:
     the launches are the same, the settled heads' programs do no work). The other heads re-cluster
     from the cached centroids. A kept clustering stays the reference of the next probe, so a head
     whose tokens drift re-clusters as soon as the drift passes t.
2. The cluster permutations: per (batch, head), the token order that makes each cluster
   contiguous (queries by their clusters, keys and values by theirs), and the cluster offsets.
   Only these ``(B, H, S)`` index tensors are built; Q, K and V are not reordered.
3. Score cluster pairs by ``softmax_j(scale * cq_i . ck_j + log |cluster_j|)`` and keep, per
   query cluster, the key clusters up to cumulative probability ``top_p`` (at least
   ``min_kc_ratio`` of the key clusters), with the key tokens each query cluster keeps
   (:func:`select_top_p_clusters`: on CUDA one fused kernel after the centroid matmul).
4. Run the variable-block (cluster) kernel with the permutations folded into its loads and
   stores: it reads the rows of Q, K and V in token order through the permutations and writes
   O and its LSE straight to token order (O token-major, the layout the backend's op returns
   as is). So there is no gather into cluster order and no scatter back: no pass over Q, K, V
   or O besides k-means' and the kernel's own.

Text tokens of joint attention are handled by :func:`attend_video_and_text` (dense text
rows and columns).

The break-even guard is per head: after step 3 each head's kept density is known, and where the
device's costs are measured (CUDA: the cluster kernel's break-even against dense SDPA,
:func:`~sparse_compile.methods.cost_model.cluster_guard_density`) the heads past it (in any batch
element) run dense SDPA together, the others through the kernel
(:func:`~sparse_compile.methods.base.attend_split_heads`). A site and CFG branch whose every head passed
it runs dense SDPA without clustering for the next ``GUARD_RECHECK_STEPS`` steps, then clusters and
decides again (near-uniform attention then costs no k-means). The host reads the device once per
call, after the selection is launched: whether q, k and v are finite and a key-padding mask keeps every
video key (:func:`~sparse_compile.methods.fallback.input_checks`; a call failing them runs dense SDPA and
its clustering is not cached), which heads pass break-even, the most keys any q cluster keeps and each
head's kept keys of all q clusters (which size the cluster kernel's kept-rows buffer) and kept pairs (the
call's density): one vector, gathered in one launch
(:func:`~sparse_compile.kernels.selection_summary.selection_summary`).
So the next call's clustering and selection are launched while this call's kernel runs. The kernel's
prep for every head is launched before the read (:meth:`Svg2Method._stage`), and where the site's last
call ran that staged call, its attention kernel too: the read then waits for the selection only, and the
output is dropped for the op's if a head turns out guarded or the kept keys outgrow the staged buffer.
Dense-step inputs with NaN or Inf never reach the cached centroids either (:meth:`Svg2Method.observe_dense`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from sparse_compile.kernels.block_select import ClusterSelection, select_top_p_clusters
from sparse_compile.kernels.kmeans import Clustering, Reuse, cluster_permutation, kmeans
from sparse_compile.kernels.selection_summary import selection_summary
from sparse_compile.kernels.varlen_block_sparse import (
    StagedVarlenCall,
    run_staged_call,
    stage_varlen_call,
    varlen_block_sparse_attention,
)
from sparse_compile.methods.base import AttentionCall, AttentionMethod, AttentionResult, attend_split_heads
from sparse_compile.methods.cost_model import cluster_guard_density
from sparse_compile.methods.fallback import input_checks, input_problem
from sparse_compile.methods.host_read import read_while
from sparse_compile.methods.text_tokens import attend_video_and_text, video_text_slices
from sparse_compile.options import SparseOptions
from sparse_compile.registry import (
    MethodConfig,
    bool_option,
    fraction_option,
    int_option,
    register_method,
    unit_interval_option,
)

logger = logging.getLogger("sparse_compile")


REUSE_PROBE_STRIDE = 8
"""The reuse rule probes every 8th video token: an eighth of an assignment pass per call."""
GUARD_RECHECK_STEPS = 10
"""Steps a site runs dense SDPA, without clustering, after a call where every head passed break-even."""


@dataclass(frozen=True)
class AllHeadsGuarded:
    """The step of this site and CFG branch's last call where every head passed break-even."""

    step: int


@dataclass(frozen=True)
class LastCallStaged:
    """Whether this site and CFG branch's last call ran every head through the kernel call staged before the
    guard's read (:meth:`Svg2Method._stage`); when it did, the next call launches its attention kernel before
    that read too."""

    staged: bool


@dataclass(frozen=True)
class CachedClusters:
    """The last k-means of one site and CFG branch, queries and keys: the warm start and the reuse
    rule's reference (:class:`~sparse_compile.kernels.kmeans.Clustering`, ``(B, H, ...)`` each)."""

    query: Clustering
    key: Clustering


def head_kept_fraction(q_sizes: torch.Tensor, kept_tokens: torch.Tensor, seq: int) -> torch.Tensor:
    """Fraction of the ``seq x seq`` pairs a cluster layout keeps per (batch, head): fp32 ``(B, H)``.

    ``q_sizes`` ``(B, H, Kq)`` integer; ``kept_tokens`` ``(B, H, Kq)`` integer, the key tokens each
    query cluster keeps (:attr:`ClusterSelection.kept_tokens`). Sums in int64.
    """
    return (kept_tokens.long() * q_sizes).sum(-1).float() / (seq * seq)


def kept_pair_fraction(q_sizes: torch.Tensor, kept_tokens: torch.Tensor, seq: int) -> torch.Tensor:
    """Mean over (batch, head) of :func:`head_kept_fraction` (0-d tensor)."""
    return head_kept_fraction(q_sizes, kept_tokens, seq).mean()


@dataclass(frozen=True)
class ClusterPlan:
    """One call's cluster layout of the video tokens, per (batch element, head).

    Attributes:
        q_perm, k_perm: int64 ``(B, H, Sv)`` token orders grouping each cluster.
        q_offsets, k_offsets: int32 ``(B, H, K + 1)`` cluster offsets.
        selection: the key clusters each query cluster keeps.
        q_sizes: int ``(B, H, Kq)`` query cluster sizes.
    """

    q_perm: torch.Tensor
    q_offsets: torch.Tensor
    k_perm: torch.Tensor
    k_offsets: torch.Tensor
    selection: ClusterSelection
    q_sizes: torch.Tensor

    def heads(self, heads: torch.Tensor) -> ClusterPlan:
        """The plan of the heads ``heads`` (int64 indices)."""

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(1, heads)

        return ClusterPlan(pick(self.q_perm), pick(self.q_offsets), pick(self.k_perm), pick(self.k_offsets),
                           ClusterSelection(*(pick(t) for t in self.selection)), pick(self.q_sizes))  # fmt: skip


@dataclass(frozen=True)
class Svg2Config(MethodConfig):
    """Options of ``method="svg2"`` (see the module doc).

    One warm k-means iteration and the reuse rule at 0.1 by default: on the trained toy model
    (``benchmarks/quality_svg2_kmeans.py``) one iteration keeps the PSNR against dense of two, and the
    reuse rule keeps it while about half the heads skip k-means on a warm call; on the GPU each halves
    k-means' time (``benchmarks/profile_svg2_stages.py --settings``). ``kmeans_sample`` stays off: with
    one warm iteration it only shortens the cold start, whose looser clusters made the cluster kernel
    slower (``benchmarks/RESULTS.md``, SVG2 stage by stage).
    """

    q_clusters: int = int_option(200, 1)
    k_clusters: int = int_option(1000, 1)
    top_p: float = fraction_option(0.9)
    min_kc_ratio: float = unit_interval_option(0.1)
    kmeans_iters_init: int = int_option(50, 1)
    kmeans_iters_step: int = int_option(1, 0)
    kmeans_during_dense: bool = bool_option(True)
    kmeans_sample: float = fraction_option(1.0)
    kmeans_reuse: float = unit_interval_option(0.1)


@register_method
class Svg2Method(AttentionMethod):
    """Sparse VideoGen2 on the cluster (variable-block) kernel."""

    name = "svg2"
    config_type = Svg2Config
    needs_block_kernel = True
    config: Svg2Config

    def __init__(self, options: SparseOptions) -> None:
        super().__init__(options)
        self._clamp_noted: set[int] = set()

    def observe_dense(self, call: AttentionCall) -> None:
        """During dense steps, cluster already so the first sparse step starts from warm centroids."""
        if self.config.kmeans_during_dense and self.dense_reason(call) is None:
            video, _ = video_text_slices(call.layout)
            self.store(call, self._cluster(call.query[:, :, video], call.key[:, :, video], call))

    def min_kept_key_clusters(self, num_key_clusters: int) -> int:
        """The floor of key clusters each query cluster keeps: ``ceil(min_kc_ratio * num_key_clusters)``, at least 1."""
        return max(math.ceil(self.config.min_kc_ratio * num_key_clusters), 1)

    def cluster_counts(self, tokens: int, site_name: str) -> tuple[int, int]:
        """``(q_clusters, k_clusters)`` for ``tokens`` video tokens: the options, clamped to ``tokens``."""
        n_q, n_k = min(self.config.q_clusters, tokens), min(self.config.k_clusters, tokens)
        if (n_q, n_k) != (self.config.q_clusters, self.config.k_clusters) and tokens not in self._clamp_noted:
            self._clamp_noted.add(tokens)
            logger.info(
                "sparse_compile: %s has %d video tokens: svg2 uses q_clusters=%d, k_clusters=%d (options: %d, %d)",
                site_name, tokens, n_q, n_k, self.config.q_clusters, self.config.k_clusters,
            )  # fmt: skip
        return n_q, n_k

    def _cluster(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> CachedClusters:
        """k-means of the video queries and keys ``(B, H, Sv, D)``, warm-started from the cache (step 1);
        the caller stores it once the call is known to run sparse."""
        cached = self.cached(call, CachedClusters)
        n_q, n_k = self.cluster_counts(q.shape[2], call.site_name)
        if cached is None:
            config = self.config
            stride = self.sample_stride()
            q_clusters = kmeans(q, n_q, config.kmeans_iters_init, seed=0, sample_stride=stride)
            k_clusters = kmeans(k, n_k, config.kmeans_iters_init, seed=1, sample_stride=stride)
        else:
            q_clusters, k_clusters = self.warm_clustering(q, n_q, cached.query), self.warm_clustering(k, n_k, cached.key)
        return CachedClusters(q_clusters, k_clusters)

    def sample_stride(self) -> int:
        """Token stride of the subsampled iterations: ``round(1 / kmeans_sample)``."""
        return max(1, round(1 / self.config.kmeans_sample))

    def warm_clustering(self, x: torch.Tensor, num_clusters: int, previous: Clustering) -> Clustering:
        """A warm call's k-means of ``x`` ``(B, H, Sv, D)`` from the cached ``previous`` clustering: the
        reuse rule when ``kmeans_reuse`` > 0, else ``kmeans_iters_step`` iterations from its centroids."""
        config = self.config
        if config.kmeans_reuse > 0:
            reuse = Reuse(previous, config.kmeans_reuse, REUSE_PROBE_STRIDE)
            return kmeans(x, num_clusters, config.kmeans_iters_step, sample_stride=self.sample_stride(), reuse=reuse)
        return kmeans(x, num_clusters, config.kmeans_iters_step, previous.centroids, sample_stride=self.sample_stride())

    def attend(self, call: AttentionCall) -> AttentionResult:
        """As every method, with the break-even guard per head where the device's costs are measured:
        the heads whose kept density passes it (in any batch element) run dense SDPA together (never
        with ``break_even_guard=False``)."""
        query, config = call.query, self.config
        break_even = (cluster_guard_density(query.device, query.dtype, query.shape[-1], config.q_clusters,
                                            config.k_clusters, config.kmeans_iters_step)
                      if self.options.break_even_guard else None)  # fmt: skip
        all_guarded = self.cached(call, AllHeadsGuarded) if break_even is not None else None
        if all_guarded is not None and 0 <= call.step.step - all_guarded.step < GUARD_RECHECK_STEPS:
            return self._guarded_dense(call)  # before the input scan: dense SDPA whatever the inputs hold
        if break_even is None or self.host_dense_reason(call) is not None:
            return super().attend(call)  # the base recipe (its dense reason: a call it runs dense anyway)
        video, _ = video_text_slices(call.layout)
        q, k, v = query[:, :, video], call.key[:, :, video], call.value[:, :, video]
        names, checks = input_checks(call)
        clusters = self._cluster(q, k, call)
        plan = self._plan(q, k, clusters, call.softmax_scale)
        kept_tokens = plan.selection.kept_tokens
        staged = self._stage(q, k, v, plan, call.softmax_scale)
        # one host read per call: the input checks; per head: whether it passes break-even and
        # the most keys one of its q clusters keeps (in every batch element); per (batch element, head): the
        # keys all its q clusters keep, and the pairs it keeps
        values = selection_summary(plan.q_sizes, kept_tokens, q.shape[2], break_even, checks)
        batch, heads = kept_tokens.shape[:2]
        last = self.cached(call, LastCallStaged) if staged is not None else None
        early = (lambda: run_staged_call(staged, q, k, v)) if last is not None and last.staged else None
        read, early_outputs = read_while(values, early)
        reason = input_problem(names, read[:len(names)])
        read = read[len(names):]
        guarded, head_max_kept = read[:heads], read[heads:2 * heads]
        pair_kept, pair_pairs = read[2 * heads:2 * heads + batch * heads], read[2 * heads + batch * heads:]
        unguarded = [h for h, g in enumerate(guarded) if not g]
        pair_rows = [pair_kept[b * heads + h] for b in range(batch) for h in unguarded]
        fits = staged is not None and reason is None and len(unguarded) == heads and sum(pair_rows) <= staged.capacity
        if staged is not None and reason is None:
            self.store(call, LastCallStaged(fits))
        if not fits:
            staged = early_outputs = None  # its buffers go before another path allocates
        if reason is not None:
            return self._fallback(call, reason)
        self.store(call, clusters)
        if not unguarded:
            self.store(call, AllHeadsGuarded(call.step.step))
            return self._guarded_dense(call)
        if staged is not None:
            outputs = run_staged_call(staged, q, k, v) if early_outputs is None else early_outputs
            density = sum(pair_pairs) / (len(pair_pairs) * q.shape[2] ** 2)
            return attend_video_and_text(call, lambda *video_qkv: (*outputs, density))
        bounds = max(head_max_kept[h] for h in unguarded), sum(pair_rows), pair_rows
        if len(unguarded) == len(guarded):
            return attend_video_and_text(call, lambda q, k, v: self._attend_plan(q, k, v, plan, call, *bounds))
        dense_ids = tuple(h for h, g in enumerate(guarded) if g)
        sparse_heads, dense_heads = (torch.tensor(ids, dtype=torch.int64, device=query.device)
                                     for ids in (unguarded, dense_ids))  # fmt: skip
        sparse_plan = plan.heads(sparse_heads)
        return attend_split_heads(call, sparse_heads, dense_heads, dense_ids,
                                  lambda q, k, v: self._attend_plan(q, k, v, sparse_plan, call, *bounds))  # fmt: skip

    @staticmethod
    def _stage(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ClusterPlan, scale: float
    ) -> StagedVarlenCall | None:
        """The cluster kernel's prep for every head of the plan (:func:`stage_varlen_call`), launched before the
        guard's read; used when no head is guarded and the kept keys fit its buffer, else dropped (its GPU
        work wasted: the prep and tile tables, and the attention kernel when it was launched early too)."""
        selection = plan.selection
        return stage_varlen_call(q, k, v, plan.q_offsets, plan.k_offsets, selection.counts, selection.indices,
                                 kept_keys=selection.kept_tokens, q_perm=plan.q_perm, kv_perm=plan.k_perm,
                                 scale=scale)  # fmt: skip

    def video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
        """Cluster-sparse attention of video tokens ``(B, H, Sv, D)``, any strides.

        Returns out ``(B, H, Sv, D)`` token-major, its fp32 LSE ``(B, H, Sv)`` and the kept density.
        """
        clusters = self._cluster(q, k, call)
        self.store(call, clusters)
        return self._attend_plan(q, k, v, self._plan(q, k, clusters, call.softmax_scale), call)

    def _plan(self, q: torch.Tensor, k: torch.Tensor, clusters: CachedClusters, scale: float) -> ClusterPlan:
        """Steps 2-3 of the module doc on video queries and keys ``(B, H, Sv, D)`` and their clusters."""
        q_clusters, k_clusters = clusters.query, clusters.key
        q_perm, q_offsets = cluster_permutation(q_clusters.labels, q_clusters.sizes, q_clusters.ranks)
        k_perm, k_offsets = cluster_permutation(k_clusters.labels, k_clusters.sizes, k_clusters.ranks)
        min_blocks = self.min_kept_key_clusters(k_clusters.sizes.shape[-1])
        selection = select_top_p_clusters(
            q_clusters.centroids, k_clusters.centroids, k_clusters.sizes, scale, self.config.top_p,
            min_blocks,
        )  # fmt: skip
        return ClusterPlan(q_perm, q_offsets, k_perm, k_offsets, selection, q_clusters.sizes)

    def _attend_plan(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: ClusterPlan, call: AttentionCall,
        max_kept_keys: int | None = None, kept_rows_total: int | None = None, pair_kept_rows: list[int] | None = None,
    ):  # fmt: skip
        """Step 4 on the plan's heads: out ``(B, h, Sv, D)`` token-major, LSE fp32 ``(B, h, Sv)``, kept density.
        ``max_kept_keys``, ``kept_rows_total`` and ``pair_kept_rows`` (read on the host by the guard: the most
        keys one q cluster of the plan's heads keeps, the keys all of them keep, and each (batch element, head)'s)
        size the kernel's kept-rows buffer."""
        selection = plan.selection
        out, lse = varlen_block_sparse_attention(
            q, k, v, plan.q_offsets, plan.k_offsets, selection.counts, selection.indices,
            q_perm=plan.q_perm, kv_perm=plan.k_perm, scale=call.softmax_scale, return_lse=True,
            max_kept_keys=max_kept_keys, kept_keys=selection.kept_tokens, kept_rows_total=kept_rows_total,
            pair_kept_rows=pair_kept_rows,
        )  # fmt: skip
        return out, lse, kept_pair_fraction(plan.q_sizes, selection.kept_tokens, q.shape[2])
