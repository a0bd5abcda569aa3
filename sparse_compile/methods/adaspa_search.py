"""AdaSpa's search: exact block attention mass, head-adaptive budgets, the kept block layout.

Video tokens ``(B, H, Sv, D)`` are cut into ``N = ceil(Sv / block)`` query and key blocks (the
last one may be partial). One search, given a row LSE ``(B, H, Sv)``:

1. **Mass.** ``mass[b, h, i, j]``: the attention mass query block ``i`` pays key block ``j``,
   averaged over the block's rows (:func:`~sparse_compile.kernels.block_select.block_mass_with_lse`,
   one pass over K given the LSE; O(N^2) memory per head, never O(Sv^2)). Each row is then
   divided by its sum, so it sums to 1 even when the LSE is a cached one from an earlier step.
2. **Ranking.** Per (batch, head, query block) the key blocks in descending mass, the diagonal
   block (the query block's own tokens) always first.
3. **Budgets.** Each (batch element, head) keeps the same number ``k_h`` of blocks in every
   query-block row: its ``k_h`` first-ranked blocks. The mean of ``k_h`` over the heads of a batch
   element is the budget ``K`` = ``density * N`` rounded to the nearest int, in ``[1, N]``
   (:func:`block_budget`). Without head adaptation every head keeps ``K``. With it, the
   ``k_h`` maximise the summed *recall* of the heads, where a head's recall at ``k`` is the
   fraction of its attention mass the kept blocks hold, averaged over query tokens:
   ``R_h(k) = sum_i (|block i| / Sv) * (sum of the k first-ranked masses of row i)``. Past the
   diagonal the ranked masses fall, so ``R_h`` is concave in ``k`` and taking the ``H * K``
   largest recall gains ``R_h(k) - R_h(k - 1)`` over all heads and ranks (the diagonal's gain
   forced first) is optimal (:func:`allocate_blocks`): a head whose attention is concentrated
   reaches a high recall with few blocks and gives the rest to heads with diffuse attention;
   the mean density is unchanged.

AdaSpa as published keeps the heads whose recall at the target density is high (> 0.8) sparser
and the others denser; the rule above is that idea made exact (no threshold: the split that
maximises the mean recall at the given mean density).

The layout's ``MAXK`` is the largest ``k_h``; the ``k_h`` are read on the host once per search
(``B * H`` ints); nothing else syncs.

Memory: the search runs on chunks of heads (:func:`head_chunks`, at most ``_CHUNK_ENTRIES``
block pairs each). The normalised masses of all heads, fp32 ``(B, H, N, N)`` (330 MB at 118800
tokens, 24 heads and ``block`` 64), are the one full-size buffer besides the layout itself; the
ranking's sort (fp32 values, int64 order) and the layout construction only ever hold one chunk,
and each chunk's masses are freed once its layout is built. The chunking changes nothing but the
rounding of the recall gains' sums (ulps): a head's masses are computed by themselves, and the
stable sort ranks each row alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_compile.kernels.block_select import block_mass_with_lse
from sparse_compile.kernels.block_select_reference import block_sizes
from sparse_compile.kernels.common import cdiv

_TINY = 1e-30
_CHUNK_ENTRIES = 1 << 23  # (batch, head, q block, key block) entries per chunk of heads: 32 MiB of fp32 masses


@dataclass(frozen=True, eq=False)
class SearchResult:
    """The kept blocks of one search over ``Sv`` video tokens in ``N`` blocks of ``block``.

    Attributes:
        counts: int32 ``(B, H, N)``: kept key blocks per query block (``head_blocks`` of its head).
        indices: int32 ``(B, H, N, MAXK)``: their ids ascending, then zeros; ``MAXK = max(head_blocks)``.
        head_blocks: int64 ``(B, H)``: blocks kept in every query-block row of each head, diagonal
            included; their mean over heads is :func:`block_budget`.
        recall: fp32 ``(B, H)``: fraction of each head's attention mass in the kept blocks,
            averaged over query tokens (under the LSE the search used, rows normalised).
        density: fp64 0-d: kept (query, key) video pairs / ``Sv**2``, mean over (batch, head);
            partial last blocks counted by their real size.
        block: tokens per query and key block.
    """

    counts: Tensor
    indices: Tensor
    head_blocks: Tensor
    recall: Tensor
    density: Tensor
    block: int


def block_budget(density: float, n_blocks: int) -> int:
    """Kept blocks per query-block row, averaged over heads: ``density * n_blocks`` to the nearest int, in [1, N]."""
    return min(n_blocks, max(1, math.floor(density * n_blocks + 0.5)))


def video_blocks(num_video: int, block: int) -> int:
    """``N``: blocks of ``block`` tokens covering ``num_video`` tokens."""
    return cdiv(num_video, block)


def ranked_masses(mass: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's key blocks by descending mass, the diagonal block first.

    Args:
        mass: fp32 ``(B, H, N, N)``.

    Returns:
        ``values`` fp32 ``(B, H, N, N)``: the masses in ranked order, and ``order`` int64
        ``(B, H, N, N)``: the key block at each rank.
    """
    n = mass.shape[-1]
    diagonal = torch.eye(n, dtype=torch.bool, device=mass.device)
    values, order = mass.masked_fill(diagonal, torch.inf).sort(dim=-1, descending=True, stable=True)
    values[..., 0] = mass.diagonal(dim1=-2, dim2=-1)
    return values, order


def recall_gains(values: Tensor, row_weights: Tensor) -> Tensor:
    """Recall each rank adds: fp32 ``(B, H, N)``, ``gains[b, h, r] = sum_i row_weights[i] * values[b, h, i, r]``.

    ``values`` fp32 ``(B, H, N, N)`` from :func:`ranked_masses`; ``row_weights`` fp32 ``(N,)``, the
    query blocks' shares of the tokens. ``gains.cumsum(-1)[..., k - 1]`` is the recall at ``k`` blocks.
    """
    return torch.einsum("bhir,i->bhr", values, row_weights)


def allocate_blocks(gains: Tensor, budget: int) -> Tensor:
    """Head-adaptive blocks per row, int64 ``(B, H)``: each in [1, N], mean over heads ``budget``.

    ``gains`` fp32 ``(B, H, N)`` from :func:`recall_gains` (non-increasing from rank 1 on). Per batch
    element the ``H * budget`` largest gains over all (head, rank) are taken, rank 0 (the diagonal)
    always; a head's count of taken gains is its number of blocks. Because gains fall with the rank,
    the taken gains of a head are (up to ties) its first ranks, and their sum, the summed recall,
    is the largest any split of ``H * budget`` blocks with at least one per head can reach.
    """
    batch, heads, n = gains.shape
    priority = gains.clone()
    priority[..., 0] = torch.inf
    chosen = priority.flatten(1).topk(heads * budget, dim=1).indices
    taken = torch.zeros(batch, heads * n, dtype=torch.int64, device=gains.device).scatter_(1, chosen, 1)
    return taken.view(batch, heads, n).sum(dim=-1)


def kept_density(keeps_last: Tensor, head_blocks: Tensor, num_video: int, block: int) -> Tensor:
    """Kept video pairs / ``Sv**2`` of a layout, fp64 0-d (mean over batch and heads).

    ``keeps_last`` bool ``(B, H, N)``: whether each row keeps the last key block; every row of a head
    keeps ``head_blocks`` ``(B, H)`` blocks. A row keeps ``head_blocks * block`` keys, less the
    padding of the last block when it keeps that one.
    """
    n = keeps_last.shape[-1]
    sizes = block_sizes(num_video, block, keeps_last.device)
    keys = head_blocks.unsqueeze(-1) * block - (n * block - num_video) * keeps_last.long()
    return (keys * sizes).sum(dim=-1).double().mean() / (num_video * num_video)


def head_chunks(batch: int, heads: int, n_blocks: int) -> list[slice]:
    """Consecutive head ranges of at most ``_CHUNK_ENTRIES`` block pairs ``(B, h, N, N)`` each (one head at least)."""
    per_chunk = max(1, min(heads, _CHUNK_ENTRIES // max(1, batch * n_blocks * n_blocks)))
    return [slice(h, min(h + per_chunk, heads)) for h in range(0, heads, per_chunk)]


def normalised_mass(q: Tensor, k: Tensor, lse: Tensor, block: int, scale: float) -> Tensor:
    """Block masses of ``q``/``k`` ``(B, h, Sv, D)`` with rows divided by their sums, fp32 ``(B, h, N, N)``."""
    mass = block_mass_with_lse(q, k, lse, block, block, scale)
    return mass.div_(mass.sum(dim=-1, keepdim=True).clamp_min(_TINY))


def kept_blocks(mass: Tensor, head_blocks: Tensor, max_blocks: int) -> tuple[Tensor, Tensor]:
    """The layout of one chunk of heads: each row's ``head_blocks`` first-ranked key blocks.

    Args:
        mass: fp32 ``(B, h, N, N)`` normalised masses.
        head_blocks: int64 ``(B, h)`` blocks per row of each head.
        max_blocks: ``head_blocks.max()`` (known on the host).

    Returns:
        ``indices`` int32 ``(B, h, N, max_blocks)``: each row's kept ids ascending, then zeros; and
        ``keeps_last`` bool ``(B, h, N)``: whether the row keeps the last key block ``N - 1``.
    """
    n = mass.shape[-1]
    top = ranked_masses(mass)[1][..., :max_blocks].to(torch.int32)
    kept_rank = torch.arange(max_blocks, device=mass.device) < head_blocks[..., None, None]
    ids = torch.where(kept_rank, top, n).sort(dim=-1).values  # kept ids ascending, then n
    return torch.where(ids < n, ids, 0), (ids == n - 1).any(dim=-1)


def search_layout(
    q: Tensor, k: Tensor, lse: Tensor, *, block: int, density: float, head_adaptive: bool, scale: float
) -> SearchResult:
    """One AdaSpa search over video tokens (see the module docstring).

    Args:
        q, k: ``(B, H, Sv, D)`` video queries and keys.
        lse: fp32 ``(B, H, Sv)``: each query row's full-attention LSE, exact or cached from an
            earlier step.
        block: query and key block size.
        density: mean kept fraction of the blocks, in (0, 1].
        head_adaptive: split the budget between heads by recall; else every head keeps the budget.
        scale: softmax scale of ``q . k``.
    """
    batch, heads, num_video, _ = q.shape
    n = video_blocks(num_video, block)
    chunks = head_chunks(batch, heads, n)
    masses = [normalised_mass(q[:, c], k[:, c], lse[:, c], block, scale) for c in chunks]
    weights = block_sizes(num_video, block, q.device).float() / num_video
    gains = torch.cat([recall_gains(ranked_masses(mass)[0], weights) for mass in masses], dim=1)
    budget = block_budget(density, n)
    if head_adaptive:
        head_blocks = allocate_blocks(gains, budget)
    else:
        head_blocks = torch.full((batch, heads), budget, dtype=torch.int64, device=q.device)
    blocks_on_host = head_blocks.tolist()  # the one host read of a search
    chunk_max = [max(max(row[c]) for row in blocks_on_host) for c in chunks]
    indices = torch.zeros((batch, heads, n, max(chunk_max)), dtype=torch.int32, device=q.device)
    keeps_last = torch.empty((batch, heads, n), dtype=torch.bool, device=q.device)
    for c, max_blocks in zip(chunks, chunk_max):
        chunk_indices, chunk_last = kept_blocks(masses.pop(0), head_blocks[:, c], max_blocks)  # frees the masses
        indices[:, c, :, :max_blocks], keeps_last[:, c] = chunk_indices, chunk_last
    recall = gains.cumsum(dim=-1).gather(-1, head_blocks.unsqueeze(-1) - 1).squeeze(-1)
    return SearchResult(
        counts=head_blocks.to(torch.int32).unsqueeze(-1).expand(batch, heads, n).contiguous(),
        indices=indices,
        head_blocks=head_blocks,
        recall=recall,
        density=kept_density(keeps_last, head_blocks, num_video, block),
        block=block,
    )
