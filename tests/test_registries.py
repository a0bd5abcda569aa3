"""Site and graph records, per-model state and per-site caches stay bounded in a long-running process.

The soak: 200 calls of a compiled tiny Wan (svg2) cycling through 5 resolutions, two steps of CFG
as two calls each per resolution and cycle, and in the first cycle a second model compiled, run and
deleted. After the first cycle nothing recompiles, the records, site states and cache entries stay
the same, and host RSS (and CUDA allocated memory on the GPU) stay within 2% of their value after
the first cycle. On CPU it runs in CI; on a CUDA machine (bf16) it prints its per-cycle table and,
with ``OUT`` set, appends it to ``$OUT/soak.jsonl``:

    python -m pytest -q -s tests/test_registries.py -k cuda
"""

from __future__ import annotations

import gc
import os
import weakref
from dataclasses import asdict, dataclass

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils

import tiny_models
from gpu_checks import save_result, to_device
from sparse_compile.runtime import sites
from sparse_compile.runtime.session import find_session

OPTIONS = {"method": "svg2", "min_seq_len": 16, "q_clusters": 4, "k_clusters": 6, "kmeans_iters_init": 2}
GRIDS = [(3, 8, 10), (2, 8, 8), (4, 6, 8), (2, 10, 12), (3, 6, 6)]
"""Latent (frames, height, width) of the 5 resolutions: 60, 32, 48, 60 and 27 video tokens."""
TIMESTEPS = (900, 700)
CALLS = 200
CYCLE_CALLS = len(GRIDS) * len(TIMESTEPS) * 2
MEMORY_DRIFT = 0.02
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


@dataclass(frozen=True)
class CycleRecord:
    """What the process holds after one cycle of the soak (after a garbage collection)."""

    cycle: int
    calls: int
    host_rss_mib: float
    cuda_allocated_mib: float
    graphs: int
    site_records: int
    graph_records: int
    site_states: int
    cache_entries: int
    cached_kinds: tuple[str, ...]
    """Entry type names held, over every site and CFG branch."""


def host_rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(grid: tuple[int, int, int], device: str) -> dict:
    frames, height, width = grid
    model, inputs, _ = tiny_models.wan(frames, 2 * height, 2 * width, layers=1)
    return to_device(model, inputs, device, DTYPES[device])[1]


def _cycle(compiled, inputs_by_grid: dict, uncond_by_grid: dict) -> int:
    """Each resolution in turn: ``TIMESTEPS`` steps, CFG as two calls. Returns the calls made."""
    calls = 0
    with torch.no_grad():
        for grid, inputs in inputs_by_grid.items():
            for t in TIMESTEPS:
                timestep = torch.full((1,), float(t), device=inputs["hidden_states"].device)
                for text in (inputs["encoder_hidden_states"], uncond_by_grid[grid]):
                    compiled(**{**inputs, "timestep": timestep, "encoder_hidden_states": text})
                    calls += 1
    return calls


def _compile_run_and_delete_another_model(device: str) -> None:
    """A second model of the class: compiled, run once, deleted; its session must be released."""
    other, inputs, _ = tiny_models.wan(layers=1)
    other, inputs = to_device(other, inputs, device, DTYPES[device])
    other_compiled = torch.compile(other, backend="sparse_video", options=OPTIONS)
    with torch.no_grad():
        other_compiled(**inputs)
    other_session = weakref.ref(find_session(other))
    del other, other_compiled
    gc.collect()
    assert other_session() is None, "a deleted model's session must be released"


def _record(model, cycle: int, calls: int, device: str) -> CycleRecord:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
    states = find_session(model).site_states.values()
    return CycleRecord(
        cycle=cycle,
        calls=calls,
        host_rss_mib=host_rss_bytes() / 2**20,
        cuda_allocated_mib=torch.cuda.memory_allocated() / 2**20 if device == "cuda" else 0.0,
        graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"],
        site_records=len(sites.SITES),
        graph_records=len(sites.GRAPHS),
        site_states=len(states),
        cache_entries=sum(len(s.cache) for s in states),
        cached_kinds=tuple(sorted({kind.__name__ for s in states for kind, _ in s.cache.entries()})),
    )


def soak(device: str) -> list[CycleRecord]:
    """Run the soak (module doc) on ``device``; one record per cycle."""
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model, _, _ = tiny_models.wan(layers=1)
    model = model.to(device=device, dtype=DTYPES[device])
    compiled = torch.compile(model, backend="sparse_video", options=OPTIONS)
    inputs_by_grid = {grid: _inputs(grid, device) for grid in GRIDS}
    uncond_by_grid = {grid: torch.randn_like(i["encoder_hidden_states"]) for grid, i in inputs_by_grid.items()}
    records, calls = [], 0
    for cycle in range(CALLS // CYCLE_CALLS):
        calls += _cycle(compiled, inputs_by_grid, uncond_by_grid)
        if cycle == 0:
            _compile_run_and_delete_another_model(device)
        records.append(_record(model, cycle, calls, device))
    return records


def format_table(records: list[CycleRecord]) -> str:
    """The per-cycle records as a Markdown table."""
    header = "| cycle | calls | host RSS MiB | CUDA allocated MiB | Dynamo graphs | site / graph records | site states | cache entries |"
    lines = [header, "|" + "---|" * 8]
    for r in records:
        lines.append(f"| {r.cycle} | {r.calls} | {r.host_rss_mib:.1f} | {r.cuda_allocated_mib:.1f} | {r.graphs} | "
                     f"{r.site_records} / {r.graph_records} | {r.site_states} | {r.cache_entries} |")  # fmt: skip
    return "\n".join(lines)


def assert_flat_after_the_first_cycle(records: list[CycleRecord]) -> None:
    """No recompile, same records, states and caches, memory within :data:`MEMORY_DRIFT` of cycle 0's."""
    first = records[0]
    table = format_table(records)
    assert records[-1].calls == CALLS
    for r in records[1:]:
        assert r.graphs == first.graphs, f"recompiled after the first cycle\n{table}"
        assert (r.site_records, r.graph_records, r.site_states, r.cache_entries) == (
            first.site_records, first.graph_records, first.site_states, first.cache_entries
        ), table  # fmt: skip
        assert abs(r.host_rss_mib / first.host_rss_mib - 1) <= MEMORY_DRIFT, f"host RSS drifted\n{table}"
        if first.cuda_allocated_mib:
            assert abs(r.cuda_allocated_mib / first.cuda_allocated_mib - 1) <= MEMORY_DRIFT, f"CUDA memory drifted\n{table}"
    assert first.site_states == 1  # the model's one rewritten site (its cross-attention stays SDPA)
    # per CFG branch of the one sparse site, at most one entry of each kind svg2 stores: its centroids; where
    # the cluster kernel runs (not the CPU reference), whether the last call was staged; where the break-even
    # guard ran every head dense, when
    assert "CachedClusters" in first.cached_kinds
    assert set(first.cached_kinds) <= {"CachedClusters", "LastCallStaged", "AllHeadsGuarded"}
    assert first.cache_entries <= 2 * len(first.cached_kinds)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_soak_across_resolutions_and_models_stays_flat_after_the_first_cycle(device):
    gc.collect()
    baseline = (len(sites.SITES), len(sites.GRAPHS))
    records = soak(device)
    print(f"\nsoak on {device}: {CALLS} calls, {len(GRIDS)} resolutions\n{format_table(records)}")
    for record in records:
        save_result("soak", {"device": device, **asdict(record)})
    assert_flat_after_the_first_cycle(records)

    torch._dynamo.reset()
    gc.collect()
    assert (len(sites.SITES), len(sites.GRAPHS)) == baseline, "records are released with their graphs"
