"""Does a sparse method keep the toy model's clips recognisable? Judge accuracy without a dense reference.

``python benchmarks/bench_task_score.py [--weights PATH] [--out DIR] [--clips 32] [--frames 16 --height 64 --width 96]``

Generates ``--clips`` clips (every class in turn, the same noise for every setting) with the toy
model (:mod:`sparse_compile.toy`) compiled with ``backend="sparse_video"``: first ``method="dense"``
(the same compiled graph with exact attention: the reference), then every sparse method at its
defaults and (without ``--defaults-only``) at kept densities 0.25 and 0.125 where the method has a
knob for its density and its layouts can keep that little of this grid (``density`` for svg and adaspa;
for radial the largest ``decay`` whose layout keeps at most that density; svg2, whose density follows
the attention, at ``top_p`` 0.75 and 0.5); the table names the densities a method cannot reach at the
grid and why (a static layout keeps a query's own frame and the first frame). Every setting runs the first
``--dense-steps`` of ``--steps`` dense. Each clip is judged (:mod:`sparse_compile.toy.judge`); a row
gives the fraction read back as the class asked for, the clips it reads right where dense does not and
the reverse (the same noise: the paired difference), the fraction where the judge found shapes at
all, the mean PSNR against the dense clip of the same noise, the mean kept density of the sparse
steps (from :func:`sparse_compile.report`) and the seconds the setting took (compile included).

Writes ``task_score.md`` and ``task_score.json`` to ``--out``, after every setting (a run cut short
leaves the rows it finished, its header saying so). Meant for a GPU (bf16); on the
CPU the methods run their reference kernels, so use the smoke size with ``--tiny`` (small
blocks and cluster counts for a grid of a few hundred tokens), e.g.
``--frames 4 --height 32 --width 48 --steps 3 --dense-steps 1 --clips 2 --tiny``.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from common import TOY_PATCH, add_toy_arguments, check_toy_arguments, save_toy_table, write_toy_table

import sparse_compile
from sparse_compile.methods import METHODS
from sparse_compile.methods.radial_pattern import kept_pair_density, radial_block_mask
from sparse_compile.methods.svg_patterns import build_patterns
from sparse_compile.toy.evaluate import clips_gained_and_lost, generate_clips, score_clips
from sparse_compile.toy.metrics import psnr
from sparse_compile.toy.model import build_toy_wan

DENSITIES = (0.25, 0.125)
SVG2_TOP_P = (0.75, 0.5)  # svg2's kept density follows the attention: lower top_p keeps fewer cluster pairs
ACCURACY_TARGET = 0.90
DEFAULTS_WITHIN = 0.03  # judge accuracy of every method at its defaults within this of dense
TINY_OPTIONS = {"svg2": {"q_clusters": 8, "k_clusters": 16, "kmeans_iters_init": 3}, "svg": {"block": 16},
                "radial": {"block": 16}, "adaspa": {"block": 16}, "auto": {"block": 32}}


def radial_decay_for(grid: tuple[int, int, int], block: int, density: float) -> float | None:
    """The largest radial ``decay`` in (0, 1] whose layout over ``grid`` keeps at most ``density``
    of the pairs (bisection, 20 halvings), or ``None`` when even the smallest decay keeps more."""
    tokens = grid[0] * grid[1] * grid[2]

    def kept(decay: float) -> float:
        return kept_pair_density(radial_block_mask(*grid, block, decay, True), tokens, block)

    if kept(1.0) <= density:
        return 1.0
    low, high = 1e-6, 1.0
    if kept(low) > density:
        return None
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if kept(mid) <= density else (low, mid)
    return low


def svg_floor_density(grid: tuple[int, int, int], block: int, density: float) -> float:
    """The kept density of svg's denser pattern over ``grid`` at ``density`` (what a head may keep): above
    ``density`` where the narrowest band (a query's own frame and the first frame) keeps more."""
    patterns = build_patterns(*grid, block, density, torch.device("cpu"))
    return max(float(patterns.spatial.kept), float(patterns.temporal.kept))


def method_settings(method: str, grid: tuple[int, int, int], tiny: bool,
                    defaults_only: bool = False) -> tuple[list[tuple[str, dict]], list[str]]:
    """``(row name, method options)`` of one method: its defaults, then (unless ``defaults_only``) each of
    ``DENSITIES`` it can be set to at ``grid``; and a note for each density it cannot reach there."""
    base = dict(TINY_OPTIONS.get(method, {})) if tiny else {}
    settings = [(f"{method} (defaults)", base)]
    notes: list[str] = []
    if defaults_only:
        return settings, notes
    defaults = METHODS[method].config_type().as_dict()
    block = base.get("block", defaults.get("block"))
    for d in DENSITIES:
        if method == "svg":
            floor = svg_floor_density(grid, block, d)
            if floor > d:
                notes.append(f"svg cannot keep {d} of this grid: its narrowest patterns keep {floor:.3f}")
            elif d != defaults["density"]:
                settings.append((f"svg density {d}", {**base, "density": d}))
        elif "density" in defaults and d != defaults["density"]:
            settings.append((f"{method} density {d}", {**base, "density": d}))
        elif method == "radial":
            decay = radial_decay_for(grid, block, d)
            if decay is not None:
                settings.append((f"radial density <= {d} (decay {decay:.3g})", {**base, "decay": decay}))
            else:
                notes.append(f"radial cannot keep {d} of this grid: its smallest decay keeps more")
    if method == "svg2":
        settings += [(f"svg2 top_p {p}", {**base, "top_p": p}) for p in SVG2_TOP_P]
    return settings, notes


def mean_kept_density(model: torch.nn.Module) -> float | None:
    """Mean over the rewritten sites of their mean kept density at the sparse steps (``None``: no sparse step)."""
    values = [s.mean_density for s in sparse_compile.report(model).sites if s.mean_density is not None]
    return sum(values) / len(values) if values else None


def run_setting(model: torch.nn.Module, options: dict, args: argparse.Namespace) -> tuple[torch.Tensor, dict]:
    """Clips of ``model`` compiled with ``options`` and what the report says about them."""
    torch._dynamo.reset()  # a fresh compile per setting: the recompile limit must never send a setting to eager
    compiled = torch.compile(model, backend="sparse_video", options=options)
    start = time.perf_counter()
    videos = generate_clips(compiled, args.frames, args.height, args.width, args.steps, args.clips, args.seed,
                            args.batch, between_batches=lambda: sparse_compile.reset(compiled))
    seconds = time.perf_counter() - start
    sites = sparse_compile.report(compiled).sites
    facts = {"sites": len(sites), "sparse_sites": sum(s.sparse for s in sites), "density": mean_kept_density(compiled),
             "seconds": round(seconds, 1)}
    return videos, facts


def score_rows(model: torch.nn.Module, args: argparse.Namespace,
               on_row: Callable[[list[dict]], None] = lambda rows: None) -> list[dict]:
    """One row per setting: dense first, then every sparse method's settings; ``on_row`` gets the rows so far
    after each one."""
    grid = (args.frames, args.height // TOY_PATCH, args.width // TOY_PATCH)
    common_options = {"dense_steps": args.dense_steps, "min_seq_len": 256}
    dense, facts = run_setting(model, {"method": "dense", **common_options}, args)
    rows = [{"setting": "dense", "options": {"method": "dense"}, **score_clips(dense, args.steps).as_dict(),
             "psnr_db": None, **facts}]
    print(f"dense: accuracy {rows[0]['accuracy']:.3f} ({facts['seconds']} s)", flush=True)
    on_row(rows)
    for method in args.methods:
        for name, extra in method_settings(method, grid, args.tiny, args.defaults_only)[0]:
            options = {"method": method, **common_options, **extra}
            videos, facts = run_setting(model, options, args)
            score = score_clips(videos, args.steps).as_dict()
            quality = float(psnr(videos, dense).clamp(max=100).mean())
            rows.append({"setting": name, "options": {"method": method, **extra}, **score, "psnr_db": quality, **facts})
            print(f"{name}: accuracy {score['accuracy']:.3f}, PSNR {quality:.1f} dB ({facts['seconds']} s)", flush=True)
            on_row(rows)
    return rows


def markdown(rows: list[dict], header: str, notes: list[str] = ()) -> str:
    """The table, then the targets (dense accuracy, every method's defaults against dense) and ``notes``
    (the densities a method cannot reach at the grid)."""
    dense = rows[0]["accuracy"]
    lines = [header, "",
             "| setting | judge accuracy | vs dense (points) | clips right only here / only dense | shapes found "
             "| PSNR vs dense (dB) | kept density | sparse sites | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        value = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        density = "-" if r["density"] is None else f"{r['density']:.3f}"
        gained, lost = clips_gained_and_lost(r["correct"], rows[0]["correct"])
        lines.append(f"| {r['setting']} | {r['accuracy']:.3f} | {100 * (r['accuracy'] - dense):+.1f} | {gained} / {lost} | "
                     f"{r['found']:.3f} | {value} | {density} | {r['sparse_sites']}/{r['sites']} | {r['seconds']} |")
    defaults = [r for r in rows[1:] if r["setting"].endswith("(defaults)")]
    behind = [r["setting"] for r in defaults if r["accuracy"] < dense - DEFAULTS_WITHIN]
    lines += ["", f"- dense judge accuracy {dense:.3f} (target >= {ACCURACY_TARGET}): "
              + ("met" if dense >= ACCURACY_TARGET else "NOT met"),
              f"- every method at its defaults within {100 * DEFAULTS_WITHIN:.0f} points of dense: "
              + ("yes" if not behind else "no: " + ", ".join(behind))]
    lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_toy_arguments(parser, "task_score.md and task_score.json")
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="clips per generation batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int, default=5)
    parser.add_argument("--defaults-only", action="store_true",
                        help="only each method's defaults (the rows the 3-point target is about), no density rows")
    parser.add_argument("--methods", nargs="+", default=[m for m in sparse_compile.available_methods() if m != "dense"],
                        choices=[m for m in sparse_compile.available_methods() if m != "dense"])
    args = parser.parse_args(argv)
    check_toy_arguments(parser, args)
    if min(args.clips, args.batch, args.steps) < 1:
        parser.error("--clips, --batch and --steps must be at least 1")
    if not 0 <= args.dense_steps <= args.steps:
        parser.error(f"--dense-steps must be in [0, --steps={args.steps}], got {args.dense_steps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_toy_wan(device, torch.bfloat16 if device.type == "cuda" else torch.float32, weights=args.weights)
    header = (f"toy model {args.weights.name}, {args.clips} clips of {args.frames}x{args.height}x{args.width} px "
              f"(grid {args.frames}x{args.height // TOY_PATCH}x{args.width // TOY_PATCH} tokens), {args.steps} steps with CFG "
              f"({args.dense_steps} dense), {device.type}, torch {torch.__version__}")
    partial = header + " (partial: the run stopped before every setting)"
    grid = (args.frames, args.height // TOY_PATCH, args.width // TOY_PATCH)
    notes = [note for method in args.methods for note in method_settings(method, grid, args.tiny, args.defaults_only)[1]]
    rows = score_rows(model, args, lambda rows: save_toy_table(args.out, "task_score", markdown(rows, partial, notes),
                                                                partial, args.weights, rows))  # fmt: skip
    write_toy_table(args.out, "task_score", markdown(rows, header, notes), header, args.weights, rows)


if __name__ == "__main__":
    main()
