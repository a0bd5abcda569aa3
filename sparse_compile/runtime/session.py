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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from torch.utils.weak import WeakIdKeyDictionary

if TYPE_CHECKING:
    from sparse_compile.runtime.sites import SiteRecord

logger = logging.getLogger("sparse_compile")

_session_ids = itertools.count()


@dataclass(frozen=True)
class StepInfo:
    """Where a forward call sits in the denoising loop."""

    step: int
    branch: int
    generation: int


class Session:
    """State shared by all graphs compiled for one model."""

    def __init__(self) -> None:
        self.id = next(_session_ids)
        self.sites: list[SiteRecord] = []
        self._layer_of_path: dict[str, int] = {}
        self._lock = threading.Lock()
        self._manual: tuple[int, int] | None = None
        self._last_timestep: float | None = None
        self._current = StepInfo(step=-1, branch=0, generation=-1)
        self.counts_forwards = False

    @property
    def current(self) -> StepInfo:
        return self._current

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
        for site in self.sites:
            site.clear_state()


_SESSIONS_BY_PARAMETER: WeakIdKeyDictionary = WeakIdKeyDictionary()


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
        session = Session()
    for p in parameters:
        _SESSIONS_BY_PARAMETER[p] = session
    return session


def find_session(model: torch.nn.Module) -> Session | None:
    """The session of a model compiled with the backend (or of its ``torch.compile`` wrapper)."""
    for p in model.parameters():
        session = _SESSIONS_BY_PARAMETER.get(p)
        if session is not None:
            return session
    return None
