"""``sparse_compile.report(model)``: what the backend did at every attention site of a model.

One row per attention site of the model, however many graphs were compiled for it (a new
resolution, a recompile): the facts of the site's most recent graph, the densities of every
call so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sparse_compile.runtime.session import HeadRuns, SiteState, find_session
from sparse_compile.runtime.sites import SiteFacts, SiteRecord

KEEPS_EVERYTHING = "sparse method, pattern keeps every pair"
"""Status of a sparse site whose every sparse-step call kept all (query, key) pairs."""

GUARDED = "dense: sparse would not be faster on this GPU (break-even guard)"
"""Status of a sparse site whose every sparse-step call the break-even guard ran dense."""


@dataclass(frozen=True)
class SiteReport:
    """One attention site of the model.

    ``facts`` are what the compiler found (shapes, kind, grid, text); ``rewritten`` says the site
    runs through the backend's op (sparse, or dense by option); ``density_by_step`` maps a
    denoising step to the mean kept density of that step's calls, dense warm-up steps included
    (``warmup_steps``); ``head_runs`` counts, per head, the calls that ran it sparse, dense by the
    break-even guard and dense by warm-up.
    """

    facts: SiteFacts
    method: str
    status: str
    rewritten: bool
    density_by_step: dict[int, float]
    warmup_steps: frozenset[int] = frozenset()
    head_runs: HeadRuns = field(default_factory=HeadRuns)

    module_path = property(lambda self: self.facts.module_path)
    q_shape = property(lambda self: self.facts.q_shape)
    k_shape = property(lambda self: self.facts.k_shape)
    kind = property(lambda self: self.facts.kind)
    grid = property(lambda self: self.facts.grid)
    text_tokens = property(lambda self: self.facts.text_tokens)
    text_position = property(lambda self: self.facts.text_position)

    @property
    def sparse(self) -> bool:
        return self.status == "sparse"

    @property
    def mean_density(self) -> float | None:
        """Mean kept density over the steps the site's method ran (not the dense warm-up steps);
        ``None`` before the first such step."""
        densities = [d for step, d in self.density_by_step.items() if step not in self.warmup_steps]
        return sum(densities) / len(densities) if densities else None


@dataclass(frozen=True)
class Report:
    """All attention sites of a model, in the order of its graphs."""

    sites: tuple[SiteReport, ...]

    @property
    def rewritten(self) -> tuple[SiteReport, ...]:
        """Sites running through the backend's op (sparse, or dense by option)."""
        return tuple(s for s in self.sites if s.rewritten)

    def __str__(self) -> str:
        if not self.sites:
            return "sparse_compile report: no graph compiled yet (torch.compile compiles on the first call)"
        header = ("site", "q (B,H,S,D)", "k", "kind", "grid (T,H,W)", "text", "status", "density",
                  "head calls sparse/guard/warm-up")
        rows = [header]
        for s in self.sites:
            density = "-" if s.mean_density is None else f"{s.mean_density:.3f}"
            text = f"{s.text_tokens} {s.text_position}" if s.text_tokens else "-"
            rows.append(
                (s.module_path, "x".join(map(str, s.q_shape)), "x".join(map(str, s.k_shape)), s.kind,
                 "-" if s.grid is None else "x".join(map(str, s.grid)), text, s.status, density,
                 "/".join(str(sum(c)) for c in (s.head_runs.sparse, s.head_runs.guard, s.head_runs.warmup)))
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        sparse = sum(s.sparse for s in self.sites)
        full = sum(s.status == KEEPS_EVERYTHING for s in self.sites)
        counts = f"{sparse} sparse, " + (f"{full} keeping every pair, " if full else "")
        lines.append(f"{len(self.sites)} attention sites: {counts}{len(self.sites) - sparse - full} dense")
        return "\n".join(lines)


def _site_report(record: SiteRecord, state: SiteState | None) -> SiteReport:
    densities = {} if state is None else state.densities
    density_by_step = {step: sum(map(float, d)) / len(d) for step, d in sorted(densities.items())}
    status = record.status
    warmup: frozenset[int] = frozenset()
    if state is not None:
        if state.fallback_reason is not None:
            status = f"dense: {state.fallback_reason} (at run time)"
        if status == "sparse":
            warmup = frozenset(state.scheduled_dense_steps)
            sparse_steps = [d for step, d in density_by_step.items() if step not in warmup]
            runs = state.head_runs
            if sum(runs.guard) and not sum(runs.sparse):
                status = GUARDED
            elif sparse_steps and all(d == 1.0 for d in sparse_steps):
                status = KEEPS_EVERYTHING
    runs = HeadRuns() if state is None else HeadRuns(*(list(c) for c in (state.head_runs.sparse, state.head_runs.guard,
                                                                          state.head_runs.warmup)))
    return SiteReport(record.facts, record.method, status, record.rewritten, density_by_step, warmup, runs)


def report(model: torch.nn.Module) -> Report:
    """Per-site facts for a model compiled with ``backend="sparse_video"`` (or its compiled wrapper)."""
    session = find_session(model)
    if session is None:
        return Report(sites=())
    latest: dict[str, SiteRecord] = {}
    for graph in session.graphs():
        for record in graph.sites:
            latest.pop(record.key, None)  # keep the order of the most recent graph
            latest[record.key] = record
    return Report(sites=tuple(_site_report(r, session.site_states.get(r.key)) for r in latest.values()))
