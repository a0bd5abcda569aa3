"""How far is the toy fixture's attention from a real video DiT's? Per layer and head, on the CPU.

``PYTHONPATH=. python benchmarks/bench_attention_stats.py [--frames 9 --height 32 --width 48] [--json PATH]``

Captures the self-attention Q/K/V of the shipped toy model (:mod:`sparse_compile.toy`) at mid
noise on ground-truth procedural clips, then for ``--rows`` sampled query rows of every head
computes the exact attention rows and reports:

- **oracle density**: the fewest keys (per row, the most-attended first) that hold 0.90 / 0.95
  of the row's attention mass, as a fraction of all keys: no method can keep less for that
  recall; **block oracle** the same with key blocks of 64 frame-major tokens;
- **SVG density**: the smallest SVG band density (block 128, among ``SVG_DENSITIES``) at which
  the head's better pattern (spatial or temporal) keeps 0.90 / 0.95 of the sampled rows' mass;
- **locality**: attention mass within one frame and 2 tokens (height, width) of the query,
  divided by the share of keys there (1: position-blind);
- **SVG profile**: the head's class under SVG's profiling at its default density 0.25
  (:func:`sparse_compile.methods.svg_profile.classify_heads`: spatial or temporal), and
  *global* when neither pattern keeps half the mass at that density.

The published anchors are printed beside the table (figures of the papers, not measured here).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sparse_compile.methods.svg_profile import classify_heads, sample_rows
from sparse_compile.methods.svg_patterns import build_patterns
from sparse_compile.toy.attention_stats import capture_self_attention
from sparse_compile.toy.model import build_toy_wan, class_embeddings
from sparse_compile.toy.videos import make_videos

RECALLS = (0.9, 0.95)
SVG_DENSITIES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
SVG_DEFAULT_DENSITY = 0.25
SVG_BLOCK = 128
ORACLE_BLOCK = 64
GLOBAL_BELOW = 0.5
ANCHORS = (
    "SVG2 (HunyuanVideo): top-p 0.9 over clusters at ~25% kept density, PSNR 30.45; 'Turbo' at 13%",
    "SVG (HunyuanVideo, CogVideoX, Wan): spatial/temporal bands at ~20-25% kept; quality drops below ~20%",
    "AdaSpa (HunyuanVideo): recall > 0.8 per head at sparsity 0.8 (20% kept blocks)",
    "XAttention: cumulative block-mass threshold 0.9-0.95",
)


def mass_density(probs: torch.Tensor, recall: float) -> torch.Tensor:
    """Fraction of the last dim's entries of ``probs`` ``(..., S)`` (rows summing to 1) that the
    fewest-entries set holding ``recall`` of the mass needs; ``(...)``."""
    ordered = probs.sort(-1, descending=True).values.cumsum(-1)
    return ((ordered < recall).sum(-1) + 1).clamp(max=probs.shape[-1]).float() / probs.shape[-1]


def block_mass(probs: torch.Tensor, block: int) -> torch.Tensor:
    """Sums of ``probs`` ``(..., S)`` over consecutive blocks of ``block`` keys: ``(..., ceil(S / block))``."""
    pad = (-probs.shape[-1]) % block
    return torch.nn.functional.pad(probs, (0, pad)).unflatten(-1, (-1, block)).sum(-1)


def near_mask(rows: torch.Tensor, grid: tuple[int, int, int], radius: int = 2) -> torch.Tensor:
    """Bool ``(R, S)``: keys within one frame and ``radius`` tokens (height, width) of each query row."""
    frames, height, width = grid
    keys = torch.arange(frames * height * width)
    coords = lambda i: (i // (height * width), (i // width) % height, i % width)  # noqa: E731
    (tq, hq, wq), (tk, hk, wk) = coords(rows), coords(keys)
    return (((tq[:, None] - tk).abs() <= 1) & ((hq[:, None] - hk).abs() <= radius)
            & ((wq[:, None] - wk).abs() <= radius))


def svg_density_needed(probs: torch.Tensor, grid: tuple[int, int, int], rows: torch.Tensor) -> dict:
    """Per head (``probs`` ``(H, R, S)``): SVG density reaching each recall, and recall of each pattern at the default."""
    needed = {recall: torch.full((probs.shape[0],), float("nan")) for recall in RECALLS}
    at_default = None
    for density in SVG_DENSITIES:
        spatial, temporal = build_patterns(*grid, SVG_BLOCK, density, torch.device("cpu")).row_masks(rows)
        kept = torch.stack([(probs * spatial).sum(-1).mean(-1), (probs * temporal).sum(-1).mean(-1)], -1)  # (H, 2)
        if density == SVG_DEFAULT_DENSITY:
            at_default = kept
        for recall in RECALLS:
            reached = (kept.amax(-1) >= recall) & needed[recall].isnan()
            needed[recall][reached] = density
    return {"needed": needed, "recall_at_default": at_default}


def layer_stats(call, grid: tuple[int, int, int], rows: torch.Tensor) -> list[dict]:
    """Statistics of every head of one captured call (batch element 0)."""
    q, k, v = call.query[:1].float(), call.key[:1].float(), call.value[:1].float()
    scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
    probs = ((q[0, :, rows] @ k[0].transpose(-1, -2)) * scale).softmax(-1)  # (H, R, S)
    near = near_mask(rows, grid)
    locality = (probs * near).sum(-1).mean(-1) / near.float().mean()
    svg = svg_density_needed(probs, grid, rows)
    profile_rows = sample_rows(q.shape[2], 64, q.device)
    temporal = classify_heads(q, k, v, build_patterns(*grid, SVG_BLOCK, SVG_DEFAULT_DENSITY, q.device),
                              profile_rows, scale)[0]
    heads = []
    for h in range(probs.shape[0]):
        best_default = float(svg["recall_at_default"][h].amax())
        kind = "global" if best_default < GLOBAL_BELOW else ("temporal" if bool(temporal[h]) else "spatial")
        stats = {"head": h, "locality": float(locality[h]), "svg_class": kind, "svg_recall_at_default": best_default}
        for recall in RECALLS:
            stats[f"oracle_{recall}"] = float(mass_density(probs[h], recall).mean())
            stats[f"block_oracle_{recall}"] = float(mass_density(block_mass(probs[h], ORACLE_BLOCK), recall).mean())
            stats[f"svg_{recall}"] = float(svg["needed"][recall][h])
        heads.append(stats)
    return heads


def capture(frames: int, height: int, width: int, clips: int) -> list:
    """Self-attention calls of the shipped toy model on ``clips`` ground-truth clips at noise level 0.5."""
    model = build_toy_wan()
    labels = torch.arange(clips) % 8
    videos = make_videos(10**6, labels, frames, height, width)
    noisy = 0.5 * videos + 0.5 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_self_attention() as calls:
        model(hidden_states=noisy, timestep=torch.full((clips,), 500.0), encoder_hidden_states=class_embeddings(labels))
    return calls


def table(per_layer: list[list[dict]]) -> str:
    """Markdown: one row per layer, head means (SVG class counts)."""
    cols = [f"{kind}_{r}" for r in RECALLS for kind in ("oracle", "block_oracle", "svg")]
    lines = ["| layer | " + " | ".join(cols) + " | locality | spatial / temporal / global |",
             "|---" * (len(cols) + 3) + "|"]
    for layer, heads in enumerate(per_layer):
        mean = lambda key: sum(h[key] for h in heads) / len(heads)  # noqa: E731
        counts = [sum(h["svg_class"] == c for h in heads) for c in ("spatial", "temporal", "global")]
        lines.append(f"| {layer} | " + " | ".join(f"{mean(c):.3f}" for c in cols)
                     + f" | {mean('locality'):.1f} | {' / '.join(map(str, counts))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--height", type=int, default=32, help="pixels, even")
    parser.add_argument("--width", type=int, default=48, help="pixels, even")
    parser.add_argument("--rows", type=int, default=256, help="sampled query rows per head")
    parser.add_argument("--json", type=Path, help="also write the per-head statistics here")
    args = parser.parse_args(argv)
    if args.height % 2 or args.width % 2 or min(args.frames, args.rows) < 1:
        parser.error("--height and --width must be even; --frames and --rows at least 1")
    grid = (args.frames, args.height // 2, args.width // 2)
    calls = capture(args.frames, args.height, args.width, clips=1)
    rows = sample_rows(grid[0] * grid[1] * grid[2], args.rows, torch.device("cpu"))
    per_layer = [layer_stats(call, grid, rows) for call in calls]
    print(f"toy fixture, grid {grid} (frames, height, width tokens), {rows.numel()} sampled rows per head, "
          "noise level 0.5; densities are kept fractions of the video key pairs")
    print(table(per_layer))
    print("published anchors (papers' figures, not measured here):")
    for line in ANCHORS:
        print(f"- {line}")
    if args.json:
        args.json.write_text(json.dumps({"grid": grid, "rows": rows.numel(), "layers": per_layer}, indent=1))


if __name__ == "__main__":
    main()
