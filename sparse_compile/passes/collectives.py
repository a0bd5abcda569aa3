"""What context-parallel collectives do to the token sequence (diffusers' Ulysses attention).

diffusers' context parallelism gives each of the ``n`` ranks of a group one equal piece of the
sequence (``hidden_states.chunk(n, dim=1)[rank]``). Ulysses attention trades heads for sequence
with one ``all_to_all_single`` per q/k/v over a flattened ``(n, S/n, B, H/n, D)`` buffer: block
``i`` goes to rank ``i``, and afterwards dim 0 indexes the *source* rank, whose block holds that
rank's piece, so ``flatten(0, 1)`` is the whole sequence again, in order, over ``H/n`` heads. The
output goes back the other way: ``(B, S, H/n, D) -> (B, n, S/n, H/n, D)`` puts the pieces on an
axis, which the all-to-all scatters (rank ``r`` receives piece ``r`` from every rank).

Factor origins let the layout analysis follow this:

- :class:`Piece` — the factor lies within piece ``index`` of ``parts`` equal consecutive pieces
  of the factors ``whole`` (``chunk`` of a merged dim); ``index=None``: within the piece that the
  tensor's :class:`PieceAxis` selects (a reshape ``whole -> (parts, whole / parts)``);
- :class:`PieceAxis` — the factor indexes those pieces;
- :class:`RankAxis` — the source-rank axis an equal-split all-to-all puts first.

An all-to-all whose scattered axis is a :class:`PieceAxis` leaves rank ``r`` piece ``r``. One whose
blocks hold the sender's own piece (index == the sender's rank in the all-to-all group: checked
in each process for itself, every rank running the same graph with its own rank) gathers the
pieces: its rank axis records the piece, and a merge of that axis with the piece (outer to inner,
unit axes between) is ``whole``. Any other collective moves data the analysis does not model, so
its output dims carry no structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

ALL_TO_ALL = "_c10d_functional::all_to_all_single"
WAIT = "_c10d_functional::wait_tensor"


@dataclass(frozen=True)
class Piece:
    """Within piece ``index`` of ``parts`` equal consecutive pieces of ``whole`` (factors, outer to
    inner); ``index=None``: within the piece the tensor's :class:`PieceAxis` selects."""

    whole: tuple[Any, ...]
    parts: int
    index: int | None


@dataclass(frozen=True)
class PieceAxis:
    """The axis over the ``parts`` equal consecutive pieces of ``whole``."""

    whole: tuple[Any, ...]
    parts: int


@dataclass(frozen=True)
class RankAxis:
    """The source-rank axis an all-to-all over ``parts`` ranks puts first. ``gathers``: the piece
    whose rank-``i`` instance block ``i`` holds (every rank sent its own piece), or ``None``."""

    parts: int
    gathers: Piece | None


@dataclass(frozen=True)
class AllToAll:
    """An equal-split all-to-all over ``parts`` ranks, seen from the process of rank ``rank``."""

    parts: int
    rank: int


def collective_op(node: fx.Node) -> str | None:
    """The qualified name of the functional collective (``torch.ops._c10d_functional.*``) a node
    calls, e.g. :data:`ALL_TO_ALL`, else ``None``.

    Dynamo records the op packet, later graphs the ``.default`` overload; both are recognised.
    """
    if node.op != "call_function":
        return None
    target = getattr(node.target, "overloadpacket", node.target)
    name = getattr(target, "_qualified_op_name", None) if isinstance(target, torch._ops.OpOverloadPacket) else None
    return name if name is not None and name.startswith("_c10d_functional::") else None


def equal_all_to_all(node: fx.Node, split_hint: Any) -> AllToAll | None:
    """An ``all_to_all_single`` whose splits are all equal, else ``None``.

    Args:
        node: an ``all_to_all_single(input, output_split_sizes, input_split_sizes, group_name)`` node.
        split_hint: maps a split size (int, SymInt or graph node) to its concrete value.

    Returns ``None`` also when the group is not a live process group of this process.
    """
    _, out_splits, in_splits, group_name = node.args
    if not out_splits or not in_splits:
        return None
    try:
        group = torch.distributed.distributed_c10d._resolve_process_group(group_name)
    except Exception:  # not a live process group of this process
        return None
    parts = group.size()
    sizes = [split_hint(s) for s in (*out_splits, *in_splits)]
    if len(sizes) != 2 * parts or len(set(sizes)) != 1:
        return None
    return AllToAll(parts, group.rank())


def exchange(scattered: Any, origins: list[Any], a2a: AllToAll) -> tuple[RankAxis, Callable[[Any], Any]]:
    """The source-rank axis of an all-to-all's output, and how the origins of its other factors change.

    Args:
        scattered: origin of the scattered (leading) factor of the input's dim 0.
        origins: origins of all other factors of the input.
        a2a: the all-to-all.

    A piece the input holds as its own (index == this rank; on rank ``i`` it is piece ``i``) is
    what the rank axis gathers. A piece selected by a scattered :class:`PieceAxis` becomes this
    rank's piece (every source sent it its piece ``rank``); other origins are unchanged.
    """
    own = {o for o in origins if isinstance(o, Piece) and (o.parts, o.index) == (a2a.parts, a2a.rank)}
    axis = RankAxis(a2a.parts, own.pop() if len(own) == 1 else None)
    if not isinstance(scattered, PieceAxis) or scattered.parts != a2a.parts:
        return axis, lambda origin: origin
    selected = Piece(scattered.whole, scattered.parts, None)
    mine = Piece(scattered.whole, scattered.parts, a2a.rank)
    return axis, lambda origin: mine if origin == selected else origin
