"""The video window of a token sequence that joins several video segments.

Some models pack latents on their own, smaller grids beside the clip they denoise (Framepack:
4x- and 2x-downsampled history and clean latents before the video window). The sparse methods
run on one grid: the window is that grid, and every other segment is *context*, attended densely
like text tokens. The window is the segment the graph can prove to be the clip it returns: the
clip's token grid is read off the unpatchify of the graph's output (:func:`returned_clip_grid`),
and exactly one segment of the sequence must have that grid (:func:`find_window`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch.fx as fx

from sparse_compile.passes.token_layout import DimLayout, Factor, Segment, TokenLayoutAnalysis, same_size

Grid = tuple[Factor, Factor, Factor]


@dataclass(frozen=True)
class Window:
    """A sequence split around its video window: the window's ``(frames, height, width)`` factors
    and the context segments before and after it (outer to inner, in sequence order)."""

    grid: Grid
    before: tuple[Segment, ...]
    after: tuple[Segment, ...]


def output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes the graph returns, in output order."""
    found: list[fx.Node] = []
    fx.node.map_arg(gm.graph.output_node().args, found.append)
    return found


def _leading(segment: Segment) -> Factor:
    """The outermost factor of a dim that is not a size-1 axis (the first factor if all are)."""
    return next((f for f in segment if f.hint != 1), segment[0])


def returned_clip_grid(gm: fx.GraphModule, analysis: TokenLayoutAnalysis) -> Grid | None:
    """The ``(frames, height, width)`` token grid of the clip the graph returns, or ``None``.

    The clip is an output ``(B, C, F, H, W)``; each of its ``F``, ``H`` and ``W`` dims leads with its
    token axis (the unpatchify of ``F' x H' x W'`` tokens makes ``F = F' * p_t``, ``H = H' * p``,
    ``W = W' * p``; a patch of one token leaves the axis alone).
    """
    for node in output_nodes(gm):
        layouts = analysis.layouts(node)
        if layouts is None or len(layouts) != 5 or any(len(lay.segments) != 1 for lay in layouts[2:]):
            continue
        axes = tuple(_leading(lay.segments[0]) for lay in layouts[2:])
        if all(f.origin is None for f in axes):
            return axes
    return None


def grid_factors(segment: Segment) -> Segment | None:
    """A segment's (frames, height, width) factors: exactly three, or three besides size-1 factors."""
    if len(segment) == 3:
        return segment
    non_unit = tuple(f for f in segment if f.hint != 1)
    return non_unit if len(non_unit) == 3 else None


def _same_grid(factors: Segment, clip: Grid) -> bool:
    return [f.hint for f in factors] == [c.hint for c in clip] and all(
        same_size(f.size, c.size) for f, c in zip(factors, clip)
    )


def _is_run(segment: Segment) -> bool:
    """Whether a segment is a plain run of tokens (at most one axis that is not size 1)."""
    return sum(f.hint != 1 for f in segment) <= 1


def _tokens(segment: Segment) -> int:
    return math.prod(f.hint for f in segment)


def find_window(seq: DimLayout, clip: Grid) -> Window | str:
    """The window of ``seq``: its one segment with the clip's grid or, in a sequence of plain token
    runs (no segment with a grid), its one run of provably as many tokens as the clip has (its axes
    are then the clip's); else why there is none, in words.

    A segment holding a rank's piece of a sequence split between ranks is never a window.
    """
    segments = seq.segments
    if any(f.origin is not None for seg in segments for f in seg):
        return "the sequence holds a piece of a sequence split between ranks"
    grids = [(i, g) for i, seg in enumerate(segments) if (g := grid_factors(seg)) is not None]
    if grids:
        matches = [i for i, g in grids if _same_grid(g, clip)]
    else:
        clip_size = sympy.Mul(*[f.size for f in clip])
        matches = [i for i, seg in enumerate(segments)
                   if _is_run(seg) and same_size(sympy.Mul(*[f.size for f in seg]), clip_size)]  # fmt: skip
    if len(matches) != 1:
        shape = "x".join(str(f.hint) for f in clip)
        which = f"none of its {len(segments)} segments has" if not matches else \
            f"{len(matches)} of its {len(segments)} segments have"
        return f"{which} the {shape} grid of the clip the model returns"
    i = matches[0]
    grid = tuple(grid_factors(segments[i])) if grids else clip
    return Window(grid, segments[:i], segments[i + 1 :])


def context_tokens(segments: tuple[Segment, ...]) -> int:
    """Number of tokens in context segments (hints)."""
    return sum(_tokens(seg) for seg in segments)
