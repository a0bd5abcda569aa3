"""Timing one compiled transformer at pinned denoising steps, its attention share and kept density."""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

import sparse_compile

ATTENTION_KERNEL = re.compile(r"flash|fmha|sdpa|attention", re.IGNORECASE)


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
    timestep_dtype: torch.dtype
    called: bool = False

    def timestep(self, step: int) -> torch.Tensor:
        return torch.full((1,), 1000.0 * (1 - step / self.total_steps), device=self.device, dtype=self.timestep_dtype)

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
    """Mean kept density of the sparse sites over the sparse steps, the sites' statuses and how many
    sites were rewritten (every graph of the model, graph breaks included)."""
    report = sparse_compile.report(compiled)
    sites = report.sites
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
        "rewritten_sites": len(report.rewritten),
        "sites": len(sites),
        "statuses": statuses,
    }
