"""Quality of every sparse method on the trained toy video DiT (real, learned attention patterns).

Two parts, one command:

1. *Generation.* Videos from fixed seeds and labels, dense (Inductor) and with each method
   (``backend="sparse_video"``, the first ``--dense-steps`` dense), with an
   :func:`sparse_compile.attention_probe` attached: PSNR and SSIM of each method's videos vs the
   dense ones, and per layer the attention recall, relative error and kept density of the sparse
   calls. LPIPS is not reported: no package here ships its network weights.
2. *Attention level.* Q/K/V captured from every self-attention layer of the model at mid noise
   on a procedural video; each method setting (SVG2 at top_p 0.8/0.9/0.95, the block methods at
   ~25% and ~12.5%) runs on them directly: relative L2 error vs dense SDPA, recall, density.

``--methods`` picks among svg2, svg, radial, adaspa (the default) and radial-fp8, adaspa-fp8 (the same
settings with ``precision="fp8"``: on GPUs with e4m3 tensor cores, the FP8 block kernel).

Writes ``quality.json``, ``quality.md``, a frame strip (``frames.png``: rows dense, then each
method) and per-layer plots (``layers.png``, when matplotlib is installed) to ``--out``.

    python benchmarks/bench_quality.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from common import method_call

import sparse_compile
from sparse_compile.methods import METHODS
from sparse_compile.methods.dense import dense_attention
from sparse_compile.options import validate_options
from sparse_compile.quality import attention_recall, relative_error
from sparse_compile.methods.base import SiteCache
from sparse_compile.toy.attention_stats import capture_self_attention
from sparse_compile.toy.frames import save_frame_strip
from sparse_compile.toy.metrics import psnr, ssim
from sparse_compile.toy.model import build_toy_wan, class_embeddings, compute_dtype
from sparse_compile.toy.sampling import GUIDANCE, generate
from sparse_compile.toy.videos import make_videos

GENERATION_METHODS = {
    "svg2": {"method": "svg2"},
    "svg": {"method": "svg", "density": 0.25},
    "radial": {"method": "radial"},
    "adaspa": {"method": "adaspa", "density": 0.25},
    "adaspa-fp8": {"method": "adaspa", "density": 0.25, "precision": "fp8"},
    "radial-fp8": {"method": "radial", "precision": "fp8"},
}
ATTENTION_SETTINGS = {
    "svg2 top_p=0.8": {"method": "svg2", "top_p": 0.8},
    "svg2 top_p=0.9": {"method": "svg2", "top_p": 0.9},
    "svg2 top_p=0.95": {"method": "svg2", "top_p": 0.95},
    "svg 25%": {"method": "svg", "density": 0.25},
    "svg 12.5%": {"method": "svg", "density": 0.125},
    "radial": {"method": "radial"},
    "adaspa 25%": {"method": "adaspa", "density": 0.25},
    "adaspa 12.5%": {"method": "adaspa", "density": 0.125},
    "adaspa 25% fp8": {"method": "adaspa", "density": 0.25, "precision": "fp8"},
    "radial fp8": {"method": "radial", "precision": "fp8"},
}
TINY_OPTIONS = {"svg2": {"q_clusters": 8, "k_clusters": 16, "kmeans_iters_init": 3}, "svg": {"block": 16},
                "radial": {"block": 16}, "adaspa": {"block": 16}}


def method_group(setting: dict) -> str:
    """The ``--methods`` name that selects ``setting``: its method, with ``-fp8`` for ``precision="fp8"``."""
    return f"{setting['method']}-fp8" if setting.get("precision") == "fp8" else setting["method"]


def _with_tiny(setting: dict, tiny: bool) -> dict:
    return {**setting, **TINY_OPTIONS.get(setting["method"], {})} if tiny else setting


def generation_quality(args, model, labels: torch.Tensor, save: Callable[[dict], None]) -> dict:
    """Dense vs each method: PSNR/SSIM of the videos and per-layer probe statistics.

    ``save`` gets the results so far after every method (with the frame strip rewritten), so a
    run cut short keeps what it measured.
    """
    frames, height, width = args.frames, args.height, args.width
    dense_model = torch.compile(model)
    dense = generate(dense_model, labels, args.seed, frames, height, width, args.steps, args.guidance)
    videos, results = {"dense": dense}, {}
    strip_frames = sorted({0, frames // 3, 2 * frames // 3, frames - 1})
    for name, setting in GENERATION_METHODS.items():
        if name not in args.methods:
            continue
        options = {**_with_tiny(setting, args.tiny), "dense_steps": args.dense_steps, "min_seq_len": 256}
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparse_video", options=options)
        generate(compiled, labels[:1], args.seed, frames, height, width, 1, args.guidance)  # compile
        sparse_compile.reset(compiled)
        start = time.perf_counter()
        with sparse_compile.attention_probe(compiled) as probe:
            video = generate(compiled, labels, args.seed, frames, height, width, args.steps, args.guidance)
        elapsed = time.perf_counter() - start
        videos[name] = video
        report = sparse_compile.report(compiled)
        results[name] = {
            "options": options,
            "psnr_db": psnr(video, dense).tolist(),
            "ssim": ssim(video, dense).tolist(),
            "per_layer": {layer: dict(zip(("relative_error", "recall", "density"), stats))
                          for layer, stats in probe.by_layer().items()},
            "sparse_sites": sum(s.sparse for s in report.sites),
            "sites": len(report.sites),
            "seconds_with_probe": elapsed,
        }
        print(f"{name}: PSNR {sum(results[name]['psnr_db']) / len(labels):.2f} dB, "
              f"SSIM {sum(results[name]['ssim']) / len(labels):.4f}", flush=True)
        save_frame_strip(args.out / "frames.png", videos, strip_frames)
        save(results)
    return results


def captured_attention(model, args) -> list:
    """Self-attention Q/K/V of every layer at mid noise on two procedural videos (eager model)."""
    labels = torch.arange(2)
    device, dtype = compute_dtype(model)
    videos = make_videos(10**6, labels, args.frames, args.height, args.width, device)
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(1)).to(device)
    noisy = (0.5 * videos + 0.5 * noise).to(dtype)
    with torch.no_grad(), capture_self_attention() as calls:
        model(hidden_states=noisy, timestep=torch.full((2,), 500.0, device=device),
              encoder_hidden_states=class_embeddings(labels.to(device), noisy.dtype))
    return calls


def attention_quality(args, calls: list, grid: tuple[int, int, int]) -> dict:
    """Each attention setting on every captured layer: error, recall and density (mean and per layer)."""
    results = {}
    for name, setting in ATTENTION_SETTINGS.items():
        if method_group(setting) not in args.methods:
            continue
        options = validate_options({**_with_tiny(setting, args.tiny), "min_seq_len": 256})
        per_layer = []
        for layer, captured in enumerate(calls):
            method = METHODS[options.method](options)
            call = method_call(captured.query, captured.key, captured.value, grid, SiteCache(), step=0,
                               scale=captured.scale, module_path=f"blocks.{layer}.attn1")
            result = method.attend(call)
            reference = dense_attention(call.query, call.key, call.value, None, call.scale)
            per_layer.append({"relative_error": relative_error(result.output, reference),
                              "recall": attention_recall(call, result), "density": float(result.kept_density)})
        mean = {k: sum(r[k] for r in per_layer) / len(per_layer) for k in per_layer[0]}
        results[name] = {"mean": mean, "per_layer": per_layer}
        print(f"{name}: error {mean['relative_error']:.4f}, recall {mean['recall']:.4f}, "
              f"density {mean['density']:.3f}", flush=True)
    return results


def markdown(env: dict, generation: dict, attention: dict) -> str:
    lines = [f"Device: {env['device']}; torch {env['torch']}; triton {env['triton']}; command: `{env['command']}`", "",
             f"Generation: {env['videos']} videos {env['frames']}x{env['height']}x{env['width']} "
             f"({env['tokens']} tokens), {env['steps']} steps with CFG {env['guidance']} as two calls, "
             f"first {env['dense_steps']} steps dense; vs the dense (Inductor) videos from the same noise.", "",
             "| method | PSNR dB | SSIM | mean recall | mean rel. error | mean density | sparse sites |",
             "|---|---|---|---|---|---|---|"]
    for name, r in generation.items():
        layers = list(r["per_layer"].values())
        mean = lambda key: sum(x[key] for x in layers) / max(len(layers), 1)  # noqa: E731
        lines.append(f"| {name} | {sum(r['psnr_db']) / len(r['psnr_db']):.2f} | {sum(r['ssim']) / len(r['ssim']):.4f} "
                     f"| {mean('recall'):.4f} | {mean('relative_error'):.4f} | {mean('density'):.3f} "
                     f"| {r['sparse_sites']}/{r['sites']} |")
    lines += ["", "Attention level (Q/K/V captured from every layer at mid noise; mean over layers):", "",
              "| setting | rel. L2 error | recall | density |", "|---|---|---|---|"]
    for name, r in attention.items():
        m = r["mean"]
        lines.append(f"| {name} | {m['relative_error']:.4f} | {m['recall']:.4f} | {m['density']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_layers(path: Path, generation: dict) -> None:
    """Per-layer density and recall of each method during generation (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no layers.png")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, r in generation.items():
        layers = sorted(r["per_layer"], key=int)
        axes[0].plot(layers, [r["per_layer"][k]["density"] for k in layers], marker="o", label=name)
        axes[1].plot(layers, [r["per_layer"][k]["recall"] for k in layers], marker="o", label=name)
    for ax, title in zip(axes, ("kept density", "attention recall")):
        ax.set_xlabel("layer")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", default="svg2,svg,radial,adaspa")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="small sizes and method options: a CPU smoke run")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_toy_wan(device, dtype)
    grid = (args.frames, args.height // 2, args.width // 2)
    labels = torch.arange(args.videos) * 3 % 8
    import triton

    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(["python"] + sys.argv),
           "videos": args.videos, "frames": args.frames, "height": args.height, "width": args.width,
           "tokens": grid[0] * grid[1] * grid[2], "steps": args.steps, "guidance": args.guidance,
           "dense_steps": args.dense_steps, "dtype": str(dtype)}
    attention = attention_quality(args, captured_attention(model, args), grid)

    def save(generation: dict) -> None:
        (args.out / "quality.json").write_text(
            json.dumps({"env": env, "generation": generation, "attention": attention}, indent=1))
        (args.out / "quality.md").write_text(markdown(env, generation, attention))

    save({})
    generation = generation_quality(args, model, labels, save)
    plot_layers(args.out / "layers.png", generation)
    print(markdown(env, generation, attention))


if __name__ == "__main__":
    main()
