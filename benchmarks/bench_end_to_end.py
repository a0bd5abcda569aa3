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
  search);
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
(HunyuanVideo blocks, 720p 129 frames: 118800 tokens + 256 text tokens, joint attention).
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

    PYTHONPATH=. python benchmarks/bench_end_to_end.py --models wan1.3b --out "$OUT" --max-seconds 540
    PYTHONPATH=. python benchmarks/bench_end_to_end.py --tiny --out /tmp/e2e
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

import sparse_compile
from sparse_compile.backend import sparse_video
from sparse_compile.methods import METHODS

SCHEMA = "bench_end_to_end/1"
INDUCTOR = "dense"  # torch.compile's default backend
BACKEND_DENSE = "backend-dense"  # the sparse_video backend with method="dense" (its own overhead)
SPARSE_METHODS = tuple(m for m in METHODS if m != "dense")
ALL_METHODS = (INDUCTOR, BACKEND_DENSE, *SPARSE_METHODS)
DEFAULT_METHODS = (INDUCTOR, *SPARSE_METHODS)
ATTENTION_KERNEL = re.compile(r"flash|fmha|sdpa|attention", re.IGNORECASE)
HUNYUAN_PROMPT_TOKENS = 64  # valid text tokens of the 256 (a typical prompt after the template crop)
HUNYUAN_GUIDANCE = 6000.0  # embedded guidance 6.0, times 1000 as the pipeline passes it


# --------------------------------------------------------------------------------------------
# Models


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked transformer: its diffusers class, constructor config and input shapes.

    ``latent`` is the latent video ``(frames, height, width)``; the patch is 1x2x2, so the video
    tokens are ``frames * height/2 * width/2``. ``calls_per_step`` is 2 for CFG as two calls, 1
    for a guidance-distilled model.
    """

    name: str
    family: str
    config: dict[str, Any]
    latent: tuple[int, int, int]
    text_tokens: int
    calls_per_step: int
    description: str

    @property
    def blocks(self) -> str:
        """Transformer blocks, e.g. ``30`` (Wan) or ``1+1`` (HunyuanVideo double+single stream)."""
        if self.family == "wan":
            return str(self.config["num_layers"])
        return f"{self.config['num_layers']}+{self.config['num_single_layers']}"

    @property
    def video_tokens(self) -> int:
        frames, height, width = self.latent
        return frames * (height // 2) * (width // 2)

    def with_layers(self, layers: int) -> "ModelSpec":
        """The same model with ``layers`` blocks (HunyuanVideo: of each kind, double and single stream)."""
        keys = ("num_layers",) if self.family == "wan" else ("num_layers", "num_single_layers")
        return ModelSpec(self.name, self.family, {**self.config, **{k: layers for k in keys}}, self.latent,
                         self.text_tokens, self.calls_per_step, self.description)


MODEL_CLASSES = {"wan": WanTransformer3DModel, "hunyuan": HunyuanVideoTransformer3DModel}
WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                  freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
HUNYUAN_COMMON = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                      num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
                      guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                      rope_axes_dim=(16, 56, 56))

FULL_MODELS = {
    "wan1.3b": ModelSpec("wan1.3b", "wan", {**WAN_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
                         (21, 60, 104), 512, 2, "Wan2.1-T2V-1.3B (30 blocks), 480p 81 frames"),
    "wan14b-stack": ModelSpec("wan14b-stack", "wan",
                              {**WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 2},
                              (21, 90, 160), 512, 2, "Wan2.1-T2V-14B blocks (of 40), 720p 81 frames"),
    "hunyuan-stack": ModelSpec("hunyuan-stack", "hunyuan", {**HUNYUAN_COMMON, "num_layers": 1, "num_single_layers": 1},
                               (33, 90, 160), 256, 1,
                               "HunyuanVideo double+single-stream blocks (of 20+40), 720p 129 frames, joint attention"),
}

TINY_WAN = dict(patch_size=(1, 2, 2), attention_head_dim=32, in_channels=16, out_channels=16, text_dim=32, freq_dim=32,
                ffn_dim=128, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
TINY_MODELS = {
    "wan1.3b": ModelSpec("wan1.3b", "wan", {**TINY_WAN, "num_attention_heads": 2, "num_layers": 1},
                         (3, 16, 24), 16, 2, "tiny Wan (2 heads x 32)"),
    "wan14b-stack": ModelSpec("wan14b-stack", "wan",
                              {**TINY_WAN, "num_attention_heads": 4, "attention_head_dim": 16, "num_layers": 1},
                              (3, 16, 24), 16, 2, "tiny Wan (4 heads x 16)"),
    "hunyuan-stack": ModelSpec("hunyuan-stack", "hunyuan", dict(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(8, 12, 12)),
        (3, 16, 24), 16, 1, "tiny HunyuanVideo (2 heads x 32)"),
}
# --tiny: sequences are a few hundred tokens, so sites must count as video from 64 tokens and the
# methods' blocks and cluster counts shrink with them.
TINY_MIN_SEQ_LEN = 64
TINY_METHOD_OPTIONS = {
    "svg2": {"q_clusters": 8, "k_clusters": 16},
    "svg": {"block": 32, "profile_rows": 16},
    "radial": {"block": 32},
    "adaspa": {"block": 32},
}


def keep_in_fp32(model: torch.nn.Module) -> None:
    """Cast the modules diffusers keeps in fp32 when loading in bf16 (``_keep_in_fp32_modules``) back to fp32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(part in keep for part in name.split(".")):
            tensor.data = tensor.data.float()


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A seeded random-weight transformer on ``device``, cast as ``from_pretrained(torch_dtype=dtype)`` would."""
    torch.manual_seed(0)
    with device:
        model = MODEL_CLASSES[spec.family](**spec.config)
    model = model.to(device=device, dtype=dtype).eval()
    if dtype != torch.float32:
        keep_in_fp32(model)
    return model


def make_inputs(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Keyword inputs of each call of a step (timestep aside): [cond, uncond] with CFG, else [cond]."""
    g = torch.Generator(device="cpu").manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    latents = rand(1, spec.config["in_channels"], *spec.latent)
    if spec.family == "wan":
        return [dict(hidden_states=latents, encoder_hidden_states=rand(1, spec.text_tokens, spec.config["text_dim"]))
                for _ in range(spec.calls_per_step)]
    valid = min(HUNYUAN_PROMPT_TOKENS, spec.text_tokens // 2)
    mask = (torch.arange(spec.text_tokens) < valid).unsqueeze(0).to(device)
    return [dict(hidden_states=latents, encoder_hidden_states=rand(1, spec.text_tokens, spec.config["text_embed_dim"]),
                 encoder_attention_mask=mask, pooled_projections=rand(1, spec.config["pooled_projection_dim"]),
                 guidance=torch.full((1,), HUNYUAN_GUIDANCE, device=device, dtype=dtype))
            for _ in range(spec.calls_per_step)]


# --------------------------------------------------------------------------------------------
# Step schedule and extrapolation


@dataclass(frozen=True)
class SteadyGroup:
    """Steps that cost the same per call: ``steps`` are all of them, ``sampled`` those timed."""

    name: str
    steps: tuple[int, ...]
    sampled: tuple[int, ...]


@dataclass(frozen=True)
class Schedule:
    """Which denoising steps a variant times, and what each timed step stands for."""

    total_steps: int
    dense_steps: int
    calls_per_step: int
    special: tuple[int, ...]
    groups: tuple[SteadyGroup, ...]

    def timed_steps(self) -> list[int]:
        return sorted({*self.special, *(s for g in self.groups for s in g.sampled)})

    def warmup_steps(self) -> list[int]:
        """Every special step and one step of each group: every code path runs before the timing."""
        return sorted({*self.special, *(g.sampled[0] for g in self.groups)})


def special_steps(options: dict[str, Any] | None, dense_steps: int, total: int) -> tuple[int, ...]:
    """Steps whose calls differ from their phase's steady calls (none for Inductor dense)."""
    if options is None:
        return ()
    steps = {0, dense_steps - 1, dense_steps}
    instance = METHODS[options["method"]](sparse_compile.validate_options(options))
    is_search_step = getattr(instance, "is_search_step", None)
    if is_search_step is not None:
        steps |= {s for s in range(dense_steps, total) if is_search_step(s)}
    return tuple(sorted(s for s in steps if 0 <= s < total))


def build_schedule(options: dict[str, Any] | None, args: argparse.Namespace, calls_per_step: int) -> Schedule:
    """Special steps plus ``--calls`` calls sampled from each steady phase."""
    total, dense = args.steps, min(args.dense_steps, args.steps)
    special = special_steps(options, dense, total)
    sample = max(1, math.ceil(args.calls / calls_per_step))
    phases = [("all", range(total))] if options is None else [("dense", range(dense)), ("sparse", range(dense, total))]
    groups = []
    for name, steps in phases:
        steady = tuple(s for s in steps if s not in special)
        if steady:
            groups.append(SteadyGroup(name, steady, steady[:sample]))
    return Schedule(total, dense, calls_per_step, special, tuple(groups))


def extrapolate(schedule: Schedule, step_ms: dict[int, list[float]]) -> dict[str, Any]:
    """Total time of a ``total_steps`` generation from the timed calls (see the module docstring)."""
    medians = {g.name: statistics.median(ms for s in g.sampled for ms in step_ms[s]) for g in schedule.groups}
    group_of = {s: g.name for g in schedule.groups for s in g.steps}
    cost = [sum(step_ms[s]) if s in schedule.special else schedule.calls_per_step * medians[group_of[s]]
            for s in range(schedule.total_steps)]
    terms = [f"step {s}: {' + '.join(f'{ms:.1f}' for ms in step_ms[s])} ms" for s in schedule.special]
    terms += [f"{len(g.steps)} {g.name} steps x {schedule.calls_per_step} calls x {medians[g.name]:.1f} ms "
              f"(median of {len(g.sampled) * schedule.calls_per_step} calls at steps {list(g.sampled)})"
              for g in schedule.groups]
    return {
        "total_s": sum(cost) / 1e3,
        "dense_phase_s": sum(cost[: schedule.dense_steps]) / 1e3,
        "sparse_phase_s": sum(cost[schedule.dense_steps:]) / 1e3,
        "median_call_ms": medians,
        "formula": "EXTRAPOLATED, not one timed run: " + " + ".join(terms),
    }


# --------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU (queue drained first), the wall clock on a CPU."""
    synchronize(device)
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start_event.record()
    fn()
    end_event.record()
    end_event.synchronize()
    return start_event.elapsed_time(end_event)


@dataclass
class Runner:
    """Calls one compiled model at a given denoising step and CFG branch."""

    compiled: torch.nn.Module
    inputs: list[dict[str, torch.Tensor]]
    tracked: bool
    total_steps: int
    device: torch.device
    called: bool = False

    def timestep(self, step: int) -> torch.Tensor:
        return torch.full((1,), 1000.0 * (1 - step / self.total_steps), device=self.device)

    def call(self, step: int, branch: int) -> None:
        """One transformer call; with the backend, pinned to ``(step, branch)`` from the second call on.

        The first call compiles and creates the model's session; step tracking makes it step 0, branch 0.
        """
        if self.tracked and self.called:
            sparse_compile.set_step(self.compiled, step, branch)
        with torch.no_grad():
            self.compiled(**self.inputs[branch], timestep=self.timestep(step), return_dict=False)
        self.called = True

    def time_steps(self, steps: list[int], branches: int) -> dict[int, list[float]]:
        """Milliseconds of each call of each step (branches ``0..branches-1``)."""
        return {s: [timed(lambda: self.call(s, b), self.device) for b in range(branches)] for s in steps}


def attention_share(runner: Runner, step: int) -> dict[str, Any]:
    """Share of one call's kernel time in attention kernels (GPU: CUDA kernels; CPU: op self times)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = runner.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        runner.call(step, 0)
        synchronize(runner.device)
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == kind]
    us = (lambda e: e.time_range.elapsed_us()) if cuda else (lambda e: e.self_cpu_time_total)
    total = sum(us(e) for e in events)
    attention: dict[str, float] = {}
    for e in events:
        if ATTENTION_KERNEL.search(e.name) and not e.name.startswith("triton"):
            attention[e.name] = attention.get(e.name, 0.0) + us(e)
    overall: dict[str, float] = {}
    for e in events:
        overall[e.name] = overall.get(e.name, 0.0) + us(e)
    return {
        "share": sum(attention.values()) / total if total else None,
        "attention_ms": sum(attention.values()) / 1e3,
        "total_ms": total / 1e3,
        "measured_on": "CUDA kernel times" if cuda else "CPU op self times (only a smoke test)",
        "top_attention_kernels": top_entries(attention),
        "top_kernels": top_entries(overall),
    }


def top_entries(times_us: dict[str, float], count: int = 5) -> list[dict[str, Any]]:
    """The ``count`` largest ``name -> microseconds`` entries as ``{"name", "ms"}`` (names cut to 160 chars)."""
    top = sorted(times_us.items(), key=lambda kv: -kv[1])[:count]
    return [{"name": name[:160], "ms": t / 1e3} for name, t in top]


def kept_density(compiled: torch.nn.Module, dense_steps: int) -> dict[str, Any]:
    """Mean kept density of the sparse sites over the sparse steps, and the sites' statuses."""
    sites = sparse_compile.report(compiled).sites
    statuses: dict[str, int] = {}
    for s in sites:
        statuses[s.status] = statuses.get(s.status, 0) + 1
    per_site = [statistics.fmean(d for step, d in s.density_by_step.items() if step >= dense_steps)
                for s in sites if s.sparse and any(step >= dense_steps for step in s.density_by_step)]
    return {
        "kept_density": statistics.fmean(per_site) if per_site else None,
        "kept_density_min_site": min(per_site, default=None),
        "kept_density_max_site": max(per_site, default=None),
        "sparse_sites": sum(s.sparse for s in sites),
        "sites": len(sites),
        "statuses": statuses,
    }


# --------------------------------------------------------------------------------------------
# Variants


def split_variant(variant: str) -> tuple[str, dict[str, Any]]:
    """``"svg2@top_p=0.3@k_clusters=500"`` -> ``("svg2", {"top_p": 0.3, "k_clusters": 500})`` (values parsed as JSON).

    Raises ``ValueError`` for an override that is not ``key=value`` or whose value is not JSON.
    """
    base, *pairs = variant.split("@")
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method variant {variant!r}: override {pair!r} is not key=value")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"method variant {variant!r}: value of {key!r} is not JSON ({error})") from None
    return base, overrides


def backend_options(method: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """``torch.compile`` options of a variant (``None``: Inductor), validated up front.

    ``method`` is a name of :data:`ALL_METHODS`, optionally with ``@key=value`` overrides (:func:`split_variant`),
    which apply last."""
    base, overrides = split_variant(method)
    if base == INDUCTOR:
        return None
    options: dict[str, Any] = {"method": "dense" if base == BACKEND_DENSE else base, "dense_steps": args.dense_steps}
    if args.tiny:
        options["min_seq_len"] = TINY_MIN_SEQ_LEN
        options.update(TINY_METHOD_OPTIONS.get(base, {}))
    options.update(args.method_options.get(base, {}))
    options.update(overrides)
    sparse_compile.validate_options(options)
    return options


def variant_settings(spec: ModelSpec, method: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What a measurement depends on; a resumed record is reused only when these are equal."""
    return {"config": json.loads(json.dumps(spec.config)), "latent": list(spec.latent), "text_tokens": spec.text_tokens,
            "calls_per_step": spec.calls_per_step, "options": backend_options(method, args), "steps": args.steps,
            "dense_steps": args.dense_steps, "calls": args.calls, "device": str(device)}


def measure_variant(spec: ModelSpec, method: str, args: argparse.Namespace, device: torch.device,
                    dtype: torch.dtype) -> dict[str, Any]:
    """Compile, warm up, time and profile one (model, method); see the module docstring."""
    options = backend_options(method, args)
    schedule = build_schedule(options, args, spec.calls_per_step)
    model = build_model(spec, device, dtype)
    # The backend callable itself: what the "sparse_video" entry point names, but no install needed.
    compiled = torch.compile(model) if options is None else torch.compile(model, backend=sparse_video, options=options)
    runner = Runner(compiled, make_inputs(spec, device, dtype), options is not None, schedule.total_steps, device)
    memory_before = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    runner.call(0, 0)
    synchronize(device)
    compile_s = time.perf_counter() - start
    print(f"  compile + first call {compile_s:.1f} s", flush=True)
    start = time.perf_counter()
    runner.time_steps(schedule.warmup_steps(), 1)
    warmup_s = time.perf_counter() - start
    if options is not None:
        sparse_compile.reset(compiled)
    step_ms = runner.time_steps(schedule.timed_steps(), spec.calls_per_step)
    extrapolated = extrapolate(schedule, step_ms)
    record: dict[str, Any] = {
        "compile_s": compile_s,
        "warmup_s": warmup_s,
        "step_ms": {str(s): ms for s, ms in step_ms.items()},
        "special_steps": list(schedule.special),
        "extrapolated": extrapolated,
        "summary": summarize(schedule, step_ms, extrapolated["median_call_ms"]),
    }
    if options is not None:
        record.update(kept_density(compiled, schedule.dense_steps))
    else:
        record["attention"] = attention_share(runner, 0)
    if device.type == "cuda":
        record["memory_before_gib"] = memory_before  # device memory still held from earlier variants, weights built
        record["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return record


def summarize(schedule: Schedule, step_ms: dict[int, list[float]],
              medians: dict[str, float]) -> dict[str, float | None]:
    """Median dense-phase call, the first sparse step (all its calls), median steady sparse call."""
    first_sparse = schedule.dense_steps
    return {
        "dense_call_ms": medians.get("dense", medians.get("all")),
        "first_sparse_step_ms": sum(step_ms[first_sparse]) if first_sparse in schedule.special else None,
        "sparse_call_ms": medians.get("sparse"),
    }


def release_compiled_state(device: torch.device) -> None:
    """Drop Dynamo's caches and free the device memory of the last variant."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# Results file


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and command line of this run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "triton": triton_version,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
    }


@dataclass
class Results:
    """Everything measured, written as JSON and markdown after each variant."""

    out: Path
    runs: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    in_progress: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: Path, out: Path) -> "Results":
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA:
            raise SystemExit(f"{path}: not a {SCHEMA} file")
        return cls(out, data["runs"], data["models"], data["variants"])

    def previous(self, model: str, method: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        """A successful earlier record of this variant with the same settings."""
        return next((v for v in self.variants if v["model"] == model and v["method"] == method
                     and v["status"] == "ok" and v["settings"] == settings), None)

    def put(self, record: dict[str, Any]) -> None:
        """Add a variant's record, replacing an earlier one of the same (model, method)."""
        self.variants = [v for v in self.variants
                         if (v["model"], v["method"]) != (record["model"], record["method"])] + [record]

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"schema": SCHEMA, "runs": self.runs, "models": self.models, "variants": self.variants,
                "in_progress": self.in_progress}
        tmp = self.out / "end_to_end.json.tmp"
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.out / "end_to_end.json")
        (self.out / "end_to_end.md").write_text(markdown(data))


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def model_table(model: str, info: dict[str, Any], variants: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of one model: a row per variant, the baseline's attention share, notes."""
    ok = [v for v in variants if v["status"] == "ok"]
    base = next((v for v in ok if v["method"] == INDUCTOR), None)
    base_call = base["summary"]["dense_call_ms"] if base else None
    base_total = base["extrapolated"]["total_s"] if base else None
    lines = [f"### {model}: {info['description']}, {info['blocks']} blocks benchmarked", "",
             f"{info['video_tokens']} video tokens (latent {'x'.join(map(str, info['latent']))}), "
             f"{info['calls_per_step']} call(s) per step, {info['parameters']:,} parameters.", "",
             "| method | compile + 1st call s | dense-phase ms/call | first sparse step ms | sparse ms/call "
             "| kept density | sparse call speedup vs Inductor | extrapolated total s | total speedup vs Inductor |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v in ok:
        s, total = v["summary"], v["extrapolated"]["total_s"]
        call = s["sparse_call_ms"] if s["sparse_call_ms"] is not None else s["dense_call_ms"]
        speed = base_call / call if base_call and v is not base else None
        lines.append(f"| {v['method']} | {v['compile_s']:.1f} | {fmt(s['dense_call_ms'], '.1f')} "
                     f"| {fmt(s['first_sparse_step_ms'], '.1f')} | {fmt(s['sparse_call_ms'], '.1f')} "
                     f"| {fmt(v.get('kept_density'), '.3f')} | {fmt(speed, '.2f')} | {total:.1f} "
                     f"| {fmt(base_total / total if base_total and v is not base else None, '.2f')} |")
    if base and base.get("attention", {}).get("share") is not None:
        att = base["attention"]
        lines += ["", f"Attention share of one Inductor dense call: {att['share']:.1%} "
                      f"({att['attention_ms']:.1f} of {att['total_ms']:.1f} ms, {att['measured_on']}; kernels named "
                      f"like `{ATTENTION_KERNEL.pattern}`, self- and cross-attention)."]
    for v in variants:
        if v["status"] != "ok":
            lines += ["", f"- {v['method']}: **{v['status']}**: {v.get('reason') or v.get('error', '')}"]
    lines += ["", "Extrapolations:"] + [f"- {v['method']}: {v['extrapolated']['formula']}" for v in ok]
    return lines + [""]


def markdown(data: dict[str, Any]) -> str:
    """The ``end_to_end.md`` report."""
    lines = ["# End-to-end transformer time: Inductor dense vs sparse methods", "",
             "Totals are EXTRAPOLATED to a whole generation from timed calls at chosen steps "
             "(benchmarks/bench_end_to_end.py says how); random weights.", ""]
    for run in data["runs"]:
        lines.append(f"- run {run['started']}: {run['device']}, torch {run['torch']}, triton {run['triton']}, "
                     f"diffusers {run['diffusers']}, commit {run['git_commit']}: `{run['command']}`")
    lines.append("")
    for model, info in data["models"].items():
        lines += model_table(model, info, [v for v in data["variants"] if v["model"] == model])
    if data.get("in_progress"):
        ip = data["in_progress"]
        lines.append(f"**Stopped during {ip['model']} / {ip['method']}** "
                     f"(started {ip['started_s']:.0f} s into the run).")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main


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


def describe(record: dict[str, Any]) -> str:
    """One progress line for a finished variant."""
    if record["status"] != "ok":
        return f"ERROR {record['error']}"
    s = record["summary"]
    parts = [f"dense call {fmt(s['dense_call_ms'], '.1f')} ms"]
    if s["sparse_call_ms"] is not None:
        parts += [f"first sparse step {fmt(s['first_sparse_step_ms'], '.1f')} ms",
                  f"sparse call {s['sparse_call_ms']:.1f} ms", f"kept density {fmt(record.get('kept_density'), '.3f')}"]
    if "attention" in record:
        parts.append(f"attention share {fmt(record['attention']['share'], '.1%')}")
    parts.append(f"extrapolated total {record['extrapolated']['total_s']:.1f} s")
    return ", ".join(parts)


def model_info(spec: ModelSpec) -> dict[str, Any]:
    """Shape facts of a model for the results file (parameters counted on the meta device)."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in MODEL_CLASSES[spec.family](**spec.config).parameters())
    return {"description": spec.description, "blocks": spec.blocks, "family": spec.family, "latent": list(spec.latent),
            "video_tokens": spec.video_tokens, "text_tokens": spec.text_tokens,
            "calls_per_step": spec.calls_per_step, "parameters": parameters,
            "config": json.loads(json.dumps(spec.config))}


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
