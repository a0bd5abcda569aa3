"""Decide, from the graph alone, what each SDPA site is and whether it can be rewritten.

A site is rewritten only when it is provably a video self-attention (or joint video+text
attention) over a known token grid; everything else keeps its SDPA call and a reason. Tokens
beside the grid (text, or latents packed beside the video window: see
:mod:`sparse_compile.passes.video_window`) are context the op attends densely.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import sympy
import torch
from torch.fx.experimental.symbolic_shapes import guard_or_false

from sparse_compile.options import SparseOptions
from sparse_compile.passes.grid_reasons import GRID_HINT, no_grid_reason, several_segments_reason
from sparse_compile.passes.sdpa_sites import SdpaCall
from sparse_compile.passes.token_layout import DimLayout, Factor, Segment, TokenLayoutAnalysis, example_value, size_expr
from sparse_compile.passes.video_window import Grid, Window, context_tokens, find_window, grid_factors
from sparse_compile.runtime.session import ModelCall
from sparse_compile.runtime.sites import SiteFacts

VIDEO_SELF = "video self-attention"
JOINT = "joint video+text attention"
CROSS = "cross-attention"
SELF = "self-attention"
OTHER = "attention"


@dataclass(frozen=True)
class SitePlan:
    """The pass's plan for one SDPA site: its facts and the graph pieces the rewrite needs.

    Attributes:
        call: the SDPA call.
        facts: what was found (shapes, kind, grid and context hints, dense reason).
        grid: ``(frames, height, width)`` factors of the video tokens, or ``None``.
        text: the segments of context tokens on one side of the video (after it if any are there,
            else before it; ``facts.text_position`` says which); empty when none.
        context: the segments of context tokens on the other side (before the video when text
            follows it); empty when none.
        key_padding: for a mask built as ``valid_query & valid_key`` from one ``(B, 1, 1, S)``
            padding mask, that mask: the op takes it as a key-padding mask, and the rows of padded
            queries (every key masked: SDPA gives 0) are zeroed after it.
    """

    call: SdpaCall
    facts: SiteFacts
    grid: tuple[Factor, Factor, Factor] | None = None
    text: tuple[Segment, ...] = ()
    context: tuple[Segment, ...] = ()
    key_padding: torch.fx.Node | None = None


def _dense_plan(call: SdpaCall, q_shape: tuple[int, ...], k_shape: tuple[int, ...], kind: str, reason: str) -> SitePlan:
    return SitePlan(call, SiteFacts(call.module_path, q_shape, k_shape, kind, dense_reason=reason))


def _hints(value: torch.Tensor) -> tuple[int, ...]:
    """Example sizes, read without specialising symbolic ones (``int()`` would add guards)."""
    return tuple(size_expr(s)[1] for s in value.shape)


def _op_name(call: SdpaCall) -> str:
    target = call.node.target
    return str(getattr(target, "overloadpacket", target))


def _unsupported_argument(call: SdpaCall) -> str | None:
    for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
        if isinstance(getattr(call, name), torch.fx.Node):
            return f"{name} is not a constant in the graph"
    if call.dropout_p != 0.0:
        return f"dropout_p={call.dropout_p} (sparse attention has no dropout)"
    if call.is_causal:
        return "is_causal=True (causal attention is not a video pattern)"
    return None


def _mask_problem(call: SdpaCall) -> str | None:
    if call.attn_mask is None:
        return None
    if not isinstance(call.attn_mask, torch.fx.Node):
        return "attn_mask is not a graph tensor"
    mask = example_value(call.attn_mask)
    if not isinstance(mask, torch.Tensor):
        return "attn_mask is not a tensor"
    if mask.dtype != torch.bool:
        return f"float attn_mask ({mask.dtype}); only boolean key-padding masks are carried"
    return None


def _method(node: Any, name: str) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_method" and node.target == name


def padding_outer_product(mask: Any) -> torch.fx.Node | None:
    """The ``(B, 1, 1, S)`` padding mask ``m`` of a mask built as ``r & r.transpose(2, 3)`` with
    ``r = m.repeat(1, 1, S, 1)`` (HunyuanVideo-1.5's processor), else ``None``."""
    while _method(mask, "bool"):
        mask = mask.args[0]
    if not isinstance(mask, torch.fx.Node) or mask.target not in (operator.and_, torch.logical_and, torch.bitwise_and):
        return None
    for rows, cols in (mask.args[:2], mask.args[1::-1]):
        if not (_method(rows, "repeat") and _method(cols, "transpose") and cols.args[0] is rows):
            continue
        if sorted(a % 4 for a in cols.args[1:3]) != [2, 3]:
            continue
        padding = example_value(rows.args[0])
        seq = padding.shape[-1] if isinstance(padding, torch.Tensor) and padding.dim() == 4 else None
        if seq is not None and tuple(padding.shape[1:3]) == (1, 1) and tuple(rows.args[1:]) == (1, 1, seq, 1):
            return rows.args[0]
    return None


def split_video_text(layout: DimLayout) -> tuple[Segment, Segment, str | None] | None:
    """``(video factors, text factors, text position)`` of a sequence layout, if it has that form.

    The video part is the one segment made of three factors (frames, height, width): exactly
    three, or three besides size-1 factors (a batch of 1 merged in); at most one other segment
    (text) may precede or follow it. A layout holding a rank's piece of a sequence split between
    ranks, or an all-to-all's rank axis not rejoined with it, is never a grid.
    """
    segments = layout.segments
    if any(f.origin is not None for seg in segments for f in seg):
        return None
    grids = [grid_factors(seg) for seg in segments]
    video = [i for i, grid in enumerate(grids) if grid is not None]
    if len(video) != 1:
        return None
    i = video[0]
    if len(segments) == 1:
        return grids[0], (), None
    if len(segments) == 2:
        return grids[i], segments[1 - i], "prefix" if i == 1 else "suffix"
    return None


def _constant(n: int) -> Factor:
    return Factor(sympy.Integer(n), n, None)


def _needs_missing_source(factors: Segment) -> bool:
    return any(not f.size.is_Integer and f.source is None for f in factors)


def _window_from_options(opts: SparseOptions, call: SdpaCall, seq_len: int) -> Window:
    frames, height, width = opts.grid
    expected = frames * height * width + opts.text_tokens
    if expected != seq_len:
        raise ValueError(
            f"sparse_video option 'grid'={opts.grid} with text_tokens={opts.text_tokens} gives "
            f"{expected} tokens, but the self-attention at {call.module_path} has {seq_len}"
        )
    text = ((_constant(opts.text_tokens),),) if opts.text_tokens else ()
    grid = (_constant(frames), _constant(height), _constant(width))
    return Window(grid, text, ()) if opts.text_position == "prefix" else Window(grid, (), text)


def _sides(window: Window) -> tuple[tuple[Segment, ...], tuple[Segment, ...], str | None]:
    """``(text, context, text position)``: the text is the tokens after the video if there are any,
    else those before it; the context is the other side's."""
    if window.after:
        return window.after, window.before, "suffix"
    if window.before:
        return window.before, (), "prefix"
    return (), (), None


def plan_site(
    call: SdpaCall,
    analysis: TokenLayoutAnalysis,
    opts: SparseOptions,
    model_call: ModelCall | None = None,
    clip: Grid | None = None,
) -> SitePlan:
    """Classify one SDPA call. ``model_call``: the model call this graph is compiled in, if any;
    its grid serves a sequence of flat tokens (a fragment after a graph break). ``clip``: the token
    grid of the clip the graph returns, if found; it tells the video window of a sequence that joins
    several video segments.

    Raises:
        ValueError: the ``grid`` option does not match a video self-attention sequence.
    """
    q, k, v = (example_value(n) for n in (call.query, call.key, call.value))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or q.dim() != 4 or k.dim() != 4:
        shape = _hints(q) if isinstance(q, torch.Tensor) else ()
        return _dense_plan(call, shape, (), OTHER, "query/key are not 4-D (B, H, S, D)")
    q_shape, k_shape = _hints(q), _hints(k)
    dense = lambda kind, reason: _dense_plan(call, q_shape, k_shape, kind, reason)  # noqa: E731
    if call.returns_lse:
        return dense(OTHER, f"{_op_name(call)} also returns the log-sum-exp (diffusers' flash/cuDNN backends; ring "
                            "attention merges partial attention over KV shards with it): not rewritten")
    # SymInt comparisons guard the relation (not the sizes), so dynamic shapes stay dynamic; a
    # relation of data-dependent sizes that cannot be decided reads as False (no guard).
    kind = CROSS if guard_or_false(q.shape[2] != k.shape[2]) else SELF
    reason = _unsupported_argument(call) or _mask_problem(call)
    if reason:
        return dense(kind, reason)
    if call.enable_gqa or q_shape[1] != k_shape[1]:
        return dense(kind, f"grouped-query attention ({q_shape[1]} query heads, {k_shape[1]} key heads)")
    if any(t.requires_grad for t in (q, k, v)):
        return dense(kind, "gradient required (training): the sparse op has no backward")
    if kind == CROSS:
        return dense(kind, f"cross-attention (key length {k_shape[2]} != query length {q_shape[2]})")
    if guard_or_false(q.shape[2] < opts.min_seq_len):
        return dense(kind, f"short sequence ({q_shape[2]} tokens < min_seq_len={opts.min_seq_len})")
    from_call = False
    if opts.grid is not None:
        window = _window_from_options(opts, call, q_shape[2])
    else:
        # The clip the graph returns decides first; a sequence of one grid (and one text segment)
        # needs no clip.
        by_clip = _window_of_clip(call, analysis, clip) if clip is not None else None
        window = by_clip if isinstance(by_clip, Window) else _infer_grid(call, analysis)
        if window is None and isinstance(by_clip, str):
            return dense(kind, by_clip)
        from_call = window is None and model_call is not None and model_call.grid is not None
        if from_call:
            window = _grid_from_call(call, analysis, model_call.grid)
        if window is None:
            return dense(kind, _fragment_reason(call, analysis, model_call) or no_grid_reason(analysis.layouts(call.query)))
    text, context, position = _sides(window)
    dense_factors = tuple(f for seg in text + context for f in seg)
    if opts.grid is None and _needs_missing_source(dense_factors if from_call else window.grid + dense_factors):
        return dense(kind, "the token grid is symbolic and no tensor in the graph carries its sizes")
    grid = window.grid
    facts = SiteFacts(
        call.module_path, q_shape, k_shape, JOINT if text else VIDEO_SELF,
        grid=(grid[0].hint, grid[1].hint, grid[2].hint), text_tokens=context_tokens(text),
        text_position=position, grid_from_call=from_call, context_tokens=context_tokens(context),
    )  # fmt: skip
    return SitePlan(call, facts, grid=tuple(grid), text=text, context=context,
                    key_padding=padding_outer_product(call.attn_mask))


def _window_from_split(found: tuple[Segment, Segment, str | None]) -> Window:
    video, text, position = found
    side = (text,) if text else ()
    return Window(tuple(video), side if position == "prefix" else (), side if position == "suffix" else ())


def _infer_grid(call: SdpaCall, analysis: TokenLayoutAnalysis) -> Window | None:
    q_layouts, k_layouts = analysis.layouts(call.query), analysis.layouts(call.key)
    if q_layouts is None or k_layouts is None:
        return None
    q_found, k_found = (split_video_text(lay[-2]) for lay in (q_layouts, k_layouts))
    # Both sides must be the same video (+ text) sequence: a key of equal length that comes from
    # elsewhere (cross-attention to as many text tokens as video tokens) is not self-attention.
    if q_found is None or k_found is None:
        return None
    q_window, k_window = _window_from_split(q_found), _window_from_split(k_found)
    return q_window if _hint_shape(q_window) == _hint_shape(k_window) else None


def _window_of_clip(call: SdpaCall, analysis: TokenLayoutAnalysis, clip: Grid) -> Window | str | None:
    """The video window of a query and key that join several segments, one of which has the grid
    of the clip the graph returns; the reason to stay dense when none or several do; ``None`` for a
    sequence that is not of several segments (other rules and reasons apply)."""
    q_layouts, k_layouts = analysis.layouts(call.query), analysis.layouts(call.key)
    if q_layouts is None or k_layouts is None or len(q_layouts[-2].segments) < 2:
        return None
    q_window, k_window = (find_window(lay[-2], clip) for lay in (q_layouts, k_layouts))
    if isinstance(q_window, str):
        several = several_segments_reason(q_layouts[-2], q_window)
        return several if several is not None else None
    if isinstance(k_window, str) or _hint_shape(q_window) != _hint_shape(k_window):
        return None
    if q_window.grid is clip and not all(f.size.is_Integer for f in clip):
        return "the window's grid is symbolic and only the graph's output carries its sizes"
    return q_window


def _flat(layout: DimLayout) -> bool:
    """Whether a sequence is plain token runs: no segment with more than one axis, no rank pieces."""
    return all(f.origin is None for seg in layout.segments for f in seg) and all(
        sum(f.hint != 1 for f in seg) <= 1 for seg in layout.segments
    )


def _grid_from_call(call: SdpaCall, analysis: TokenLayoutAnalysis, grid: tuple[int, int, int]) -> Window | None:
    """The window of flat tokens whose video part is the model call's clip: their one run of
    ``frames*height*width`` tokens, the other runs context; ``None`` otherwise."""
    q_layouts, k_layouts = analysis.layouts(call.query), analysis.layouts(call.key)
    if q_layouts is None or k_layouts is None:
        return None
    seq = q_layouts[-2]
    if not _flat(seq) or not _flat(k_layouts[-2]) or [s.hint for s in (seq, k_layouts[-2])] != [seq.hint] * 2:
        return None
    window = find_window(seq, tuple(_constant(n) for n in grid))
    return window if isinstance(window, Window) else None


def _fragment_reason(call: SdpaCall, analysis: TokenLayoutAnalysis, model_call: ModelCall | None) -> str | None:
    """The reason for flat tokens in a fragment of a model call whose clip grid is unknown or not in them."""
    q_layouts = analysis.layouts(call.query)
    if model_call is None or q_layouts is None or not _flat(q_layouts[-2]):
        return None
    runs = " + ".join(str(math.prod(f.hint for f in seg)) for seg in q_layouts[-2].segments)
    where = f"the tokens ({runs}) reach this graph flat from an earlier graph of the model call"
    if model_call.grid is not None:
        frames, height, width = model_call.grid
        return (f"{where}, whose clip grid {frames}x{height}x{width} is not exactly one run of these tokens; "
                f"{GRID_HINT}")
    return f"{where}, where {model_call.grid_reason or 'no clip grid was found'}"


def _hint_shape(window: Window) -> tuple:
    return tuple(f.hint for f in window.grid), context_tokens(window.before), context_tokens(window.after)
