"""``method="auto"`` against every single method on the trained toy DiT's learned attention (GPU).

Questions: at equal recall, is ``auto`` faster than each single method? What does the ``recall``
option trade (speed, kept density, generation PSNR vs dense with the same noise)?

1. *Attention level.* Q/K/V of every self-attention layer of the toy model at mid noise, at the
   largest grid (``--frames/--height/--width``); each setting runs on them directly: exact recall
   (from the LSE), kept density, and the steady-state time of the whole method call summed over
   the layers (``do_bench`` medians), against cuDNN dense SDPA on the same layers. For each ``auto``
   row: the fastest setting of every single method whose recall is at least ``auto``'s.
2. *Generation.* Videos from fixed seeds through ``torch.compile(model, backend="sparse_video",
   options={"method": "auto", "recall": r})`` against Inductor's dense compile: PSNR vs dense and
   the time of a sparse-step forward pair (CFG as two calls).

    PYTHONPATH=. python benchmarks/bench_auto.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
from common import bench_ms, method_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import sparse_compile
from sparse_compile.methods import METHODS
from sparse_compile.methods.base import SiteCache
from sparse_compile.options import validate_options
from sparse_compile.quality import attention_recall
from sparse_compile.toy.attention_stats import capture_self_attention
from sparse_compile.toy.metrics import psnr
from sparse_compile.toy.model import build_toy_wan, class_embeddings
from sparse_compile.toy.sampling import generate
from sparse_compile.toy.videos import make_videos

RECALLS = (0.8, 0.9, 0.95, 0.99)
SETTINGS = [
    *({"method": "auto", "recall": r} for r in RECALLS),
    *({"method": "svg", "density": d} for d in (0.125, 0.25, 0.5)),
    *({"method": "adaspa", "density": d} for d in (0.125, 0.25, 0.5)),
    *({"method": "svg2", "top_p": p} for p in (0.8, 0.9, 0.95)),
    {"method": "radial"},
]


def _label(setting: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in setting.items())


def _call(captured, grid, cache: SiteCache):
    return method_call(captured.query, captured.key, captured.value, grid, cache, scale=captured.scale)


def captured_layers(model, grid_pixels: tuple[int, int, int]) -> list:
    frames, height, width = grid_pixels
    labels = torch.arange(2)
    videos = make_videos(10**6, labels, frames, height, width, "cuda")
    noise = torch.randn(videos.shape, generator=torch.Generator().manual_seed(1)).cuda()
    noisy = (0.5 * videos + 0.5 * noise).bfloat16()
    with torch.no_grad(), capture_self_attention() as calls:
        model(hidden_states=noisy, timestep=torch.full((2,), 500.0, device="cuda"),
              encoder_hidden_states=class_embeddings(labels.cuda(), torch.bfloat16))
    return calls


def attention_level(calls: list, grid: tuple[int, int, int], methods: set[str]) -> list[dict]:
    """Every setting on every captured layer: mean recall and density, summed steady-state ms."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense_ms = sum(bench_ms(
            lambda c=c: torch.nn.functional.scaled_dot_product_attention(c.query, c.key, c.value, scale=c.scale))
            for c in calls)  # fmt: skip
    rows = []
    for setting in (s for s in SETTINGS if s["method"] in methods):
        options = validate_options({**setting, "min_seq_len": 256})
        recalls, densities, total_ms, cold_ms = [], [], 0.0, 0.0
        for captured in calls:
            method, state = METHODS[options.method](options), SiteCache()
            torch.cuda.synchronize()
            start = time.perf_counter()
            method.attend(_call(captured, grid, state))  # cold: choice, search, clustering, layouts
            torch.cuda.synchronize()
            cold_ms += (time.perf_counter() - start) * 1e3
            result = method.attend(_call(captured, grid, state))
            assert torch.isfinite(result.output).all()
            recalls.append(attention_recall(_call(captured, grid, state), result))
            densities.append(float(result.kept_density))
            total_ms += bench_ms(lambda: method.attend(_call(captured, grid, state)))
        row = {"setting": _label(setting), "method": setting["method"], "recall": sum(recalls) / len(recalls),
               "density": sum(densities) / len(densities), "ms": total_ms, "cold_ms": cold_ms, "dense_ms": dense_ms}
        rows.append(row)
        print(row, flush=True)
    return rows


def best_single_at_recall(rows: list[dict], recall: float) -> dict[str, dict | None]:
    """Per single method, its fastest row with recall >= ``recall`` (``None`` if none reaches it)."""
    best: dict[str, dict | None] = {}
    for name in ("svg", "adaspa", "svg2", "radial"):
        reaching = [r for r in rows if r["method"] == name and r["recall"] >= recall]
        best[name] = min(reaching, key=lambda r: r["ms"]) if reaching else None
    return best


def generation(model, args) -> list[dict]:
    """PSNR vs Inductor dense and sparse-step time, for each ``recall``."""
    labels = torch.arange(args.videos) % 8
    dims = (args.frames, args.height, args.width)
    dense_model = torch.compile(model)
    reference = generate(dense_model, labels, args.seed, *dims, steps=args.steps)
    x = torch.randn(args.videos, 3, *dims, device="cuda", dtype=torch.bfloat16)
    cond = class_embeddings(labels.cuda(), torch.bfloat16)

    def step_ms(m, timestep: float) -> float:
        t = torch.full((args.videos,), timestep, device="cuda")
        with torch.no_grad():
            return bench_ms(lambda: m(hidden_states=x, timestep=t, encoder_hidden_states=cond))

    inductor_ms = step_ms(dense_model, 500.0)
    rows = []
    for recall in RECALLS:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparse_video",
                                 options={"method": "auto", "recall": recall, "dense_steps": args.dense_steps})
        start = time.perf_counter()
        videos = generate(compiled, labels, args.seed, *dims, steps=args.steps)
        seconds = time.perf_counter() - start
        sparse_compile.set_step(compiled, args.steps - 1)
        row = {"recall": recall, "psnr": float(psnr(videos, reference).mean()), "generation_s": seconds,
               "sparse_step_ms": step_ms(compiled, 500.0), "inductor_step_ms": inductor_ms,
               "report": str(sparse_compile.report(compiled))}
        sparse_compile.set_step(compiled, None)
        rows.append(row)
        print({k: v for k, v in row.items() if k != "report"}, flush=True)
    return rows


def markdown(attention: list[dict], gen: list[dict], env: str) -> str:
    lines = [f"{env}", "",
             "| setting | recall | kept density | ms (all layers) | speedup vs cuDNN | first call ms (choice, search, clustering) |",
             "|---|---|---|---|---|---|"]
    for r in attention:
        lines.append(f"| {r['setting']} | {r['recall']:.4f} | {r['density']:.3f} | {r['ms']:.3f} | "
                     f"{r['dense_ms'] / r['ms']:.2f}x | {r['cold_ms']:.1f} |")
    lines += ["", "| auto recall | auto ms | fastest single method at >= that recall (ms) |", "|---|---|---|"]
    for r in attention:
        if r["method"] != "auto":
            continue
        best = best_single_at_recall(attention, r["recall"])
        cells = ", ".join(f"{name}: {b['setting']} {b['ms']:.3f}" if b else f"{name}: none reaches it"
                          for name, b in best.items())
        lines.append(f"| {r['setting']} (recall {r['recall']:.4f}) | {r['ms']:.3f} | {cells} |")
    lines += ["", "| recall option | PSNR vs dense (dB) | sparse-step forward ms | Inductor dense ms | speedup |",
              "|---|---|---|---|---|"]
    for g in gen:
        lines.append(f"| {g['recall']} | {g['psnr']:.2f} | {g['sparse_step_ms']:.2f} | {g['inductor_step_ms']:.2f} | "
                     f"{g['inductor_step_ms'] / g['sparse_step_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--videos", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="auto,svg,adaspa,svg2,radial", help="settings of these methods only")
    parser.add_argument("--skip-generation", action="store_true")
    args = parser.parse_args(argv)
    env = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    model = build_toy_wan("cuda", torch.bfloat16)
    grid = (args.frames, args.height // 2, args.width // 2)
    args.out.mkdir(parents=True, exist_ok=True)

    def save(attention: list[dict], gen: list[dict]) -> str:
        (args.out / "auto.json").write_text(json.dumps({"env": env, "attention": attention, "generation": gen}, indent=1))
        text = markdown(attention, gen, env)
        (args.out / "auto.md").write_text(text)
        return text

    calls = captured_layers(model, (args.frames, args.height, args.width))
    attention = attention_level(calls, grid, set(args.methods.split(",")))
    save(attention, [])
    gen = [] if args.skip_generation else generation(model, args)
    print(save(attention, gen))


if __name__ == "__main__":
    main()
