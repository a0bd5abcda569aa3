"""``sparse_compile.report(model)``: what the backend did at every attention site."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_compile.runtime.session import find_session
from sparse_compile.runtime.sites import GRAPHS


@dataclass(frozen=True)
class SiteReport:
    """Facts of one attention site of a compiled graph.

    ``rewritten`` says the site runs through the backend's op (sparse, or dense by option);
    ``density_by_step`` maps a denoising step to the mean kept density of that step's calls.
    """

    module_path: str
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    kind: str
    grid: tuple[int, int, int] | None
    text_tokens: int
    text_position: str | None
    method: str
    status: str
    rewritten: bool
    density_by_step: dict[int, float]

    @property
    def sparse(self) -> bool:
        return self.status == "sparse"

    @property
    def mean_density(self) -> float | None:
        """Mean kept density over the steps run so far (``None`` before the first call)."""
        if not self.density_by_step:
            return None
        return sum(self.density_by_step.values()) / len(self.density_by_step)


@dataclass(frozen=True)
class Report:
    """All sites of every graph compiled for a model, in compile then graph order."""

    sites: tuple[SiteReport, ...]

    @property
    def rewritten(self) -> tuple[SiteReport, ...]:
        """Sites running through the backend's op (sparse, or dense by option)."""
        return tuple(s for s in self.sites if s.rewritten)

    def __str__(self) -> str:
        if not self.sites:
            return "sparse_compile report: no graph compiled yet (torch.compile compiles on the first call)"
        header = ("site", "q (B,H,S,D)", "k", "kind", "grid (T,H,W)", "text", "status", "density")
        rows = [header]
        for s in self.sites:
            density = "-" if s.mean_density is None else f"{s.mean_density:.3f}"
            text = f"{s.text_tokens} {s.text_position}" if s.text_tokens else "-"
            rows.append(
                (s.module_path, "x".join(map(str, s.q_shape)), "x".join(map(str, s.k_shape)), s.kind,
                 "-" if s.grid is None else "x".join(map(str, s.grid)), text, s.status, density)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        sparse = sum(s.sparse for s in self.sites)
        lines.append(f"{len(self.sites)} attention sites: {sparse} sparse, {len(self.sites) - sparse} dense")
        return "\n".join(lines)


def report(model: torch.nn.Module) -> Report:
    """Per-site facts for a model compiled with ``backend="sparse_video"`` (or its compiled wrapper)."""
    session = find_session(model)
    if session is None:
        return Report(sites=())
    sites = []
    for graph_id in session.graph_ids:
        for r in GRAPHS[graph_id].sites:
            state = session.site_states.get(r.site_id)
            densities = {} if state is None else state.densities
            status = r.status
            if state is not None and state.fallback_reason is not None:
                status = f"dense: {state.fallback_reason} (at run time)"
            sites.append(
                SiteReport(
                    module_path=r.module_path,
                    q_shape=r.q_shape,
                    k_shape=r.k_shape,
                    kind=r.kind,
                    grid=r.grid,
                    text_tokens=r.text_tokens,
                    text_position=r.text_position,
                    method=r.method,
                    status=status,
                    rewritten=r.rewritten,
                    density_by_step={step: sum(map(float, d)) / len(d) for step, d in sorted(densities.items())},
                )
            )
    return Report(sites=tuple(sites))
