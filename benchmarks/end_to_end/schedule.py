"""Which denoising steps a variant times, and the extrapolation of a whole generation from them."""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from typing import Any

import sparse_compile
from sparse_compile.methods import METHODS


@dataclass(frozen=True)
class SteadyGroup:
    """Steps that cost the same per call: ``steps`` are all of them, ``sampled`` those timed."""

    name: str
    steps: tuple[int, ...]
    sampled: tuple[int, ...]


@dataclass(frozen=True)
class Schedule:
    """Which denoising steps a variant times, and what each timed step stands for."""

    total_steps: int
    dense_steps: int
    calls_per_step: int
    special: tuple[int, ...]
    groups: tuple[SteadyGroup, ...]

    def timed_steps(self) -> list[int]:
        return sorted({*self.special, *(s for g in self.groups for s in g.sampled)})

    def warmup_steps(self) -> list[int]:
        """Every special step and one step of each group: every code path runs before the timing."""
        return sorted({*self.special, *(g.sampled[0] for g in self.groups)})


def special_steps(options: dict[str, Any] | None, dense_steps: int, total: int) -> tuple[int, ...]:
    """Steps whose calls differ from their phase's steady calls (none for Inductor dense)."""
    if options is None:
        return ()
    steps = {0, dense_steps - 1, dense_steps}
    instance = METHODS[options["method"]](sparse_compile.validate_options(options))
    steps |= {s for s in range(dense_steps, total) if instance.is_extra_work_step(s)}
    return tuple(sorted(s for s in steps if 0 <= s < total))


def build_schedule(options: dict[str, Any] | None, args: argparse.Namespace, calls_per_step: int) -> Schedule:
    """Special steps plus ``--calls`` calls sampled from each steady phase."""
    total, dense = args.steps, min(args.dense_steps, args.steps)
    special = special_steps(options, dense, total)
    sample = max(1, math.ceil(args.calls / calls_per_step))
    phases = [("all", range(total))] if options is None else [("dense", range(dense)), ("sparse", range(dense, total))]
    groups = []
    for name, steps in phases:
        steady = tuple(s for s in steps if s not in special)
        if steady:
            groups.append(SteadyGroup(name, steady, steady[:sample]))
    return Schedule(total, dense, calls_per_step, special, tuple(groups))


def extrapolate(schedule: Schedule, step_ms: dict[int, list[float]]) -> dict[str, Any]:
    """Total time of a ``total_steps`` generation from the timed calls (see the module docstring)."""
    medians = {g.name: statistics.median(ms for s in g.sampled for ms in step_ms[s]) for g in schedule.groups}
    group_of = {s: g.name for g in schedule.groups for s in g.steps}
    cost = [sum(step_ms[s]) if s in schedule.special else schedule.calls_per_step * medians[group_of[s]]
            for s in range(schedule.total_steps)]
    terms = [f"step {s}: {' + '.join(f'{ms:.1f}' for ms in step_ms[s])} ms" for s in schedule.special]
    terms += [f"{len(g.steps)} {g.name} steps x {schedule.calls_per_step} calls x {medians[g.name]:.1f} ms "
              f"(median of {len(g.sampled) * schedule.calls_per_step} calls at steps {list(g.sampled)})"
              for g in schedule.groups]
    return {
        "total_s": sum(cost) / 1e3,
        "dense_phase_s": sum(cost[: schedule.dense_steps]) / 1e3,
        "sparse_phase_s": sum(cost[schedule.dense_steps:]) / 1e3,
        "median_call_ms": medians,
        "formula": "EXTRAPOLATED, not one timed run: " + " + ".join(terms),
    }
