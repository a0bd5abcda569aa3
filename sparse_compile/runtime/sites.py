"""Records of the attention sites the pass found, looked up by the custom op at run time."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any

from sparse_compile.methods.base import AttentionMethod
from sparse_compile.options import SparseOptions
from sparse_compile.runtime.session import Session

_site_ids = itertools.count()
_graph_ids = itertools.count()
SITES: dict[int, "SiteRecord"] = {}
GRAPHS: dict[int, "GraphRecord"] = {}
_lock = threading.Lock()


@dataclass
class SiteRecord:
    """One SDPA site of one compiled graph: what the pass found, fixed at compile time.

    Per-model run-time state (densities, caches) lives in the model's
    :class:`~sparse_compile.runtime.session.Session`.

    Attributes:
        site_id: the constant baked into the graph's op call.
        module_path: e.g. ``blocks.3.attn1``.
        q_shape, k_shape: example shapes ``(B, H, S, D)`` at compile time.
        kind: video self-attention, joint attention, cross-attention, ...
        grid: ``(frames, height, width)`` at compile time (symbolic sizes as their example values).
        text_tokens, text_position: joint text placement (0 / ``None`` without text).
        method: name of the method the options ask for.
        status: ``"sparse"`` or ``"dense: <reason>"``.
        layer_index: position among the model's video attention sites (``None`` if not rewritten).
        options: the options the graph was compiled with.
        attention: the method instance run at this site (``None`` when not rewritten).
    """

    site_id: int
    module_path: str
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    kind: str
    grid: tuple[int, int, int] | None
    text_tokens: int
    text_position: str | None
    method: str
    status: str
    layer_index: int | None
    options: SparseOptions
    attention: AttentionMethod | None = None

    @property
    def rewritten(self) -> bool:
        return self.attention is not None


@dataclass
class GraphRecord:
    """All SDPA sites of one compiled graph, and the session of the model it was compiled for
    (the fallback for graphs without parameters, whose callers cannot be told apart)."""

    graph_id: int
    compile_session: Session
    sites: list[SiteRecord]


def register_site(**fields: Any) -> SiteRecord:
    """Create a site record with a fresh id and add it to the global table."""
    with _lock:
        record = SiteRecord(site_id=next(_site_ids), **fields)
        SITES[record.site_id] = record
    return record


def register_graph(compile_session: Session, sites: list[SiteRecord]) -> GraphRecord:
    """Record a compiled graph's sites; the compiling model's session sees it at once."""
    with _lock:
        graph = GraphRecord(graph_id=next(_graph_ids), compile_session=compile_session, sites=sites)
        GRAPHS[graph.graph_id] = graph
    compile_session.attach_graph(graph.graph_id)
    return graph
