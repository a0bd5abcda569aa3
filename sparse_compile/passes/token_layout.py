"""Forward shape analysis: how every tensor dimension of an FX graph factors into grid axes.

A video DiT builds its token sequence by merging the (frames, height, width) axes of a
patch embedding (``flatten``/``view``/8-D patchify reshapes) and concatenating text tokens
before or after it (``cat``). This pass follows those shape operations forward through the
graph and records, for each dimension, a :class:`DimLayout`: a list of concatenated
*segments*, each the product of ordered *factors* (outer to inner). The sequence dimension of
a Wan query ends up as one segment ``(T, H, W)``; CogVideoX's as ``[(text,), (T, H, W)]``.
Under context parallelism the sequence is split between ranks and reassembled by an
all-to-all before attention; :mod:`sparse_compile.passes.collectives` says how that is followed.

Sizes are sympy expressions (symbolic under dynamic shapes) with a concrete hint; grouping
decisions use the hints and every grouping is re-checked symbolically, so a layout is only
reported when it holds for every size the graph's guards admit.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import sympy
import torch
import torch.fx as fx

from sparse_compile.passes.collectives import (
    ALL_TO_ALL,
    WAIT,
    Piece,
    PieceAxis,
    RankAxis,
    collective_op,
    equal_all_to_all,
    exchange,
)


@dataclass(frozen=True)
class Factor:
    """One axis of a merged dimension.

    Attributes:
        size: the axis length (sympy; an Integer when static).
        hint: its concrete value in the traced example.
        source: ``(node, dim)`` of a tensor in the graph that has this axis as a whole dimension,
            used to read the size at run time; ``None`` if no tensor node has it (tuple outputs).
        origin: for context parallelism, a :class:`Piece` of a sequence split between ranks, the
            :class:`PieceAxis` over such pieces or the :class:`RankAxis` of an all-to-all
            (see :mod:`sparse_compile.passes.collectives`); ``None`` for a plain axis.
    """

    size: sympy.Expr
    hint: int
    source: tuple[fx.Node, int] | None
    origin: Piece | PieceAxis | RankAxis | None = None


Segment = tuple[Factor, ...]


@dataclass(frozen=True)
class DimLayout:
    """A dimension as concatenated segments, each a product of factors (outer to inner)."""

    segments: tuple[Segment, ...]

    @staticmethod
    def atomic(size: sympy.Expr, hint: int, source: tuple[fx.Node, int] | None) -> "DimLayout":
        return DimLayout(((Factor(size, hint, source),),))

    @property
    def hint(self) -> int:
        return sum(math.prod(f.hint for f in seg) for seg in self.segments)

    @property
    def size(self) -> sympy.Expr:
        return sympy.Add(*[sympy.Mul(*[f.size for f in seg]) for seg in self.segments])

    @property
    def richness(self) -> int:
        """How much structure is known: 0 for a plain dimension. Unit factors carry none."""
        return sum(max(1, sum(1 for f in seg if f.hint != 1)) for seg in self.segments) - 1

    def with_source(self, node: fx.Node, dim: int) -> "DimLayout":
        """Give unsourced single-factor segments the source ``(node, dim)`` when they span the dim."""
        if len(self.segments) == 1 and len(self.segments[0]) == 1 and self.segments[0][0].source is None:
            return DimLayout(((dataclasses.replace(self.segments[0][0], source=(node, dim)),),))
        return self


Layouts = list[DimLayout]


UNBACKED_SIZE_HINT = 8192
"""The hint of a data-dependent size where torch has no ``optimization_hint`` (before 2.12): Inductor's
default for unbacked sizes."""


def size_expr(size: int | torch.SymInt) -> tuple[sympy.Expr, int]:
    """``(sympy expression, concrete hint)`` of a (possibly symbolic) size.

    A data-dependent (unbacked) size, e.g. a length read with ``.item()``, has no value at
    compile time: its hint is an optimisation hint only, so every decision that involves it
    must be (and is) re-checked on the expressions.
    """
    if isinstance(size, torch.SymInt):
        return size.node.expr, _size_hint(size)
    return sympy.Integer(int(size)), int(size)


def _size_hint(size: torch.SymInt) -> int:
    """A concrete value for a symbolic size: torch's optimisation hint (which also hints unbacked sizes),
    or before torch 2.12 the shape environment's hint and :data:`UNBACKED_SIZE_HINT` for unbacked ones."""
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint
    except ImportError:
        hint = size.node.shape_env.size_hint(size.node.expr, allow_none=True)
        return int(UNBACKED_SIZE_HINT if hint is None else hint)
    return int(optimization_hint(size))



def same_size(a: sympy.Expr, b: sympy.Expr) -> bool:
    """True when two size expressions are provably equal."""
    if a == b:
        return True
    return sympy.expand(a - b) == 0


def example_value(node: fx.Node) -> Any:
    """The traced example value of a node (Dynamo ``example_value`` or AOT ``val``)."""
    return node.meta.get("example_value", node.meta.get("val"))


def _atomic_layouts(t: torch.Tensor, node: fx.Node | None) -> Layouts:
    out = []
    for d, s in enumerate(t.shape):
        expr, hint = size_expr(s)
        out.append(DimLayout.atomic(expr, hint, (node, d) if node is not None else None))
    return out


def _normalize_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _align_reshape(in_hints: Sequence[int], out_hints: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Group input and output dims of a reshape into minimal groups of equal product.

    A size-1 dim facing a size-1 dim pairs with it; otherwise it joins the next group (the
    last one at the end), so a leading ``T=1`` stays a factor of the merged sequence and a
    split ``(B*F) -> (1, F)`` follows the factor boundary.
    Returns ``None`` when the shapes do not align.
    """
    if 0 in in_hints or 0 in out_hints:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    pending_in: list[int] = []
    pending_out: list[int] = []
    n_in, n_out = len(in_hints), len(out_hints)
    while True:
        if i < n_in and j < n_out and in_hints[i] == 1 and out_hints[j] == 1:
            groups.append((pending_in + [i], pending_out + [j]))
            pending_in, pending_out = [], []
            i += 1
            j += 1
            continue
        if i < n_in and in_hints[i] == 1:
            pending_in.append(i)
            i += 1
            continue
        if j < n_out and out_hints[j] == 1:
            pending_out.append(j)
            j += 1
            continue
        if i >= n_in or j >= n_out:
            break
        gi, gj = pending_in + [i], pending_out + [j]
        pending_in, pending_out = [], []
        pi, pj = in_hints[i], out_hints[j]
        i += 1
        j += 1
        while pi != pj:
            if pi < pj:
                if i >= n_in:
                    return None
                gi.append(i)
                pi *= in_hints[i]
                i += 1
            else:
                if j >= n_out:
                    return None
                gj.append(j)
                pj *= out_hints[j]
                j += 1
        groups.append((gi, gj))
    if i < n_in or j < n_out:
        return None
    if pending_in or pending_out:
        if not groups:
            return None
        groups[-1][0].extend(pending_in)
        groups[-1][1].extend(pending_out)
    return groups


def _split_factors(factors: Segment, out_sizes: list[tuple[sympy.Expr, int]]) -> list[Segment] | None:
    """Split an ordered factor list into consecutive runs whose products are ``out_sizes``.

    A size-1 output takes a size-1 factor if one is next; trailing size-1 factors join the
    last run. Returns ``None`` when a run boundary falls inside a factor.
    """
    runs: list[list[Factor]] = []
    k = 0
    for expr, hint in out_sizes:
        run: list[Factor] = []
        if hint == 1:
            if k < len(factors) and factors[k].hint == 1:
                run.append(factors[k])
                k += 1
            runs.append(run)
            continue
        prod = 1
        while prod < hint:
            if k >= len(factors):
                return None
            run.append(factors[k])
            prod *= factors[k].hint
            k += 1
        if prod != hint or not same_size(sympy.Mul(*[f.size for f in run]), expr):
            return None
        runs.append(run)
    while k < len(factors) and factors[k].hint == 1 and runs:
        runs[-1].append(factors[k])
        k += 1
    if k != len(factors):
        return None
    return [tuple(run) for run in runs]


def join_pieces(factors: Segment) -> Segment:
    """``factors`` with each rank axis that gathers a piece, followed by that piece (unit axes
    between), replaced by the piece's ``whole``: all pieces in rank order are the whole axis
    (see :mod:`sparse_compile.passes.collectives`)."""
    out: list[Factor] = []
    i = 0
    while i < len(factors):
        axis = factors[i].origin
        j = i + 1
        while j < len(factors) and factors[j].size == 1:  # unit axes (batch, one local head) between
            j += 1
        piece = factors[j].origin if j < len(factors) else None
        if isinstance(axis, RankAxis) and axis.gathers is not None and piece == axis.gathers:
            out.extend(piece.whole)
            i = j + 1
        else:
            out.append(factors[i])
            i += 1
    return tuple(out)


def _split_into_pieces(factors: Segment, out_sizes: list[tuple[sympy.Expr, int]]) -> list[Segment] | None:
    """A split ``whole -> (parts, whole / parts)`` of a merged dim (two or more factors) across
    factor boundaries: the outer dim indexes ``parts`` equal consecutive pieces of ``whole``, the
    inner one lies within the piece."""
    if len(factors) < 2 or len(out_sizes) != 2 or any(hint == 1 for _, hint in out_sizes):
        return None
    (parts_expr, parts), (piece_expr, piece_hint) = out_sizes
    if not parts_expr.is_Integer or not same_size(sympy.Mul(*[f.size for f in factors]), parts_expr * piece_expr):
        return None
    return [
        (Factor(parts_expr, parts, None, PieceAxis(factors, parts)),),
        (Factor(piece_expr, piece_hint, None, Piece(factors, parts, None)),),
    ]


def reshape_layouts(node: fx.Node, in_layouts: Layouts, in_shape: Sequence, out_shape: Sequence) -> Layouts:
    """Layouts of a reshape's output: merges concatenate factors (rejoining sequence pieces
    gathered by an all-to-all), splits follow factor boundaries or else split into pieces."""
    out_sizes = [size_expr(s) for s in out_shape]
    in_sizes = [size_expr(s) for s in in_shape]
    out: list[DimLayout | None] = [None] * len(out_sizes)
    groups = _align_reshape([h for _, h in in_sizes], [h for _, h in out_sizes])
    if groups is not None:
        for gi, gj in groups:
            if not gj:
                continue
            if len(gi) == 1 and len(gj) == 1 and in_sizes[gi[0]][1] == out_sizes[gj[0]][1]:
                if same_size(in_sizes[gi[0]][0], out_sizes[gj[0]][0]):
                    out[gj[0]] = in_layouts[gi[0]]
                continue
            if any(len(in_layouts[d].segments) != 1 for d in gi):
                continue
            merged: Segment = tuple(f for d in gi for f in in_layouts[d].segments[0])
            if not same_size(sympy.Mul(*[f.size for f in merged]), sympy.Mul(*[out_sizes[d][0] for d in gj])):
                continue
            runs = _split_factors(merged, [out_sizes[d] for d in gj])
            if runs is None:
                runs = _split_into_pieces(join_pieces(merged), [out_sizes[d] for d in gj])
            if runs is None:
                continue
            for d, run in zip(gj, runs):
                out[d] = DimLayout((join_pieces(run),)).with_source(node, d) if run else None
    return [
        layout if layout is not None else DimLayout.atomic(expr, hint, (node, d))
        for d, (layout, (expr, hint)) in enumerate(zip(out, out_sizes))
    ]


def _richest(candidates: list[DimLayout]) -> DimLayout | None:
    best = None
    for c in candidates:
        if best is None or c.richness > best.richness:
            best = c
    return best


def elementwise_layouts(node: fx.Node, out: torch.Tensor, inputs: list[tuple[torch.Tensor, Layouts]]) -> Layouts:
    """Broadcasting rule for any other op: an output dim inherits the richest layout of an input
    dim of the same size at the same position counted from the right."""
    result = []
    rank = out.dim()
    for d, s in enumerate(out.shape):
        expr, hint = size_expr(s)
        from_right = rank - d
        candidates = []
        for t, lay in inputs:
            if t.dim() >= from_right:
                in_d = t.dim() - from_right
                if lay[in_d].hint == hint and same_size(lay[in_d].size, expr):
                    candidates.append(lay[in_d])
        best = _richest(candidates)
        result.append(best if best is not None else DimLayout.atomic(expr, hint, (node, d)))
    return result


_RESHAPE_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_RESHAPE_FUNCTIONS = {torch.reshape, torch.flatten, torch.unflatten, torch.squeeze, torch.unsqueeze}
_SPLIT_METHODS = {"split", "chunk", "unbind", "split_with_sizes", "tensor_split"}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.unbind, torch.tensor_split}


def _is(node: fx.Node, methods: set[str], functions: set[Callable]) -> bool:
    if node.op == "call_method":
        return node.target in methods
    return node.op == "call_function" and node.target in functions


def _hint_of(bound: Any) -> Any:
    """A slice bound as a concrete int (graph nodes and SymInts through their example value)."""
    if isinstance(bound, fx.Node):
        bound = example_value(bound)
    if isinstance(bound, torch.SymInt):
        return size_expr(bound)[1]
    return bound


def _index_layouts(node: fx.Node, in_layouts: Layouts, index: Any, out: torch.Tensor) -> Layouts | None:
    """Layouts of ``x[index]`` for basic indexing (ints, slices, ``None``, ``...``).

    A slice with step 1 that covers whole segments of a joined dim keeps them, so
    ``hidden[:, text_len:]`` keeps the video factors of ``cat([text, video])``.
    Returns ``None`` for advanced indexing.
    """
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
        return None
    specified = sum(1 for i in items if i is not None and i is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (len(in_layouts) - specified)
    items += [slice(None)] * (len(in_layouts) - sum(1 for i in items if i is not None))
    result: Layouts = []
    in_d = 0
    for item in items:
        if isinstance(item, int):
            in_d += 1
            continue
        out_d = len(result)
        expr, hint = size_expr(out.shape[out_d])
        if item is None:
            result.append(DimLayout.atomic(expr, hint, (node, out_d)))
            continue
        layout = in_layouts[in_d]
        start, stop, step = slice(_hint_of(item.start), _hint_of(item.stop), _hint_of(item.step)).indices(layout.hint)
        if (start, stop, step) == (0, layout.hint, 1) and same_size(layout.size, expr):
            result.append(layout)
        elif step == 1:
            result.append(TokenLayoutAnalysis._piece(layout, start, (expr, hint)).with_source(node, out_d))
        else:
            result.append(DimLayout.atomic(expr, hint, (node, out_d)))
        in_d += 1
    return result if len(result) == out.dim() else None


def _equal_piece(layout: DimLayout, sizes: list[tuple[sympy.Expr, int]], index: int) -> DimLayout | None:
    """Piece ``index`` of a one-segment dim split into ``len(sizes) >= 2`` equal pieces, as one
    :class:`Piece` factor; ``None`` otherwise (unequal pieces keep whole segments or nothing).
    A piece of one element carries no token structure (``chunk(6, dim=1)`` of a modulation
    table, ``chunk(2, dim=-1)`` of (start, end) coordinates): ``None`` as well."""
    parts = len(sizes)
    expr, hint = sizes[index]
    if parts < 2 or len(layout.segments) != 1 or any(h != hint for _, h in sizes) or expr == 1:
        return None
    if not same_size(layout.size, parts * expr):
        return None
    return DimLayout(((Factor(expr, hint, None, Piece(layout.segments[0], parts, index)),),))


class TokenLayoutAnalysis:
    """Runs the forward analysis over a graph; :meth:`layouts` answers per node."""

    def __init__(self, gm: fx.GraphModule):
        self._layouts: dict[fx.Node, Any] = {}
        for node in gm.graph.nodes:
            value = example_value(node)
            try:
                result = self._visit(node, value)
            except Exception:  # an op this analysis does not model: its dims carry no structure
                result = self._fallback(node, value)
            if result is not None:
                self._layouts[node] = result

    def layouts(self, node: fx.Node) -> Layouts | None:
        """Per-dim layouts of a tensor-valued node, or ``None`` if unknown."""
        result = self._layouts.get(node)
        return result if isinstance(result, list) else None

    # -- helpers -------------------------------------------------------------------------
    def _fallback(self, node: fx.Node, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return _atomic_layouts(value, node)
        if isinstance(value, (tuple, list)) and all(isinstance(v, torch.Tensor) for v in value):
            return tuple(_atomic_layouts(v, None) for v in value)
        return None

    def _input(self, arg: Any) -> tuple[torch.Tensor, Layouts] | None:
        if not isinstance(arg, fx.Node):
            return None
        value = example_value(arg)
        lay = self.layouts(arg)
        if isinstance(value, torch.Tensor) and lay is not None and len(lay) == value.dim():
            return value, lay
        return None

    def _tensor_inputs(self, node: fx.Node) -> list[tuple[torch.Tensor, Layouts]]:
        found = []
        for arg in node.all_input_nodes:
            item = self._input(arg)
            if item is not None:
                found.append(item)
        return found

    # -- rules ---------------------------------------------------------------------------
    def _visit(self, node: fx.Node, value: Any) -> Any:
        if node.op == "call_function" and node.target is operator.getitem:
            return self._getitem(node, value)
        if isinstance(value, torch.Tensor):
            return self._tensor_rule(node, value)
        if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return self._tuple_rule(node, value)
        return None

    def _getitem(self, node: fx.Node, value: Any) -> Any:
        container, index = node.args
        parent = self._layouts.get(container) if isinstance(container, fx.Node) else None
        if isinstance(parent, tuple) and isinstance(index, int) and isinstance(value, torch.Tensor):
            return [lay.with_source(node, d) for d, lay in enumerate(parent[index])]
        if isinstance(value, torch.Tensor):
            source = self._input(container)
            if source is not None:
                sliced = _index_layouts(node, source[1], index, value)
                if sliced is not None:
                    return sliced
            return self._tensor_rule(node, value)
        return None

    def _tensor_rule(self, node: fx.Node, value: torch.Tensor) -> Layouts:
        first = self._input(node.args[0]) if node.args else None
        if first is not None and _is(node, _RESHAPE_METHODS, _RESHAPE_FUNCTIONS):
            return reshape_layouts(node, first[1], first[0].shape, value.shape)
        if first is not None and node.target in ("transpose", torch.transpose, "swapaxes", torch.swapaxes):
            d0, d1 = (_normalize_dim(int(a), value.dim()) for a in node.args[1:3])
            lay = list(first[1])
            lay[d0], lay[d1] = lay[d1], lay[d0]
            return lay
        if first is not None and node.target in ("permute", torch.permute):
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)) else node.args[1:]
            return [first[1][_normalize_dim(int(d), value.dim())] for d in dims]
        if node.op == "call_function" and node.target in (torch.cat, torch.concat):
            return self._cat(node, value)
        if node.op == "call_function" and node.target is torch.stack:
            return self._stack(node, value)
        collective = collective_op(node)
        if collective is not None:
            return self._collective(node, collective, value, first)
        return elementwise_layouts(node, value, self._tensor_inputs(node))

    def _cat(self, node: fx.Node, value: torch.Tensor) -> Layouts:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dim = _normalize_dim(dim, value.dim())
        parts = [self._input(t) for t in tensors]
        parts = [p for p in parts if p is not None and p[0].dim() == value.dim()]
        result = elementwise_layouts(node, value, parts)
        if len(parts) == len(tensors):
            segments = tuple(seg for t, lay in parts if lay[dim].hint > 0 for seg in lay[dim].segments)
            joined = DimLayout(segments)
            expr, hint = size_expr(value.shape[dim])
            if joined.hint == hint and same_size(joined.size, expr):
                result[dim] = joined
        return result

    def _collective(self, node: fx.Node, op: str, value: torch.Tensor, first: tuple[torch.Tensor, Layouts] | None) -> Layouts:
        """``wait_tensor`` keeps its input's layouts. An equal-split ``all_to_all_single`` over
        ``n`` ranks scatters the leading ``n``-factor of dim 0 and puts the source-rank axis in its
        place; the other factors keep their meaning (every rank's block has the same layout),
        except that a piece selected by a scattered :class:`PieceAxis` becomes this rank's piece.
        Any other collective's dims are plain."""
        if first is None or op not in (WAIT, ALL_TO_ALL):
            return _atomic_layouts(value, node)
        if op == WAIT:
            return list(first[1])
        a2a = equal_all_to_all(node, _hint_of)
        in_lay = first[1]
        segments = in_lay[0].segments
        if a2a is None or len(segments) != 1 or segments[0][0].hint != a2a.parts:
            expr, hint = size_expr(value.shape[0])
            return [DimLayout.atomic(expr, hint, (node, 0))] + list(in_lay[1:])
        lead, rest = segments[0][0], segments[0][1:]
        others = [f.origin for f in rest] + [f.origin for lay in in_lay[1:] for seg in lay.segments for f in seg]
        axis, received = exchange(lead.origin, others, a2a)

        def renamed(segment: Segment) -> Segment:
            return tuple(dataclasses.replace(f, origin=received(f.origin)) for f in segment)

        rank_axis = Factor(sympy.Integer(a2a.parts), a2a.parts, None, axis)
        return [DimLayout(((rank_axis,) + renamed(rest),))] + [
            DimLayout(tuple(renamed(seg) for seg in lay.segments)) for lay in in_lay[1:]
        ]

    def _stack(self, node: fx.Node, value: torch.Tensor) -> Layouts:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dim = _normalize_dim(dim, value.dim())
        parts = [p for p in (self._input(t) for t in node.args[0]) if p is not None]
        # A stacked input dim d sits at output dim d (d < dim) or d + 1 (d >= dim).
        result = []
        for d, s in enumerate(value.shape):
            expr, hint = size_expr(s)
            if d == dim or not parts:
                result.append(DimLayout.atomic(expr, hint, (node, d)))
                continue
            in_d = d if d < dim else d - 1
            result.append(_richest([lay[in_d] for _, lay in parts]) or DimLayout.atomic(expr, hint, (node, d)))
        return result

    def _tuple_rule(self, node: fx.Node, values: Sequence[torch.Tensor]) -> tuple[Layouts, ...]:
        first = self._input(node.args[0]) if node.args else None
        if node.op == "call_function" and node.target is torch.meshgrid:
            return self._meshgrid(node, values)
        if first is None or not _is(node, _SPLIT_METHODS, _SPLIT_FUNCTIONS):
            return tuple(_atomic_layouts(v, None) for v in values)
        in_value, in_lay = first
        if node.target in ("unbind", torch.unbind):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            dim = _normalize_dim(dim, in_value.dim())
            kept = in_lay[:dim] + in_lay[dim + 1 :]
            return tuple(list(kept) for _ in values)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        dim = _normalize_dim(dim, in_value.dim())
        outs = []
        offset = 0
        sizes = [size_expr(v.shape[dim]) for v in values]
        for index, size in enumerate(sizes):
            lay = list(in_lay)
            lay[dim] = _equal_piece(in_lay[dim], sizes, index) or self._piece(in_lay[dim], offset, size)
            offset += size[1]
            outs.append(lay)
        return tuple(outs)

    @staticmethod
    def _piece(layout: DimLayout, offset: int, size: tuple[sympy.Expr, int]) -> DimLayout:
        """The part ``[offset, offset + size)`` of a dim: whole segments keep their factors."""
        start = 0
        picked: list[Segment] = []
        for seg in layout.segments:
            length = math.prod(f.hint for f in seg)
            if start >= offset and start + length <= offset + size[1]:
                picked.append(seg)
            start += length
        piece = DimLayout(tuple(picked))
        if picked and piece.hint == size[1] and same_size(piece.size, size[0]):
            return piece
        return DimLayout.atomic(size[0], size[1], None)

    def _meshgrid(self, node: fx.Node, values: Sequence[torch.Tensor]) -> tuple[Layouts, ...]:
        axes = []
        for arg in (node.args[0] if len(node.args) == 1 and isinstance(node.args[0], (list, tuple)) else node.args):
            item = self._input(arg)
            if item is None or item[0].dim() != 1:
                return tuple(_atomic_layouts(v, None) for v in values)
            axes.append(item[1][0])
        if node.kwargs.get("indexing", "ij") == "xy" and len(axes) >= 2:
            axes[0], axes[1] = axes[1], axes[0]
        return tuple(list(axes) for _ in values)
