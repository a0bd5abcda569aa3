"""Per-model state: denoising-step tracking and what the model remembers at each attention site.

A stock diffusers pipeline calls the transformer once per step (CFG batched) or twice
with the same timestep (CFG as two calls). The graph's step marker hands every forward's
timestep to :meth:`Session.begin_forward`, which derives ``(step, branch, generation)`` (and
hands on the timestep with the generation's first one):
a lower timestep than the last one starts the next step, the same timestep is the second
CFG branch of the same step, a higher one (or the first call, or the same timestep a third
time: CFG has two branches) starts a new generation. Custom loops set the step explicitly
with :meth:`Session.set_step`; there a pinned step lower than the current one starts a new
generation.

A new generation clears every site's cache, so the same inputs give the same output in every
generation. A forward that did not finish (an exception or ``KeyboardInterrupt`` between its
step marker and its last attention call) ends its generation: the next forward starts a new one.

Graph breaks split one transformer call into several compiled graphs (*fragments*). The step
marker of a graph holding the timestep opens a :class:`ModelCall` on its thread (each run opens a
new one); graphs without a timestep that are compiled or run while it is open (its model's
``forward`` frame still on the stack) belong to that call: their parameters join the call's
session (one model, one session) and their attention calls count in the call's step.
The call also carries the token grid found where the patchify is, for fragments that see plain
``(B, S, D)`` tokens. A fragment compiled from a submodule's frame (a transformer block) serves
every instance of that submodule, so its sites are kept per *scope*: the parameter the fragment
is called with (see :meth:`Session.scope_of`).
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from sparse_compile.methods.call import AttentionCall, AttentionResult, StepInfo
from sparse_compile.methods.cache import SiteCache

logger = logging.getLogger("sparse_compile")

Probe = Callable[[AttentionCall, AttentionResult], None]
"""Called with every sparse call's inputs and result (see :mod:`sparse_compile.quality`)."""

CFG_BRANCHES = 2
"""Classifier-free guidance has two branches: 0 (conditional) and 1 (unconditional)."""

_session_ids = itertools.count()


@dataclass
class HeadRuns:
    """Calls per head index of one site: ``sparse``, ``guard`` (dense by the break-even guard) and
    ``warmup`` (dense by the options); a run-time fallback counts in none of them."""

    sparse: list[int] = field(default_factory=list)
    guard: list[int] = field(default_factory=list)
    warmup: list[int] = field(default_factory=list)

    def add(self, result: AttentionResult) -> None:
        if result.fallback_reason is not None:
            return
        heads = result.output.shape[1]
        for counts in (self.sparse, self.guard, self.warmup):
            counts.extend([0] * (heads - len(counts)))
        guarded = set(result.guarded_heads)
        for h in range(heads):
            kind = self.warmup if result.scheduled_dense else self.guard if h in guarded else self.sparse
            kind[h] += 1


@dataclass(frozen=True)
class CallSizes:
    """One attention call's sizes: q and k ``(B, H, S, D)``, and its text and context token counts."""

    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    text_tokens: int
    context_tokens: int


@dataclass
class SiteState:
    """What one model remembers about one attention site across calls and recompiles.

    Attributes:
        densities: step -> kept density of each call in that step (all CFG branches); a method
            may report a 0-d device tensor, read only when a report is made (no sync per call).
        scheduled_dense_steps: steps whose calls ran dense by the options (dense steps/layers).
        cache: the method's cached entries (centroids, layouts, LSE ...), cleared per generation.
        fallback_reason: why the method last had to run a call dense at run time, if it did.
        head_runs: per head index, how many calls ran it sparse, dense by the break-even guard,
            and dense by the options (warm-up steps and layers): :class:`HeadRuns`.
        last_call: the sizes of the last call as it ran (the compiler knows them only as hints where
            they are data-dependent or dynamic), or ``None`` before a call.
        options: the backend options of the compile whose calls these are (:meth:`Session.state_of`).
    """

    densities: dict[int, list[float | torch.Tensor]] = field(default_factory=dict)
    scheduled_dense_steps: set[int] = field(default_factory=set)
    cache: SiteCache = field(default_factory=SiteCache)
    fallback_reason: str | None = None
    head_runs: HeadRuns = field(default_factory=HeadRuns)
    last_call: CallSizes | None = None
    options: Any = None

    def record(self, site_name: str, step: int, result: AttentionResult) -> None:
        """Keep a call's density and how its heads ran; log the site's first run-time dense fallback
        (once per model and site)."""
        self.densities.setdefault(step, []).append(result.kept_density)
        self.head_runs.add(result)
        if result.scheduled_dense:
            self.scheduled_dense_steps.add(step)
        if result.fallback_reason is not None:
            if self.fallback_reason is None:
                logger.warning("sparse_compile: %s runs dense: %s", site_name, result.fallback_reason)
            self.fallback_reason = result.fallback_reason


class Session:
    """Everything one model remembers: step tracking, the graphs it ran, per-site state.

    Models of one class share compiled graphs (their parameters are graph inputs), so a
    session is found at run time from the parameters the graph is called with, never
    baked into the graph. Site state is keyed by the site's key within the model (its module
    path), so recompiles share it and it is bounded by the model's sites; a compile with other
    options (the model compiled again for another method) starts it afresh. ``probe``, when set,
    sees every sparse call (for quality measurements).
    """

    def __init__(self) -> None:
        self.id = next(_session_ids)
        self._graphs: dict[int, weakref.ref] = {}
        self.site_states: dict[str, SiteState] = {}
        self._layer_of_path: dict[str, int] = {}
        self._lock = threading.Lock()
        self._manual: tuple[int, int] | None = None
        self._last_timestep: float | None = None
        self._first_timestep: float | None = None
        self._current = StepInfo(step=-1, branch=0, generation=-1)
        self._calls_left = 0
        self._scopes: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._scope_anchors: dict[int, weakref.ref] = {}
        self._scopes_of_graph: dict[int, list[int]] = {}
        self.probe: Probe | None = None

    @property
    def current(self) -> StepInfo:
        return self._current

    def attach_graph(self, graph: Any) -> None:
        """Remember (weakly) a graph record this model runs or was compiled into, most recent last."""
        with self._lock:
            if next(reversed(self._graphs), None) != graph.graph_id:
                self._graphs.pop(graph.graph_id, None)
                self._graphs[graph.graph_id] = weakref.ref(graph)
                self._prune_graphs()

    def graphs(self) -> list[Any]:
        """The live graph records of this model, least recently run first."""
        with self._lock:
            self._prune_graphs()
            return [graph for graph in (ref() for ref in self._graphs.values()) if graph is not None]

    def _prune_graphs(self) -> None:
        for graph_id in [i for i, ref in self._graphs.items() if ref() is None]:
            del self._graphs[graph_id]
            self._scopes_of_graph.pop(graph_id, None)

    def state_of(self, site_key: str, options: Any = None) -> SiteState:
        """This model's state for one site under the backend ``options`` its call was compiled with: created
        on first use, and again when the options differ from those of the state's calls (densities, warm-up
        steps, head counts and caches of another method are not this one's)."""
        state = self.site_states.get(site_key)
        if state is None or state.options != options:
            with self._lock:
                state = self.site_states.get(site_key)
                if state is None or state.options != options:
                    state = self.site_states[site_key] = SiteState(options=options)
        return state

    def layer_index(self, module_path: str) -> int:
        """Index of a video attention site in first-seen order; stable across recompiles."""
        with self._lock:
            return self._layer_of_path.setdefault(module_path, len(self._layer_of_path))

    def begin_forward(self, timestep: float | None, attention_calls: int) -> StepInfo:
        """Advance the step tracker for one transformer call that makes ``attention_calls`` calls
        of the attention op, and return where it is."""
        with self._lock:
            cur = self._current
            interrupted = self._calls_left > 0
            if self._manual is not None:
                step, branch = self._manual
                new_generation = interrupted or cur.generation < 0 or step < cur.step
                self._current = StepInfo(step, branch, cur.generation + new_generation)
            elif timestep is None:
                new_generation = interrupted or cur.generation < 0
                self._current = StepInfo(0 if new_generation else cur.step + 1, 0, cur.generation + new_generation)
            elif (
                interrupted
                or self._last_timestep is None
                or timestep > self._last_timestep
                or (timestep == self._last_timestep and cur.branch + 1 >= CFG_BRANCHES)
            ):
                self._current = StepInfo(0, 0, cur.generation + 1)
            elif timestep == self._last_timestep:
                self._current = StepInfo(cur.step, cur.branch + 1, cur.generation)
            else:
                self._current = StepInfo(cur.step + 1, 0, cur.generation)
            if timestep is not None:
                self._last_timestep = timestep
            if self._current.generation != cur.generation:
                self._first_timestep = timestep
                for state in self.site_states.values():
                    state.cache.clear()
            self._current = replace(self._current, timestep=timestep, first_timestep=self._first_timestep)
            self._calls_left = attention_calls
            return self._current

    def step_info(self, step: int, branch: int, generation: int) -> StepInfo:
        """The step of a call from its step token: the current forward's (with its timesteps) when
        the token is that forward's, else without timesteps."""
        cur = self._current
        if (cur.step, cur.branch, cur.generation) == (step, branch, generation):
            return cur
        return StepInfo(step, branch, generation)

    def join_forward(self, attention_calls: int) -> StepInfo:
        """A fragment of the current forward makes ``attention_calls`` more calls of the attention op;
        returns the forward's step."""
        with self._lock:
            self._calls_left += attention_calls
            return self._current

    def scope_of(self, anchor: torch.Tensor, graph_id: int) -> int:
        """The scope of a fragment run with parameter ``anchor`` (one per submodule instance the
        fragment's graph serves), numbered in first-run order; remembered per graph for the report."""
        with self._lock:
            scope = self._scopes.get(anchor)
            if scope is None:
                scope = self._scopes[anchor] = len(self._scope_anchors)
                self._scope_anchors[scope] = weakref.ref(anchor)
            scopes = self._scopes_of_graph.setdefault(graph_id, [])
            if scope not in scopes:
                scopes.append(scope)
            return scope

    def scopes_of_graph(self, graph_id: int) -> list[tuple[int, torch.Tensor | None]]:
        """``(scope, anchor parameter or None if freed)`` of every scope a graph has run in."""
        with self._lock:
            return [(s, self._scope_anchors[s]()) for s in self._scopes_of_graph.get(graph_id, [])]

    def end_call(self) -> None:
        """One attention call of the current forward has finished."""
        with self._lock:
            self._calls_left -= 1

    def set_step(self, step: int | None, branch: int = 0) -> None:
        """Pin the step (and CFG branch, 0 or 1) of the next calls.

        ``None`` returns to automatic tracking, which continues from the pinned step.
        """
        if step is None:
            self._manual = None
            return
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0 or None, got {step!r}")
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < CFG_BRANCHES:
            raise ValueError(
                f"branch must be 0 (conditional) or 1 (unconditional): classifier-free guidance has "
                f"{CFG_BRANCHES} branches, got {branch!r}"
            )
        self._manual = (step, branch)

    def reset(self) -> None:
        """Start a new generation: step tracking and every site's state (caches, densities) are cleared."""
        with self._lock:
            self._last_timestep = None
            self._manual = None
            self._calls_left = 0
            self._current = StepInfo(step=-1, branch=0, generation=self._current.generation)
            self.site_states.clear()


def scoped_key(site_key: str, scope: int) -> str:
    """The state key of a site of a scoped fragment (``scope >= 0``); ``site_key`` itself otherwise."""
    return site_key if scope < 0 else f"{site_key}@{scope}"


@dataclass
class ModelCall:
    """One transformer call in progress on a thread: its session, ``(frames, height, width)`` of the
    clip's tokens if a graph of the call found them, else why the graph that opened the call found
    no grid in the tokens it hands on (``grid_reason``, or ``None``)."""

    session: weakref.ref
    grid: tuple[int, int, int] | None
    grid_reason: str | None = None
    frame: tuple[int, Any] | None = None


_THREAD = threading.local()


def _model_forward_frame() -> tuple[int, Any] | None:
    """``(id, code)`` of the innermost ``forward`` frame of a module (not an FX graph) on the stack:
    the compiled model forward that runs the graphs of one call."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self") if frame.f_code.co_name == "forward" else None
        if isinstance(owner, torch.nn.Module) and not isinstance(owner, torch.fx.GraphModule):
            return id(frame), frame.f_code
        frame = frame.f_back
    return None


def _on_stack(marker: tuple[int, Any] | None) -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if marker is not None and (id(frame), frame.f_code) == marker:
            return True
        frame = frame.f_back
    return False


def current_call() -> ModelCall | None:
    """The call in progress on this thread: opened, its model alive and its forward still running."""
    call = getattr(_THREAD, "call", None)
    if call is None or call.session() is None or not _on_stack(call.frame):
        return None
    return call


def call_of(session: Session) -> ModelCall | None:
    """The call open on this thread if it is ``session``'s."""
    call = current_call()
    return call if call is not None and call.session() is session else None


def enter_forward(session: Session, graph: Any, timestep: float | None, grid: tuple[int, int, int] | None) -> StepInfo:
    """Step of one run of ``graph`` (a :class:`~sparse_compile.runtime.sites.GraphRecord`; see the
    module doc): a graph with a timestep opens a new call; a graph without one joins the session's
    open call, or counts as a forward of its own when there is none (unless it has no attention
    call: then it changes nothing). ``grid``: the clip's grid in the graph's outputs."""
    call = call_of(session) if timestep is None else None
    if call is not None:
        call.grid = call.grid or grid
        return session.join_forward(graph.attention_calls)
    if timestep is None and not graph.attention_calls:
        return session.current
    info = session.begin_forward(timestep, graph.attention_calls)
    if timestep is not None:
        _THREAD.call = ModelCall(weakref.ref(session), grid, graph.grid_reason, _model_forward_frame())
    return info


_SESSIONS_BY_PARAMETER: WeakIdKeyDictionary = WeakIdKeyDictionary()
SESSIONS: "weakref.WeakValueDictionary[int, Session]" = weakref.WeakValueDictionary()


def _new_session() -> Session:
    session = Session()
    SESSIONS[session.id] = session
    return session


def session_for_parameters(parameters: Iterable[torch.Tensor], joining: Session | None = None) -> Session:
    """The session of the model owning these parameters, created on first sight.

    Graphs compiled for one model (recompiles for a new resolution) share parameters and so share
    the session; two models never do. Parameters seen for the first time in a fragment compiled
    during a call join that call's session (``joining``).
    """
    parameters = [p for p in parameters if isinstance(p, torch.nn.Parameter)]
    for p in parameters:
        session = _SESSIONS_BY_PARAMETER.get(p)
        if session is not None:
            break
    else:
        session = joining or _new_session()
    for p in parameters:
        _SESSIONS_BY_PARAMETER[p] = session
    return session


def session_for_anchor(anchor: torch.Tensor, joining: Session | None = None) -> Session:
    """The session of the model whose parameter ``anchor`` is, at run time: if new, ``joining``
    (a fragment run in a model call with a submodule instance it was not compiled with) or a new one."""
    session = _SESSIONS_BY_PARAMETER.get(anchor)
    if session is None:
        session = joining or _new_session()
        _SESSIONS_BY_PARAMETER[anchor] = session
    return session


def find_session(model: torch.nn.Module) -> Session | None:
    """The session of a model compiled with the backend (or of its ``torch.compile`` wrapper)."""
    for p in model.parameters():
        session = _SESSIONS_BY_PARAMETER.get(p)
        if session is not None:
            return session
    return None
