"""``method="svg2"``: Sparse VideoGen2, semantic-aware permutation with cached centroids.

Per call, on the video tokens of each (batch element, head):

1. k-means on the queries (``q_clusters``) and, separately, on the keys (``k_clusters``);
   the first sparse call runs ``kmeans_iters_init`` iterations, later calls warm-start from
   the centroids cached for this model, site and CFG branch and run ``kmeans_iters_step``.
   With ``kmeans_during_dense`` the dense warm-up steps already cluster, so the first sparse
   step starts warm.
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
rows and columns). No step of the sparse path reads a device value on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparse_compile.kernels.block_select import select_top_p_clusters
from sparse_compile.kernels.kmeans import cluster_permutation, kmeans
from sparse_compile.kernels.varlen_block_sparse import varlen_block_sparse_attention
from sparse_compile.methods.base import (
    AttentionCall,
    AttentionMethod,
    AttentionResult,
    MethodOption,
    bool_option,
    fraction_option,
    int_option,
)
from sparse_compile.methods.fallback import dense_fallback
from sparse_compile.methods.text_tokens import attend_video_and_text, mask_problem, video_text_slices

@dataclass(frozen=True)
class Centroids:
    """Cached k-means centroids of one site and CFG branch: ``(B, H, K, D)`` fp32 each."""

    query: torch.Tensor
    key: torch.Tensor


def kept_pair_fraction(q_sizes: torch.Tensor, kept_tokens: torch.Tensor, seq: int) -> torch.Tensor:
    """Mean over (batch, head) of the fraction of the ``seq x seq`` pairs a cluster layout keeps (0-d tensor).

    ``q_sizes`` ``(B, H, Kq)`` integer; ``kept_tokens`` ``(B, H, Kq)`` integer, the key tokens each
    query cluster keeps (:attr:`ClusterSelection.kept_tokens`). Sums in int64.
    """
    return (kept_tokens.long() * q_sizes).sum(-1).float().mean() / (seq * seq)


class Svg2Method(AttentionMethod):
    """Sparse VideoGen2 on the cluster (variable-block) kernel."""

    name = "svg2"
    is_sparse = True
    option_spec = {
        "q_clusters": int_option(200, 1),
        "k_clusters": int_option(1000, 1),
        "top_p": fraction_option(0.9),
        "min_kc_ratio": MethodOption(
            0.1, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1, "a number in [0, 1]"
        ),
        "kmeans_iters_init": int_option(50, 1),
        "kmeans_iters_step": int_option(2, 0),
        "kmeans_during_dense": bool_option(True),
    }

    def attend(self, call: AttentionCall) -> AttentionResult:
        problem = mask_problem(call.attn_mask, call.layout)
        if problem is not None:
            return dense_fallback(call, problem)
        return attend_video_and_text(call, lambda q, k, v: self._video_attention(q, k, v, call))

    def observe_dense(self, call: AttentionCall) -> None:
        """During dense steps, cluster already so the first sparse step starts from warm centroids."""
        if self.params["kmeans_during_dense"]:
            video, _ = video_text_slices(call.layout)
            self._cluster(call.query[:, :, video], call.key[:, :, video], call)

    def min_kept_key_clusters(self, num_key_clusters: int) -> int:
        """The floor of key clusters each query cluster keeps: ``ceil(min_kc_ratio * num_key_clusters)``, at least 1."""
        return max(math.ceil(self.params["min_kc_ratio"] * num_key_clusters), 1)

    def _cluster(self, q: torch.Tensor, k: torch.Tensor, call: AttentionCall):
        """k-means of the video queries and keys ``(B, H, Sv, D)``, warm-started from the cache."""
        key = ("svg2_centroids", call.step.branch)
        cached: Centroids | None = call.state.cache.get(key)
        seq, dim = q.shape[2], q.shape[3]
        n_q, n_k = min(self.params["q_clusters"], seq), min(self.params["k_clusters"], seq)
        warm = cached is not None and cached.query.shape == (*q.shape[:2], n_q, dim) and cached.key.shape[2] == n_k
        iters = self.params["kmeans_iters_step"] if warm else self.params["kmeans_iters_init"]
        q_clusters = kmeans(q, n_q, iters, cached.query if warm else None, seed=0)
        k_clusters = kmeans(k, n_k, iters, cached.key if warm else None, seed=1)
        call.state.cache[key] = Centroids(q_clusters.centroids, k_clusters.centroids)
        return q_clusters, k_clusters

    def _video_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall):
        """Cluster-sparse attention of video tokens ``(B, H, Sv, D)``, any strides.

        Returns out ``(B, H, Sv, D)`` token-major, its fp32 LSE ``(B, H, Sv)`` and the kept density.
        """
        scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
        q_clusters, k_clusters = self._cluster(q, k, call)
        q_perm, q_offsets = cluster_permutation(q_clusters.labels, q_clusters.sizes, q_clusters.ranks)
        k_perm, k_offsets = cluster_permutation(k_clusters.labels, k_clusters.sizes, k_clusters.ranks)
        min_blocks = self.min_kept_key_clusters(k_clusters.sizes.shape[-1])
        selection = select_top_p_clusters(
            q_clusters.centroids, k_clusters.centroids, k_clusters.sizes, scale, self.params["top_p"], min_blocks
        )
        out, lse = varlen_block_sparse_attention(
            q, k, v, q_offsets, k_offsets, selection.counts, selection.indices,
            q_perm=q_perm, kv_perm=k_perm, scale=scale, return_lse=True,
        )  # fmt: skip
        density = kept_pair_fraction(q_clusters.sizes, selection.kept_tokens, q.shape[2])
        return out, lse, density
