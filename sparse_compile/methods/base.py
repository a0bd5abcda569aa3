"""The interface every attention method implements, and the recipe all of them share.

:meth:`AttentionMethod.run` is one call at a site: dense at the dense layers and warm-up steps
of the options (``dense_steps``, ``dense_timestep_fraction``; the method may observe them, e.g. to
warm its caches), dense with a reason when the
method cannot take the call (:meth:`~AttentionMethod.dense_reason`), dense when the method's
pattern keeps every pair or, on CUDA, more than the device's break-even density (the guard:
:meth:`~AttentionMethod.predicted_density` against :mod:`~sparse_compile.methods.cost_model`),
and otherwise the method's :meth:`~AttentionMethod.video_attention`
on the video tokens, merged with dense attention to and from the text tokens. Whether q, k and v
are finite (and a key-padding mask keeps every video key) is read on the host once per call: before the call
plans its pattern from them, after its kernels are launched when it reuses a cached pattern
(:meth:`~AttentionMethod.input_checked`). Methods keep
state between calls as typed entries of the site's :class:`SiteCache`, keyed by
:meth:`~AttentionMethod.cache_key`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from typing import Callable, ClassVar, Sequence, TypeVar

import torch

from sparse_compile.methods.cache import SiteCache
from sparse_compile.methods.call import AttentionCall, AttentionResult, StepInfo, TokenLayout
from sparse_compile.methods.cost_model import guard_costs
from sparse_compile.methods.exact import dense_attention
from sparse_compile.methods.fallback import block_kernel_problem, input_checks, input_problem
from sparse_compile.methods.host_read import read_while
from sparse_compile.methods.text_tokens import VideoAttention, attend_video_and_text, attention_over_keys, mask_problem
from sparse_compile.options import SparseOptions
from sparse_compile.registry import MethodConfig

__all__ = [
    "AttentionCall",
    "AttentionMethod",
    "AttentionResult",
    "CacheKey",
    "SiteCache",
    "StepInfo",
    "TokenLayout",
]

Entry = TypeVar("Entry")
T = TypeVar("T")
logger = logging.getLogger("sparse_compile")


def in_timestep_warmup(step: StepInfo, fraction: float) -> bool:
    """Whether the step's timestep is above ``1 - fraction`` of its generation's first timestep.

    Never for a forward without a timestep input, or a generation whose first timestep is not
    positive (logged once per process when ``fraction`` asks for a warm-up).
    """
    if fraction == 0:
        return False
    if step.timestep is None or step.first_timestep is None or step.first_timestep <= 0:
        _note_no_timestep_warmup()
        return False
    return step.timestep > (1 - fraction) * step.first_timestep


@functools.cache
def _note_no_timestep_warmup() -> None:
    logger.warning(
        "sparse_compile: a forward without a positive timestep input: the timestep warm-up "
        "(dense_timestep_fraction) does not apply; give dense_steps to run the first steps dense"
    )


@dataclass(frozen=True)
class CacheKey:
    """What a cached entry of a call depends on: the method's config, the video grid, ``(B, H)``,
    the head dim, dtype and device of the query."""

    config: MethodConfig
    grid: tuple[int, int, int]
    batch_heads: tuple[int, int]
    head_dim: int
    dtype: torch.dtype
    device: torch.device


def heads_of(call: AttentionCall, heads: torch.Tensor) -> AttentionCall:
    """The call restricted to ``heads`` (int64 indices): q, k, v and a per-head mask copied."""
    mask = call.attn_mask
    if mask is not None and mask.shape[1] > 1:
        mask = mask.index_select(1, heads)
    return replace(call, query=call.query.index_select(1, heads), key=call.key.index_select(1, heads),
                   value=call.value.index_select(1, heads), attn_mask=mask)


HeadGroup = tuple[torch.Tensor, VideoAttention]
"""Heads (int64 indices) that run one video attention together, and that attention."""


def attend_head_groups(
    call: AttentionCall, groups: Sequence[HeadGroup], dense_heads: torch.Tensor, dense_head_ids: tuple[int, ...]
) -> AttentionResult:
    """Each group's heads through its video attention (merged with the text tokens), ``dense_heads``
    through one dense SDPA, stitched by head (the groups non-empty and, with ``dense_heads``, a
    partition of the heads; ``dense_heads`` may be empty). ``dense_head_ids``: the same heads on the host
    (the result reports them without reading the device, which would wait for every kernel of the call).

    A video attention takes its heads' video tokens. The dense heads' video rows report the LSE
    ``+inf`` (recall 1) and count as guarded; the kept density is the mean over heads.
    """
    batch, heads = call.query.shape[:2]
    output = call.query.new_empty(call.query.shape[:-1] + (call.value.shape[-1],))
    video_lse = None
    kept: float | torch.Tensor = float(len(dense_head_ids))
    for group_heads, video_attention in groups:
        part = attend_video_and_text(heads_of(call, group_heads), video_attention)
        output[:, group_heads] = part.output
        if video_lse is None:
            video_lse = part.video_lse.new_full((batch, heads, part.video_lse.shape[-1]), torch.inf)
        video_lse[:, group_heads] = part.video_lse
        kept = kept + part.kept_density * group_heads.numel()
    if dense_head_ids:
        output[:, dense_heads] = AttentionMethod._exact(heads_of(call, dense_heads))
    return AttentionResult(output=output, kept_density=kept / heads, video_lse=video_lse, guarded_heads=dense_head_ids)


def attend_split_heads(
    call: AttentionCall, sparse_heads: torch.Tensor, dense_heads: torch.Tensor, dense_head_ids: tuple[int, ...],
    video_attention: VideoAttention,
) -> AttentionResult:  # fmt: skip
    """``sparse_heads`` through ``video_attention``, ``dense_heads`` (on the host: ``dense_head_ids``) through
    one dense SDPA (:func:`attend_head_groups` with one group)."""
    return attend_head_groups(call, ((sparse_heads, video_attention),), dense_heads, dense_head_ids)


class AttentionMethod:
    """A sparse (or dense) attention method, instantiated once per site of a compiled graph.

    Subclasses set ``name``, ``config_type`` (their :class:`MethodConfig`, validated once when the
    options are) and override :meth:`video_attention`. ``self.config`` holds the validated values.
    """

    name: ClassVar[str]
    is_sparse: ClassVar[bool] = True
    config_type: ClassVar[type[MethodConfig]] = MethodConfig
    needs_block_kernel: ClassVar[bool] = False
    """Whether calls the block kernels cannot take (:func:`block_kernel_problem`) run dense."""

    def __init__(self, options: SparseOptions) -> None:
        config = options.method_config if options.method_config is not None else self.config_type()
        if not isinstance(config, self.config_type):
            raise ValueError(
                f"method {self.name!r} takes a {self.config_type.__name__}, got a {type(config).__name__}"
            )
        self.options = options
        self.config = config

    # The schedule of dense layers and steps, decided here only.

    def layer_dense_reason(self, layer: int | None) -> str | None:
        """Why every call at video attention layer ``layer`` runs dense by the options, or ``None``."""
        if not self.is_sparse:
            return f"method={self.name!r}"
        if layer is not None and layer < self.options.dense_layers:
            return f"dense_layers={self.options.dense_layers}"
        return None

    def is_dense_step(self, step: StepInfo) -> bool:
        """Whether ``step`` is a dense warm-up step: one of the first ``dense_steps``, or one whose
        timestep is above ``1 - dense_timestep_fraction`` of its generation's first timestep."""
        return step.step < self.options.dense_steps or in_timestep_warmup(step, self.options.dense_timestep_fraction)

    def is_extra_work_step(self, step: int) -> bool:
        """Whether calls at sparse step ``step`` do scheduled work beyond a steady call (benchmarks time such
        steps one by one); the first sparse step always may."""
        return False

    @property
    def first_sparse_step(self) -> int:
        """The first step the step count lets run sparse (the timestep warm-up may keep later ones dense)."""
        return self.options.dense_steps

    def run(self, call: AttentionCall) -> AttentionResult:
        """Attention of one call at this site, following the dense schedule (see the module doc)."""
        if self.layer_dense_reason(call.layer) is not None:
            return AttentionResult(self._exact(call), 1.0, scheduled_dense=True)
        if self.is_dense_step(call.step):
            self.observe_dense(call)
            return AttentionResult(self.dense_step_attention(call), 1.0, scheduled_dense=True)
        return self.attend(call)

    def attend(self, call: AttentionCall) -> AttentionResult:
        """Attention of one call at a sparse step: sparse video attention merged with the text tokens,
        or dense with a fallback reason, or dense when the pattern keeps every pair."""
        reason = self.host_dense_reason(call)
        if reason is not None:
            return self._fallback(call, reason)
        every_pair = self.keeps_every_pair(call)
        guarded = not every_pair and self.guard_sends_dense(call)

        def attention() -> AttentionResult:
            if every_pair:
                return AttentionResult(self._exact(call), 1.0)
            if guarded:
                return self._guarded_dense(call)
            return attend_video_and_text(call, self._bound_video_attention(call))

        reason, result = self.input_checked(call, attention)
        return result if reason is None else self._fallback(call, reason)

    # What a method may refine.

    def dense_reason(self, call: AttentionCall) -> str | None:
        """Why this call cannot run sparse (:meth:`host_dense_reason`, or :func:`input_checks`: NaN or Inf in q, k
        or v, a video key masked), or ``None``. The input checks are last: they read the device."""
        problem = self.host_dense_reason(call)
        if problem is None:
            names, flags = input_checks(call)
            problem = input_problem(names, flags.tolist())
        return problem

    def input_checked(self, call: AttentionCall, work: Callable[[], T]) -> tuple[str | None, T | None]:
        """``(None, work())`` when the call passes :func:`input_checks` (q, k, v finite, no video key masked), else
        ``(why not, None)``, with one host read. It is taken before ``work`` when this call plans from its inputs
        (:meth:`plans_from_inputs`), else after ``work`` is launched, so the GPU does not idle between the read and
        ``work``'s kernels (a call reusing its pattern stores nothing, and a failed check only makes its output
        wrong, and it is dropped)."""
        names, flags = input_checks(call)
        plans = self.plans_from_inputs(call)
        read, result = read_while(flags, None if plans else work)
        reason = input_problem(names, read)
        if reason is not None:
            return reason, None
        return None, work() if plans else result

    def host_dense_reason(self, call: AttentionCall) -> str | None:
        """Why this call cannot run sparse that the host knows without reading the device (its mask's shape, the
        block kernels' limits), or ``None``."""
        problem = mask_problem(call.attn_mask, call.layout)
        if problem is None and self.needs_block_kernel:
            problem = block_kernel_problem(call.query, call.value)
        return problem

    def plans_from_inputs(self, call: AttentionCall) -> bool:
        """Whether this call computes its pattern from q and k (a profile, a search, a choice, a clustering)
        instead of reusing a cached one: it must know they are finite before it plans (a plan made from NaN
        may hold any index). Methods that cache their pattern say when they reuse it."""
        return True

    def keeps_every_pair(self, call: AttentionCall) -> bool:
        """Whether this call's pattern keeps every (query, key) pair (then dense SDPA runs instead)."""
        return False

    def predicted_density(self, call: AttentionCall) -> float | None:
        """The kept density this call will have, known before it runs on the host (``None``: not
        known without waiting for the device, so the guard does not apply)."""
        return None

    def guard_sends_dense(self, call: AttentionCall) -> bool:
        """Whether the predicted density is past the device's break-even density for the block kernel
        (:func:`~sparse_compile.methods.cost_model.guard_costs`: on CUDA only; never with the option
        ``break_even_guard=False``)."""
        density = self.predicted_density(call) if self.options.break_even_guard else None
        if density is None:
            return False
        query = call.query
        costs = guard_costs(query.device, query.dtype, query.shape[-1], getattr(self.config, "block", 64))
        return costs is not None and density > costs.break_even_density

    def observe_dense(self, call: AttentionCall) -> None:
        """Called on the calls of the dense warm-up steps (e.g. to warm caches)."""

    def dense_step_attention(self, call: AttentionCall) -> torch.Tensor:
        """The output of a call at a dense warm-up step (after :meth:`observe_dense`): dense SDPA."""
        return self._exact(call)

    def video_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, torch.Tensor, float | torch.Tensor]:
        """Attention among the video tokens ``(B, H, Sv, D)`` (frame-major, any strides); sparse
        methods override it (this one is exact).

        Returns out ``(B, H, Sv, Dv)``, its fp32 LSE ``(B, H, Sv)`` and the kept fraction of the
        ``Sv x Sv`` pairs.
        """
        out, lse = attention_over_keys(q, k, v, None, call.softmax_scale)
        return out, lse, 1.0

    # Typed cache entries.

    def cache_key(self, call: AttentionCall) -> CacheKey:
        query = call.query
        return CacheKey(self.config, call.layout.grid, (query.shape[0], query.shape[1]), query.shape[-1],
                        query.dtype, query.device)  # fmt: skip

    def cached(self, call: AttentionCall, kind: type[Entry]) -> Entry | None:
        """This branch's ``kind`` entry, if one was stored for this call's :meth:`cache_key`."""
        return call.cache.get(kind, call.step.branch, self.cache_key(call))

    def store(self, call: AttentionCall, entry: object) -> None:
        """Keep ``entry`` for this branch under this call's :meth:`cache_key`."""
        call.cache.put(call.step.branch, self.cache_key(call), entry)

    @staticmethod
    def _exact(call: AttentionCall) -> torch.Tensor:
        return dense_attention(call.query, call.key, call.value, call.attn_mask, call.scale)

    @classmethod
    def _fallback(cls, call: AttentionCall, reason: str) -> AttentionResult:
        """The call as dense SDPA because of ``reason``."""
        return AttentionResult(cls._exact(call), 1.0, fallback_reason=reason)

    @classmethod
    def _guarded_dense(cls, call: AttentionCall) -> AttentionResult:
        """The call as dense SDPA, every head counted as sent dense by the break-even guard."""
        return AttentionResult(cls._exact(call), 1.0, guarded_heads=tuple(range(call.query.shape[1])))

    def _bound_video_attention(self, call: AttentionCall) -> VideoAttention:
        return lambda q, k, v: self.video_attention(q, k, v, call)
