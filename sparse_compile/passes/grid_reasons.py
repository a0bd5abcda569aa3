"""Why a self-attention site has no token grid, in words a user understands.

Read off the query's layouts ``(B, H, S, D)`` (see :mod:`sparse_compile.passes.token_layout`)
when the site planner found no single (frames, height, width) grid in the sequence.
"""

from __future__ import annotations

from sparse_compile.passes.token_layout import DimLayout, Layouts
from sparse_compile.passes.video_window import grid_factors

GRID_HINT = "pass options grid=(frames, height, width) if the sequence is one video clip"


def _non_unit(layout: DimLayout) -> list[int]:
    return [f.hint for seg in layout.segments for f in seg if f.hint != 1]


def _axes(sizes: list[int]) -> str:
    return " x ".join(map(str, sizes))


NO_RETURNED_CLIP = ("the graph returns no clip (B, C, F, H, W) whose token grid tells which one is the video window "
                    "(a graph that holds the whole forward does: against an .item() graph break, set "
                    "torch._dynamo.config.capture_scalar_outputs = True)")


def several_segments_reason(seq: DimLayout, why: str = NO_RETURNED_CLIP) -> str | None:
    """The reason for a token sequence of several video segments (more than one segment with a
    (frames, height, width) grid, or more than two segments) whose window is unknown (``why``),
    else ``None``."""
    grids = sum(grid_factors(seg) is not None for seg in seq.segments)
    if len(seq.segments) <= 2 and grids <= 1:
        return None
    parts = ", ".join(_axes([f.hint for f in seg]) for seg in seq.segments)
    return (f"the sequence joins {len(seq.segments)} segments ({parts}): several video segments (e.g. history "
            f"latents packed beside the video window), and {why}")


def no_grid_reason(q_layouts: Layouts | None) -> str:
    """The dense reason of a self-attention site whose sequence has no single video grid.

    * several video segments (history latents packed beside the video window) of which none is
      proved to be the clip;
    * the clip's axes split between the batch and the sequence (attention within each frame,
      or across frames at each position): no attention over the whole clip;
    * a plain token axis (audio or other 1-D tokens), beside a text segment or not;
    * otherwise the layout that was found.
    """
    if q_layouts is None or len(q_layouts) != 4:
        return f"could not infer the token grid from the graph; {GRID_HINT}"
    batch, seq = q_layouts[0], q_layouts[2]
    several = several_segments_reason(seq)
    if several:
        return several
    in_batch, in_seq = _non_unit(batch), _non_unit(seq)
    if len(seq.segments) == 1 and in_batch and 1 <= len(in_seq) <= 2 and len(in_batch) + len(in_seq) >= 3:
        return (f"no video self-attention over the whole clip: the sequence holds axes {_axes(in_seq)} and the "
                f"batch holds {_axes(in_batch)} (factorized spatial or temporal attention)")
    if all(sum(f.hint != 1 for f in seg) <= 1 for seg in seq.segments):
        return (f"a plain token axis of {seq.hint} tokens with no frames x height x width structure in the graph "
                f"(audio or other non-video tokens, or tokens packed before the model); {GRID_HINT}")
    parts = ", ".join(_axes([f.hint for f in seg]) for seg in seq.segments)
    return f"could not infer the token grid from the graph (sequence layout {parts}); {GRID_HINT}"
