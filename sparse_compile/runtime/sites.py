"""Records of the attention sites the pass found, looked up by the custom op at run time.

The compiled graph owns its records: :func:`register_graph` returns a :class:`GraphRecord` that
the rewrite stores on the graph module, and the lookup tables here hold them weakly, so they
are released with the graph (e.g. on ``torch._dynamo.reset()``).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass

from sparse_compile.methods.base import AttentionMethod
from sparse_compile.runtime.session import Session

_site_ids = itertools.count()
_graph_ids = itertools.count()
SITES: weakref.WeakValueDictionary[int, SiteRecord] = weakref.WeakValueDictionary()
GRAPHS: weakref.WeakValueDictionary[int, GraphRecord] = weakref.WeakValueDictionary()
_lock = threading.Lock()


@dataclass(frozen=True)
class SiteFacts:
    """What the pass found at one SDPA site, kept for the site's whole life (the report reads it).

    Attributes:
        module_path: e.g. ``blocks.3.attn1``.
        q_shape, k_shape: example shapes ``(B, H, S, D)`` at compile time (concrete hints).
        kind: one of the kind constants of :mod:`sparse_compile.passes.site_plan`.
        grid: ``(frames, height, width)`` of the video tokens (hints), or ``None``.
        text_tokens: number of joint text tokens (hint; 0 without text).
        text_position: ``"prefix"``/``"suffix"`` for joint attention, else ``None``.
        context_tokens: tokens on the other side of the video from the text (latents packed
            beside the video window), attended densely like the text (hint; 0 without them).
        dense_reason: why the site stays dense SDPA; ``None`` when it is rewritten.
        grid_from_call: the grid is the one the model call recorded where the patchify is (a fragment
            whose tokens arrive flat); the op checks it against the token count at run time.
    """

    module_path: str
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    kind: str
    grid: tuple[int, int, int] | None = None
    text_tokens: int = 0
    text_position: str | None = None
    dense_reason: str | None = None
    grid_from_call: bool = False
    context_tokens: int = 0


@dataclass(eq=False)
class SiteRecord:
    """One SDPA site of one compiled graph: what the pass found, fixed at compile time.

    Per-model run-time state (densities, caches) lives in the model's
    :class:`~sparse_compile.runtime.session.Session`, under ``key``.

    Attributes:
        site_id: the constant baked into the graph's op call.
        key: the site within the model: its module path, with ``#n`` for the n-th extra call of
            one module in a graph; the same in every graph compiled for the model.
        facts: shapes, kind, grid and text placement as the pass found them.
        method: name of the method the options ask for.
        status: ``"sparse"`` or ``"dense: <reason>"``.
        layer_index: position among the model's video attention sites (``None`` if not rewritten).
        attention: the method instance run at this site (``None`` when not rewritten).
    """

    site_id: int
    key: str
    facts: SiteFacts
    method: str
    status: str
    layer_index: int | None
    attention: AttentionMethod | None = None

    @property
    def rewritten(self) -> bool:
        return self.attention is not None


@dataclass(eq=False)
class GraphRecord:
    """All SDPA sites of one compiled graph, and (weakly) the session of the model it was compiled
    for: the fallback for graphs without parameters, whose callers cannot be told apart.

    A graph without a timestep input is *scoped*: a fragment that may serve several instances of a
    submodule, whose sites are kept per instance (see :mod:`sparse_compile.runtime.session`).
    ``anchor_path`` is its anchor parameter's name relative to the graph's frame (``norm1.linear.weight``),
    from which the report names each instance. ``grid_reason``: why the tokens the graph hands on
    have no single clip grid, if they have structure but not that (told to later fragments).
    """

    graph_id: int
    compile_session: weakref.ref[Session]
    sites: list[SiteRecord]
    scoped: bool = False
    anchor_path: str | None = None
    grid_reason: str | None = None

    @property
    def attention_calls(self) -> int:
        """Calls of the attention op one run of the graph makes."""
        return sum(site.rewritten for site in self.sites)


def register_site(
    key: str, facts: SiteFacts, method: str, status: str, layer_index: int | None, attention: AttentionMethod | None
) -> SiteRecord:
    """Create a site record with a fresh id and add it to the lookup table."""
    with _lock:
        record = SiteRecord(next(_site_ids), key, facts, method, status, layer_index, attention)
        SITES[record.site_id] = record
    return record


def register_graph(
    compile_session: Session,
    sites: list[SiteRecord],
    scoped: bool = False,
    anchor_path: str | None = None,
    grid_reason: str | None = None,
) -> GraphRecord:
    """Record a compiled graph's sites; the compiling model's session sees it at once.

    The caller must keep the returned record alive as long as the graph runs.
    """
    with _lock:
        graph = GraphRecord(next(_graph_ids), weakref.ref(compile_session), sites, scoped, anchor_path, grid_reason)
        GRAPHS[graph.graph_id] = graph
    compile_session.attach_graph(graph)
    return graph
