"""``python -m sparse_compile.demo``: sparse attention on a small trained video DiT.

Builds the toy Wan transformer shipped with the package (8 layers, trained on procedural
videos of moving shapes, :mod:`sparse_compile.toy`), compiles it with
``backend="sparse_video"`` and generates the same short clip densely and sparsely (same
noise, CFG as two calls per step). Prints what the backend rewrote, the time per transformer
call, how close the sparse video stays to the dense one (PSNR, SSIM), what the judge
(:mod:`sparse_compile.toy.judge`) reads from each clip, and writes a labelled frame strip.

On a GPU the dense baseline is the model compiled by Inductor; on the CPU it is the eager model
and the sparse methods run their PyTorch reference kernels, so the CPU times show the
mechanics, not the speed (see benchmarks/RESULTS.md for GPU numbers). The default method is the
backend's, ``auto``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import torch

import sparse_compile
from sparse_compile.cli_types import number_in
from sparse_compile.toy.frames import save_frame_strip
from sparse_compile.toy.judge import judge
from sparse_compile.toy.metrics import psnr, ssim
from sparse_compile.toy.model import build_toy_wan, class_embeddings, compute_dtype
from sparse_compile.toy.sampling import GUIDANCE, generate
from sparse_compile.toy.videos import MIN_SIZE, NUM_CLASSES, class_name

PATCH = 2  # pixels per token along height and width


def progress(label: str, steps: int, stream: TextIO = sys.stdout) -> Callable[[int], None]:
    """The per-step callback of :func:`generate`: a redrawn bar on a terminal, one line at the end otherwise."""
    start = time.perf_counter()
    terminal = stream.isatty()

    def on_step(i: int) -> None:
        done = i + 1
        if terminal:
            stream.write(f"\r{label:<28} [{'#' * done}{'.' * (steps - done)}] {done}/{steps}")
            if done == steps:
                stream.write("\n")
        elif done == steps:
            stream.write(f"{label:<28} {steps} steps in {time.perf_counter() - start:.1f} s\n")
        stream.flush()
    return on_step


def timed_generation(model, labels: torch.Tensor, args: argparse.Namespace, label: str) -> tuple[torch.Tensor, float]:
    """Generated videos and seconds per transformer call (two calls per step)."""
    start = time.perf_counter()
    videos = generate(model, labels, args.seed, args.frames, args.height, args.width, args.steps, args.guidance,
                      on_step=progress(label, args.steps))
    if videos.is_cuda:
        torch.cuda.synchronize()
    return videos, (time.perf_counter() - start) / (2 * args.steps)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo's options, checked before any model is built (bad values exit with a message naming the option)."""
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="auto", choices=sparse_compile.available_methods())
    parser.add_argument("--label", type=int, default=4, choices=range(NUM_CLASSES),
                        help="class: " + ", ".join(f"{i} {class_name(i)}" for i in range(NUM_CLASSES)))
    parser.add_argument("--steps", type=number_in(int, 1), default=20 if gpu else 6)
    parser.add_argument("--dense-steps", type=number_in(int, 0), default=5 if gpu else 2)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--frames", type=number_in(int, 1), default=16 if gpu else 6)
    parser.add_argument("--height", type=number_in(int, MIN_SIZE), default=64 if gpu else 32,
                        help=f"pixels, even (tokens: height/{PATCH})")
    parser.add_argument("--width", type=number_in(int, MIN_SIZE), default=96 if gpu else 48,
                        help=f"pixels, even (tokens: width/{PATCH})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if gpu else "cpu", help="cpu or cuda[:index]")
    parser.add_argument("--out", type=Path, default=Path("sparse_compile_demo.png"), help="frame strip PNG")
    args = parser.parse_args(argv)
    for name in ("height", "width"):
        if getattr(args, name) % PATCH:
            parser.error(f"--{name} must be a multiple of {PATCH} (the model's patch size), got {getattr(args, name)}")
    if args.dense_steps > args.steps:
        parser.error(f"--dense-steps ({args.dense_steps}) must not exceed --steps ({args.steps})")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:index], got {args.device!r}")
    if device.type == "cuda" and not gpu:
        parser.error("--device cuda: this PyTorch build sees no CUDA GPU; use --device cpu")
    if not args.out.parent.is_dir():
        parser.error(f"--out: folder {args.out.parent} does not exist")
    if args.out.suffix.lower() != ".png":
        parser.error(f"--out must name a .png file, got {str(args.out)!r}")
    args.device = device
    return args


def compile_call(model, labels: torch.Tensor, args: argparse.Namespace) -> None:
    """One conditional call at the first step's timestep: compiles ``model`` before the timed generation."""
    device, dtype = compute_dtype(model)
    noise = torch.zeros((labels.shape[0], 3, args.frames, args.height, args.width), device=device, dtype=dtype)
    with torch.no_grad():
        model(hidden_states=noise, timestep=torch.full((labels.shape[0],), 1000.0, device=device),
              encoder_hidden_states=class_embeddings(labels.to(device), dtype))


def verdict_text(clip: torch.Tensor, asked: int) -> str:
    """``"judge: squares moving right (as asked)"`` or ``"... (asked: ...)"`` for one clip ``(3, F, H, W)``."""
    verdict = judge(clip[None])[0]
    seen = class_name(verdict.label) if verdict.found else "no shapes found"
    return f"judge: {seen} " + ("(as asked)" if verdict.label == asked else "(wrong)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = args.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_toy_wan(device, dtype)
    labels = torch.tensor([args.label])
    tokens = args.frames * (args.height // PATCH) * (args.width // PATCH)
    print(f"toy Wan DiT (8 layers, 6 heads x 64), {tokens} video tokens ({args.frames} frames "
          f"{args.height}x{args.width} px), '{class_name(args.label)}', {args.steps} steps with CFG, "
          f"{device.type} {dtype}, method={args.method!r}")

    dense_model = torch.compile(model) if device.type == "cuda" else model
    dense_name = "inductor (dense)" if device.type == "cuda" else "eager (dense)"
    if device.type == "cuda":
        compile_call(dense_model, labels, args)
    dense, dense_s = timed_generation(dense_model, labels, args, dense_name)

    options = {"method": args.method, "dense_steps": args.dense_steps, "min_seq_len": 256}
    if args.method == "svg2":  # cluster counts in proportion to the defaults' (200 / 1000 at ~30k tokens)
        options.update(q_clusters=max(8, tokens // 160), k_clusters=max(16, tokens // 32))
    sparse = torch.compile(model, backend="sparse_video", options=options)
    compile_call(sparse, labels, args)
    sparse_compile.reset(sparse)
    videos, sparse_s = timed_generation(sparse, labels, args, f"sparse_video ({args.method})")

    print("options:", options)
    print(sparse_compile.report(sparse))
    print(f"time per transformer call: {dense_name} {dense_s * 1e3:.0f} ms, sparse_video {sparse_s * 1e3:.0f} ms "
          f"({dense_s / sparse_s:.2f}x, all steps including the {args.dense_steps} dense ones)")
    quality = psnr(videos, dense).item()
    print(f"sparse vs dense video: PSNR {quality:.2f} dB, SSIM {ssim(videos, dense).item():.4f}")
    dense_verdict, sparse_verdict = verdict_text(dense[0], args.label), verdict_text(videos[0], args.label)
    print(f"asked for '{class_name(args.label)}'; dense {dense_verdict}; {args.method} {sparse_verdict}")
    frames = sorted({0, args.frames // 3, 2 * args.frames // 3, args.frames - 1})
    rows = {f"dense | asked: {class_name(args.label)} | {dense_verdict}": dense,
            f"{args.method} | PSNR {quality:.1f} dB vs dense | {sparse_verdict}": videos}
    print(f"frame strip (top dense, bottom {args.method}, frames {frames}): {save_frame_strip(args.out, rows, frames)}")
    if device.type == "cpu":
        print("on the CPU the sparse methods run their PyTorch reference kernels (the specification): "
              "their speed is only meaningful on a GPU, see benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
