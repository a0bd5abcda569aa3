"""SVG2's clusters as a candidate of ``method="auto"``: k-means, exact cluster-pair masses, the layout.

Per (batch element, head) of the video tokens ``(B, h, Sv, D)``:

1. **k-means** of the queries and, separately, of the keys with svg2's default cluster counts
   (clamped to ``Sv``) and cold-start iterations, seeded as svg2's cold start (0 for queries, 1 for
   keys): :func:`~sparse_compile.kernels.kmeans.kmeans`.
2. **Mass** (:func:`cluster_mass`): ``mass[a, c]``, the mean over query cluster ``a``'s rows of the
   softmax mass on key cluster ``c``'s keys, exact from the rows' full LSE; rows divided by their
   sums, as the block masses are. Where ``Kq * MASS_ROWS_PER_CLUSTER < Sv`` the mean runs over that
   many rows of each cluster, evenly spaced through it (:func:`sampled_rows`: at 32k tokens a tenth
   of the rows), else over every row. Torch ops on every device (the keys in cluster order, running
   sums over them, no scatter over keys), in chunks of heads and rows, so no buffer holds more than
   :data:`_MASS_CHUNK_ENTRIES` (batch, head, row, key) scores.
3. **Selection** (:func:`cluster_candidate`): per query cluster the fewest key clusters, by descending
   mass, whose mass reaches the recall target (:func:`~sparse_compile.kernels.block_select.select_top_p`;
   empty query clusters keep none). The head's recall, ``sum_a (|a| / Sv) * kept mass of a``, is then
   exact on the rows the masses were measured on (an estimate of the head's where they are a
   sample, checked again on other rows by the site's recall check); its kept pairs,
   ``sum_a |a| * kept keys of a``, are exact.

A head that takes the candidate runs on the cluster kernel with the permutations folded into its
loads and stores (:class:`ClusterLayout`, as svg2's step 4); the clustering and selection are kept
with the choice and reused until the site chooses again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_compile.kernels.block_select import ClusterSelection, select_top_p
from sparse_compile.kernels.block_select_reference import masked_row_lse
from sparse_compile.kernels.kmeans import Clustering, cluster_permutation, kmeans
from sparse_compile.kernels.kmeans_reference import add_fixed_point, fixed_point_sums, scales_for
from sparse_compile.kernels.masked_reference import gather_rows, keep_matrix
from sparse_compile.kernels.varlen_block_sparse import varlen_block_sparse_attention
from sparse_compile.kernels.varlen_block_sparse_reference import kept_kv_tokens
from sparse_compile.methods.auto_choice import RECALL_TOLERANCE
from sparse_compile.methods.svg2 import Svg2Config

_SVG2_DEFAULTS = Svg2Config()
KMEANS_ITERS = _SVG2_DEFAULTS.kmeans_iters_init
QUERY_SEED, KEY_SEED = 0, 1
MASS_ROWS_PER_CLUSTER = 16
"""Query rows per query cluster the masses are measured on, when that is fewer than all rows."""
_MASS_CHUNK_ENTRIES = 1 << 24  # (batch, head, row, key) scores, or copied q/k entries, per chunk of a pass
_MIN_CHUNK_ROWS = 64
_TINY = 1e-30

KeptKeys = Callable[[slice], Tensor]
"""For a slice of a layout's heads: whether each sampled row keeps each video key, bool ``(B, h, R, Sv)``."""


def cluster_counts(num_video: int) -> tuple[int, int]:
    """Query and key cluster counts for ``num_video`` tokens: svg2's defaults, clamped to the tokens."""
    return min(_SVG2_DEFAULTS.q_clusters, num_video), min(_SVG2_DEFAULTS.k_clusters, num_video)


@dataclass(frozen=True, eq=False)
class MassRows:
    """The query rows a cluster-pair mass averages over.

    Attributes:
        tokens: int64 ``(B, h, R)``: the rows' video tokens.
        labels: int64 ``(B, h, R)``: each row's query cluster.
        per_cluster: fp32 ``(B, h, Kq)``: rows of each query cluster among them (0: the cluster is empty).
    """

    tokens: Tensor
    labels: Tensor
    per_cluster: Tensor


def every_row(q_clusters: Clustering) -> MassRows:
    """Every video row, with its cluster."""
    labels = q_clusters.labels.long()
    tokens = torch.arange(labels.shape[-1], device=labels.device).expand_as(labels)
    return MassRows(tokens, labels, q_clusters.sizes.float())


def sampled_rows(q_clusters: Clustering, q_perm: Tensor, q_offsets: Tensor, per_cluster: int) -> MassRows:
    """``per_cluster`` rows of each query cluster, evenly spaced through its tokens in cluster order
    (``q_perm`` int64 ``(B, h, Sv)``, ``q_offsets`` int32 ``(B, h, Kq + 1)``); a cluster smaller than that
    repeats its rows, an empty one gets none."""
    sizes = q_clusters.sizes.long()
    n_q = sizes.shape[-1]
    slots = torch.arange(per_cluster, device=sizes.device)
    place = q_offsets[..., :-1].long().unsqueeze(-1) + slots * sizes.unsqueeze(-1) // per_cluster
    place = place.clamp_max(q_perm.shape[-1] - 1).flatten(2)  # an empty cluster's slots point anywhere
    labels = torch.arange(n_q, device=sizes.device).repeat_interleave(per_cluster).expand_as(place)
    return MassRows(q_perm.gather(-1, place), labels, torch.where(sizes > 0, float(per_cluster), 0.0))


def cluster_mass(q: Tensor, k: Tensor, lse: Tensor, rows: MassRows, k_perm: Tensor, k_offsets: Tensor,
                 scale: float) -> Tensor:  # fmt: skip
    """Normalised cluster-pair masses, fp32 ``(B, h, Kq, Kk)``, exact over ``rows`` (module doc, step 2).

    q, k ``(B, h, Sv, D)``; lse fp32 ``(B, h, Sv)``: each row's full-attention LSE (rows at ``-inf``
    contribute nothing); ``k_perm`` int64 ``(B, h, Sv)`` and ``k_offsets`` int32 ``(B, h, Kk + 1)`` the
    keys in cluster order (:func:`~sparse_compile.kernels.kmeans.cluster_permutation`). A row's mass on
    each key cluster is a difference of its running sum over the keys in cluster order (fp32); the rows'
    masses are then averaged into their query cluster's row (zero for a cluster without rows), summed as exact
    fixed-point parts (:func:`~sparse_compile.kernels.kmeans_reference.add_fixed_point`): the same bits on
    every run.
    """
    batch, heads, num_video, _ = q.shape
    n_q, n_k = rows.per_cluster.shape[-1], k_offsets.shape[-1] - 1
    num_rows = rows.tokens.shape[-1]
    # Row masses (at most 1 each) summed as exact fixed-point parts: the same bits in any order of addition.
    scales = scales_for(torch.ones(batch, heads, device=q.device), num_rows)
    parts = torch.zeros(2, batch, heads, n_q, n_k, dtype=torch.float32, device=q.device)
    per_head = max(1, _MASS_CHUNK_ENTRIES // (batch * num_video * _MIN_CHUNK_ROWS))
    for first in range(0, heads, per_head):
        hs = slice(first, min(first + per_head, heads))
        h = hs.stop - hs.start
        qh = gather_rows(q[:, hs], rows.tokens[:, hs]).float()
        k_sorted = gather_rows(k[:, hs], k_perm[:, hs]).float().transpose(-1, -2)
        row_lse = masked_row_lse(lse[:, hs].gather(-1, rows.tokens[:, hs]).float())
        bounds = k_offsets[:, hs].long().unsqueeze(2)
        row_labels = rows.labels[:, hs]
        chunk_rows = max(1, _MASS_CHUNK_ENTRIES // (batch * h * num_video))
        for start in range(0, num_rows, chunk_rows):
            r = slice(start, min(start + chunk_rows, num_rows))
            running = torch.exp(qh[:, :, r] @ k_sorted * scale - row_lse[:, :, r, None]).cumsum_(dim=-1)
            running = F.pad(running, (1, 0))
            to_key_cluster = running.gather(-1, bounds.expand(-1, -1, running.shape[2], -1)).diff(dim=-1)
            add_fixed_point(parts[:, :, hs], row_labels[:, :, r, None].expand_as(to_key_cluster), to_key_cluster,
                            scales[:, hs], num_rows)  # fmt: skip
    mass = fixed_point_sums(parts, scales, num_rows).float()
    mass.mul_((rows.per_cluster > 0).unsqueeze(-1)).div_(rows.per_cluster.clamp_min(1).unsqueeze(-1))
    return mass.div_(mass.sum(dim=-1, keepdim=True).clamp_min(_TINY))


@dataclass(frozen=True, eq=False)
class ClusterCandidate:
    """The cluster candidate of ``h`` heads.

    Attributes:
        query, key: the k-means of the queries and keys (``(B, h, ...)`` each).
        q_perm, k_perm: int64 ``(B, h, Sv)`` token orders grouping each cluster.
        q_offsets, k_offsets: int32 ``(B, h, K + 1)`` cluster offsets.
        selection: the kept key clusters of every query cluster (empty query clusters keep none).
        recall: fp32 ``(B, h)``: the exact recall of each head.
        kept_pairs: fp64 ``(B, h)``: the (query, key) video pairs it computes.
    """

    query: Clustering
    key: Clustering
    q_perm: Tensor
    q_offsets: Tensor
    k_perm: Tensor
    k_offsets: Tensor
    selection: ClusterSelection
    recall: Tensor
    kept_pairs: Tensor


def head_groups(heads: Tensor, entries_per_head: int) -> tuple[Tensor, ...]:
    """``heads`` int64 ``(h,)`` in consecutive groups of at most :data:`_MASS_CHUNK_ENTRIES` entries
    (one head at least), for a pass that copies ``entries_per_head`` entries of each head."""
    return heads.split(max(1, _MASS_CHUNK_ENTRIES // max(1, entries_per_head)))


def _clustered_heads(q: Tensor, k: Tensor, lse: Tensor, scale: float) -> tuple[Clustering, Clustering, Tensor,
                                                                             Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The k-means of q and k ``(B, h, Sv, D)``, their token orders and offsets, and the cluster-pair
    masses (:func:`cluster_mass`) given the rows' LSE fp32 ``(B, h, Sv)``."""
    num_video = q.shape[2]
    n_q, n_k = cluster_counts(num_video)
    query = kmeans(q, n_q, KMEANS_ITERS, seed=QUERY_SEED)
    key = kmeans(k, n_k, KMEANS_ITERS, seed=KEY_SEED)
    q_perm, q_offsets = cluster_permutation(query.labels, query.sizes, query.ranks)
    k_perm, k_offsets = cluster_permutation(key.labels, key.sizes, key.ranks)
    rows = (sampled_rows(query, q_perm, q_offsets, MASS_ROWS_PER_CLUSTER) if n_q * MASS_ROWS_PER_CLUSTER < num_video
            else every_row(query))
    mass = cluster_mass(q, k, lse, rows, k_perm, k_offsets, scale)
    return query, key, q_perm, q_offsets, k_perm, k_offsets, mass


def _cat_clusterings(parts: list[Clustering]) -> Clustering:
    """Cold-start clusterings of consecutive groups of heads as one."""
    return Clustering(*(torch.cat([getattr(part, name) for part in parts], dim=1)
                        for name in ("centroids", "labels", "sizes", "ranks")))  # fmt: skip


def cluster_candidate(q: Tensor, k: Tensor, lse: Tensor, heads: Tensor, scale: float, target: float) -> ClusterCandidate:
    """k-means, exact masses and the selection reaching ``target`` of the ``heads`` int64 ``(h,)`` of video
    q, k ``(B, H, Sv, D)`` given their rows' full LSE fp32 ``(B, H, Sv)`` (module doc). The heads are
    copied out a few at a time (:func:`head_groups`), so the pass never holds a copy of all of q or k."""
    num_video = q.shape[2]
    parts = [_clustered_heads(*(t.index_select(1, group) for t in (q, k, lse)), scale)
             for group in head_groups(heads, q.shape[0] * num_video * q.shape[3])]  # fmt: skip
    query, key = (_cat_clusterings([part[i] for part in parts]) for i in (0, 1))
    q_perm, q_offsets, k_perm, k_offsets, mass = (torch.cat([part[i] for part in parts], dim=1) for i in range(2, 7))
    counts, indices = select_top_p(mass, max(0.0, target - RECALL_TOLERANCE))
    counts = torch.where(query.sizes > 0, counts, 0)
    kept = keep_matrix(counts, indices, mass.shape[-1])
    kept_tokens = kept_kv_tokens(key.sizes, counts, indices)
    q_sizes = query.sizes.double()
    recall = ((mass * kept).sum(dim=-1) * query.sizes / num_video).sum(dim=-1)
    return ClusterCandidate(
        query=query,
        key=key,
        q_perm=q_perm,
        q_offsets=q_offsets,
        k_perm=k_perm,
        k_offsets=k_offsets,
        selection=ClusterSelection(counts, indices, kept_tokens),
        recall=recall,
        kept_pairs=(kept_tokens.double() * q_sizes).sum(dim=-1),
    )


def kept_pairs_floor(q: Tensor, k: Tensor, scale: float, rows: Tensor, target: float) -> Tensor:
    """A floor of the pairs any layout reaching recall ``target`` keeps, fp64 ``(B, h)``, from query ``rows``.

    q, k ``(B, h, Sv, D)``; rows int64 ``(R,)``. A query cluster keeping ``m`` keys gives each of its
    rows at most the mass of that row's ``m`` largest probabilities, so, with the clusters' targets
    relaxed to one over all rows, no selection keeps fewer (row, key) pairs than the fewest largest
    probabilities of all rows together whose sum reaches ``target`` times the rows. That count on
    the sampled rows, scaled to ``Sv`` rows, is the floor (an estimate where the rows are a sample).
    """
    batch, heads, num_video, _ = q.shape
    per_chunk = max(1, _MASS_CHUNK_ENTRIES // (batch * rows.numel() * num_video))
    floors = []
    for start in range(0, heads, per_chunk):
        hs = slice(start, min(start + per_chunk, heads))
        probs = ((q[:, hs, rows].float() @ k[:, hs].float().transpose(-1, -2)) * scale).softmax(dim=-1)
        ranked = probs.flatten(2).sort(dim=-1, descending=True).values.cumsum_(dim=-1)
        pairs = (ranked < target * rows.numel() - RECALL_TOLERANCE).sum(dim=-1) + 1
        floors.append(pairs.double() * num_video / rows.numel())
    return torch.cat(floors, dim=1)


def _pick(t: Tensor, heads: Tensor) -> Tensor:
    return t.index_select(1, heads)


@dataclass(frozen=True, eq=False)
class ClusterLayout:
    """What the heads that chose clusters run: svg2's cluster layout, per (batch element, head).

    Attributes:
        q_perm, k_perm: int64 ``(B, h, Sv)`` token orders grouping each cluster.
        q_offsets, k_offsets: int32 ``(B, h, K + 1)`` cluster offsets.
        selection: the key clusters each query cluster keeps.
        q_labels, k_labels: int32 ``(B, h, Sv)``: each token's cluster (for the recall check).
        max_kept_keys: the most keys any query cluster keeps,
        pair_kept_rows: the keys each (batch element, head)'s query clusters keep together, ``B * h`` ints, and
        kept_rows_total: their sum (these three size the kernel's kept-rows buffer).
        density: fp64 0-d: kept video pairs / ``Sv**2``, mean over (batch, head).
    """

    q_perm: Tensor
    q_offsets: Tensor
    k_perm: Tensor
    k_offsets: Tensor
    selection: ClusterSelection
    q_labels: Tensor
    k_labels: Tensor
    max_kept_keys: int
    pair_kept_rows: list[int]
    kept_rows_total: int
    density: Tensor

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """Video tokens ``(B, h, Sv, D)`` of these heads -> (out, LSE fp32 ``(B, h, Sv)``, kept density)."""
        sel = self.selection
        out, lse = varlen_block_sparse_attention(
            q, k, v, self.q_offsets, self.k_offsets, sel.counts, sel.indices, q_perm=self.q_perm,
            kv_perm=self.k_perm, scale=scale, return_lse=True, max_kept_keys=self.max_kept_keys,
            kept_keys=sel.kept_tokens, kept_rows_total=self.kept_rows_total, pair_kept_rows=self.pair_kept_rows,
        )  # fmt: skip
        return out, lse, self.density

    def kept_keys(self, rows: Tensor) -> KeptKeys:
        """The keys each of the query ``rows`` int64 ``(R,)`` keeps, per slice of heads."""
        num_keys = self.selection.indices.shape[-1]

        def kept(hs: slice) -> Tensor:
            keep = keep_matrix(self.selection.counts[:, hs], self.selection.indices[:, hs], num_keys)
            row_clusters = self.q_labels[:, hs][:, :, rows].long()
            row_keep = keep.gather(2, row_clusters.unsqueeze(-1).expand(-1, -1, -1, num_keys))
            key_clusters = self.k_labels[:, hs].long().unsqueeze(2)
            return row_keep.gather(3, key_clusters.expand(-1, -1, rows.numel(), -1))

        return kept


def cluster_layout(candidate: ClusterCandidate, heads: Tensor) -> ClusterLayout:
    """The layout of the candidate's ``heads`` (int64 indices into its heads, non-empty). Reads the
    most kept keys of a query cluster and the kept keys of each (batch element, head) on the host (one read)."""
    selection = ClusterSelection(*(_pick(t, heads) for t in candidate.selection))
    num_video = candidate.q_perm.shape[-1]
    kept = selection.kept_tokens.long()
    max_kept_keys, *pair_kept_rows = torch.cat([kept.max().view(1), kept.flatten(0, 1).sum(-1)]).tolist()
    return ClusterLayout(
        q_perm=_pick(candidate.q_perm, heads),
        q_offsets=_pick(candidate.q_offsets, heads),
        k_perm=_pick(candidate.k_perm, heads),
        k_offsets=_pick(candidate.k_offsets, heads),
        selection=selection,
        q_labels=_pick(candidate.query.labels, heads),
        k_labels=_pick(candidate.key.labels, heads),
        max_kept_keys=max(1, max_kept_keys),
        pair_kept_rows=pair_kept_rows,
        kept_rows_total=sum(pair_kept_rows),
        density=_pick(candidate.kept_pairs, heads).mean() / float(num_video) ** 2,
    )
