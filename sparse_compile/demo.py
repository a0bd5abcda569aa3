"""``python -m sparse_compile.demo``: sparse attention on a small trained video DiT.

Builds the toy Wan transformer shipped with the package (8 layers, trained on procedural
videos of moving shapes, :mod:`sparse_compile.toy`), compiles it with
``backend="sparse_video"`` and generates the same short clips densely and sparsely (same
noise, CFG as two calls per step). Prints what the backend rewrote, the time per transformer
call, how close the sparse videos stay to the dense ones (PSNR, SSIM), and writes a frame strip (top: dense, bottom: sparse).

On a GPU the dense baseline is the model compiled by Inductor; on the CPU it is the eager model
and the sparse methods run their PyTorch reference kernels, so the CPU times show the
mechanics, not the speed (see benchmarks/RESULTS.md for GPU numbers).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

import sparse_compile
from sparse_compile.toy.frames import save_frame_strip
from sparse_compile.toy.metrics import psnr, ssim
from sparse_compile.toy.model import build_toy_wan
from sparse_compile.toy.sampling import generate

LABEL_NAMES = ("circles moving right", "circles moving left", "circles moving down", "circles moving up",
               "squares moving right", "squares moving left", "squares moving down", "squares moving up")


def progress(label: str, steps: int):
    """A one-line text progress bar: returns the per-step callback of :func:`generate`."""
    def on_step(i: int) -> None:
        done = i + 1
        sys.stdout.write(f"\r{label:<28} [{'#' * done}{'.' * (steps - done)}] {done}/{steps}")
        if done == steps:
            sys.stdout.write("\n")
        sys.stdout.flush()
    return on_step


def timed_generation(model, labels: torch.Tensor, args: argparse.Namespace, label: str) -> tuple[torch.Tensor, float]:
    """Generated videos and seconds per transformer call (two calls per step)."""
    start = time.perf_counter()
    videos = generate(model, labels, args.seed, args.frames, args.height, args.width, args.steps, args.guidance,
                      on_step=progress(label, args.steps))
    if videos.is_cuda:
        torch.cuda.synchronize()
    return videos, (time.perf_counter() - start) / (2 * args.steps)


def main(argv: list[str] | None = None) -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="svg2", choices=sparse_compile.available_methods())
    parser.add_argument("--label", type=int, default=4, choices=range(len(LABEL_NAMES)),
                        help="class: " + ", ".join(f"{i} {n}" for i, n in enumerate(LABEL_NAMES)))
    parser.add_argument("--steps", type=int, default=20 if gpu else 6)
    parser.add_argument("--dense-steps", type=int, default=5 if gpu else 2)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--frames", type=int, default=16 if gpu else 6)
    parser.add_argument("--height", type=int, default=64 if gpu else 32, help="pixels (tokens: height/2)")
    parser.add_argument("--width", type=int, default=96 if gpu else 48, help="pixels (tokens: width/2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--out", type=Path, default=Path("sparse_compile_demo.png"), help="frame strip PNG")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_toy_wan(device, dtype)
    labels = torch.tensor([args.label])
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"toy Wan DiT (8 layers, 6 heads x 64), {tokens} video tokens ({args.frames} frames "
          f"{args.height}x{args.width} px), '{LABEL_NAMES[args.label]}', {args.steps} steps with CFG, "
          f"{device.type} {dtype}, method={args.method!r}")

    dense_model = torch.compile(model) if device.type == "cuda" else model
    dense_name = "inductor (dense)" if device.type == "cuda" else "eager (dense)"
    if device.type == "cuda":
        generate(dense_model, labels, args.seed, args.frames, args.height, args.width, 1, args.guidance)  # compile
    dense, dense_s = timed_generation(dense_model, labels, args, dense_name)

    options = {"method": args.method, "dense_steps": args.dense_steps, "min_seq_len": 256}
    if args.method == "svg2":  # cluster counts in proportion to the defaults' (200 / 1000 at ~30k tokens)
        options.update(q_clusters=max(8, tokens // 160), k_clusters=max(16, tokens // 32))
    sparse = torch.compile(model, backend="sparse_video", options=options)
    generate(sparse, labels, args.seed, args.frames, args.height, args.width, 1, args.guidance)  # compile
    sparse_compile.reset(sparse)
    videos, sparse_s = timed_generation(sparse, labels, args, f"sparse_video ({args.method})")

    print("options:", options)
    print(sparse_compile.report(sparse))
    print(f"time per transformer call: {dense_name} {dense_s * 1e3:.0f} ms, sparse_video {sparse_s * 1e3:.0f} ms "
          f"({dense_s / sparse_s:.2f}x, all steps including the {args.dense_steps} dense ones)")
    print(f"sparse vs dense video: PSNR {psnr(videos, dense).item():.2f} dB, SSIM {ssim(videos, dense).item():.4f}")
    frames = sorted({0, args.frames // 3, 2 * args.frames // 3, args.frames - 1})
    print(f"frame strip (top dense, bottom sparse, frames {frames}): "
          f"{save_frame_strip(args.out, {'dense': dense, 'sparse': videos}, frames)}")
    if device.type == "cpu":
        print("on the CPU the sparse methods run their PyTorch reference kernels (the specification): "
              "their speed is only meaningful on a GPU, see benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
