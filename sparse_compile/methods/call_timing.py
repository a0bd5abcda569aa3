"""Is a site's sparse path slower than dense on this GPU? Measured on its own calls, without a host sync.

A cost model predicts a choice's time from calibration shapes; the whole path of a real call (its
kernels, the checks and copies around them, any host sync inside) can still come out slower than
dense SDPA. :class:`PathTimer` records CUDA events around one (site, CFG branch)'s calls and reads
each pair later, once ``end.query()`` says the GPU has passed it, so nothing waits: dense calls of
the warm-up give the dense time, the calls of a sparse choice the sparse time (not its first call, which
may make the choice or compile and autotune kernels). :meth:`PathTimer.sparse_is_slower` compares them.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Literal

import torch

Path = Literal["dense", "sparse"]

DENSE_SAMPLES = 3
"""Dense call times kept (the latest), whose median is the dense time."""
SPARSE_SAMPLES = 1
"""Sparse call times a verdict waits for."""
MAX_PENDING = 4
"""Event pairs awaiting their read at most (older ones are dropped unread)."""


def timing_available(t: torch.Tensor) -> bool:
    """Whether calls on ``t``'s device can be timed (CUDA events)."""
    return t.is_cuda


def recorded_event() -> torch.cuda.Event:
    """A timing event recorded now on the current CUDA stream."""
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


@dataclass(eq=False)
class PathTimer:
    """Call times in ms of one (site, CFG branch): the latest dense ones, and the sparse ones of the
    choice made at step ``choice_step`` (``None``: no sparse choice timed yet)."""

    dense_ms: list[float] = field(default_factory=list)
    sparse_ms: list[float] = field(default_factory=list)
    choice_step: int | None = None
    sparse_calls: int = 0
    _pending: list[tuple[Path, torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)

    def new_choice(self, step: int) -> None:
        """Forget the sparse times: a choice made at ``step`` runs from now on (this, its first call, untimed)."""
        self.choice_step, self.sparse_calls, self.sparse_ms = step, 0, []
        self._pending = [entry for entry in self._pending if entry[0] == "dense"]

    @property
    def collecting_sparse(self) -> bool:
        """Whether the next sparse call may be a sample: no choice timed yet, or its samples not all in."""
        return self.choice_step is None or self.sparse_calls < SPARSE_SAMPLES

    def count_sparse_call(self) -> bool:
        """Count one more call of the current choice after its first; whether its time is a sample (until
        ``SPARSE_SAMPLES`` are in)."""
        self.sparse_calls += 1
        return self.sparse_calls <= SPARSE_SAMPLES

    def start(self) -> torch.cuda.Event:
        """An event recorded now on the current stream: a timed call begins."""
        return recorded_event()

    def stop(self, path: Path, start: torch.cuda.Event) -> None:
        """The timed call on ``path`` that began at ``start`` has been enqueued whole."""
        self._pending = (self._pending + [(path, start, recorded_event())])[-MAX_PENDING:]

    def collect(self) -> None:
        """Read the event pairs the GPU has passed (no wait)."""
        waiting = []
        for path, start, end in self._pending:
            if not end.query():
                waiting.append((path, start, end))
            elif path == "dense":
                self.dense_ms = (self.dense_ms + [start.elapsed_time(end)])[-DENSE_SAMPLES:]
            else:
                self.sparse_ms.append(start.elapsed_time(end))
        self._pending = waiting

    def sparse_is_slower(self) -> bool | None:
        """Whether the sparse calls took at least the dense calls' median (``None``: samples missing)."""
        if not self.dense_ms or len(self.sparse_ms) < SPARSE_SAMPLES:
            return None
        return statistics.median(self.sparse_ms) >= statistics.median(self.dense_ms)
