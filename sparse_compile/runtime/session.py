"""Per-model state: denoising-step tracking and the attention sites compiled for the model.

A stock diffusers pipeline calls the transformer once per step (CFG batched) or twice
with the same timestep (CFG as two calls). The graph's step marker hands every forward's
timestep to :meth:`Session.begin_forward`, which derives ``(step, branch, generation)``:
a lower timestep than the last one starts the next step, the same timestep is another
CFG branch of the same step, a higher one (or the first call) starts a new generation.
Custom loops set the step explicitly with :meth:`Session.set_step`.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from sparse_compile.methods.base import AttentionCall, AttentionResult

logger = logging.getLogger("sparse_compile")

Probe = Callable[["AttentionCall", "AttentionResult", int], None]
"""Called with every sparse call's inputs, result and layer index (see :mod:`sparse_compile.quality`)."""

_session_ids = itertools.count()


@dataclass
class SiteState:
    """What one model remembers about one attention site across calls.

    Attributes:
        densities: step -> kept density of each call in that step (all CFG branches); a method
            may report a 0-d device tensor, read only when a report is made (no sync per call).
        cache: the method's cached state (centroids, block indices, LSE ...).
        fallback_reason: why the method last had to run a call dense at run time, if it did.
    """

    densities: dict[int, list[float | torch.Tensor]] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)
    fallback_reason: str | None = None

    def record_density(self, step: int, density: float | torch.Tensor) -> None:
        self.densities.setdefault(step, []).append(density)


@dataclass(frozen=True)
class StepInfo:
    """Where a forward call sits in the denoising loop."""

    step: int
    branch: int
    generation: int


class Session:
    """Everything one model remembers: step tracking, the graphs it ran, per-site state.

    Models of one class share compiled graphs (their parameters are graph inputs), so a
    session is found at run time from the parameters the graph is called with, never
    baked into the graph. ``probe``, when set, sees every sparse call (for quality measurements).
    """

    def __init__(self) -> None:
        self.id = next(_session_ids)
        self.graph_ids: list[int] = []
        self.site_states: dict[int, SiteState] = {}
        self._layer_of_path: dict[str, int] = {}
        self._lock = threading.Lock()
        self._manual: tuple[int, int] | None = None
        self._last_timestep: float | None = None
        self._current = StepInfo(step=-1, branch=0, generation=-1)
        self.probe: Probe | None = None

    @property
    def current(self) -> StepInfo:
        return self._current

    def attach_graph(self, graph_id: int) -> None:
        """Remember that this model runs (or was compiled into) a graph, for its report."""
        if graph_id not in self.graph_ids:
            with self._lock:
                if graph_id not in self.graph_ids:
                    self.graph_ids.append(graph_id)

    def state_of(self, site_id: int) -> SiteState:
        """This model's state for one site, created on first use."""
        state = self.site_states.get(site_id)
        if state is None:
            with self._lock:
                state = self.site_states.setdefault(site_id, SiteState())
        return state

    def layer_index(self, module_path: str) -> int:
        """Index of a video attention site in first-seen order; stable across recompiles."""
        with self._lock:
            return self._layer_of_path.setdefault(module_path, len(self._layer_of_path))

    def begin_forward(self, timestep: float | None) -> StepInfo:
        """Advance the step tracker for one transformer call and return where it is."""
        with self._lock:
            cur = self._current
            if self._manual is not None:
                step, branch = self._manual
                self._current = StepInfo(step, branch, max(cur.generation, 0))
            elif timestep is None:
                self._current = StepInfo(cur.step + 1, 0, max(cur.generation, 0))
            elif self._last_timestep is None or timestep > self._last_timestep:
                self._current = StepInfo(0, 0, cur.generation + 1)
            elif timestep == self._last_timestep:
                self._current = StepInfo(cur.step, cur.branch + 1, cur.generation)
            else:
                self._current = StepInfo(cur.step + 1, 0, cur.generation)
            if timestep is not None:
                self._last_timestep = timestep
            return self._current

    def set_step(self, step: int | None, branch: int = 0) -> None:
        """Pin the step (and CFG branch) of the next calls.

        ``None`` returns to automatic tracking, which continues from the pinned step.
        """
        if step is None:
            self._manual = None
            return
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0 or None, got {step!r}")
        if isinstance(branch, bool) or not isinstance(branch, int) or branch < 0:
            raise ValueError(f"branch must be an int >= 0, got {branch!r}")
        self._manual = (step, branch)

    def reset(self) -> None:
        """Start a new generation: step tracking and every site's cached state are cleared."""
        with self._lock:
            self._last_timestep = None
            self._manual = None
            self._current = StepInfo(step=-1, branch=0, generation=self._current.generation)
            self.site_states.clear()


_SESSIONS_BY_PARAMETER: WeakIdKeyDictionary = WeakIdKeyDictionary()
SESSIONS: "weakref.WeakValueDictionary[int, Session]" = weakref.WeakValueDictionary()


def _new_session() -> Session:
    session = Session()
    SESSIONS[session.id] = session
    return session


def session_for_parameters(parameters: Iterable[torch.Tensor]) -> Session:
    """The session of the model owning these parameters, created on first sight.

    Graphs compiled for one model (recompiles for a new resolution, graph breaks) share
    parameters and so share the session; two models never do.
    """
    parameters = [p for p in parameters if isinstance(p, torch.nn.Parameter)]
    for p in parameters:
        session = _SESSIONS_BY_PARAMETER.get(p)
        if session is not None:
            break
    else:
        session = _new_session()
    for p in parameters:
        _SESSIONS_BY_PARAMETER[p] = session
    return session


def session_for_anchor(anchor: torch.Tensor) -> Session:
    """The session of the model whose parameter ``anchor`` is, at run time (created if new)."""
    session = _SESSIONS_BY_PARAMETER.get(anchor)
    if session is None:
        session = _new_session()
        _SESSIONS_BY_PARAMETER[anchor] = session
    return session


def find_session(model: torch.nn.Module) -> Session | None:
    """The session of a model compiled with the backend (or of its ``torch.compile`` wrapper)."""
    for p in model.parameters():
        session = _SESSIONS_BY_PARAMETER.get(p)
        if session is not None:
            return session
    return None
