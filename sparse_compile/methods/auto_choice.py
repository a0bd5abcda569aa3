"""Per-head choice of ``method="auto"``: the cheapest candidate whose exact recall reaches the target.

Input: the normalised block masses of one call's video tokens, ``mass[b, h, i, j]``: the mean over
query block ``i``'s rows of the softmax mass on key block ``j`` (exact, from the rows' full LSE:
:func:`~sparse_compile.methods.adaspa_search.normalised_mass`). A candidate's recall for a head, the
share of each query row's softmax mass that its kept keys carry averaged over the video rows, is
then exact: ``sum_i w_i sum_j mass[i, j] keep[i, j]``, ``w_i`` block ``i``'s share of the rows.

Candidates per head: the static patterns of :mod:`~sparse_compile.methods.auto_patterns`, and
``top-p``: in every query-block row the fewest key blocks, by descending mass (its own block first),
whose mass reaches the target, so every row's recall reaches it. Every candidate runs on the same
block-sparse kernel, whose cost grows with the kept pairs, so a head takes the qualifying candidate
with the fewest kept pairs. A static candidate is taken over ``top-p`` while it keeps at most
``1 + STATIC_SLACK`` times as many pairs: its recall does not hinge on the step it was measured at.
A head whose choice keeps more than the cost model's break-even density runs all blocks
(``dense (guard)``).

``clusters`` (:mod:`~sparse_compile.methods.auto_clusters`) runs on another kernel and pays for its
k-means, so it is compared by time, per head summed over the batch (a head runs in one launch):
:func:`heads_taking_clusters` takes it where it is faster than the head's block choice (or than dense,
for a guarded head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_compile.methods.adaspa_search import head_chunks, ranked_masses
from sparse_compile.methods.auto_patterns import Candidates
from sparse_compile.methods.block_pairs import kept_pairs
from sparse_compile.methods.cost_model import ClusterCosts, KernelCosts

STATIC_SLACK = 0.1
TOP_P = "top-p"
GUARD = "dense (guard)"
CLUSTERS = "clusters"
RECALL_TOLERANCE = 1e-6


@dataclass(frozen=True, eq=False)
class HeadChoice:
    """The choice for a chunk of heads.

    Attributes:
        labels: int64 ``(B, h)``: index into the names (the candidates', then ``top-p``, then
            ``dense (guard)``).
        masks: bool ``(B, h, N, N)``: the chosen block keep-mask of each head.
        recall: fp32 ``(B, h)``: its exact recall (1 for guarded heads).
        kept_pairs: fp64 ``(B, h)``: the (query, key) video pairs it computes.
        guarded: bool ``(B, h)``: the head runs all blocks (``dense (guard)``).
    """

    labels: Tensor
    masks: Tensor
    recall: Tensor
    kept_pairs: Tensor
    guarded: Tensor


def choice_names(candidates: Candidates) -> tuple[str, ...]:
    """Label of each :attr:`HeadChoice.labels` value, and last :data:`CLUSTERS`."""
    return (*candidates.names, TOP_P, GUARD, CLUSTERS)


def candidate_recall(mass: Tensor, candidates: Candidates) -> Tensor:
    """Exact recall of every static candidate per head, fp32 ``(B, h, C)``, from masses ``(B, h, N, N)``."""
    batch, heads, n, _ = mass.shape
    weights = candidates.block_sizes.float() / float(candidates.block_sizes.sum())
    weighted = (mass * weights[:, None]).reshape(batch * heads, n * n)
    return (weighted @ candidates.masks.reshape(-1, n * n).T.float()).view(batch, heads, -1)


def top_p_blocks(mass: Tensor, target: float, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Per row the fewest blocks by descending mass (own block first) reaching ``target``.

    Args:
        mass: fp32 ``(B, h, N, N)`` normalised block masses.
        weights: fp32 ``(N,)``: each query block's share of the rows.

    Returns:
        keep-mask bool ``(B, h, N, N)`` and the head recall fp32 ``(B, h)``.
    """
    n = mass.shape[-1]
    values, order = ranked_masses(mass)
    cumulative = values.cumsum(dim=-1)
    counts = ((cumulative < target - RECALL_TOLERANCE).sum(dim=-1) + 1).clamp_max(n)
    row_recall = cumulative.gather(-1, counts.unsqueeze(-1) - 1).squeeze(-1)
    kept_rank = torch.arange(n, device=mass.device) < counts.unsqueeze(-1)
    masks = torch.zeros_like(kept_rank).scatter_(-1, order, kept_rank)
    return masks, (row_recall * weights).sum(dim=-1)


def choose_heads(mass: Tensor, candidates: Candidates, target: float, break_even_density: float) -> HeadChoice:
    """The cheapest candidate per head reaching recall ``target`` (module docstring).

    Args:
        mass: fp32 ``(B, h, N, N)`` normalised block masses of the video tokens.
        candidates: the static candidates of the call's grid and block size.
        target: recall to reach, in (0, 1].
        break_even_density: kept density above which a head runs every block.
    """
    sizes = candidates.block_sizes
    num_video = float(sizes.sum())
    static_recall = candidate_recall(mass, candidates)
    static_pairs = kept_pairs(candidates.masks, sizes)
    top_masks, top_recall = top_p_blocks(mass, target, sizes.float() / num_video)
    top_pairs = kept_pairs(top_masks, sizes)

    static_cost = torch.where(static_recall >= target - RECALL_TOLERANCE, static_pairs, torch.inf)
    best_pairs, best = static_cost.min(dim=-1)
    use_static = best_pairs <= (1 + STATIC_SLACK) * top_pairs
    n_static = len(candidates.names)
    labels = torch.where(use_static, best, n_static)
    pairs = torch.where(use_static, best_pairs, top_pairs)
    recall = torch.where(use_static, static_recall.gather(-1, best.unsqueeze(-1)).squeeze(-1), top_recall)
    masks = torch.where(use_static[..., None, None], candidates.masks[best], top_masks)

    guard = pairs > break_even_density * num_video**2
    return HeadChoice(
        labels=torch.where(guard, n_static + 1, labels),
        masks=masks | guard[..., None, None],
        recall=torch.where(guard, 1.0, recall),
        kept_pairs=torch.where(guard, num_video**2, pairs),
        guarded=guard,
    )


def cat_choices(choices: list[HeadChoice]) -> HeadChoice:
    """The choices of consecutive chunks of heads as one."""
    return HeadChoice(*(torch.cat([getattr(c, name) for c in choices], dim=1)
                        for name in ("labels", "masks", "recall", "kept_pairs", "guarded")))  # fmt: skip


def block_or_dense_time(choice: HeadChoice, costs: KernelCosts, num_video: int) -> Tensor:
    """Per (batch element, head) the time to beat, fp64 ``(B, h)``: its block choice's kernel time,
    or for a guarded head dense SDPA's within the guard's margin."""
    limit = costs.dense_limit(float(num_video) ** 2)
    return torch.where(choice.guarded, limit, choice.kept_pairs * costs.pair_time)


def heads_taking_clusters(block_pairs: Tensor, guarded: Tensor, cluster_pairs: Tensor, costs: KernelCosts,
                  clusters: ClusterCosts, clustering_share: float, num_video: int) -> Tensor:  # fmt: skip
    """Which heads run the cluster candidate, bool ``(h,)``.

    A head does when, in every batch element, ``clusters.pair_time * cluster_pairs + clustering_share``
    (its share of one k-means per choice) stays under dense SDPA's time within the guard's margin, and,
    summed over the batch, under its block choices' (a head guarded in some batch element: under dense).

    Args:
        block_pairs, guarded: fp64 / bool ``(B, h)``: the block choice's kept pairs and guard
            (:class:`HeadChoice`).
        cluster_pairs: fp64 ``(B, h)``: the kept pairs of the cluster candidate.
        clustering_share: k-means time charged to one (batch element, head) per call.
    """
    cluster_time = cluster_pairs * clusters.pair_time + clustering_share
    block_time = torch.where(guarded, torch.inf, block_pairs * costs.pair_time)
    under_dense = (cluster_time < costs.dense_limit(float(num_video) ** 2)).all(dim=0)
    return under_dense & (cluster_time.sum(dim=0) < block_time.sum(dim=0))


def masks_to_layout(masks: Tensor) -> tuple[Tensor, Tensor]:
    """Block keep-masks bool ``(B, H, N, N)`` -> kernel layout: counts int32 ``(B, H, N)`` and
    indices int32 ``(B, H, N, MAXK)`` (kept ids ascending, then zeros). Reads ``MAXK`` on the host;
    ranks the ids a few heads at a time (:func:`~sparse_compile.methods.adaspa_search.head_chunks`)."""
    batch, heads, n, _ = masks.shape
    counts = masks.sum(dim=-1, dtype=torch.int32)
    max_kept = int(counts.max()) if counts.numel() else 0
    indices = torch.zeros(batch, heads, n, max_kept, dtype=torch.int32, device=masks.device)
    descending_rank = n - torch.arange(n, device=masks.device, dtype=torch.float32)
    slots = torch.arange(max_kept, device=masks.device)
    for hs in head_chunks(batch, heads, n):
        ids = n - torch.where(masks[:, hs], descending_rank, 0.0).topk(max_kept, dim=-1).values.int()
        indices[:, hs] = torch.where(slots < counts[:, hs].unsqueeze(-1), ids, 0)
    return counts, indices
