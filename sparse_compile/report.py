"""``sparse_compile.report(model)``: what the backend did at every attention site of a model.

One row per attention site of the model, however many graphs were compiled for it (a new
resolution, a recompile, the fragments of a forward split by graph breaks): the facts of the
site's most recent graph, the densities of every call so far. A fragment compiled from a
submodule's frame (a transformer block) has one row per instance it ran for, named by the model's
parameter names (``transformer_blocks.1.attn``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from sparse_compile.graph_friendly import graph_breaking_attention_note
from sparse_compile.methods.cost_model import calibration_lines
from sparse_compile.runtime.session import HeadRuns, Session, SiteState, find_session, scoped_key
from sparse_compile.runtime.sites import GraphRecord, SiteFacts, SiteRecord

KEEPS_EVERYTHING = "sparse method, pattern keeps every pair"
"""Status of a sparse site whose every sparse-step call kept all (query, key) pairs."""

GUARDED = "dense: sparse would not be faster on this device (break-even guard)"
"""Status of a sparse site whose every sparse-step call the break-even guard ran dense."""

DENSITY_NOTE_RATIO = 1.1
"""A sparse site is noted when its mean kept density passes its method's ``density`` option by this factor."""


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
    """All attention sites of a model, in the order of its graphs; ``graphs``: how many compiled
    graphs the model has; ``notes``: lines about the model as a whole, the sites that kept more than their
    method's ``density`` asked, and the break-even kept densities this process measured on its GPUs (what
    the guard decided by)."""

    sites: tuple[SiteReport, ...]
    graphs: int = 0
    notes: tuple[str, ...] = ()

    @property
    def rewritten(self) -> tuple[SiteReport, ...]:
        """Sites running through the backend's op (sparse, or dense by option)."""
        return tuple(s for s in self.sites if s.rewritten)

    def __str__(self) -> str:
        return "\n".join((self._table(),) + self.notes)

    def _table(self) -> str:
        if not self.graphs:
            return "sparse_compile report: no graph compiled yet (torch.compile compiles on the first call)"
        if not self.sites:
            return f"sparse_compile report: {self.graphs} graphs compiled, with no attention site in them"
        header = ("site", "q (B,H,S,D)", "k", "kind", "grid (T,H,W)", "text", "status", "density",
                  "head calls sparse/guard/warm-up")
        rows = [header]
        for s in self.sites:
            density = "-" if s.mean_density is None else f"{s.mean_density:.3f}"
            text = f"{s.text_tokens} {s.text_position}" if s.text_tokens else "-"
            if s.facts.context_tokens:
                text += f", {s.facts.context_tokens} {'suffix' if s.text_position == 'prefix' else 'prefix'} context"
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


def _site_report(record: SiteRecord, state: SiteState | None, module_path: str) -> SiteReport:
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
    facts = record.facts if module_path == record.facts.module_path else replace(record.facts, module_path=module_path)
    if state is not None and state.last_call is not None:  # as run: the compiler's sizes may be hints
        run = state.last_call
        facts = replace(facts, q_shape=run.q_shape, k_shape=run.k_shape, text_tokens=run.text_tokens,
                        context_tokens=run.context_tokens)
    return SiteReport(facts, record.method, status, record.rewritten, density_by_step, warmup, runs)


def _scopes(session: Session, graph: GraphRecord, names: dict[int, str]) -> list[tuple[str, int]]:
    """``(module path prefix, scope)`` of each instance a graph ran for: ``[("", -1)]`` for an unscoped
    graph (or a fragment that has not run); the prefix is where the graph's frame sits in the model."""
    scopes = session.scopes_of_graph(graph.graph_id) if graph.scoped else []
    if not scopes:
        return [("", -1)]
    found = []
    for scope, anchor in scopes:
        full, rel = names.get(id(anchor), ""), graph.anchor_path or ""
        known = rel and (full == rel or full.endswith("." + rel))
        found.append((full[: len(full) - len(rel)] if known else f"[instance {scope}].", scope))
    return found


def report(model: torch.nn.Module) -> Report:
    """Per-site facts for a model compiled with ``backend="sparse_video"`` (or its compiled wrapper)."""
    note = graph_breaking_attention_note(model)
    notes = (note,) if note else ()
    session = find_session(model)
    if session is None:
        return Report(sites=(), notes=notes)
    root = getattr(model, "_orig_mod", model)
    names = {id(p): name for name, p in root.named_parameters()}
    graphs = session.graphs()
    latest: dict[str, tuple[SiteRecord, str]] = {}
    for graph in graphs:
        for prefix, scope in _scopes(session, graph, names):
            for record in graph.sites:
                path = prefix + record.key
                latest.pop(path, None)  # keep the order of the most recent graph
                latest[path] = (record, scoped_key(record.key, scope))
    states = [session.site_states.get(key) for _, key in latest.values()]
    sites = tuple(_site_report(r, state, path) for (path, (r, _)), state in zip(latest.items(), states))
    notes += _window_notes(sites) + _density_notes(sites, states)
    return Report(sites=sites, graphs=len(graphs), notes=notes + calibration_lines())


def _density_notes(sites: tuple[SiteReport, ...], states: list[SiteState | None]) -> tuple[str, ...]:
    """One line per method, grid and ``density`` option whose sparse sites kept more than the option asked
    (by :data:`DENSITY_NOTE_RATIO`): the method's layouts cannot keep less of that grid (svg's narrowest band
    is a query's own frame and the first frame)."""
    lines: dict[str, list[str]] = {}
    for site, state in zip(sites, states):
        config = None if state is None or state.options is None else state.options.method_config
        asked = getattr(config, "density", None)
        if site.sparse and asked is not None and site.mean_density is not None:
            if site.mean_density > asked * DENSITY_NOTE_RATIO:
                line = (f"{site.method} asked for density={asked} keeps {site.mean_density:.3f} of grid "
                        f"{'x'.join(map(str, site.grid))}: its layouts cannot keep less of this grid")
                lines.setdefault(line, []).append(site.module_path)
    return tuple(f"{line} ({', '.join(paths)})" for line, paths in lines.items())


def _window_notes(sites: tuple[SiteReport, ...]) -> tuple[str, ...]:
    """One line per video window that has context tokens on both sides (latents packed beside it)."""
    lines: dict[str, list[str]] = {}
    for s in sites:
        if s.rewritten and s.facts.context_tokens:
            before, after = (s.text_tokens, s.facts.context_tokens) if s.text_position == "prefix" else (
                s.facts.context_tokens, s.text_tokens)
            line = (f"video window {'x'.join(map(str, s.grid))} runs the method; {before} context tokens before it "
                    f"and {after} after it (text) are attended densely")
            lines.setdefault(line, []).append(s.module_path)
    return tuple(f"{line} ({', '.join(paths)})" for line, paths in lines.items())
