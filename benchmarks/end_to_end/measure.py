"""One variant measured end to end: compile, warm up, time the scheduled steps, profile."""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

import torch

import sparse_compile
from sparse_compile.backend import sparse_video
from sparse_compile.methods.cost_model import calibration_lines

from .models import ModelSpec, build_model, make_inputs, timestep_dtype
from .schedule import Schedule, build_schedule, extrapolate
from .timing import Runner, attention_share, kept_density, synchronize
from .variants import backend_options


def measure_variant(spec: ModelSpec, method: str, args: argparse.Namespace, device: torch.device,
                    dtype: torch.dtype) -> dict[str, Any]:
    """Compile, warm up, time and profile one (model, method); see the module docstring."""
    options = backend_options(method, args)
    schedule = build_schedule(options, args, spec.calls_per_step)
    model = build_model(spec, device, dtype)
    # The backend callable itself: what the "sparse_video" entry point names, but no install needed.
    compiled = torch.compile(model) if options is None else torch.compile(model, backend=sparse_video, options=options)
    runner = Runner(compiled, make_inputs(spec, device, dtype), options is not None, schedule.total_steps, device,
                    timestep_dtype(spec, dtype))
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
        record["break_even"] = list(calibration_lines())  # what the guard decided by, in this process
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
