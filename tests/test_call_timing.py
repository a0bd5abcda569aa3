"""Timing a site's calls without a sync (:mod:`sparse_compile.methods.call_timing`), and ``auto`` turning a choice
dense once its calls are measured slower than dense ones. CUDA events are stood in for by a clock the test moves."""

from __future__ import annotations

import pytest

from method_calls import method_call
from sparse_compile.methods import auto, call_timing
from sparse_compile.methods.auto import AutoMethod
from sparse_compile.methods.call_timing import PathTimer
from sparse_compile.options import validate_options
from sparse_compile.runtime.session import SiteState
from test_auto import BLOCK, LAYOUT, synthetic_heads


class FakeEvent:
    """An event recorded at the clock's time; finished unless the clock holds it."""

    def __init__(self, clock: "Clock") -> None:
        self.clock, self.time = clock, clock.now
        clock.events += 1

    def query(self) -> bool:
        return self.time < self.clock.held_from

    def elapsed_time(self, end: "FakeEvent") -> float:
        return end.time - self.time


class Clock:
    def __init__(self) -> None:
        self.now, self.held_from, self.events = 0.0, float("inf"), 0


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(call_timing, "recorded_event", lambda: FakeEvent(clock))
    return clock


def _timed(timer: PathTimer, clock: Clock, path: str, ms: float) -> None:
    start = timer.start()
    clock.now += ms
    timer.stop(path, start)


def test_a_timing_is_read_only_once_the_gpu_has_passed_its_end(clock):
    timer = PathTimer()
    clock.held_from = 5.0  # events recorded from t=5 on are not finished yet
    _timed(timer, clock, "dense", 10.0)
    timer.collect()
    assert timer.dense_ms == []
    clock.held_from = float("inf")
    timer.collect()
    assert timer.dense_ms == [10.0]


def test_the_verdict_needs_dense_and_sparse_times_and_compares_with_the_dense_median(clock):
    timer = PathTimer()
    for ms in (10.0, 30.0, 11.0, 12.0):  # the latest 3 are kept: median 12
        _timed(timer, clock, "dense", ms)
    timer.new_choice(step=4)
    assert timer.count_sparse_call()
    _timed(timer, clock, "sparse", 11.5)
    assert timer.sparse_is_slower() is None, "not read yet"
    timer.collect()
    assert timer.dense_ms == [30.0, 11.0, 12.0] and timer.sparse_is_slower() is False
    assert not timer.count_sparse_call(), "the samples are in"


def test_a_new_choice_forgets_the_sparse_times_but_not_the_dense_ones(clock):
    timer = PathTimer()
    _timed(timer, clock, "dense", 10.0)
    timer.new_choice(step=1)
    timer.count_sparse_call()
    _timed(timer, clock, "sparse", 20.0)
    timer.collect()
    assert timer.sparse_is_slower()
    timer.new_choice(step=11)
    assert timer.sparse_is_slower() is None and timer.dense_ms == [10.0]


def _run_steps(clock: Clock, monkeypatch, dense_ms: float, sparse_ms: float, steps: int) -> SiteState:
    """``auto`` (2 dense steps) at the synthetic heads, with its dense and sparse paths taking the given times."""
    monkeypatch.setattr(auto, "timing_available", lambda t: True)

    def taking(ms: float, fn):
        def timed(*args, **kwargs):
            clock.now += ms
            return fn(*args, **kwargs)
        return timed

    monkeypatch.setattr(AutoMethod, "_exact", staticmethod(taking(dense_ms, AutoMethod._exact)))
    monkeypatch.setattr(auto, "attend_head_groups", taking(sparse_ms, auto.attend_head_groups))
    method = AutoMethod(validate_options({"method": "auto", "block": BLOCK, "dense_steps": 2}))
    q, k, v = synthetic_heads()
    state = SiteState()
    for step in range(steps):
        state.record("blocks.0.attn1", step, method.run(method_call(q, k, v, LAYOUT, state.cache, step=step)))
    return state


def test_auto_runs_dense_from_the_call_after_its_sparse_calls_are_measured_slower(clock, monkeypatch):
    runs = _run_steps(clock, monkeypatch, dense_ms=10.0, sparse_ms=12.0, steps=6).head_runs
    # steps 0-1 warm-up; 2 (the choice's first call, untimed) and 3 (timed) sparse; 4-5 dense by the guard
    assert (runs.warmup, runs.sparse, runs.guard) == ([2, 2, 2], [2, 2, 0], [2, 2, 4])


def test_auto_keeps_a_choice_measured_faster_than_dense(clock, monkeypatch):
    runs = _run_steps(clock, monkeypatch, dense_ms=10.0, sparse_ms=8.0, steps=6).head_runs
    assert (runs.warmup, runs.sparse, runs.guard) == ([2, 2, 2], [4, 4, 0], [0, 0, 4])
    # 2 per dense warm-up call, 1 at the choice's first call, 2 around the timed one: none once the samples are in
    assert clock.events == 2 * 2 + 1 + 2
