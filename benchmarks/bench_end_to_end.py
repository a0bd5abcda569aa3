"""End-to-end speed of whole diffusers video transformers: Inductor dense vs the sparse methods.

For each model and method this compiles the transformer (``torch.compile(model)`` for
``dense``, ``torch.compile(model, backend=sparse_video, options=...)`` otherwise: the callable the
``"sparse_video"`` entry point names, so a source tree without an install works), warms it
up outside the timing, then times transformer calls at chosen denoising steps (steps and CFG
branches pinned with ``sparse_compile.set_step``; CUDA events, one call at a time) and
**extrapolates** the time of a whole ``--steps``-step generation from them:

* *special* steps, timed call by call: step 0 (compile warm-up aside, SVG2's initial k-means
  runs here while ``kmeans_during_dense``), the last dense step (AdaSpa caches the full LSE), the
  first sparse step, and any later step the method schedules extra work for (AdaSpa's second
  search; ``auto``'s timed second sparse step and its recall checks);
* *steady* steps, sampled: the median call of ``--calls`` calls in the dense phase (steps
  ``< --dense-steps``) and in the sparse phase stands for every other step of that phase.

``total = sum(calls of each special step) + n_dense_steady * calls_per_step * median_dense_call
+ n_sparse_steady * calls_per_step * median_sparse_call``: the simple form
``D*2*t_dense + (N-D)*2*t_sparse + 2*(t_first_sparse - t_sparse)`` with every step that does
extra work timed instead of assumed steady. Inductor dense: every step is steady, ``total = N * calls_per_step *
median_call``. Wan runs CFG as two calls a step; HunyuanVideo (guidance-distilled) one.

Also: compile time (wall time of the first call), the kept density of the sparse steps (from
``sparse_compile.report``), and for Inductor dense the share of one call's GPU kernel time spent
in attention kernels (``torch.profiler``). Random weights (seeded), bf16 on CUDA, fp32 on CPU.

Models (``--models``): ``wan1.3b`` (Wan2.1-T2V-1.3B, 30 layers, 480p 81 frames: 32760 video
tokens), ``wan14b-stack`` (Wan2.1-14B blocks, 720p 81 frames: 75600 tokens), ``hunyuan-stack``
(HunyuanVideo blocks, 720p 129 frames: 118800 tokens + 256 text tokens, joint attention),
``mochi-stack`` (4 Mochi 1 blocks at full width, 480p 163 frames: 44520 tokens + 256 text tokens;
built with ``sparse_compile.use_graph_friendly_attention``) and ``hunyuan15-stack`` (4
HunyuanVideo-1.5 blocks at full width, 480p 121 frames: 49290 tokens + 576 text and image tokens;
its forward breaks into several graphs). The markdown lists the rewritten attention sites per
variant. Both stacks, Inductor dense and two methods, about 5 minutes on an H200:

    python benchmarks/bench_end_to_end.py --models mochi-stack,hunyuan15-stack --methods dense,radial,adaspa \
        --calls 2 --out "$OUT" --max-seconds 290
``--tiny`` shrinks every model, grid and schedule so a whole run takes about two minutes of CPU
time (the sparse methods then run their PyTorch reference kernels: a smoke test, not a speed number).

A ``--methods`` entry may carry option overrides after ``@``: ``svg2@top_p=0.3`` is SVG2 with
``top_p`` 0.3 (values are JSON: numbers, ``true``/``false``, quoted strings), ``svg2@top_p=0.3@k_clusters=500``
sets two. With random weights the attention is nearly uniform, so SVG2's top-p keeps about ``top_p``
of the pairs (0.88 at 0.9); a lower ``top_p`` measures the model at the kept densities that trained
weights give at 0.9.

Results go to ``--out``: ``end_to_end.json`` (every measurement, the environment and the
command line; rewritten after each variant, so a run stopped by ``--max-seconds`` or a kill keeps
what it measured) and ``end_to_end.md``. ``--resume`` merges an earlier run's JSON and skips the
variants it already measured with the same settings.

    python benchmarks/bench_end_to_end.py --models wan1.3b --out "$OUT" --max-seconds 540
    python benchmarks/bench_end_to_end.py --tiny --out /tmp/e2e
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import common  # noqa: F401 - puts the repository root on sys.path
import diffusers
import torch
from end_to_end.measure import measure_variant, release_compiled_state
from end_to_end.models import FULL_MODELS, TINY_MODELS, ModelSpec, model_info
from end_to_end.report import Results, describe, environment
from end_to_end.variants import (
    ALL_METHODS,
    BACKEND_DENSE,
    DEFAULT_METHODS,
    INDUCTOR,
    backend_options,
    split_variant,
    variant_settings,
)


@dataclass
class Budget:
    """``--max-seconds``: a variant starts only if the longest one so far would still fit."""

    max_seconds: float | None
    start: float = field(default_factory=time.perf_counter)
    durations: dict[str, list[float]] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def estimate(self, model: str) -> float:
        everything = [d for ds in self.durations.values() for d in ds]
        return max(self.durations.get(model) or everything or [0.0])

    def refusal(self, model: str) -> str | None:
        """Why the next variant of ``model`` must be skipped, or ``None``."""
        if self.max_seconds is None:
            return None
        elapsed, estimate = self.elapsed(), self.estimate(model)
        if elapsed + estimate <= self.max_seconds:
            return None
        return (f"--max-seconds {self.max_seconds:.0f}: {elapsed:.0f} s elapsed + {estimate:.0f} s "
                "(longest variant so far) would exceed it")


def run_variant(spec: ModelSpec, method: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                budget: Budget, results: Results) -> None:
    """Measure one variant (or record why not) and write the results file."""
    settings = variant_settings(spec, method, args, device)
    if results.previous(spec.name, method, settings) is not None:
        print(f"[{spec.name} / {method}] already measured in the resumed file", flush=True)
        return
    record: dict[str, Any] = {"model": spec.name, "method": method, "settings": settings, "run": len(results.runs) - 1}
    refusal = budget.refusal(spec.name)
    if refusal is not None:
        print(f"[{spec.name} / {method}] {refusal}", flush=True)
        results.put({**record, "status": "skipped", "reason": refusal})
        results.write()
        return
    print(f"[{spec.name} / {method}] options {settings['options']}", flush=True)
    results.in_progress = {"model": spec.name, "method": method, "started_s": budget.elapsed()}
    results.write()
    start = time.perf_counter()
    try:
        record.update(measure_variant(spec, method, args, device, dtype), status="ok")
    except Exception as exc:  # noqa: BLE001 - one failing variant must not end the run
        record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                      traceback=traceback.format_exc()[-4000:])
    record["wall_s"] = time.perf_counter() - start
    release_compiled_state(device)
    budget.durations.setdefault(spec.name, []).append(record["wall_s"])
    results.in_progress = None
    results.put(record)
    results.write()
    print(f"[{spec.name} / {method}] {describe(record)} ({record['wall_s']:.0f} s)", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(FULL_MODELS), help=f"comma-separated, of {list(FULL_MODELS)}")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated, of {list(ALL_METHODS)} ('dense' is Inductor, "
                             f"'{BACKEND_DENSE}' the backend's own dense op); a backend method may carry "
                             "option overrides, e.g. svg2@top_p=0.3")
    parser.add_argument("--calls", type=int, default=None, help="calls timed per steady phase (default 4; --tiny 2)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps extrapolated to (default 50; --tiny 6)")
    parser.add_argument("--dense-steps", type=int, default=None,
                        help="first steps run dense by the sparse methods (default 10 = 20%% of 50; --tiny 2)")
    parser.add_argument("--layers", type=int, default=None,
                        help="override every model's block count (HunyuanVideo: of each kind)")
    parser.add_argument("--method-options", type=json.loads, default={},
                        help='JSON of extra options per method, e.g. \'{"svg": {"density": 0.2}}\'')
    parser.add_argument("--out", type=Path, default=Path("end_to_end_results"))
    parser.add_argument("--resume", type=Path, default=None, help="an earlier end_to_end.json to merge and skip")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="skip variants that would end past this many seconds since the start")
    parser.add_argument("--tiny", action="store_true", help="tiny models and schedule: a CPU smoke run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for key, full, tiny in (("calls", 4, 2), ("steps", 50, 6), ("dense_steps", 10, 2)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    unknown_models = [m for m in args.models if m not in FULL_MODELS]
    if unknown_models:
        parser.error(f"unknown models {unknown_models}; allowed: {list(FULL_MODELS)}")
    for method in args.methods:
        try:
            base, overrides = split_variant(method)
        except ValueError as error:
            parser.error(str(error))
        if base not in ALL_METHODS or (base == INDUCTOR and overrides):
            parser.error(f"unknown method {method!r}; allowed: {list(ALL_METHODS)}, the sparse ones optionally "
                         "with @key=value overrides")
    unknown = sorted(set(args.method_options) - set(ALL_METHODS) - {INDUCTOR})
    if unknown or not all(isinstance(v, dict) for v in args.method_options.values()):
        parser.error(f"--method-options must map methods of {list(ALL_METHODS[1:])} to option dicts, "
                     f"got {args.method_options!r}")
    if args.calls < 1 or args.steps < 1 or not 0 <= args.dense_steps <= args.steps:
        parser.error("need --calls >= 1, --steps >= 1 and 0 <= --dense-steps <= --steps")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    diffusers.utils.logging.set_verbosity_error()  # build_model casts like from_pretrained; no cast warning
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny and device.type == "cpu":
        torch._inductor.config.compile_threads = 1  # no compile worker pool: faster for tiny graphs on 2 cores
    for method in args.methods:
        backend_options(method, args)  # a bad --method-options entry fails before anything runs
    budget = Budget(args.max_seconds)
    results = Results.load(args.resume, args.out) if args.resume else Results(args.out)
    results.runs.append(environment(device))
    specs = TINY_MODELS if args.tiny else FULL_MODELS
    print(f"{results.runs[-1]['device']}, torch {torch.__version__}, {dtype}; steps {args.steps}, dense steps "
          f"{args.dense_steps}, {args.calls} calls per steady phase", flush=True)
    for name in args.models:
        spec = specs[name] if args.layers is None else specs[name].with_layers(args.layers)
        results.models[name] = model_info(spec)
        print(f"== {name}: {spec.description}, {spec.blocks} blocks, {spec.video_tokens} video tokens", flush=True)
        for method in args.methods:
            run_variant(spec, method, args, device, dtype, budget, results)
    results.write()
    print((args.out / "end_to_end.md").read_text())
    print(f"wrote {args.out / 'end_to_end.json'} and end_to_end.md in {budget.elapsed():.0f} s")


if __name__ == "__main__":
    main()
