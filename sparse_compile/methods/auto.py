"""``method="auto"``: per site and head, the cheapest pattern that keeps a recall target.

**Choosing.** For one (site, CFG branch), the exact block masses of the video tokens (a row-LSE
pass and a block-mass pass, like an AdaSpa search) give every block candidate's exact recall per
head; :mod:`~sparse_compile.methods.auto_choice` takes the one that reaches ``recall`` with the fewest
kept pairs (SVG's spatial and temporal bands, Radial's mask, or per-row top-p blocks); heads
past the break-even density of the device's cost model (:mod:`~sparse_compile.methods.cost_model`)
run dense. Then SVG2's clusters (:mod:`~sparse_compile.methods.auto_clusters`: k-means, exact
cluster-pair masses from the same LSE) are scored on the heads where they could be faster, and a head
takes them where its cluster-kernel time plus its share of the k-means is below its block choice's
(:func:`~sparse_compile.methods.auto_choice.heads_taking_clusters`). The k-means runs once per
choice, so its time is charged to the ``recheck_every`` calls a choice lasts at least. The whole
call runs dense unless its predicted time, the dense heads' included, is under :data:`~sparse_compile.methods.cost_model.GUARD_MARGIN`
of dense SDPA's for every head: a few sparse heads beside many dense ones save less than splitting the
call by heads costs. Heads whose scores are not finite (NaN or Inf in
q or k) run dense, so they give what dense attention gives.

**When.** At the last of the ``dense_steps`` steps when they are given, else at the first sparse
call of a generation (the timestep warm-up's last step is not known ahead), or of a new grid or
shape. Every ``recheck_every`` steps after a
choice the kept layout's recall is measured exactly on ``_CHECK_ROWS`` sampled query rows (a
``rows x Sv`` product per head; for cluster heads the rows' kept keys follow from their query cluster's
selection); the site chooses anew, clusterings included, when a head falls more than
``_RECHECK_MARGIN`` below ``recall``.

**Running.** The block heads of a call share one block-sparse launch over their per-head
layouts, the cluster heads one cluster-kernel launch with their permutations folded in; heads the
guard sent dense (in any batch element) run dense SDPA together, and their video rows report the
LSE ``+inf`` (recall 1) (:func:`~sparse_compile.methods.base.attend_head_groups`). Text tokens of
joint attention are dense (:func:`attend_video_and_text`). Calls the block kernels cannot take run
dense with the reason reported. A call whose choice is dense runs dense SDPA without reading its inputs
(no finiteness check, so no host sync) until the site chooses again.

**Measured.** The cost model predicts from calibration shapes; on CUDA the site also times its own calls
(:mod:`~sparse_compile.methods.call_timing`: CUDA events, read without a sync): the dense warm-up calls,
then the calls of a sparse choice after its first. Once a sparse call took at least the dense calls'
median, the choice turns dense (counted as guarded) until the site chooses again. Off with
``break_even_guard=False``.

Options:
    recall: the share of each query row's softmax mass the kept keys must carry, in (0, 1];
        default 0.95.
    block: query and key block size, one of 32, 64, 128; default 64.
    recheck_every: steps between sampled-row recall checks (int >= 1); default 10.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sparse_compile.kernels.block_select import attention_lse
from sparse_compile.kernels.masked_reference import keep_matrix
from sparse_compile.methods.adaspa_search import head_chunks, normalised_mass
from sparse_compile.methods.auto_choice import (
    CLUSTERS,
    HeadChoice,
    block_or_dense_time,
    cat_choices,
    choice_names,
    choose_heads,
    heads_taking_clusters,
    masks_to_layout,
)
from sparse_compile.methods.auto_clusters import (
    KMEANS_ITERS,
    ClusterLayout,
    KeptKeys,
    cluster_candidate,
    cluster_counts,
    cluster_layout,
    kept_pairs_floor,
)
from sparse_compile.methods.auto_patterns import static_candidates
from sparse_compile.methods.base import AttentionCall, AttentionMethod, AttentionResult, HeadGroup, attend_head_groups
from sparse_compile.methods.block_kernel import fixed_block_attention
from sparse_compile.methods.call_timing import PathTimer, timing_available
from sparse_compile.methods.cost_model import ClusterCosts, KernelCosts, cluster_costs, kernel_costs
from sparse_compile.methods.text_tokens import attend_video_and_text, video_text_slices
from sparse_compile.registry import MethodConfig, choice_option, fraction_option, int_option, register_method

BLOCK_SIZES = (32, 64, 128)
_CHECK_ROWS = 64
_RECHECK_MARGIN = 0.03
_ROW_SHIFT = 7919  # a prime: each check samples other rows than the last
_CHECK_CHUNK_ENTRIES = 1 << 24  # (batch, head, row, key) scores per chunk of heads in a recall check


@dataclass(frozen=True)
class AutoConfig(MethodConfig):
    """Options of ``method="auto"`` (see the module doc)."""

    recall: float = fraction_option(0.95)
    block: int = choice_option(64, BLOCK_SIZES)
    recheck_every: int = int_option(10, 1)


@dataclass(frozen=True, eq=False)
class Choice:
    """What one (site, CFG branch) runs until it chooses again (cached per grid, shapes and generation).

    Attributes:
        step: the step it was chosen at.
        block_heads, cluster_heads, dense_heads: int64 ``(Hb,)`` / ``(Hc,)`` / ``(Hd,)`` head indices
            on the call's device: a partition of the heads.
        dense_head_ids: the dense heads on the host.
        counts, indices: the block heads' kernel layout, int32 ``(B, Hb, N)`` and ``(B, Hb, N, MAXK)``
            (``None`` without block heads).
        clusters: the cluster heads' layout (``None`` without cluster heads).
        head_labels: the chosen candidate of each (batch element, head), ``B`` tuples of ``H``.
        recall: fp32 ``(B, H)``: each head's exact recall at the choice.
        density: fp64 0-d: kept video pairs / ``Sv**2``, mean over (batch, head).
        block_density: fp64 0-d: the same over the block heads only.
        dense: the whole call runs dense SDPA: the cost model says sparse would not be faster, or the
            choice's calls were measured slower than dense ones (:mod:`~sparse_compile.methods.call_timing`).
    """

    step: int
    block_heads: Tensor
    cluster_heads: Tensor
    dense_heads: Tensor
    dense_head_ids: tuple[int, ...]
    counts: Tensor | None
    indices: Tensor | None
    clusters: ClusterLayout | None
    head_labels: tuple[tuple[str, ...], ...]
    recall: Tensor
    density: Tensor
    block_density: Tensor
    dense: bool


def sampled_recall(q: Tensor, k: Tensor, scale: float, rows: Tensor, kept_keys: KeptKeys) -> Tensor:
    """Exact recall of a layout on query ``rows``: fp32 ``(B, H)``.

    q, k ``(B, H, Sv, D)``; rows int64 ``(R,)``; ``kept_keys`` the keys each row keeps, per slice of
    heads (:func:`block_kept_keys`, :meth:`ClusterLayout.kept_keys`). The recall of a row is the share
    of its full softmax mass on the keys it keeps.
    """
    batch, heads, num_video, _ = q.shape
    per_chunk = max(1, _CHECK_CHUNK_ENTRIES // (batch * rows.numel() * num_video))
    recalls = []
    for start in range(0, heads, per_chunk):
        hs = slice(start, min(start + per_chunk, heads))
        scores = (q[:, hs, rows].float() @ k[:, hs].float().transpose(-1, -2)) * scale
        recalls.append((scores.softmax(dim=-1) * kept_keys(hs)).sum(dim=-1).mean(dim=-1))
    return torch.cat(recalls, dim=1)


def block_kept_keys(counts: Tensor, indices: Tensor, block: int, num_video: int, rows: Tensor) -> KeptKeys:
    """The keys each of the query ``rows`` int64 ``(R,)`` keeps under a block layout (counts int32
    ``(B, H, N)``, indices ``(B, H, N, MAXK)``), per slice of heads."""
    n = counts.shape[-1]
    key_block = torch.arange(num_video, device=counts.device) // block
    row_block = rows // block

    def kept(hs: slice) -> Tensor:
        return keep_matrix(counts[:, hs][:, :, row_block], indices[:, hs][:, :, row_block], n)[..., key_block]

    return kept


def check_rows(num_video: int, step: int) -> Tensor:
    """``_CHECK_ROWS`` evenly spaced video rows, shifted by the step (deterministic): int64 ``(R,)``."""
    count = min(_CHECK_ROWS, num_video)
    spacing = num_video // count
    return torch.arange(count) * spacing + (step * _ROW_SHIFT) % spacing


def _head_indices(flags: list[bool], device: torch.device) -> Tensor:
    """int64 indices of the true ``flags``."""
    return torch.tensor([h for h, flag in enumerate(flags) if flag], dtype=torch.int64, device=device)


@register_method
class AutoMethod(AttentionMethod):
    """Per head the cheapest candidate pattern reaching ``recall``; dense where sparse cannot win."""

    name = "auto"
    config_type = AutoConfig
    needs_block_kernel = True
    config: AutoConfig

    def attend(self, call: AttentionCall) -> AttentionResult:
        timer = self._path_timer(call)
        cached = self._measured(call, self.cached(call, Choice), timer)
        if cached is not None and cached.dense:  # dense until the site chooses again: no input checks, no sync
            return self._guarded_dense(call)
        start = timer.start() if timer is not None and timer.collecting_sparse else None
        reason = self.host_dense_reason(call)
        if reason is not None:
            return self._fallback(call, reason)
        reason, ran = self.input_checked(call, lambda: self._attend_choice(call, cached))
        if reason is not None:
            return self._fallback(call, reason)
        choice, result = ran
        if timer is not None and not choice.dense:
            self._time_sparse_call(timer, choice, start)
        return result

    def plans_from_inputs(self, call: AttentionCall) -> bool:
        """When it chooses: no choice cached for this branch, or its recall check is due."""
        choice = self.cached(call, Choice)
        return choice is None or self._due_for_check(choice, call.step.step)

    def _attend_choice(self, call: AttentionCall, cached: Choice | None) -> tuple[Choice, AttentionResult]:
        """This call's choice (:meth:`_current_choice` from ``cached``) and its attention."""
        video, _ = video_text_slices(call.layout)
        choice = self._current_choice(call.query[:, :, video], call.key[:, :, video], call, cached)
        if choice.dense:
            return choice, self._guarded_dense(call)
        groups = self._head_groups(choice, call)
        if len(groups) == 1 and not choice.dense_head_ids:
            return choice, attend_video_and_text(call, groups[0][1])
        return choice, attend_head_groups(call, groups, choice.dense_heads, choice.dense_head_ids)

    def is_extra_work_step(self, step: int) -> bool:
        """The step after the first sparse one, whose calls are timed against dense (and may still run sparse where
        the site then turns dense), and the recall checks every ``recheck_every`` steps after a choice made at the
        last dense step."""
        since_choice = step - (self.first_sparse_step - 1)
        return step == self.first_sparse_step + 1 or (since_choice > 0 and since_choice % self.config.recheck_every == 0)

    def dense_step_attention(self, call: AttentionCall) -> Tensor:
        """Dense SDPA, timed on CUDA: the dense time a sparse choice must beat."""
        timer = self._path_timer(call)
        if timer is None:
            return self._exact(call)
        start = timer.start()
        output = self._exact(call)
        timer.stop("dense", start)
        return output

    def _path_timer(self, call: AttentionCall) -> PathTimer | None:
        """This branch's :class:`PathTimer` with its finished timings read, on CUDA with the break-even guard on."""
        if not (self.options.break_even_guard and timing_available(call.query)):
            return None
        timer = self.cached(call, PathTimer)
        if timer is None:
            timer = PathTimer()
            self.store(call, timer)
        timer.collect()
        return timer

    def _measured(self, call: AttentionCall, choice: Choice | None, timer: PathTimer | None) -> Choice | None:
        """``choice``, made dense (and stored so) once its calls were measured slower than dense ones."""
        if choice is None or choice.dense or timer is None or timer.choice_step != choice.step:
            return choice
        if timer.sparse_is_slower():
            choice = replace(choice, dense=True)
            self.store(call, choice)
        return choice

    @staticmethod
    def _time_sparse_call(timer: PathTimer, choice: Choice, start: object) -> None:
        """Count this sparse call of ``choice``, begun at event ``start`` (recorded while the timer collects):
        its time is a sample unless it is the choice's first call."""
        if timer.choice_step != choice.step:
            timer.new_choice(choice.step)
        elif timer.count_sparse_call():
            timer.stop("sparse", start)

    def observe_dense(self, call: AttentionCall) -> None:
        """At the last dense step, choose for the first sparse step."""
        if call.step.step != self.first_sparse_step - 1 or self.dense_reason(call) is not None:
            return
        video, _ = video_text_slices(call.layout)
        self.store(call, self._choose(call.query[:, :, video], call.key[:, :, video], call))

    def _head_groups(self, choice: Choice, call: AttentionCall) -> list[HeadGroup]:
        """The block heads' and the cluster heads' video attention, each one launch."""
        groups: list[HeadGroup] = []
        if choice.counts is not None:
            groups.append((choice.block_heads, lambda q, k, v: self._block_attention(q, k, v, choice, call)))
        if choice.clusters is not None:
            layout, scale = choice.clusters, call.softmax_scale
            groups.append((choice.cluster_heads, lambda q, k, v: layout.attend(q, k, v, scale)))
        return groups

    def _current_choice(self, q: Tensor, k: Tensor, call: AttentionCall, choice: Choice | None) -> Choice:
        """This branch's choice (``choice``: the cached one), made anew when missing (new generation, grid
        or shape) or failing its recall check."""
        step = call.step.step
        if choice is not None and self._due_for_check(choice, step) and not choice.dense:
            if bool((self._checked_recall(q, k, choice, call, step) < self.config.recall - _RECHECK_MARGIN).any()):
                choice = None
        if choice is None:
            choice = self._choose(q, k, call)
            self.store(call, choice)
        return choice

    def _checked_recall(self, q: Tensor, k: Tensor, choice: Choice, call: AttentionCall, step: int) -> Tensor:
        """Exact recall of the block and cluster heads on this step's sampled rows, fp32 ``(B, Hb + Hc)``."""
        num_video, scale = q.shape[2], call.softmax_scale
        rows = check_rows(num_video, step).to(q.device)
        measured = []
        if choice.counts is not None:
            kept = block_kept_keys(choice.counts, choice.indices, self.config.block, num_video, rows)
            heads = choice.block_heads
            measured.append(sampled_recall(q.index_select(1, heads), k.index_select(1, heads), scale, rows, kept))
        if choice.clusters is not None:
            heads = choice.cluster_heads
            measured.append(sampled_recall(q.index_select(1, heads), k.index_select(1, heads), scale, rows,
                                           choice.clusters.kept_keys(rows)))  # fmt: skip
        return torch.cat(measured, dim=1)

    def _due_for_check(self, choice: Choice, step: int) -> bool:
        since = step - choice.step
        return since > 0 and since % self.config.recheck_every == 0

    def _choose(self, q: Tensor, k: Tensor, call: AttentionCall) -> Choice:
        """Score every candidate on exact masses and build the per-head layouts."""
        batch, heads, num_video, head_dim = q.shape
        block, target, scale = self.config.block, float(self.config.recall), call.softmax_scale
        lay = call.layout
        candidates = static_candidates(lay.frames, lay.height, lay.width, block, q.device)
        costs = kernel_costs(q.device, q.dtype, head_dim, block)
        lse = attention_lse(q, k, scale)
        choice = cat_choices([
            choose_heads(normalised_mass(q[:, c], k[:, c], lse[:, c], block, scale), candidates, target,
                         costs.break_even_density)
            for c in head_chunks(batch, heads, candidates.block_sizes.numel())
        ])  # fmt: skip
        finite = torch.isfinite(lse).all(dim=-1).all(dim=0)  # scores with NaN/Inf: dense, as given
        n_q, n_k = cluster_counts(num_video)
        clusters_cost = cluster_costs(q.device, q.dtype, head_dim, n_q, n_k, KMEANS_ITERS)
        share = clusters_cost.clustering_time * num_video / self.config.recheck_every
        on_clusters, clusters, recall, kept_pairs = self._pick_clusters(q, k, lse, scale, choice, costs, clusters_cost,
                                                                        share, finite)  # fmt: skip
        finite_flags = finite.tolist()
        guarded = choice.guarded.any(dim=0).tolist()
        dense_flags = [not on_clusters[h] and (guarded[h] or not finite_flags[h]) for h in range(heads)]
        block_flags = [not (on_clusters[h] or dense_flags[h]) for h in range(heads)]
        flags = (block_flags, on_clusters, dense_flags)
        block_heads, cluster_heads, dense_heads = (_head_indices(f, q.device) for f in flags)
        counts, indices = masks_to_layout(choice.masks[:, block_heads]) if block_heads.numel() else (None, None)
        block_pairs = float(kept_pairs[:, block_heads].sum())
        cluster_pairs = float(kept_pairs[:, cluster_heads].sum())
        head_pairs = batch * float(num_video) ** 2
        n_block, n_cluster, n_dense = block_heads.numel(), cluster_heads.numel(), dense_heads.numel()
        sparse_time = (costs.block_time(block_pairs) if n_block else 0.0) + (
            clusters_cost.call_time(cluster_pairs, share * batch * n_cluster) if n_cluster else 0.0)
        names = choice_names(candidates)
        return Choice(
            step=call.step.step,
            block_heads=block_heads,
            cluster_heads=cluster_heads,
            dense_heads=dense_heads,
            dense_head_ids=tuple(h for h, dense in enumerate(dense_flags) if dense),
            counts=counts,
            indices=indices,
            clusters=clusters,
            head_labels=tuple(tuple(CLUSTERS if on_clusters[h] else names[i] for h, i in enumerate(row))
                              for row in choice.labels.tolist()),  # fmt: skip
            recall=recall,
            density=torch.tensor((block_pairs + cluster_pairs + head_pairs * n_dense) / (head_pairs * heads),
                                 dtype=torch.float64),
            block_density=torch.tensor(block_pairs / (head_pairs * max(1, n_block)), dtype=torch.float64),
            dense=n_block + n_cluster == 0
            or not sparse_time + costs.dense_pair_time * head_pairs * n_dense < costs.dense_limit(head_pairs * heads),
        )

    def _pick_clusters(
        self, q: Tensor, k: Tensor, lse: Tensor, scale: float, choice: HeadChoice, costs: KernelCosts,
        clusters_cost: ClusterCosts, share: float, finite: Tensor,
    ) -> tuple[list[bool], ClusterLayout | None, Tensor, Tensor]:  # fmt: skip
        """Which heads take SVG2's clusters, their layout, and every head's recall fp32 ``(B, H)`` and
        kept pairs fp64 ``(B, H)`` with the cluster heads' replaced. Only heads with finite scores whose
        time to beat exceeds the k-means share plus the cluster kernel's time on the floor of kept pairs
        (:func:`~sparse_compile.methods.auto_clusters.kept_pairs_floor` on sampled rows) are clustered."""
        num_video, target = q.shape[2], float(self.config.recall)
        rows = check_rows(num_video, 0).to(q.device)
        floor = kept_pairs_floor(q, k, scale, rows, target) * clusters_cost.pair_time + share
        worth = finite & (block_or_dense_time(choice, costs, num_video).sum(dim=0) > floor.sum(dim=0))
        worth_heads = _head_indices(worth.tolist(), q.device)
        on_clusters = [False] * q.shape[1]
        if not worth_heads.numel():
            return on_clusters, None, choice.recall, choice.kept_pairs
        candidate = cluster_candidate(q, k, lse, worth_heads, scale, target)
        block_pairs, guarded = (t.index_select(1, worth_heads) for t in (choice.kept_pairs, choice.guarded))
        wins = heads_taking_clusters(block_pairs, guarded, candidate.kept_pairs, costs, clusters_cost, share, num_video)
        for h, win in zip(worth_heads.tolist(), wins.tolist()):
            on_clusters[h] = win
        if not any(on_clusters):
            return on_clusters, None, choice.recall, choice.kept_pairs
        picked, global_heads = wins.nonzero().flatten(), worth_heads[wins]
        recall = choice.recall.index_copy(1, global_heads, candidate.recall.index_select(1, picked))
        kept_pairs = choice.kept_pairs.index_copy(1, global_heads, candidate.kept_pairs.index_select(1, picked))
        return on_clusters, cluster_layout(candidate, picked), recall, kept_pairs

    def _block_attention(
        self, q: Tensor, k: Tensor, v: Tensor, choice: Choice, call: AttentionCall
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Video tokens ``(B, Hb, Sv, D)`` of the block heads -> (out, LSE fp32 ``(B, Hb, Sv)``, kept density 0-d)."""
        out, lse = fixed_block_attention(q, k, v, choice.counts, choice.indices, self.config.block, call.softmax_scale,
                                         self.options.precision)  # fmt: skip
        return out, lse, choice.block_density
