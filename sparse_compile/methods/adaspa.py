"""``method="adaspa"``: AdaSpa, blockified top-k from the exact block attention mass, head-adaptive.

The video tokens (frame-major) are cut into blocks of ``block`` tokens. At *search steps* the
exact attention mass of every (query block, key block) pair is computed from a row LSE and each
head keeps, in every query-block row, its top blocks by mass (the diagonal block always); the
number of blocks per head adapts to how concentrated the head's attention is, the mean over heads
staying at ``density`` of the blocks (:mod:`adaspa_search` has the exact rule). Between search
steps the kept layout is reused as it is (device tensors in the site's state; the op is opaque to
the compiler, so nothing recompiles) and every call is one block-sparse kernel launch.

When a (site, CFG branch) searches:

- at its first sparse call, or whenever it has no layout for the current generation, grid and
  ``(B, H, Sv)`` (so a new video always searches first);
- at every step of ``search_steps``; by default (``None``) at the first sparse step
  ``dense_steps`` and at ``dense_steps + search_interval``: two searches, as published
  (steps 10 and 30 of 50 with 10 dense steps). Listed steps inside the dense steps do nothing.

Where the LSE comes from (the "two-pass, then one-pass" search): the full-attention LSE of the
video rows, computed by :func:`~sparse_compile.kernels.block_select.attention_lse`, is cached per
(site, CFG branch) with the layout. At the last dense step (``dense_steps - 1``),
:meth:`AdaSpaMethod.observe_dense` computes and caches it, so the first search is one pass (block
mass only). A search without a cached LSE (no dense steps, a new generation or shape) computes it
first and caches it; later searches reuse it. The LSE of the sparse output is never cached: it
lacks the dropped mass. The cached LSE is only the rows' normalisation; the search renormalises
each query block's row of masses, so a stale LSE changes the ranking only through the relative
weight of the rows inside a query block. (It must stay within about 80 below the true LSE, or
``exp`` overflows fp32 in the mass pass; adjacent-enough steps are far from that.)

Caches are per CFG branch (``call.step.branch``; CFG batched in one call is one branch whose
``B`` holds both halves, each (batch element, head) searched on its own) under
``call.state.cache[("adaspa", branch)]`` (a :class:`BranchState`).

Text tokens of joint attention are dense (:func:`attend_video_and_text`). Calls the block kernels
cannot take (a non key-padding mask, head dim outside 16/32/64/128, ``Dv != D``, dtype other than
fp16/bf16/fp32) run dense through :func:`dense_fallback` (logged once per model and site, shown
in the report). A ``density`` whose budget is every block (``density=1``, or a grid of one block)
runs dense SDPA, with no search.

Options:
    density: mean kept fraction of the video blocks over heads, in (0, 1]; default 0.2 (the
        published sparsity 0.8).
    block: query and key block size, one of 16, 32, 64, 128; default 64 as published.
    search_steps: ``None`` (default: the schedule above) or a list/tuple of step indices (ints
        >= 0) to search at; an empty one searches only when there is no layout.
    search_interval: steps from the first sparse step to the second search of the default
        schedule (int >= 1, default 20); unused when ``search_steps`` is given.
    head_adaptive: split the block budget between heads by recall (default True); False keeps
        the budget in every head.

Cost of a search: the block mass is a full ``QK^T`` pass (plus one more for the LSE when none is
cached), and the ranking sorts the ``(B, H, N, N)`` masses twice, a chunk of heads at a time
(:mod:`adaspa_search`: the masses, fp32 ``(B, H, N, N)``, are the one full-size temporary); one
host read of the per-head budgets. Steady-state calls read nothing on the host. The kernel reads
q, k, v through their strides and writes the output in the op's token-major layout, so neither
call copies q, k, v or O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from sparse_compile.kernels.block_select import attention_lse
from sparse_compile.kernels.block_sparse import block_sparse_attention
from sparse_compile.methods.adaspa_search import SearchResult, block_budget, search_layout, video_blocks
from sparse_compile.methods.base import (
    AttentionCall,
    AttentionMethod,
    AttentionResult,
    MethodOption,
    bool_option,
    choice_option,
    fraction_option,
    int_option,
)
from sparse_compile.methods.dense import dense_attention
from sparse_compile.methods.fallback import block_kernel_problem, dense_fallback
from sparse_compile.methods.text_tokens import attend_video_and_text, mask_problem, video_text_slices

BLOCK_SIZES = (16, 32, 64, 128)


def _is_step_list(value: Any) -> bool:
    """``None``, or a list/tuple of ints >= 0."""
    if value is None:
        return True
    return isinstance(value, (list, tuple)) and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value
    )


@dataclass(frozen=True, eq=False)
class BranchState:
    """What one (site, CFG branch) keeps between calls.

    Attributes:
        lse: fp32 ``(B, H, Sv)``: full-attention LSE of the video rows (from the last dense step
            or the first search that computed it).
        generation: the generation it belongs to.
        grid: ``(frames, height, width)`` of the video tokens.
        search: the layout of the latest search, ``None`` before the first.
        search_step: the step of that search, ``None`` before the first.
    """

    lse: Tensor
    generation: int
    grid: tuple[int, int, int]
    search: SearchResult | None
    search_step: int | None


class AdaSpaMethod(AttentionMethod):
    """AdaSpa: per-head top-k blocks by exact block mass, searched at a few steps and reused."""

    name = "adaspa"
    is_sparse = True
    option_spec = {
        "density": fraction_option(0.2),
        "block": choice_option(64, BLOCK_SIZES),
        "search_steps": MethodOption(None, _is_step_list, "None or a list/tuple of ints >= 0"),
        "search_interval": int_option(20, 1),
        "head_adaptive": bool_option(True),
    }

    def is_search_step(self, step: int) -> bool:
        """Whether ``step`` is a scheduled search step (a first sparse call searches regardless)."""
        steps = self.params["search_steps"]
        if steps is None:
            first = self.options.dense_steps
            return step in (first, first + self.params["search_interval"])
        return step in steps

    def attend(self, call: AttentionCall) -> AttentionResult:
        problem = self._dense_reason(call)
        if problem is not None:
            return dense_fallback(call, problem)
        if self._keeps_every_block(call):
            return AttentionResult(dense_attention(call.query, call.key, call.value, call.attn_mask, call.scale), 1.0)
        return attend_video_and_text(call, lambda q, k, v: self._video_attention(q, k, v, call))

    def observe_dense(self, call: AttentionCall) -> None:
        """At the last dense step, cache the video rows' full LSE so the first search is one pass."""
        if call.step.step != self.options.dense_steps - 1:
            return
        if self._dense_reason(call) is not None or self._keeps_every_block(call):
            return
        video, _ = video_text_slices(call.layout)
        q, k = call.query[:, :, video], call.key[:, :, video]
        lse = attention_lse(q, k, self._scale(call))
        call.state.cache[("adaspa", call.step.branch)] = BranchState(
            lse=lse, generation=call.step.generation, grid=self._grid(call), search=None, search_step=None
        )

    def _video_attention(
        self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Video tokens ``(B, H, Sv, D)`` -> (out ``(B, H, Sv, D)``, LSE fp32 ``(B, H, Sv)``, kept density 0-d)."""
        scale = self._scale(call)
        state = self._state(q, k, call, scale)
        search = state.search
        out, lse = block_sparse_attention(
            q, k, v, search.counts, search.indices,
            block_q=search.block, block_k=search.block, scale=scale, return_lse=True,
        )  # fmt: skip
        return out, lse, search.density

    def _state(self, q: Tensor, k: Tensor, call: AttentionCall, scale: float) -> BranchState:
        """This branch's cached state, searched anew when it has no layout or the step is a search step."""
        key = ("adaspa", call.step.branch)
        state: BranchState | None = call.state.cache.get(key)
        step = call.step.step
        if not self._matches(state, q, call):
            state = None
        if state is not None and state.search is not None:
            if not self.is_search_step(step) or state.search_step == step:
                return state
        lse = attention_lse(q, k, scale) if state is None else state.lse
        search = search_layout(
            q, k, lse, block=self.params["block"], density=float(self.params["density"]),
            head_adaptive=self.params["head_adaptive"], scale=scale,
        )  # fmt: skip
        state = BranchState(lse=lse, generation=call.step.generation, grid=self._grid(call), search=search,
                            search_step=step)  # fmt: skip
        call.state.cache[key] = state
        return state

    @staticmethod
    def _matches(state: BranchState | None, q: Tensor, call: AttentionCall) -> bool:
        """Whether a cached state belongs to this call's generation, grid and video ``(B, H, Sv)``."""
        return (
            state is not None
            and state.generation == call.step.generation
            and state.grid == AdaSpaMethod._grid(call)
            and state.lse.shape == q.shape[:3]
            and state.lse.device == q.device
        )

    def _keeps_every_block(self, call: AttentionCall) -> bool:
        """Whether the block budget at ``density`` is every block of this call's video tokens."""
        n = video_blocks(call.layout.video_tokens, self.params["block"])
        return block_budget(float(self.params["density"]), n) == n

    @staticmethod
    def _dense_reason(call: AttentionCall) -> str | None:
        """Why this call cannot run sparse (mask or kernel limits), or ``None``."""
        return mask_problem(call.attn_mask, call.layout) or block_kernel_problem(call.query, call.value)

    @staticmethod
    def _grid(call: AttentionCall) -> tuple[int, int, int]:
        lay = call.layout
        return (lay.frames, lay.height, lay.width)

    @staticmethod
    def _scale(call: AttentionCall) -> float:
        return call.scale if call.scale is not None else call.query.shape[-1] ** -0.5
