"""How far is the toy fixture's attention from a real video DiT's? Per layer and head, beside the papers' figures.

``python benchmarks/bench_attention_stats.py [--weights PATH] [--out DIR] [--frames 16 --height 64 --width 96]``

Samples ``--clips`` clips (classes in turn) densely up to the first sparse step (step
``--dense-steps`` of ``--steps``; by default the first step past the backend's default warm-up,
``dense_timestep_fraction`` 0.07: step 2 of 20 on the toy's schedule), captures the Q/K/V of every
self-attention layer there (conditional branch) and, per layer and head, averaged over the clips
(:mod:`sparse_compile.toy.method_recall` defines each):

- the kept density each method (and the oracle) needs for recall 0.9 and 0.95;
- each method's recall and density at its defaults;
- locality: attention mass within one frame and 2 tokens (height, width) of the query, divided
  by the share of keys there (1: position-blind);
- the head's class under SVG's profiling (spatial / temporal), *global* when neither pattern
  keeps half the mass at SVG's density.

The summary averages each method's head-mean density for recall 0.95 over the layers and checks
whether the best method stays at or below ``DENSITY_TARGET``. A table of the figures the seed
papers report for HunyuanVideo and Wan2.1 follows, beside the fixture's.

Writes ``attention_stats.md`` and ``attention_stats.json`` to ``--out``. On a GPU (bf16) the
default grid takes about a minute; the CPU smoke run needs a small grid and ``--tiny`` (small
blocks and cluster counts), e.g. ``--frames 4 --height 32 --width 48 --steps 3 --dense-steps 1
--clips 1 --rows 64 --tiny``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from common import TOY_PATCH, add_toy_arguments, check_toy_arguments

from sparse_compile import options
from sparse_compile.kernels.common import default_scale
from sparse_compile.methods.adaspa import AdaSpaConfig
from sparse_compile.methods.auto import AutoConfig
from sparse_compile.methods.base import in_timestep_warmup
from sparse_compile.methods.call import StepInfo
from sparse_compile.methods.radial import RadialConfig
from sparse_compile.methods.radial_pattern import kept_pair_density, radial_block_mask
from sparse_compile.methods.svg import SvgConfig
from sparse_compile.methods.svg2 import Svg2Config
from sparse_compile.methods.svg_profile import sample_rows
from sparse_compile.toy.attention_stats import CapturedAttention, capture_self_attention
from sparse_compile.toy.evaluate import balanced_labels
from sparse_compile.toy.method_recall import METHODS, RECALLS, CallAnalysis, MethodConfigs, analyse_call
from sparse_compile.toy.model import build_toy_wan, class_embeddings, compute_dtype
from sparse_compile.toy.sampling import generate, noise_level, noise_levels

DENSITY_TARGET = 0.35  # the best method's layer-mean density for recall 0.95
TINY_CONFIGS = MethodConfigs(adaspa=AdaSpaConfig(block=16), svg=SvgConfig(block=16), radial=RadialConfig(block=16),
                             svg2=Svg2Config(q_clusters=8, k_clusters=16, kmeans_iters_init=3),
                             auto=AutoConfig(block=32))
SHORT = {"top-p blocks": "top-p blk"}

# The seed papers' figures (not measured here). Columns: quantity, HunyuanVideo, Wan2.1, fixture key, source.
ANCHORS = (
    ("SVG heads spatial / temporal / other (share of heads)", "29.2% / 66.7% / 4.1% (ambiguous)", "not reported",
     "svg_classes", "SVG project page, svg-project.github.io (Sparse VideoGen, arXiv 2502.01776)"),
    ("SVG kept fraction ('sparsity') in the published scripts", "0.25; first 10% of steps, 3% of layers dense",
     "0.25 (Wan2.1-14B 720p); first 30% of steps, 3% of layers dense", "svg_default",
     "Sparse-VideoGen scripts/hyvideo/hyvideo_t2v_720p_svg.sh, scripts/wan/wan_t2v_720p_svg.sh"),
    ("SVG2 at top_p 0.9: kept density, PSNR vs dense", "~25% density, PSNR 30.45 (2.30x); 'Turbo' 13% density",
     "PSNR up to 26 (1.89x); Wan2.1-14B T2V PSNR 25.8 (1.60x); script: 100 / 100 clusters", "svg2_default",
     "Sparse VideoGen2, arXiv 2505.18875 (abstract); shared/NOTES-methods.md; scripts/wan/wan_t2v_720p_sap.sh"),
    ("AdaSpa: per-head recall at 20% kept blocks (sparsity 0.8)", "> 0.8", "not reported", "adaspa_default",
     "AdaSpa, arXiv 2502.21079; shared/NOTES-methods.md"),
    ("Radial default mask: kept density of the published rule at the model's grid",
     "decay 0.95, no sink: {radial_hunyuan} at 33x45x80 (720p, 129 frames)",
     "decay 0.2, sink: {radial_wan} at 21x30x52 (480p, 81 frames)", "radial_default",
     "rule of Radial Attention, arXiv 2506.19852; density computed here from the mask, not an attention figure"),
    ("Locality (mass near the query / share of near keys)",
     "not reported as a number (Radial: attention decays with spatial and temporal distance)", "same",
     "locality", "Radial Attention, arXiv 2506.19852"),
)
PUBLISHED_GRIDS = {"radial_hunyuan": ((33, 45, 80), 0.95, False), "radial_wan": ((21, 30, 52), 0.2, True)}


def capture(model: torch.nn.Module, args: argparse.Namespace) -> tuple[list[CapturedAttention], float]:
    """Self-attention calls of one conditional forward at step ``--dense-steps`` of a dense ``--steps`` sampling."""
    device, dtype = compute_dtype(model)
    labels = balanced_labels(args.clips)
    latent = generate(model, labels, args.seed, args.frames, args.height, args.width, args.steps,
                      until=args.dense_steps)
    sigma = noise_level(args.dense_steps, args.steps)
    with torch.no_grad(), capture_self_attention() as calls:
        model(hidden_states=latent.to(dtype), timestep=torch.full((args.clips,), sigma * 1000, device=device),
              encoder_hidden_states=class_embeddings(labels.to(device), dtype))
    return calls, sigma


def head_rows(analyses: list[CallAnalysis]) -> list[dict]:
    """One dict per (layer, head): every statistic averaged over the batch (the clips)."""
    rows = []
    for layer, a in enumerate(analyses):
        for head in range(a.near_mass.shape[1]):
            row: dict = {"layer": layer, "head": head,
                         "locality": float(a.near_mass[:, head].mean()) / a.near_share,
                         "svg_class": [c[head] for c in a.svg_class], "auto_choice": [c[head] for c in a.auto_choice]}
            for method in METHODS:
                for target in RECALLS:
                    row[f"{method} {target}"] = float(a.needed[method][target][:, head].mean())
            for method, (recall, density) in a.at_defaults.items():
                row[f"{method} defaults recall"] = float(recall[:, head].mean())
                row[f"{method} defaults density"] = float(density[:, head].mean())
            rows.append(row)
    return rows


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def _class_counts(rows: list[dict]) -> tuple[int, int, int]:
    labels = [c for r in rows for c in r["svg_class"]]
    return tuple(labels.count(kind) for kind in ("spatial", "temporal", "global"))


def density_table(groups: dict[str, list[dict]], first: str) -> list[str]:
    """Markdown rows: per group, each method's density for 0.9 / 0.95, locality and SVG classes."""
    cols = " | ".join(SHORT.get(m, m) for m in METHODS)
    lines = [f"| {first} | {cols} | locality | SVG spatial / temporal / global |", "|---" * (len(METHODS) + 3) + "|"]
    for name, rows in groups.items():
        cells = " | ".join(" / ".join(f"{_mean(rows, f'{m} {t}'):.3f}" for t in RECALLS) for m in METHODS)
        lines.append(f"| {name} | {cells} | {_mean(rows, 'locality'):.1f} | {' / '.join(map(str, _class_counts(rows)))} |")
    return lines


def summary(rows: list[dict], layers: int) -> tuple[list[str], dict]:
    """Each method's density for recall 0.95 averaged over layers, the best one against ``DENSITY_TARGET``,
    and each method at its defaults."""
    by_layer = [[r for r in rows if r["layer"] == layer] for layer in range(layers)]
    target = max(RECALLS)
    means = {m: sum(_mean(ls, f"{m} {target}") for ls in by_layer) / layers for m in METHODS if m != "oracle"}
    best = min(means, key=means.get)
    lines = [f"Density for recall {target}, mean over layers (a head no setting of the method brings to the "
             "target counts as 1.0):", "",
             "| " + " | ".join(SHORT.get(m, m) for m in means) + " | oracle |", "|---" * (len(means) + 1) + "|",
             "| " + " | ".join(f"{v:.3f}" for v in means.values()) + f" | {sum(_mean(ls, f'oracle {target}') for ls in by_layer) / layers:.3f} |",
             "", f"Best method: {best} at {means[best]:.3f} (target <= {DENSITY_TARGET}): "
             + ("met" if means[best] <= DENSITY_TARGET else "NOT met"), "",
             "Each method at its defaults (mean over layers and heads):", "", "| method | recall | kept density |",
             "|---|---|---|"]
    defaults = sorted({k.rsplit(" defaults", 1)[0] for k in rows[0] if " defaults " in k})
    for method in defaults:
        lines.append(f"| {method} | {_mean(rows, f'{method} defaults recall'):.3f} | "
                     f"{_mean(rows, f'{method} defaults density'):.3f} |")
    return lines, {"density_for_recall_0.95": means, "best": best, "met": means[best] <= DENSITY_TARGET}


def fixture_figures(rows: list[dict]) -> dict[str, str]:
    """The fixture's value beside each anchor (keys of ``ANCHORS``)."""
    spatial, temporal, other = _class_counts(rows)
    total = spatial + temporal + other
    share = lambda n: f"{100 * n / total:.1f}%"  # noqa: E731
    default = lambda m: (f"recall {_mean(rows, f'{m} defaults recall'):.3f} at density "  # noqa: E731
                         f"{_mean(rows, f'{m} defaults density'):.3f}")
    adaspa_heads = [r["adaspa defaults recall"] for r in rows]
    return {
        "svg_classes": f"{share(spatial)} / {share(temporal)} / {share(other)} (global)",
        "svg_default": f"{default('svg')}; needs {_mean(rows, 'svg 0.9'):.3f} for recall 0.9",
        "svg2_default": default("svg2"),
        "adaspa_default": f"{default('adaspa')}; heads > 0.8: {sum(r > 0.8 for r in adaspa_heads)}/{len(adaspa_heads)}",
        "radial_default": default("radial"),
        "locality": f"{_mean(rows, 'locality'):.1f}",
    }


def anchors_table(rows: list[dict]) -> list[str]:
    """The papers' figures for HunyuanVideo and Wan2.1 beside the fixture's, each with its source."""
    published = {name: f"{kept_pair_density(radial_block_mask(*grid, 128, decay, sink), grid[0] * grid[1] * grid[2], 128):.3f}"
                 for name, (grid, decay, sink) in PUBLISHED_GRIDS.items()}
    fixture = fixture_figures(rows)
    lines = ["| quantity | HunyuanVideo | Wan2.1 | this fixture | source |", "|---|---|---|---|---|"]
    for quantity, hunyuan, wan, key, source in ANCHORS:
        lines.append(f"| {quantity} | {hunyuan.format(**published)} | {wan.format(**published)} | {fixture[key]} "
                     f"| {source} |")
    return lines


def default_warmup_steps(steps: int) -> int:
    """Steps of a ``steps``-step toy sampling that the backend's default ``dense_timestep_fraction`` runs dense."""
    timesteps = (noise_levels(steps)[:steps] * 1000).tolist()
    return sum(in_timestep_warmup(StepInfo(i, 0, 0, t, timesteps[0]), options.DEFAULT_DENSE_TIMESTEP_FRACTION)
               for i, t in enumerate(timesteps))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_toy_arguments(parser, "attention_stats.md and attention_stats.json")
    parser.add_argument("--clips", type=int, default=2, help="clips (classes in turn) the statistics average over")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int,
                        help="capture at this step (the first sparse one; default: past the default warm-up)")
    parser.add_argument("--rows", type=int, default=512, help="sampled query rows per head (row-level recalls)")
    args = parser.parse_args(argv)
    check_toy_arguments(parser, args)
    if min(args.clips, args.steps, args.rows) < 1:
        parser.error("--clips, --steps and --rows must be at least 1")
    if args.dense_steps is None:
        args.dense_steps = min(default_warmup_steps(args.steps), args.steps - 1)
    if not 0 <= args.dense_steps < args.steps:
        parser.error(f"--dense-steps must be in [0, --steps={args.steps}), got {args.dense_steps}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_toy_wan(device, torch.bfloat16 if device.type == "cuda" else torch.float32, weights=args.weights)
    grid = (args.frames, args.height // TOY_PATCH, args.width // TOY_PATCH)
    calls, sigma = capture(model, args)
    rows_sampled = sample_rows(grid[0] * grid[1] * grid[2], args.rows, device)
    configs = TINY_CONFIGS if args.tiny else MethodConfigs()
    analyses = []
    for call in calls:
        scale = default_scale(call.query.shape[-1], call.scale)
        analyses.append(analyse_call(call.query, call.key, call.value, grid, rows_sampled, scale, configs))
    rows = head_rows(analyses)
    header = (f"toy model {args.weights.name}, grid {grid[0]}x{grid[1]}x{grid[2]} tokens ({args.frames} frames "
              f"{args.height}x{args.width} px), {args.clips} clips, captured at step {args.dense_steps} of {args.steps} "
              f"(sigma {sigma:.2f}), {rows_sampled.numel()} sampled rows per head, {device.type}; densities are kept "
              "fractions of the video pairs, each cell 'recall 0.9 / recall 0.95'")
    summary_lines, verdict = summary(rows, len(analyses))
    per_layer = {str(layer): [r for r in rows if r["layer"] == layer] for layer in range(len(analyses))}
    per_head = {f"{r['layer']}.{r['head']}": [r] for r in rows}
    text = "\n".join([header, "", "Per layer (mean over heads):", "", *density_table(per_layer, "layer"), "",
                      *summary_lines, "", "Published anchors beside the fixture:", "", *anchors_table(rows), "",
                      "Per head (layer.head):", "", *density_table(per_head, "head")])
    print(text)
    print(f"({time.perf_counter() - start:.0f} s)")
    if args.out is not None:
        (args.out / "attention_stats.md").write_text(text + "\n")
        (args.out / "attention_stats.json").write_text(json.dumps(
            {"header": header, "grid": grid, "sigma": sigma, "summary": verdict, "heads": rows}, indent=1))


if __name__ == "__main__":
    main()
