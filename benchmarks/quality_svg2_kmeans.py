"""SVG2's k-means settings against quality on the trained toy DiT: one generation per setting.

Each setting (``--settings``: comma-separated ``svg2@option=value@...`` variants) generates the same
videos as dense (eager, same noise): PSNR vs dense, mean kept density over the sparse calls, and
the work its warm k-means calls did, counted from their results: the share of (batch, head)
clusterings the reuse rule kept (queries, keys) and the assignment passes per warm call
(``probe + (1 - kept) * ((iters - 1) / sample_stride + 1)``, the probe an eighth of a pass when
reuse is on). Cluster counts default to the Wan 480p tokens per cluster (200 and 1000 clusters for
32760 tokens) scaled to the grid. Sized for a CPU run:

    PYTHONPATH=. python benchmarks/quality_svg2_kmeans.py --out /tmp/q
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from end_to_end.variants import split_variant

import sparse_compile
import sparse_compile.methods.svg2 as svg2_module
from sparse_compile.toy.metrics import psnr
from sparse_compile.toy.model import build_toy_wan
from sparse_compile.toy.sampling import generate

WAN_TOKENS, WAN_Q_CLUSTERS, WAN_K_CLUSTERS = 32760, 200, 1000
DEFAULT_SETTINGS = ("svg2@kmeans_iters_step=2@kmeans_sample=1@kmeans_reuse=0,svg2@kmeans_iters_step=1,"
                    "svg2@kmeans_reuse=0.1,svg2@kmeans_sample=0.25,svg2")  # fmt: skip


class KmeansCounter:
    """Wraps svg2's ``kmeans``: counts warm calls, the (batch, head) clusterings the reuse rule kept and
    the assignment passes, per role (queries: seed 0, keys: seed 1; warm calls pass no seed)."""

    def __init__(self) -> None:
        self.warm_calls = 0
        self.kept = [0, 0]
        self.heads = [0, 0]
        self.passes = 0.0
        self._real = svg2_module.kmeans

    def __call__(self, x, n, iters, init=None, *, seed=None, sample_stride=1, reuse=None):
        result = self._real(x, n, iters, init, **({} if seed is None else {"seed": seed}),
                            sample_stride=sample_stride, reuse=reuse)  # fmt: skip
        if seed is None:  # a warm call
            role = self.warm_calls % 2
            self.warm_calls += 1
            stride = max(1, min(sample_stride, x.shape[2] // n)) if iters > 1 else 1
            full = (iters - 1) / stride + 1 if iters > 0 else 1
            kept = float(result.settled.float().mean()) if result.settled is not None else 0.0
            self.kept[role] += kept * result.labels.shape[0] * result.labels.shape[1]
            self.heads[role] += result.labels.shape[0] * result.labels.shape[1]
            self.passes += (svg2_module.REUSE_PROBE_STRIDE ** -1 if reuse is not None else 0.0) + (1 - kept) * full
        return result


def run_setting(model, labels, args, options: dict) -> dict:
    """Generate with ``options``; PSNR is filled in by the caller."""
    counter = KmeansCounter()
    svg2_module.kmeans = counter
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparse_video", options=options)
        start = time.perf_counter()
        with torch.no_grad():
            video = generate(compiled, labels, args.seed, args.frames, args.height, args.width, args.steps)
        seconds = time.perf_counter() - start
        report = sparse_compile.report(compiled)
    finally:
        svg2_module.kmeans = counter._real
    densities = [s.mean_density for s in report.sites if s.sparse]
    return {
        "video": video,
        "density": sum(densities) / max(len(densities), 1),
        "kept_q": counter.kept[0] / max(counter.heads[0], 1),
        "kept_k": counter.kept[1] / max(counter.heads[1], 1),
        "passes": counter.passes / max(counter.warm_calls / 2, 1),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--settings", default=DEFAULT_SETTINGS)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--videos", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dense-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_toy_wan(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    labels = torch.arange(args.videos) * 3 % 8
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    clusters = {"q_clusters": max(1, round(WAN_Q_CLUSTERS * tokens / WAN_TOKENS)),
                "k_clusters": max(1, round(WAN_K_CLUSTERS * tokens / WAN_TOKENS))}  # fmt: skip
    with torch.no_grad():
        dense = generate(model, labels, args.seed, args.frames, args.height, args.width, args.steps)
    rows = [f"Toy DiT, {args.videos} video(s) {args.frames}x{args.height}x{args.width} ({tokens} tokens), "
            f"{args.steps} steps, first {args.dense_steps} dense, {clusters}; {device}", "",
            "| setting | PSNR dB vs dense | kept density | reused q / k heads | passes per warm call (q + k) |",
            "|---|---|---|---|---|"]  # fmt: skip
    for name in args.settings.split(","):
        setting = split_variant(name)[1]
        options = {"method": "svg2", "min_seq_len": 16, "dense_steps": args.dense_steps, **clusters, **setting}
        r = run_setting(model, labels, args, options)
        rows.append(f"| {name} | {float(psnr(r['video'], dense).mean()):.2f} | {r['density']:.3f} "
                    f"| {r['kept_q']:.2f} / {r['kept_k']:.2f} | {r['passes']:.2f} |")  # fmt: skip
        print(rows[-1], f"({r['seconds']:.0f} s)", flush=True)
    (args.out / "svg2_kmeans_quality.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
