"""Records of the attention sites the pass found, looked up by the custom op at run time."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from sparse_compile.methods.base import AttentionMethod
from sparse_compile.options import SparseOptions
from sparse_compile.runtime.session import Session

_site_ids = itertools.count()
SITES: dict[int, "SiteRecord"] = {}
_lock = threading.Lock()


@dataclass
class SiteRecord:
    """One SDPA site of one compiled graph.

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
        densities: step -> kept density of each call in that step (all CFG branches).
        state: per-method cached state (centroids, indices, LSE ...), keyed by the method.
    """

    site_id: int
    session: Session
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
    densities: dict[int, list[float]] = field(default_factory=dict)
    state: dict[Any, Any] = field(default_factory=dict)

    @property
    def rewritten(self) -> bool:
        return self.attention is not None

    def record_density(self, step: int, density: float) -> None:
        self.densities.setdefault(step, []).append(density)

    def clear_state(self) -> None:
        self.densities.clear()
        self.state.clear()


def register_site(**fields: Any) -> SiteRecord:
    """Create a record with a fresh id, add it to its session and to the global table."""
    with _lock:
        record = SiteRecord(site_id=next(_site_ids), **fields)
        SITES[record.site_id] = record
    record.session.sites.append(record)
    return record
