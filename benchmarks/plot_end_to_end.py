"""Plots of ``bench_end_to_end.py`` results (needs matplotlib: ``pip install -e ".[bench]"``).

Writes two PNGs next to the first JSON (or into ``--out``):

* ``speedup_vs_density.png``: per model and method, the speedup over Inductor dense against the
  kept density of the sparse steps; left the steady-state sparse call, right the extrapolated
  whole generation (dense warm-up steps included);
* ``total_time.png``: per model, the extrapolated generation time of each method, split into the
  dense-phase and sparse-phase steps.

Several JSON files (e.g. one per device call) are merged; a later file's record of a
(model, method) replaces an earlier one.

    python benchmarks/plot_end_to_end.py benchmarks/results/end_to_end.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INDUCTOR = "dense"
MARKERS = "os^DvP*X"


@dataclass(frozen=True)
class Point:
    """One sparse variant against its model's Inductor dense baseline."""

    model: str
    method: str
    density: float
    call_speedup: float
    total_speedup: float


def load(paths: list[Path]) -> tuple[dict[tuple[str, str], dict[str, Any]], list[str]]:
    """Successful variant records of every file by (model, method), later files winning, in run
    order; and the devices the runs were on."""
    variants: dict[tuple[str, str], dict[str, Any]] = {}
    devices: list[str] = []
    for path in paths:
        data = json.loads(path.read_text())
        devices += [run["device"] for run in data["runs"] if run["device"] not in devices]
        for record in data["variants"]:
            if record["status"] == "ok":
                variants[(record["model"], record["method"])] = record
    return variants, devices


def speedup_points(variants: dict[tuple[str, str], dict[str, Any]]) -> list[Point]:
    """Sparse variants with a kept density whose model has an Inductor dense record."""
    points = []
    for (model, method), record in variants.items():
        base = variants.get((model, INDUCTOR))
        sparse_ms = record["summary"]["sparse_call_ms"]
        if base is None or method == INDUCTOR or sparse_ms is None or record.get("kept_density") is None:
            continue
        points.append(Point(model, method, record["kept_density"], base["summary"]["dense_call_ms"] / sparse_ms,
                            base["extrapolated"]["total_s"] / record["extrapolated"]["total_s"]))
    return points


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (imported on first use: ``--help`` needs no matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup_vs_density(points: list[Point], devices: str, path: Path) -> None:
    """Two panels (steady call, extrapolated total): speedup vs kept density; colour = method, marker = model."""
    from matplotlib.lines import Line2D

    plt = pyplot()
    methods = list(dict.fromkeys(p.method for p in points))
    models = list(dict.fromkeys(p.model for p in points))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    markers = {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(models)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    for ax, attr, title in ((axes[0], "call_speedup", "steady-state sparse call"),
                            (axes[1], "total_speedup", "whole generation (extrapolated)")):
        for p in points:
            ax.scatter(p.density, getattr(p, attr), color=colors[p.method], marker=markers[p.model], s=70)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("kept density (sparse steps)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speedup vs Inductor dense")
    handles = [Line2D([], [], color=colors[m], marker="o", linestyle="", label=m) for m in methods]
    handles += [Line2D([], [], color="black", marker=markers[m], linestyle="", label=m) for m in models]
    axes[1].legend(handles=handles, loc="best", fontsize=8)
    fig.suptitle(f"Speedup over Inductor dense vs kept density ({devices})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_totals(variants: dict[tuple[str, str], dict[str, Any]], devices: str, path: Path) -> None:
    """One panel per model: stacked dense-phase + sparse-phase extrapolated seconds per method."""
    plt = pyplot()
    models = list(dict.fromkeys(model for model, _ in variants))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        records = [r for (m, _), r in variants.items() if m == model]
        names = [r["method"] for r in records]
        dense = [r["extrapolated"]["dense_phase_s"] for r in records]
        sparse = [r["extrapolated"]["sparse_phase_s"] for r in records]
        ax.bar(names, dense, label="dense-phase steps", color="tab:grey")
        ax.bar(names, sparse, bottom=dense, label="sparse-phase steps", color="tab:blue")
        base = variants.get((model, INDUCTOR))
        for i, record in enumerate(records):
            total = record["extrapolated"]["total_s"]
            label = f"{total:.1f} s"
            if base is not None and record is not base:
                label += f"\n{base['extrapolated']['total_s'] / total:.2f}x"
            ax.annotate(label, (i, total), ha="center", va="bottom", fontsize=8)
        settings = records[0]["settings"]
        ax.set_title(f"{model}: {settings['steps']} steps, first {settings['dense_steps']} dense", fontsize=10)
        ax.set_ylabel("extrapolated transformer time (s)")
        ax.margins(y=0.2)
        ax.tick_params(axis="x", rotation=30)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"Extrapolated generation time, transformer calls only ({devices})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="end_to_end.json files of bench_end_to_end.py")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first JSON's)")
    args = parser.parse_args(argv)
    out = args.out or args.json[0].parent
    out.mkdir(parents=True, exist_ok=True)
    variants, devices = load(args.json)
    if not variants:
        raise SystemExit("no successful variant in the given files")
    points = speedup_points(variants)
    written = [out / "total_time.png"]
    plot_totals(variants, ", ".join(devices), written[0])
    if points:
        written.append(out / "speedup_vs_density.png")
        plot_speedup_vs_density(points, ", ".join(devices), written[1])
    else:
        print("no sparse variant with an Inductor dense baseline of the same model: no speedup plot")
    print("wrote", ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
