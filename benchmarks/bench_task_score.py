"""Does a sparse method keep the toy model's clips recognisable? Judge accuracy without a dense reference.

``PYTHONPATH=. python benchmarks/bench_task_score.py [--clips 32] [--frames 16 --height 64 --width 96 --steps 20]``

Generates ``--clips`` clips (every class in turn) with the shipped toy model densely, then
compiled with ``backend="sparse_video"`` for every method at its defaults and, for methods with
a ``density`` option, at 0.25 and 0.125 where that is not the default. Each clip is judged (:mod:`sparse_compile.toy.judge`):
the table gives the fraction read back as the class asked for, and the mean PSNR against the
dense clip of the same noise. Meant for a GPU; on the CPU use a small size (e.g.
``--frames 6 --height 32 --width 48 --steps 6 --clips 8``), where the methods run their
reference kernels.
"""

from __future__ import annotations

import argparse

import torch

import sparse_compile
from sparse_compile.methods import METHODS
from sparse_compile.toy.evaluate import balanced_labels, score_generation
from sparse_compile.toy.metrics import psnr
from sparse_compile.toy.model import build_toy_wan
from sparse_compile.toy.sampling import generate

DENSITIES = (0.25, 0.125)


def method_settings(method: str) -> list[tuple[str, dict]]:
    """``(row name, extra options)`` of one method: its defaults, then each other of ``DENSITIES`` if it has a density."""
    settings = [(f"{method} (defaults)", {})]
    spec = METHODS[method].option_spec.get("density")
    if spec is not None:
        settings += [(f"{method} density {d}", {"density": d}) for d in DENSITIES if d != spec.default]
    return settings


def mean_psnr(model, dense: torch.Tensor, args: argparse.Namespace, before_batch) -> float:
    """Mean PSNR (dB) of ``model``'s clips against the dense ones of the same labels and seeds."""
    labels = balanced_labels(args.clips)
    values = []
    for start in range(0, args.clips, args.batch):
        before_batch()
        clip = generate(model, labels[start:start + args.batch], start // args.batch, args.frames, args.height,
                        args.width, args.steps)
        values.append(psnr(clip, dense[start:start + args.batch]))
    return float(torch.cat(values).clamp(max=100).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int, default=5)
    args = parser.parse_args(argv)
    if args.height % 2 or args.width % 2 or min(args.clips, args.batch, args.frames, args.steps) < 1:
        parser.error("--height and --width must be even; --clips, --batch, --frames, --steps at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_toy_wan(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = (args.frames, args.height, args.width, args.steps)
    labels = balanced_labels(args.clips)
    dense = torch.cat([generate(model, labels[s:s + args.batch], s // args.batch, *size)
                       for s in range(0, args.clips, args.batch)])
    rows = [("dense", score_generation(model, *size, clips=args.clips, batch=args.batch).accuracy, float("inf"))]
    for method in sparse_compile.available_methods():
        if method == "dense":
            continue
        for name, extra in method_settings(method):
            options = {"method": method, "dense_steps": args.dense_steps, "min_seq_len": 256, **extra}
            sparse = torch.compile(model, backend="sparse_video", options=options)
            reset = lambda: sparse_compile.reset(sparse)  # noqa: E731
            score = score_generation(sparse, *size, clips=args.clips, batch=args.batch, before_batch=reset)
            rows.append((name, score.accuracy, mean_psnr(sparse, dense, args, reset)))
    print(f"toy model, {args.clips} clips of {args.frames}x{args.height}x{args.width} px, {args.steps} steps "
          f"({args.dense_steps} dense), {device.type}")
    print("| setting | judge accuracy | PSNR vs dense (dB) |\n|---|---|---|")
    for name, accuracy, value in rows:
        print(f"| {name} | {accuracy:.3f} | {value:.1f} |")


if __name__ == "__main__":
    main()
