"""Which classifier-free guidance scale makes the toy model's dense clips most recognisable?

``python benchmarks/bench_guidance.py [--weights PATH] [--out DIR] [--guidance 1 1.5 2 3 4] [--clips 32]
[--sizes 16x64x96:20 ...] [--shift 1 3]``

For each scale and schedule shift, generates ``--clips`` clips (every class in turn, the same noise in
every row) with the toy model, eager and dense, at ``--sizes`` (default: the sizes and step counts the
training run judges, :data:`sparse_compile.toy.train.EVAL_SIZES`; fp32 weights under bf16 autocast on
a GPU, as there), and judges them (:mod:`sparse_compile.toy.judge`). Each row is printed as it finishes.
A row gives the accuracy, the fraction of clips where the judge found shapes, and the accuracy
per class. The toy's default scale is :data:`sparse_compile.toy.sampling.GUIDANCE`.

Writes ``guidance.md`` and ``guidance.json`` to ``--out``, and with ``--strips`` a labelled frame strip
per row of its first clip of each class (``guidance_<CFG>_<F>x<H>x<W>.png``: what was asked, what the
judge read). Meant for a GPU; ``--tiny``
runs one small size for a CPU smoke test.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import add_toy_io_arguments, check_toy_io_arguments, write_toy_table

from sparse_compile.toy.evaluate import generate_clips, score_clips
from sparse_compile.toy.frames import save_frame_strip
from sparse_compile.toy.judge import judge
from sparse_compile.toy.model import build_toy_wan
from sparse_compile.toy.videos import NUM_CLASSES, class_name
from sparse_compile.toy.sampling import GUIDANCE
from sparse_compile.toy.train import EVAL_SIZES, size_entry, training_autocast

TINY_SIZES = ((2, 16, 16, 1),)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_toy_io_arguments(parser, "guidance.md and guidance.json")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--sizes", type=lambda text: size_entry(text, "STEPS"), nargs="+", default=list(EVAL_SIZES),
                        help="clip sizes and sampling steps FxHxW:STEPS (default: "
                             + " ".join(f"{f}x{h}x{w}:{s}" for f, h, w, s in EVAL_SIZES) + ")")
    parser.add_argument("--shift", type=float, nargs="+", default=[1.0],
                        help="schedule shifts (sparse_compile.toy.sampling.noise_levels; default 1: linear)")
    parser.add_argument("--strips", action="store_true", help="also write a frame strip per row to --out")
    parser.add_argument("--tiny", action="store_true", help="one 2x16x16 clip size, one step (CPU smoke)")
    args = parser.parse_args(argv)
    if min(args.guidance) < 1.0:
        parser.error(f"--guidance scales must be at least 1, got {args.guidance}")
    if args.clips < 1:
        parser.error(f"--clips must be at least 1, got {args.clips}")
    if min(args.shift) < 1.0:
        parser.error(f"--shift values must be at least 1, got {args.shift}")
    check_toy_io_arguments(parser, args)
    if args.strips and args.out is None:
        parser.error("--strips needs --out")
    return args


def write_strip(path: Path, videos: torch.Tensor) -> None:
    """A frame strip of the first clip of each class among ``videos`` ``(N, 3, F, H, W)`` (generated for
    :func:`~sparse_compile.toy.evaluate.balanced_labels`), each captioned with the class asked and read."""
    frames = videos.shape[2]
    rows = {f"asked {class_name(i)}; judged {class_name(v.label) if v.found else 'no shapes'}": videos[i:i + 1]
            for i, v in enumerate(judge(videos[:NUM_CLASSES]))}
    save_frame_strip(path, rows, sorted({0, frames // 3, 2 * frames // 3, frames - 1}))


def score_rows(model: torch.nn.Module, scales: list[float], sizes: tuple[tuple[int, int, int, int], ...],
               clips: int, strips: Path | None = None, shifts: tuple[float, ...] = (1.0,)) -> list[dict]:
    """One row per (size, shift, scale): the :class:`~sparse_compile.toy.evaluate.GenerationScore` fields,
    ``guidance``, ``shift`` and the seconds it took; with ``strips`` (a folder) a :func:`write_strip` per row."""
    rows = []
    device = next(model.parameters()).device
    for frames, height, width, steps in sizes:
        for shift in shifts:
            for scale in scales:
                start = time.perf_counter()
                with training_autocast(device):
                    videos = generate_clips(model, frames, height, width, steps, clips, guidance=scale, shift=shift)
                score = score_clips(videos, steps)
                if strips is not None:
                    shifted = "" if shift == 1.0 else f"_shift{shift:g}"
                    write_strip(strips / f"guidance_{scale:g}{shifted}_{frames}x{height}x{width}.png", videos)
                rows.append({"guidance": scale, "shift": shift, **score.as_dict(),
                             "seconds": round(time.perf_counter() - start, 1)})
                print(f"CFG {scale:g}, shift {shift:g}, {frames}x{height}x{width}, {steps} steps: accuracy "
                      f"{score.accuracy:.3f} ({rows[-1]['seconds']} s)", flush=True)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| CFG | shift | clip (F×H×W px), steps | accuracy | found | per class (circles r/l/d/u, "
             "squares r/l/d/u) |", "|---|---|---|---|---|---|"]
    for r in rows:
        default = " (default)" if r["guidance"] == GUIDANCE else ""
        per_class = " ".join(f"{a:.2f}" for a in r["per_class"])
        clip = f"{r['frames']}×{r['height']}×{r['width']}, {r['steps']}"
        lines.append(f"| {r['guidance']:g}{default} | {r['shift']:g} | {clip} | "
                     f"{r['accuracy']:.3f} | {r['found']:.3f} | {per_class} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_toy_wan(device, torch.float32, weights=args.weights)
    header = (f"toy model {args.weights.name}, dense, {args.clips} clips per row (every class in turn, the same "
              f"noise per row), {device.type}, torch {torch.__version__}")
    rows = score_rows(model, args.guidance, TINY_SIZES if args.tiny else tuple(args.sizes), args.clips,
                      args.out if args.strips else None, tuple(args.shift))
    write_toy_table(args.out, "guidance", markdown(rows, header), header, args.weights, rows)


if __name__ == "__main__":
    main()
