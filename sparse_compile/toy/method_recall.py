"""Kept density each sparse method needs for a recall target, per head, from one self-attention call.

*Recall* of a set of kept (query, key) pairs: the share of each query row's softmax mass that its
kept keys carry, averaged over the rows. *Density*: kept pairs / ``Sv**2``. For q, k, v
``(B, H, Sv, D)`` over a frame-major video grid, :func:`analyse_call` gives per (batch element,
head) the density each method needs for each recall target (:func:`needed_density` of the
method's operating points; 1 when none reaches it: the method would have to run dense), and
each method's recall and density at its defaults:

- ``oracle``: per query row the fewest keys, most-attended first (no method keeps less);
- ``top-p blocks``: per query block the fewest key blocks by exact block mass (``auto``'s top-p
  candidate; the bound for per-block selection at adaspa's block size);
- ``adaspa``: the same number of top blocks in every query block of a head (its search's rule),
  at every count; at defaults, its head-adaptive search at ``density``;
- ``svg``: the better of its spatial and temporal layouts at each of ``SVG_DENSITIES``; at
  defaults, the pattern its profiling picks at ``density``;
- ``radial``: its mask at each of ``RADIAL_DECAYS`` (the same for every head);
- ``svg2``: k-means clusters at the configured counts, top-p of the cluster pairs at each of
  ``SVG2_TOP_PS``;
- ``auto``: its per-head choice for the target (exact block masses, no break-even guard).

Row-level recalls (oracle, svg, svg2, locality) are exact on the sampled query rows; block-level
ones (top-p blocks, adaspa, radial, auto) exact over all rows. Memory ``O(B * H * R * Sv)`` for
``R`` sampled rows and ``O(B * H * N^2)`` for ``N`` blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sparse_compile.kernels.block_select import attention_lse, select_top_p_clusters
from sparse_compile.kernels.block_select_reference import block_sizes
from sparse_compile.kernels.kmeans import kmeans
from sparse_compile.methods.adaspa import AdaSpaConfig
from sparse_compile.methods.adaspa_search import normalised_mass, ranked_masses, recall_gains, search_layout
from sparse_compile.methods.auto import AutoConfig
from sparse_compile.methods.auto_choice import candidate_recall, choice_names, choose_heads, top_p_blocks
from sparse_compile.methods.auto_patterns import Candidates, static_candidates
from sparse_compile.methods.radial import RadialConfig
from sparse_compile.methods.radial_pattern import kept_pair_density, radial_block_mask
from sparse_compile.methods.svg import SvgConfig
from sparse_compile.methods.svg2 import Svg2Config
from sparse_compile.methods.svg_patterns import build_patterns
from sparse_compile.methods.svg_profile import classify_heads, sample_rows
from sparse_compile.toy.attention_stats import near_mask, row_log_probs

RECALLS = (0.9, 0.95)
METHODS = ("oracle", "top-p blocks", "adaspa", "svg", "radial", "svg2", "auto")
SVG_DENSITIES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
RADIAL_DECAYS = (0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0)
SVG2_TOP_PS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
GLOBAL_BELOW = 0.5  # a head whose better SVG pattern keeps less recall than this at its density is "global"
PROFILE_ROWS = 64  # SVG's profiling rows
_TOLERANCE = 1e-6


@dataclass(frozen=True)
class MethodConfigs:
    """The configs whose block sizes, cluster counts and defaults the analysis uses."""

    adaspa: AdaSpaConfig = AdaSpaConfig()
    svg: SvgConfig = SvgConfig()
    radial: RadialConfig = RadialConfig()
    svg2: Svg2Config = Svg2Config()
    auto: AutoConfig = AutoConfig()


@dataclass(frozen=True)
class Curve:
    """A method's operating points per (batch element, head): density and recall, fp32 ``(B, H, P)`` each."""

    density: Tensor
    recall: Tensor


@dataclass(frozen=True)
class CallAnalysis:
    """Everything :func:`analyse_call` measures, fp32 ``(B, H)`` tensors on the CPU.

    Attributes:
        needed: ``needed[method][target]``: density the method needs for recall ``target``.
        at_defaults: ``at_defaults[method]``: ``(recall, density)`` of the method at its defaults.
        near_mass, near_share: attention mass within one frame and 2 tokens of the query, and the
            share of keys there (:func:`~sparse_compile.toy.attention_stats.near_mask`).
        svg_class: per head ``"spatial"``, ``"temporal"`` (SVG's profiling at its density) or
            ``"global"`` (neither pattern keeps ``GLOBAL_BELOW`` of the mass there); ``B`` lists of ``H``.
        auto_choice: ``auto``'s candidate per head for the highest target; ``B`` lists of ``H``.
    """

    needed: dict[str, dict[float, Tensor]]
    at_defaults: dict[str, tuple[Tensor, Tensor]]
    near_mass: Tensor
    near_share: float
    svg_class: list[list[str]]
    auto_choice: list[list[str]]


def needed_density(curve: Curve, target: float) -> Tensor:
    """Least density of ``curve`` whose recall reaches ``target``, ``(B, H)``; 1 (dense) where none does."""
    reached = curve.recall >= target - _TOLERANCE
    return torch.where(reached, curve.density, torch.inf).amin(-1).clamp(max=1.0)


def oracle_density(probs: Tensor, target: float) -> Tensor:
    """Per row the fewest keys holding ``target`` of its mass, as a fraction of the keys, mean over rows: ``(B, H)``."""
    ordered = probs.sort(-1, descending=True).values.cumsum(-1)
    keys = ((ordered < target - _TOLERANCE).sum(-1) + 1).clamp(max=probs.shape[-1])
    return (keys.float() / probs.shape[-1]).mean(-1)


def pair_density(masks: Tensor, sizes: Tensor) -> Tensor:
    """Kept token pairs / ``Sv**2`` of block keep-masks bool ``(..., N, N)`` over blocks of ``sizes`` ``(N,)``."""
    sizes = sizes.double()
    return (((masks.double() @ sizes) @ sizes) / sizes.sum() ** 2).float()


def adaspa_curve(mass: Tensor, sizes: Tensor) -> Curve:
    """AdaSpa's rule at every count ``k``: the ``k`` first-ranked key blocks in every query block of a head.

    ``mass`` fp32 ``(B, H, N, N)`` normalised block masses; ``sizes`` ``(N,)`` tokens per block. The
    density of ``k`` blocks is ``k / N`` (the partial last block counted whole).
    """
    recall = recall_gains(ranked_masses(mass)[0], sizes.float() / sizes.sum()).cumsum(-1)  # (B, H, N)
    n = mass.shape[-1]
    density = torch.arange(1, n + 1, device=mass.device, dtype=torch.float32) / n
    return Curve(density.expand_as(recall), recall)


def radial_curve(mass: Tensor, grid: tuple[int, int, int], block: int, sink: bool,
                 decays: tuple[float, ...] = RADIAL_DECAYS) -> Curve:
    """Radial's mask at each of ``decays``; ``mass`` the normalised block masses at ``block``."""
    tokens = grid[0] * grid[1] * grid[2]
    masks = [radial_block_mask(*grid, block, decay, sink) for decay in decays]
    candidates = Candidates(tuple(map(str, decays)), torch.stack(masks).to(mass.device),
                            block_sizes(tokens, block, mass.device))
    recall = candidate_recall(mass, candidates)
    density = torch.tensor([kept_pair_density(m, tokens, block) for m in masks], device=mass.device)
    return Curve(density.expand_as(recall), recall)


def svg_curve(probs: Tensor, rows: Tensor, grid: tuple[int, int, int], block: int) -> Curve:
    """SVG's spatial and temporal layouts at each of ``SVG_DENSITIES`` (their real kept fractions), on ``rows``."""
    densities, recalls = [], []
    for density in SVG_DENSITIES:
        patterns = build_patterns(*grid, block, density, probs.device)
        for pattern, keep in zip((patterns.spatial, patterns.temporal), patterns.row_masks(rows)):
            recalls.append((probs * keep).sum(-1).mean(-1))
            densities.append(torch.full_like(recalls[-1], pattern.kept))
    return Curve(torch.stack(densities, -1), torch.stack(recalls, -1))


def svg_at_density(q: Tensor, k: Tensor, v: Tensor, probs: Tensor, rows: Tensor, grid: tuple[int, int, int],
                   config: SvgConfig, scale: float) -> tuple[Tensor, Tensor, list[list[str]]]:
    """SVG at ``config``: recall and density of the pattern its profiling picks per head, and the head classes."""
    patterns = build_patterns(*grid, config.block, float(config.density), q.device)
    temporal = classify_heads(q, k, v, patterns, sample_rows(q.shape[2], PROFILE_ROWS, q.device), scale)
    spatial_keep, temporal_keep = patterns.row_masks(rows)
    recall_s, recall_t = (probs * spatial_keep).sum(-1).mean(-1), (probs * temporal_keep).sum(-1).mean(-1)
    recall = torch.where(temporal, recall_t, recall_s)
    density = torch.where(temporal, patterns.temporal.kept, patterns.spatial.kept).float()
    best = torch.maximum(recall_s, recall_t)
    classes = [["global" if float(best[b, h]) < GLOBAL_BELOW else ("temporal" if bool(temporal[b, h]) else "spatial")
                for h in range(q.shape[1])] for b in range(q.shape[0])]
    return recall, density, classes


def svg2_curve(q: Tensor, k: Tensor, probs: Tensor, rows: Tensor, config: Svg2Config, scale: float,
               top_ps: tuple[float, ...] = SVG2_TOP_PS) -> Curve:
    """SVG2's cluster selection at each of ``top_ps``: k-means of q and k (the method's counts, clamped
    to ``Sv``, its first-call iterations and seeds), top-p of the cluster pairs, recall on ``rows``."""
    batch, heads, tokens, _ = q.shape
    n_q, n_k = min(config.q_clusters, tokens), min(config.k_clusters, tokens)
    q_clusters = kmeans(q, n_q, config.kmeans_iters_init, seed=0)
    k_clusters = kmeans(k, n_k, config.kmeans_iters_init, seed=1)
    min_blocks = max(math.ceil(config.min_kc_ratio * n_k), 1)
    row_labels = q_clusters.labels[:, :, rows].long()  # (B, H, R)
    key_labels = k_clusters.labels.long()[:, :, None, :].expand(-1, -1, rows.numel(), -1)  # (B, H, R, Sv)
    densities, recalls = [], []
    for top_p in top_ps:
        selection = select_top_p_clusters(q_clusters.centroids, k_clusters.centroids, k_clusters.sizes, scale,
                                          top_p, min_blocks)
        slots = torch.arange(selection.indices.shape[-1], device=q.device)
        ids = torch.where(slots < selection.counts[..., None], selection.indices.long(), n_k)
        kept = torch.zeros(batch, heads, n_q, n_k + 1, dtype=torch.bool, device=q.device).scatter_(-1, ids, True)
        row_kept = kept.gather(2, row_labels[..., None].expand(-1, -1, -1, n_k + 1))  # (B, H, R, Kk + 1)
        keep = row_kept.gather(3, key_labels)  # (B, H, R, Sv)
        recalls.append((probs * keep).sum(-1).mean(-1))
        pairs = (selection.kept_tokens.long() * q_clusters.sizes.long()).sum(-1)
        densities.append(pairs.float() / tokens**2)
    return Curve(torch.stack(densities, -1), torch.stack(recalls, -1))


def auto_density(mass: Tensor, grid: tuple[int, int, int], block: int, target: float) -> tuple[Tensor, Tensor, list]:
    """``auto``'s choice for ``target`` per head without the guard: density, recall and candidate index."""
    candidates = static_candidates(*grid, block, mass.device)
    choice = choose_heads(mass, candidates, target, break_even_density=1.0)
    tokens = float(candidates.block_sizes.sum())
    return (choice.kept_pairs / tokens**2).float(), choice.recall, choice.labels.tolist()


def analyse_call(q: Tensor, k: Tensor, v: Tensor, grid: tuple[int, int, int], rows: Tensor, scale: float,
                 configs: MethodConfigs = MethodConfigs()) -> CallAnalysis:
    """Every statistic of one self-attention call over the video tokens ``(B, H, Sv, D)`` (see the module doc)."""
    probs = row_log_probs(q[:, :, rows], k, scale).exp()  # exact attention of the rows: (B, H, R, S)
    lse = attention_lse(q, k, scale)
    masses: dict[int, Tensor] = {}

    def mass(block: int) -> Tensor:
        if block not in masses:
            masses[block] = normalised_mass(q, k, lse, block, scale)
        return masses[block]

    tokens = q.shape[2]
    a_block, r_cfg, s2_cfg = configs.adaspa.block, configs.radial, configs.svg2
    a_sizes = block_sizes(tokens, a_block, q.device)
    top_ps = tuple(sorted(set(SVG2_TOP_PS) | {float(s2_cfg.top_p)}))
    curves = {
        "adaspa": adaspa_curve(mass(a_block), a_sizes),
        "svg": svg_curve(probs, rows, grid, configs.svg.block),
        "radial": radial_curve(mass(r_cfg.block), grid, r_cfg.block, r_cfg.first_frame_sink),
        "svg2": svg2_curve(q, k, probs, rows, s2_cfg, scale, top_ps),
    }
    needed: dict[str, dict[float, Tensor]] = {m: {} for m in METHODS}
    auto_labels: list = []
    for target in RECALLS:
        needed["oracle"][target] = oracle_density(probs, target)
        top_masks, _ = top_p_blocks(mass(a_block), target, a_sizes.float() / tokens)
        needed["top-p blocks"][target] = pair_density(top_masks, a_sizes)
        for method, curve in curves.items():
            needed[method][target] = needed_density(curve, target)
        needed["auto"][target], _, auto_labels = auto_density(mass(configs.auto.block), grid, configs.auto.block,
                                                              target)
    names = choice_names(static_candidates(*grid, configs.auto.block, q.device))
    search = search_layout(q, k, lse, block=a_block, density=float(configs.adaspa.density),
                           head_adaptive=configs.adaspa.head_adaptive, scale=scale)
    radial = radial_curve(mass(r_cfg.block), grid, r_cfg.block, r_cfg.first_frame_sink, (float(r_cfg.decay),))
    svg2_at = top_ps.index(float(s2_cfg.top_p))
    auto_density_, auto_recall, _ = auto_density(mass(configs.auto.block), grid, configs.auto.block,
                                                 float(configs.auto.recall))
    svg_recall, svg_density, svg_class = svg_at_density(q, k, v, probs, rows, grid, configs.svg, scale)
    at_defaults = {
        "adaspa": (search.recall, search.head_blocks.float() / mass(a_block).shape[-1]),
        "svg": (svg_recall, svg_density),
        "radial": (radial.recall[..., 0], radial.density[..., 0]),
        "svg2": (curves["svg2"].recall[..., svg2_at], curves["svg2"].density[..., svg2_at]),
        "auto": (auto_recall, auto_density_),
    }
    near = near_mask(rows, grid)
    return CallAnalysis(
        needed={m: {t: d.float().cpu() for t, d in by_target.items()} for m, by_target in needed.items()},
        at_defaults={m: (r.float().cpu(), d.float().cpu()) for m, (r, d) in at_defaults.items()},
        near_mass=(probs * near).sum(-1).mean(-1).cpu(),
        near_share=float(near.float().mean()),
        svg_class=svg_class,
        auto_choice=[[names[i] for i in row] for row in auto_labels],
    )
