"""``method="svg"``: Sparse VideoGen, a spatial or a temporal band per head, chosen online.

Per call, on the video tokens (frame-major ``frames x height x width``):

1. Patterns (:mod:`svg_patterns`, cached per grid, ``block`` and ``density``): *spatial* keeps
   the frames within ``±n`` of the query's frame, *temporal* the positions within ``±m`` of the
   query's position across all frames; both keep the first frame (attention sink). Band widths
   are the widest whose block layout keeps at most ``density`` of the video pairs.
2. Profiling (:mod:`svg_profile`): ``profile_rows`` sampled query rows, exact against both
   masked variants; each (batch element, head) takes the pattern with the smaller error. The
   choice and everything derived from it (a :class:`HeadPlan`) is cached in the site's cache per
   CFG branch and renewed every ``profile_every`` steps (default 1: every step, as published) and
   on a new generation, grid or shape.
3. One block-sparse kernel launch over all heads, with the layout transform fused into it:
   each head gets its pattern's layout and a token permutation, the temporal order (sink first,
   then position-major, :func:`~sparse_compile.methods.svg_patterns.temporal_permutation`) for
   temporal heads and the identity for spatial heads; the kernel reads q, k, v and writes O and
   LSE through it (``q_perm`` = ``kv_perm``). q, k, v are never copied into the temporal order
   and back: the kernel reads the caller's tensors (any strides, e.g. the ``(B, S, H, D)``
   storage of a diffusers call) and writes O and LSE in frame-major token order, O laid out as a
   contiguous ``(B, Sv, H, D)``: the layout the backend's op returns without a copy.

Text tokens of joint attention go through :func:`attend_video_and_text` (dense text rows and
columns); masks other than key padding, head dims or dtypes the block kernel lacks, and
``D != Dv`` run dense, logged once per site. No step reads a device value on the host
besides the check for NaN or Inf in q, k and v.

Memory beyond the output and LSE: the profile's scores, O(chunk heads x ``profile_rows`` x Sv)
(:mod:`svg_profile`, freed before the kernel runs), the plan's permutation, int32 ``(B, H, Sv)``,
and its layouts, int32 ``(B, H, NQ, MAXK)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_compile.kernels.block_sparse import block_sparse_attention
from sparse_compile.methods.base import AttentionCall, AttentionMethod
from sparse_compile.methods.svg_patterns import SvgPatterns, build_patterns
from sparse_compile.methods.svg_profile import classify_heads, sample_rows
from sparse_compile.registry import MethodConfig, choice_option, fraction_option, int_option, register_method

BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True, eq=False)
class HeadPlan:
    """One profiling result of a (site, CFG branch) and the per-head kernel inputs derived from it.

    Attributes:
        head_is_temporal: bool ``(B, H)``.
        perm: int32 ``(B, H, Sv)``: frame-major token at each kernel-order slot of each head (the
            kernel's ``q_perm`` and ``kv_perm``).
        counts: int32 ``(B, H, NQ)``; indices: int32 ``(B, H, NQ, MAXK)``: each head's layout.
        density: fp32 0-d: kept fraction of the video pairs, averaged over (batch, head).
        patterns: the patterns the plan was built from.
        step: when it was profiled.
    """

    head_is_temporal: Tensor
    perm: Tensor
    counts: Tensor
    indices: Tensor
    density: Tensor
    patterns: SvgPatterns
    step: int


def plan_heads(head_is_temporal: Tensor, patterns: SvgPatterns, step: int) -> HeadPlan:
    """Per-head token permutations and layouts for a choice ``head_is_temporal`` bool ``(B, H)``."""
    spatial, temporal = patterns.spatial, patterns.temporal
    identity = torch.arange(patterns.to_temporal.numel(), dtype=torch.int32, device=head_is_temporal.device)
    is_t = head_is_temporal[..., None]
    maxk = max(spatial.indices.shape[1], temporal.indices.shape[1])
    s_idx = F.pad(spatial.indices, (0, maxk - spatial.indices.shape[1]))
    t_idx = F.pad(temporal.indices, (0, maxk - temporal.indices.shape[1]))
    return HeadPlan(
        head_is_temporal=head_is_temporal,
        perm=torch.where(is_t, patterns.to_temporal, identity),
        counts=torch.where(is_t, temporal.counts, spatial.counts),
        indices=torch.where(is_t[..., None], t_idx, s_idx),
        density=torch.where(head_is_temporal, temporal.kept, spatial.kept).mean(),
        patterns=patterns,
        step=step,
    )


def run_plan(q: Tensor, k: Tensor, v: Tensor, plan: HeadPlan, scale: float) -> tuple[Tensor, Tensor]:
    """Block-sparse attention of frame-major video tokens ``(B, H, Sv, D)`` (any strides) under ``plan``.

    Returns ``out (B, H, Sv, D)`` token-major and ``lse`` fp32 ``(B, H, Sv)``, both frame-major.
    """
    block = plan.patterns.block
    return block_sparse_attention(
        q, k, v, plan.counts, plan.indices, block_q=block, block_k=block,
        q_perm=plan.perm, kv_perm=plan.perm, scale=scale, return_lse=True,
    )  # fmt: skip


@dataclass(frozen=True)
class SvgConfig(MethodConfig):
    """Options of ``method="svg"`` (see the module doc)."""

    density: float = fraction_option(0.25)
    block: int = choice_option(128, BLOCK_SIZES)
    profile_rows: int = int_option(64, 1)
    profile_every: int = int_option(1, 1)


@register_method
class SvgMethod(AttentionMethod):
    """Sparse VideoGen: per-head spatial or temporal block band, profiled on sampled rows."""

    name = "svg"
    config_type = SvgConfig
    needs_block_kernel = True
    config: SvgConfig

    def patterns_for(self, call: AttentionCall) -> SvgPatterns:
        """Both candidate patterns of this call's grid (cached per grid, block, density, device)."""
        return build_patterns(*call.layout.grid, self.config.block, float(self.config.density), call.query.device)

    def predicted_density(self, call: AttentionCall) -> float:
        """The denser of the two patterns (a head runs one of them)."""
        patterns = self.patterns_for(call)
        return max(patterns.spatial.kept, patterns.temporal.kept)

    def plans_from_inputs(self, call: AttentionCall) -> bool:
        """When it profiles the heads: no plan cached for this branch, or its profile is due."""
        return self._profile_due(self.cached(call, HeadPlan), call.step.step)

    def _profile_due(self, plan: HeadPlan | None, step: int) -> bool:
        return plan is None or not 0 <= step - plan.step < self.config.profile_every

    def _plan(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> HeadPlan:
        """The cached plan of this CFG branch, or a fresh profile when it is due or there is none."""
        plan = self.cached(call, HeadPlan)
        step = call.step.step
        if self._profile_due(plan, step):
            patterns = self.patterns_for(call)
            rows = sample_rows(q.shape[2], self.config.profile_rows, q.device)
            plan = plan_heads(classify_heads(q, k, v, patterns, rows, call.softmax_scale), patterns, step)
            self.store(call, plan)
        return plan

    def video_attention(self, q: Tensor, k: Tensor, v: Tensor, call: AttentionCall):
        """SVG attention of video tokens ``(B, H, Sv, D)`` -> (out, lse fp32 ``(B, H, Sv)``, kept density)."""
        plan = self._plan(q, k, v, call)
        out, lse = run_plan(q, k, v, plan, call.softmax_scale)
        return out, lse, plan.density
