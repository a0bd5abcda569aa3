"""``method="auto"`` against every single method, and the default warm-up, on the trained toy DiT (GPU).

Modes (each writes ``<mode>.md`` and ``<mode>.json`` to ``--out``):

- ``toy``: generation at the largest grid from the same noise: dense, ``auto`` at its defaults, every
  single method at its defaults and at about 25% / 12.5% kept density (svg2 and radial have no
  density option: smaller ``top_p`` stands in for svg2; radial's bands cannot narrow below a block,
  so smaller blocks and ``decay`` give its lower densities), adaspa and radial with ``precision="fp8"``,
  and ``auto``'s ``recall`` sweep. Per
  setting: mean kept density and exact recall (from the full row LSE) over the sparse calls, PSNR vs
  dense, and the steady-state attention time of one forward (the method on q/k/v captured from every
  layer at mid noise, summed over the layers) against cuDNN dense SDPA on the same q/k/v. Writes
  ``recall_vs_density.png``.
- ``warmup``: ``auto`` at its defaults with ``dense_timestep_fraction`` 0 / default / 0.1 / 0.2 / 0.3,
  50 steps: dense steps, PSNR vs dense and seconds per generation.

Generation runs the eager model with its video self-attention routed through the method
(:class:`RoutedModel`), with the backend's own step tracking (a :class:`Session` advanced from each
forward's timestep) and the options' warm-up, so no setting needs its own compile; the rest of the
model is eager in every setting, dense included. Every setting uses the backend's default warm-up
unless ``--dense-steps`` is given.

    PYTHONPATH=. python benchmarks/bench_auto.py toy --out $OUT
    PYTHONPATH=. python benchmarks/bench_auto.py warmup --out $OUT
    PYTHONPATH=. python benchmarks/bench_auto.py warmup --tiny --out /tmp/x   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from common import bench_ms, method_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_compile.methods import METHODS
from sparse_compile.methods.base import AttentionMethod, SiteCache, TokenLayout
from sparse_compile.options import DEFAULT_DENSE_TIMESTEP_FRACTION, validate_options
from sparse_compile.quality import attention_recall
from sparse_compile.runtime.session import Session
from sparse_compile.toy.attention_stats import capture_self_attention
from sparse_compile.toy.metrics import psnr
from sparse_compile.toy.model import build_toy_wan, class_embeddings, compute_dtype
from sparse_compile.toy.sampling import GUIDANCE, generate
from sparse_compile.toy.videos import make_videos

LAYERS = 8
RECALLS = (0.8, 0.9, 0.99)  # with the default 0.95: the recall sweep
TOY_SETTINGS = [
    {"method": "auto"},
    *({"method": "auto", "recall": r} for r in RECALLS),
    {"method": "svg"},
    {"method": "svg", "density": 0.125},
    {"method": "adaspa"},
    {"method": "adaspa", "precision": "fp8"},
    {"method": "adaspa", "density": 0.25},
    {"method": "adaspa", "density": 0.125},
    {"method": "svg2"},
    {"method": "svg2", "top_p": 0.5},
    {"method": "svg2", "top_p": 0.25},
    {"method": "radial"},
    {"method": "radial", "precision": "fp8"},
    {"method": "radial", "block": 64},
    {"method": "radial", "block": 32, "decay": 0.05},
]
WARMUP_FRACTIONS = (0.0, DEFAULT_DENSE_TIMESTEP_FRACTION, 0.1, 0.2, 0.3)
TINY_OPTIONS = {"svg2": {"q_clusters": 8, "k_clusters": 16, "kmeans_iters_init": 3}, "svg": {"block": 16},
                "radial": {"block": 16}, "adaspa": {"block": 16}, "auto": {"block": 32}}


def label(setting: dict) -> str:
    """``svg2`` at its defaults, ``svg2 top_p=0.5`` otherwise."""
    return " ".join([setting["method"], *(f"{k}={v}" for k, v in setting.items() if k != "method")])


def method_for(setting: dict, args) -> AttentionMethod:
    """The method of ``setting`` (with ``--tiny``'s small sizes and ``--dense-steps`` when given)."""
    options = dict(setting)
    if args.tiny:
        options = {**options, **TINY_OPTIONS.get(options["method"], {})}
    if args.dense_steps is not None:
        options.setdefault("dense_steps", args.dense_steps)
    validated = validate_options(options)
    return METHODS[validated.method](validated)


class RoutedModel(torch.nn.Module):
    """The eager model with every unmasked video self-attention call run by ``method`` (``None``: dense SDPA).

    Each forward advances a :class:`Session` from its timestep, as the compiled step marker does; each
    layer is one site with its own state. With ``measure_recall`` every sparse call's exact recall is
    kept in ``recalls``.
    """

    def __init__(self, model: torch.nn.Module, method: AttentionMethod | None, layout: TokenLayout,
                 measure_recall: bool) -> None:  # fmt: skip
        super().__init__()
        self.model, self.method, self.layout, self.measure_recall = model, method, layout, measure_recall
        self.session = Session()
        self.recalls: list[float] = []
        self._layer = 0
        self._inside = False

    def forward(self, **inputs):
        self.session.begin_forward(float(inputs["timestep"].reshape(-1)[0]), LAYERS)
        self._layer = 0
        original = F.scaled_dot_product_attention

        def routed(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
            if self.method is None or self._inside or attn_mask is not None or query.shape[-2] != key.shape[-2]:
                return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                scale=scale, **kwargs)  # fmt: skip
            self._inside = True
            try:
                return self._run(query, key, value, scale)
            finally:
                self._inside = False

        F.scaled_dot_product_attention = routed
        try:
            return self.model(**inputs)
        finally:
            F.scaled_dot_product_attention = original

    def _run(self, query, key, value, scale) -> torch.Tensor:
        layer = self._layer
        self._layer += 1
        state = self.session.state_of(f"blocks.{layer}.attn1")
        call = method_call(query, key, value, self.layout.grid, state.cache, scale=scale,
                           module_path=f"blocks.{layer}.attn1", layer=layer)
        call = replace(call, step=self.session.current)
        result = self.method.run(call)
        state.record(call.site_name, call.step.step, result)
        if self.measure_recall and not result.scheduled_dense:
            self.recalls.append(attention_recall(call, result))
        self.session.end_call()
        return result.output

    def kept_density(self) -> float | None:
        """Mean kept density of the calls the method ran (not the warm-up's), ``None`` if none."""
        densities = [float(d) for state in self.session.site_states.values()
                     for step, ds in state.densities.items() if step not in state.scheduled_dense_steps for d in ds]
        return sum(densities) / len(densities) if densities else None

    def warmup_steps(self) -> int:
        """Steps the options ran dense at the first layer."""
        return len(self.session.state_of("blocks.0.attn1").scheduled_dense_steps)


def steady_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median ms of ``fn``: ``do_bench`` on CUDA, the mean of three timed calls elsewhere."""
    if device.type == "cuda":
        return bench_ms(fn)
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def captured_layers(model, args, device: torch.device) -> list:
    """Self-attention q/k/v of every layer at mid noise on two procedural videos (eager forward)."""
    labels = torch.arange(2)
    videos = make_videos(10**6, labels, args.frames, args.height, args.width, device)
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(1)).to(device)
    dtype = compute_dtype(model)[1]
    with torch.no_grad(), capture_self_attention() as calls:
        model(hidden_states=(0.5 * videos + 0.5 * noise).to(dtype), timestep=torch.full((2,), 500.0, device=device),
              encoder_hidden_states=class_embeddings(labels.to(device), dtype))  # fmt: skip
    return calls


def attention_ms(calls: list, method: AttentionMethod | None, layout: TokenLayout, device: torch.device) -> float:
    """Steady-state ms of one forward's attention: ``method.attend`` on every captured layer after a first
    (choosing) call, or cuDNN dense SDPA (``None``), summed over the layers."""
    total = 0.0
    for c in calls:
        if method is None:
            backend = sdpa_kernel(SDPBackend.CUDNN_ATTENTION) if device.type == "cuda" else nullcontext()
            with backend:
                total += steady_ms(lambda c=c: F.scaled_dot_product_attention(c.query, c.key, c.value, scale=c.scale),
                                   device)  # fmt: skip
            continue
        cache = SiteCache()

        def attend(c=c, cache=cache):
            return method.attend(method_call(c.query, c.key, c.value, layout.grid, cache, scale=c.scale))

        attend()
        total += steady_ms(attend, device)
    return total


def timed_generation(model: RoutedModel, args, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Videos from ``args.seed`` and the seconds the generation took."""
    if model.model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    videos = generate(model, labels, args.seed, args.frames, args.height, args.width, args.steps, args.guidance,
                      shift=args.shift)
    if model.model.device.type == "cuda":
        torch.cuda.synchronize()
    return videos, time.perf_counter() - start


def toy_rows(model, args, layout: TokenLayout, labels: torch.Tensor, device: torch.device,
             save: Callable[[list[dict]], None]) -> list[dict]:  # fmt: skip
    """One row per setting (dense first); ``save`` gets the rows so far after each."""
    calls = captured_layers(model, args, device)
    dense_videos, dense_s = timed_generation(RoutedModel(model, None, layout, False), args, labels)
    rows = [{"setting": "dense", "method": "dense", "recall": 1.0, "density": 1.0, "psnr": float("inf"),
             "attention_ms": attention_ms(calls, None, layout, device), "generation_s": dense_s, "warmup_steps": 0}]
    for setting in TOY_SETTINGS:
        if setting["method"] not in args.methods:
            continue
        routed = RoutedModel(model, method_for(setting, args), layout, measure_recall=True)
        videos, seconds = timed_generation(routed, args, labels)
        recalls = routed.recalls
        rows.append({
            "setting": label(setting), "method": setting["method"], "options": setting,
            "recall": sum(recalls) / len(recalls) if recalls else None, "density": routed.kept_density(),
            "psnr": float(psnr(videos, dense_videos).mean()), "generation_s": seconds,
            "attention_ms": attention_ms(calls, method_for(setting, args), layout, device),
            "warmup_steps": routed.warmup_steps(),
        })  # fmt: skip
        print(rows[-1], flush=True)
        save(rows)
    return rows


def least_dense_single_at(rows: list[dict], recall: float) -> dict | None:
    """The single-method row with the lowest kept density whose recall reaches ``recall``."""
    reaching = [r for r in rows if r["method"] not in ("auto", "dense") and r["recall"] is not None
                and r["recall"] >= recall]  # fmt: skip
    return min(reaching, key=lambda r: r["density"]) if reaching else None


def _num(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _table(header: list[str], cells: list[list[str]]) -> list[str]:
    """Markdown table lines."""
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header), *(f"| {' | '.join(row)} |" for row in cells)]


def toy_markdown(rows: list[dict], env: str) -> str:
    dense_ms = rows[0]["attention_ms"]
    lines = [env, "", *_table(
        ["setting", "kept density", "recall", "PSNR vs dense (dB)", "attention ms per forward", "speedup vs cuDNN",
         "generation s (eager)", "warm-up steps"],
        [[r["setting"], _num(r["density"], ".3f"), _num(r["recall"], ".4f"), f"{r['psnr']:.2f}",
          f"{r['attention_ms']:.2f}", f"{dense_ms / r['attention_ms']:.2f}x", f"{r['generation_s']:.1f}",
          str(r["warmup_steps"])] for r in rows],
    ), ""]  # fmt: skip
    sweep = []
    for r in (r for r in rows if r["method"] == "auto"):
        best = None if r["recall"] is None else least_dense_single_at(rows, r["recall"])
        cell = f"{best['setting']}: density {best['density']:.3f}, {dense_ms / best['attention_ms']:.2f}x" if best \
            else "none reaches it"  # fmt: skip
        sweep.append([r["setting"], _num(r["recall"], ".4f"), _num(r["density"], ".3f"), f"{r['psnr']:.2f}",
                      f"{dense_ms / r['attention_ms']:.2f}x", cell])  # fmt: skip
    lines += _table(["auto setting", "recall", "kept density", "PSNR (dB)", "speedup vs cuDNN",
                     "least dense single method at >= that recall"], sweep)  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_recall_vs_density(rows: list[dict], path: Path) -> None:
    """Recall against kept density, one series per method (``auto``'s is its recall sweep); skipped, with a
    note, where matplotlib is not installed."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        print("matplotlib is not installed: no recall-vs-density plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"):
        points = sorted((r["density"], r["recall"]) for r in rows
                        if r["method"] == method and r["density"] is not None and r["recall"] is not None)
        if points:
            ax.plot(*zip(*points), marker="o", linewidth=2.5 if method == "auto" else 1.2, label=method)
    ax.set_xlabel("kept density (sparse calls)")
    ax.set_ylabel("recall (exact, mean over video rows)")
    ax.set_title("toy DiT generation: recall vs kept density")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def warmup_rows(model, args, layout: TokenLayout, labels: torch.Tensor,
                save: Callable[[list[dict]], None]) -> list[dict]:  # fmt: skip
    """``auto`` at its defaults per warm-up fraction; dense generation first."""
    dense_videos, dense_s = timed_generation(RoutedModel(model, None, layout, False), args, labels)
    rows = [{"setting": "dense", "fraction": None, "warmup_steps": args.steps, "psnr": float("inf"),
             "density": 1.0, "generation_s": dense_s}]
    for fraction in WARMUP_FRACTIONS:
        routed = RoutedModel(model, method_for({"method": "auto", "dense_timestep_fraction": fraction}, args), layout,
                             measure_recall=False)  # fmt: skip
        videos, seconds = timed_generation(routed, args, labels)
        rows.append({"setting": f"auto, dense_timestep_fraction={fraction}", "fraction": fraction,
                     "warmup_steps": routed.warmup_steps(), "psnr": float(psnr(videos, dense_videos).mean()),
                     "density": routed.kept_density(), "generation_s": seconds})  # fmt: skip
        print(rows[-1], flush=True)
        save(rows)
    return rows


def warmup_markdown(rows: list[dict], env: str) -> str:
    dense_s = rows[0]["generation_s"]
    lines = [env, "", *_table(
        ["setting", "dense warm-up steps", "PSNR vs dense (dB)", "kept density (sparse steps)", "generation s (eager)",
         "vs dense"],
        [[r["setting"], str(r["warmup_steps"]), f"{r['psnr']:.2f}", _num(r["density"], ".3f"),
          f"{r['generation_s']:.2f}", f"{dense_s / r['generation_s']:.2f}x"] for r in rows],
    )]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("toy", "warmup"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="default: 20 (toy), 50 (warmup)")
    parser.add_argument("--dense-steps", type=int, default=None, help="dense steps instead of the default warm-up")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift", type=float, default=1.0,
                        help="the sampler's schedule: 1 linear in the noise, 3 as Wan2.1 at 480p (sampling.noise_levels)")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help=f"CFG scale (default {GUIDANCE}, the demo's)")
    parser.add_argument("--methods", default="auto,svg,adaspa,svg2,radial", help="toy: settings of these methods only")
    parser.add_argument("--tiny", action="store_true", help="a 4x16x16 grid, 2 steps, small method sizes (CPU smoke)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.mode == "toy" else 50
    if args.tiny:
        args.frames, args.height, args.width, args.steps, args.videos = 4, 16, 16, 2, 1
    args.methods = set(args.methods.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_toy_wan(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    layout = TokenLayout(args.frames, args.height // 2, args.width // 2, 0, False)
    labels = torch.arange(args.videos) * 3 % 8
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    env = (f"{name}, torch {torch.__version__}; toy DiT {args.frames}x{args.height}x{args.width} px "
           f"({layout.video_tokens} tokens), {args.videos} videos, {args.steps} steps (shift {args.shift}), CFG {args.guidance} as two calls")
    args.out.mkdir(parents=True, exist_ok=True)
    to_markdown = toy_markdown if args.mode == "toy" else warmup_markdown

    def save(rows: list[dict]) -> None:
        (args.out / f"{args.mode}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        (args.out / f"{args.mode}.md").write_text(to_markdown(rows, env))

    if args.mode == "toy":
        rows = toy_rows(model, args, layout, labels, device, save)
        plot_recall_vs_density(rows, args.out / "recall_vs_density.png")
    else:
        rows = warmup_rows(model, args, layout, labels, save)
    print(to_markdown(rows, env))


if __name__ == "__main__":
    main()
