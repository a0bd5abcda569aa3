"""``method="auto"``: per site and head, the cheapest pattern that keeps a recall target.

**Choosing.** For one (site, CFG branch), the exact block masses of the video tokens (a row-LSE
pass and a block-mass pass, like an AdaSpa search) give every candidate's exact recall per head;
:mod:`~sparse_compile.methods.auto_choice` takes the one that reaches ``recall`` with the fewest
kept pairs (SVG's spatial and temporal bands, Radial's mask, or per-row top-p blocks); heads
past the break-even density of the device's cost model (:mod:`~sparse_compile.methods.cost_model`)
run dense, and so does the whole call when sparse would not be faster. Heads whose scores are not
finite (NaN or Inf in q or k) run dense, so they give what dense attention gives.

**When.** At the last of the ``dense_steps`` steps when they are given, else at the first sparse
call of a generation (the timestep warm-up's last step is not known ahead), or of a new grid or
shape. Every ``recheck_every`` steps after a
choice the kept layout's recall is measured exactly on ``_CHECK_ROWS`` sampled query rows (a
``rows x Sv`` product per head); the site chooses anew when a head falls more than
``_RECHECK_MARGIN`` below ``recall``.

**Running.** The sparse heads of a call share one block-sparse launch over their per-head
layouts; heads the guard sent dense (in any batch element) run dense SDPA together, and their
video rows report the LSE ``+inf`` (recall 1). Text tokens of joint attention are dense
(:func:`attend_video_and_text`). Calls the block kernels cannot take run dense with the reason
reported.

Options:
    recall: the share of each query row's softmax mass the kept keys must carry, in (0, 1];
        default 0.95.
    block: query and key block size, one of 32, 64, 128; default 64.
    recheck_every: steps between sampled-row recall checks (int >= 1); default 10.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_compile.kernels.block_select import attention_lse
from sparse_compile.kernels.block_sparse import block_sparse_attention
from sparse_compile.methods.adaspa_search import head_chunks, normalised_mass
from sparse_compile.methods.auto_choice import GUARD, choice_names, choose_heads, masks_to_layout
from sparse_compile.methods.cost_model import kernel_costs
from sparse_compile.methods.auto_patterns import static_candidates
from sparse_compile.methods.base import AttentionCall, AttentionMethod, AttentionResult, attend_split_heads
from sparse_compile.methods.text_tokens import attend_video_and_text, video_text_slices
from sparse_compile.registry import MethodConfig, choice_option, fraction_option, int_option, register_method

BLOCK_SIZES = (32, 64, 128)
_CHECK_ROWS = 64
_RECHECK_MARGIN = 0.03
_ROW_SHIFT = 7919  # a prime: each check samples other rows than the last
_CHECK_CHUNK_ENTRIES = 1 << 25  # (batch, head, row, key) scores per chunk of heads in a recall check


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
        sparse_heads, dense_heads: int64 ``(Hs,)`` / ``(Hd,)`` head indices on the call's device.
        counts, indices: the sparse heads' kernel layout, int32 ``(B, Hs, N)`` and ``(B, Hs, N, MAXK)``
            (``None`` when every head is dense).
        head_labels: the chosen candidate of each (batch element, head), ``B`` tuples of ``H``.
        recall: fp32 ``(B, H)``: each head's exact recall at the choice.
        density: fp64 0-d: kept video pairs / ``Sv**2``, mean over (batch, head).
        sparse_density: fp64 0-d: the same over the sparse heads only.
        dense: the whole call runs dense SDPA (the cost model says sparse would not be faster).
    """

    step: int
    sparse_heads: Tensor
    dense_heads: Tensor
    counts: Tensor | None
    indices: Tensor | None
    head_labels: tuple[tuple[str, ...], ...]
    recall: Tensor
    density: Tensor
    sparse_density: Tensor
    dense: bool


def sampled_recall(q: Tensor, k: Tensor, counts: Tensor, indices: Tensor, block: int, scale: float,
                   rows: Tensor) -> Tensor:
    """Exact recall of a block layout on query ``rows``: fp32 ``(B, H)``.

    q, k ``(B, H, Sv, D)``; counts/indices the kernel layout; rows int64 ``(R,)``. The recall of a
    row is the share of its full softmax mass on the keys its block keeps.
    """
    batch, heads, num_video, _ = q.shape
    n = counts.shape[-1]
    key_block = torch.arange(num_video, device=q.device) // block
    row_block = rows // block
    per_chunk = max(1, _CHECK_CHUNK_ENTRIES // (batch * rows.numel() * num_video))
    recalls = []
    for start in range(0, heads, per_chunk):
        hs = slice(start, min(start + per_chunk, heads))
        scores = (q[:, hs, rows].float() @ k[:, hs].float().transpose(-1, -2)) * scale
        probs = scores.softmax(dim=-1)
        slots = indices[:, hs][:, :, row_block].long()
        valid = torch.arange(slots.shape[-1], device=q.device) < counts[:, hs][:, :, row_block].unsqueeze(-1)
        kept = torch.zeros(*slots.shape[:-1], n + 1, dtype=torch.bool, device=q.device)
        kept.scatter_(-1, torch.where(valid, slots, n), True)
        recalls.append((probs * kept[..., key_block]).sum(dim=-1).mean(dim=-1))
    return torch.cat(recalls, dim=1)


def check_rows(num_video: int, step: int) -> Tensor:
    """``_CHECK_ROWS`` evenly spaced video rows, shifted by the step (deterministic): int64 ``(R,)``."""
    count = min(_CHECK_ROWS, num_video)
    spacing = num_video // count
    return torch.arange(count) * spacing + (step * _ROW_SHIFT) % spacing


@register_method
class AutoMethod(AttentionMethod):
    """Per head the cheapest candidate pattern reaching ``recall``; dense where sparse cannot win."""

    name = "auto"
    config_type = AutoConfig
    needs_block_kernel = True
    config: AutoConfig

    def attend(self, call: AttentionCall) -> AttentionResult:
        reason = self.dense_reason(call)
        if reason is not None:
            return AttentionResult(self._exact(call), 1.0, fallback_reason=reason)
        video, _ = video_text_slices(call.layout)
        choice = self._current_choice(call.query[:, :, video], call.key[:, :, video], call)
        heads = call.query.shape[1]
        if choice.dense:
            return AttentionResult(self._exact(call), 1.0, guarded_heads=tuple(range(heads)))
        if choice.dense_heads.numel() == 0:
            return attend_video_and_text(call, lambda q, k, v: self._video_attention(q, k, v, choice, call))
        return attend_split_heads(call, choice.sparse_heads, choice.dense_heads,
                                  lambda q, k, v: self._video_attention(q, k, v, choice, call))

    def observe_dense(self, call: AttentionCall) -> None:
        """At the last dense step, choose for the first sparse step."""
        if call.step.step != self.first_sparse_step - 1 or self.dense_reason(call) is not None:
            return
        video, _ = video_text_slices(call.layout)
        self.store(call, self._choose(call.query[:, :, video], call.key[:, :, video], call))

    def _current_choice(self, q: Tensor, k: Tensor, call: AttentionCall) -> Choice:
        """This branch's choice, made anew when missing (new generation, grid or shape) or failing
        its recall check."""
        choice = self.cached(call, Choice)
        step = call.step.step
        if choice is not None and self._due_for_check(choice, step) and not choice.dense:
            rows = check_rows(q.shape[2], step).to(q.device)
            heads = choice.sparse_heads
            measured = sampled_recall(q.index_select(1, heads), k.index_select(1, heads), choice.counts,
                                      choice.indices, self.config.block, call.softmax_scale, rows)  # fmt: skip
            if bool((measured < self.config.recall - _RECHECK_MARGIN).any()):
                choice = None
        if choice is None:
            choice = self._choose(q, k, call)
            self.store(call, choice)
        return choice

    def _due_for_check(self, choice: Choice, step: int) -> bool:
        since = step - choice.step
        return since > 0 and since % self.config.recheck_every == 0

    def _choose(self, q: Tensor, k: Tensor, call: AttentionCall) -> Choice:
        """Score every candidate on exact block masses and build the per-head layout."""
        batch, heads, num_video, head_dim = q.shape
        block, target, scale = self.config.block, float(self.config.recall), call.softmax_scale
        lay = call.layout
        candidates = static_candidates(lay.frames, lay.height, lay.width, block, q.device)
        costs = kernel_costs(q.device, q.dtype, head_dim, block)
        lse = attention_lse(q, k, scale)
        choices = [
            choose_heads(normalised_mass(q[:, c], k[:, c], lse[:, c], block, scale), candidates, target,
                         costs.break_even_density)
            for c in head_chunks(batch, heads, candidates.block_sizes.numel())
        ]  # fmt: skip
        names = choice_names(candidates)
        labels = torch.cat([c.labels for c in choices], dim=1).tolist()
        not_finite = (~torch.isfinite(lse)).any(dim=-1).any(dim=0).tolist()  # scores with NaN/Inf: dense, as given
        guarded = [not_finite[h] or any(names[row[h]] == GUARD for row in labels) for h in range(heads)]
        sparse_heads = torch.tensor([h for h in range(heads) if not guarded[h]], dtype=torch.int64, device=q.device)
        dense_heads = torch.tensor([h for h in range(heads) if guarded[h]], dtype=torch.int64, device=q.device)
        masks = torch.cat([c.masks for c in choices], dim=1)[:, sparse_heads]
        sparse_pairs = float(torch.cat([c.kept_pairs for c in choices], dim=1)[:, sparse_heads].sum())
        head_pairs = batch * float(num_video) ** 2
        counts, indices = masks_to_layout(masks) if sparse_heads.numel() else (None, None)
        return Choice(
            step=call.step.step,
            sparse_heads=sparse_heads,
            dense_heads=dense_heads,
            counts=counts,
            indices=indices,
            head_labels=tuple(tuple(names[i] for i in row) for row in labels),
            recall=torch.cat([c.recall for c in choices], dim=1),
            density=torch.tensor((sparse_pairs + head_pairs * dense_heads.numel()) / (head_pairs * heads),
                                 dtype=torch.float64),
            sparse_density=torch.tensor(sparse_pairs / (head_pairs * max(1, sparse_heads.numel())), dtype=torch.float64),
            dense=counts is None or not costs.sparse_wins(sparse_pairs, head_pairs * sparse_heads.numel()),
        )

    def _video_attention(
        self, q: Tensor, k: Tensor, v: Tensor, choice: Choice, call: AttentionCall
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Video tokens ``(B, H, Sv, D)`` -> (out, LSE fp32 ``(B, H, Sv)``, kept density 0-d)."""
        block = self.config.block
        out, lse = block_sparse_attention(
            q, k, v, choice.counts, choice.indices, block_q=block, block_k=block, scale=call.softmax_scale,
            return_lse=True,
        )  # fmt: skip
        return out, lse, choice.sparse_density
