"""``method="adaspa"``: AdaSpa, blockified top-k from the exact block attention mass, head-adaptive.

The video tokens (frame-major) are cut into blocks of ``block`` tokens. At *search steps* the
exact attention mass of every (query block, key block) pair is computed from a row LSE and each
head keeps, in every query-block row, its top blocks by mass (the diagonal block always); the
number of blocks per head adapts to how concentrated the head's attention is, the mean over heads
staying at ``density`` of the blocks (:mod:`adaspa_search` has the rule). Between search steps the
layout is reused as it is and every call is one block-sparse kernel launch.

A (site, CFG branch) searches at its first sparse call of a generation, grid and shape, and at
every step of ``search_steps``; by default (``None``) at the first sparse step and at
``search_interval`` steps after it (two searches, as published). Listed steps inside the dense
steps do nothing.

The search needs the full-attention LSE of the video rows
(:func:`~sparse_compile.kernels.block_select.attention_lse`). At the last dense step
:meth:`AdaSpaMethod.observe_dense` computes and caches it, so the first search is one pass (block
mass only); without it the first search computes it. Later searches reuse the cached LSE (the
search renormalises each query block's row of masses, so a stale LSE only reweights rows within a
block). The LSE of the sparse output is never cached: it lacks the dropped mass.

A ``density`` whose budget is every block (``density=1``, or a grid of one block) runs dense SDPA.

Options:
    density: mean kept fraction of the video blocks over heads, in (0, 1]; default 0.2.
    block: query and key block size, one of 16, 32, 64, 128; default 64.
    search_steps: ``None`` (the default schedule) or a list/tuple of step indices (ints >= 0) to
        search at; an empty one searches only when there is no layout.
    search_interval: steps from the first sparse step to the second search of the default
        schedule (int >= 1, default 20); unused when ``search_steps`` is given.
    head_adaptive: split the block budget between heads by recall (default True); False keeps
        the budget in every head.

Memory: a search's block masses, fp32 ``(B, H, N, N)`` for ``N`` blocks, a chunk of heads at a
time; steady-state calls read nothing on the host and copy none of q, k, v or O.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sparse_compile.kernels.block_select import attention_lse
from sparse_compile.methods.adaspa_search import SearchResult, block_budget, search_layout, video_blocks
from sparse_compile.methods.base import AttentionCall, AttentionMethod
from sparse_compile.methods.block_kernel import fixed_block_attention
from sparse_compile.methods.text_tokens import video_text_slices
from sparse_compile.registry import (
    MethodConfig,
    bool_option,
    choice_option,
    fraction_option,
    int_option,
    register_method,
    steps_option,
)

BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class AdaSpaConfig(MethodConfig):
    """Options of ``method="adaspa"`` (see the module doc)."""

    density: float = fraction_option(0.2)
    block: int = choice_option(64, BLOCK_SIZES)
    search_steps: tuple[int, ...] | None = steps_option()
    search_interval: int = int_option(20, 1)
    head_adaptive: bool = bool_option(True)


@dataclass(frozen=True, eq=False)
class BranchState:
    """What one (site, CFG branch) keeps between calls.

    Attributes:
        lse: fp32 ``(B, H, Sv)``: full-attention LSE of the video rows (from the last dense step
            or the first search that computed it).
        search: the layout of the latest search, ``None`` before the first.
        search_step: the step of that search, ``None`` before the first.
    """

    lse: Tensor
    search: SearchResult | None
    search_step: int | None


@register_method
class AdaSpaMethod(AttentionMethod):
    """AdaSpa: per-head top-k blocks by exact block mass, searched at a few steps and reused."""

    name = "adaspa"
    config_type = AdaSpaConfig
    needs_block_kernel = True
    config: AdaSpaConfig

    def is_search_step(self, step: int) -> bool:
        """Whether ``step`` is a scheduled search step (a first sparse call searches regardless)."""
        steps = self.config.search_steps
        if steps is None:
            return step in (self.first_sparse_step, self.first_sparse_step + self.config.search_interval)
        return step in steps

    def is_extra_work_step(self, step: int) -> bool:
        """The search steps."""
        return self.is_search_step(step)

    def keeps_every_pair(self, call: AttentionCall) -> bool:
        """Whether the block budget at ``density`` is every block of this call's video tokens."""
        n = video_blocks(call.layout.video_tokens, self.config.block)
        return block_budget(float(self.config.density), n) == n

    def predicted_density(self, call: AttentionCall) -> float:
        """The block budget's share of the video blocks (the mean over heads a search keeps)."""
        n = video_blocks(call.layout.video_tokens, self.config.block)
        return block_budget(float(self.config.density), n) / n

    def plans_from_inputs(self, call: AttentionCall) -> bool:
        """When it searches: no search cached for this branch, or a search step it has not searched at."""
        return self._search_due(self.cached(call, BranchState), call.step.step)

    def _search_due(self, state: BranchState | None, step: int) -> bool:
        if state is None or state.search is None:
            return True
        return self.is_search_step(step) and state.search_step != step

    def observe_dense(self, call: AttentionCall) -> None:
        """At the last dense step, cache the video rows' full LSE so the first search is one pass."""
        if call.step.step != self.first_sparse_step - 1:
            return
        if self.dense_reason(call) is not None or self.keeps_every_pair(call):
            return
        video, _ = video_text_slices(call.layout)
        lse = attention_lse(call.query[:, :, video], call.key[:, :, video], call.softmax_scale)
        self.store(call, BranchState(lse=lse, search=None, search_step=None))

    def video_attention(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor, Tensor]:
        """Video tokens ``(B, H, Sv, D)`` -> (out ``(B, H, Sv, D)``, LSE fp32 ``(B, H, Sv)``, kept density 0-d)."""
        search = self._searched_state(q, k, call).search
        out, lse = fixed_block_attention(q, k, v, search.counts, search.indices, search.block, call.softmax_scale,
                                         self.options.precision)  # fmt: skip
        return out, lse, search.density

    def _searched_state(self, q: Tensor, k: Tensor, call: AttentionCall) -> BranchState:
        """This branch's cached state, searched anew when it has no layout or the step is a search step."""
        state = self.cached(call, BranchState)
        step = call.step.step
        if not self._search_due(state, step):
            return state
        lse = attention_lse(q, k, call.softmax_scale) if state is None else state.lse
        search = search_layout(
            q, k, lse, block=self.config.block, density=float(self.config.density),
            head_adaptive=self.config.head_adaptive, scale=call.softmax_scale,
        )  # fmt: skip
        state = BranchState(lse=lse, search=search, search_step=step)
        self.store(call, state)
        return state
