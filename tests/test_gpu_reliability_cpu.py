"""The CPU half of ``test_gpu_reliability.py``: its helpers (``gpu_checks.py``), its step-logic
expectations in the default mode, and the op tags its CUDA-graph test rests on."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
import torch.fx as fx

import test_gpu_reliability as spec
import tiny_models
from gpu_checks import (
    CallPeaks,
    PeakMemory,
    denoise,
    describe_peaks,
    first_and_steady_calls,
    in_op_layout,
    peak_during,
    peak_ratio,
    rel_l2,
    run_loop,
    storage_bytes,
    structured_qkv,
    to_device,
)
from sparse_compile.backend import sparse_video
from sparse_compile.kernels import varlen_block_sparse
from sparse_compile.kernels.common import launch_group_size
from sparse_compile.methods.base import TokenLayout
from sparse_compile.methods.svg2 import Svg2Config


class FakeMemory:
    """A :class:`gpu_checks.MemoryStats` whose allocations the test makes by hand."""

    def __init__(self, allocated: int = 0) -> None:
        self.current = allocated
        self.max = allocated
        self.syncs = 0

    def alloc(self, n: int) -> None:
        self.current += n
        self.max = max(self.max, self.current)

    def free(self, n: int) -> None:
        self.current -= n

    def synchronize(self) -> None:
        self.syncs += 1

    def allocated(self) -> int:
        return self.current

    def reset_peak(self) -> None:
        self.max = self.current

    def peak(self) -> int:
        return self.max


def test_peak_during_counts_the_largest_allocation_above_the_baseline():
    stats = FakeMemory(allocated=1000)
    stats.alloc(500)
    stats.free(500)  # an earlier peak must not count

    def call():
        stats.alloc(300)
        stats.alloc(200)  # transient workspace
        stats.free(200)
        return "out"

    assert peak_during(call, stats) == ("out", 500)
    assert stats.syncs == 2

    # An earlier baseline also counts what is still held since then (the 300 of the first call).
    assert peak_during(lambda: stats.alloc(100), stats, baseline=1000) == (None, 400)


def test_storage_bytes_counts_each_storage_once():
    x = torch.zeros(4, 8, dtype=torch.float16)
    y = torch.zeros(3, dtype=torch.float32)
    assert storage_bytes([x, x.t(), x[1:], y]) == 4 * 8 * 2 + 3 * 4


def test_peak_ratio_compares_totals_including_the_inputs():
    gib = 1 << 30
    dense = PeakMemory(inputs=2 * gib, increment=gib)
    sparse = PeakMemory(inputs=2 * gib, increment=gib + gib // 2)
    assert sparse.total == 3.5 * gib
    assert peak_ratio(sparse, dense) == pytest.approx(3.5 / 3)
    assert describe_peaks("svg2 first call", sparse, dense) == (
        "svg2 first call: peak 3.500 GiB (inputs 2.000 + 1.500) vs dense SDPA 3.000 GiB "
        "(inputs 2.000 + 1.000): ratio 1.167"
    )


def test_in_op_layout_copies_only_outputs_not_laid_out_as_the_op_returns_them():
    q = torch.randn(2, 5, 3, 4).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
    v = torch.randn(2, 3, 5, 6)
    bshd = torch.randn(2, 5, 3, 6).transpose(1, 2)
    assert in_op_layout(bshd, q, v) is bshd
    bhsd = torch.randn(2, 3, 5, 6)
    moved = in_op_layout(bhsd, q, v)
    assert torch.equal(moved, bhsd) and moved.transpose(1, 2).is_contiguous()


def test_structured_qkv_is_sequence_major_deterministic_and_concentrated():
    q, k, v = structured_qkv(heads=3, seq=512, dim=64, dtype=torch.bfloat16, device="cpu")
    q2, _, _ = structured_qkv(heads=3, seq=512, dim=64, dtype=torch.bfloat16, device="cpu")
    for t in (q, k, v):
        assert t.shape == (1, 3, 512, 64) and t.dtype == torch.bfloat16
        assert t.transpose(1, 2).is_contiguous()  # a (1, S, H, D) tensor seen as (1, H, S, D)
    assert torch.equal(q, q2)
    assert storage_bytes((q, k, v)) == 3 * 512 * 3 * 64 * 2

    def top_tenth_mass(a: torch.Tensor, b: torch.Tensor) -> float:
        """Mean share of a query's attention held by its top 10% of keys."""
        p = torch.softmax(a.float() @ b.float().transpose(-1, -2) / 8, dim=-1)
        return float(p.topk(512 // 10, dim=-1).values.sum(-1).mean())

    # Attention concentrates on few keys (what sparse methods exploit), unlike standard normal q, k.
    assert top_tenth_mass(q, k) > 0.95
    gen = torch.Generator().manual_seed(0)
    assert top_tenth_mass(torch.randn(1, 3, 512, 64, generator=gen), torch.randn(1, 3, 512, 64, generator=gen)) < 0.6


def test_to_device_casts_floating_inputs_only():
    model, inputs, _ = tiny_models.wan(layers=1)
    model, moved = to_device(model, inputs, "cpu", torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert moved["hidden_states"].dtype == torch.bfloat16
    assert moved["timestep"].dtype == inputs["timestep"].dtype


def test_denoise_runs_conditional_then_unconditional_per_step():
    torch.manual_seed(0)
    model, inputs, _ = tiny_models.wan(layers=1)
    uncond = torch.randn_like(inputs["encoder_hidden_states"])
    outputs = denoise(model, inputs, (900, 500), uncond_text=uncond)
    with torch.no_grad():
        expected = [
            model(**{**inputs, "timestep": torch.tensor([float(t)]), "encoder_hidden_states": text}).sample
            for t in (900, 500) for text in (inputs["encoder_hidden_states"], uncond)
        ]
    assert len(outputs) == 4
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(got, want)
    assert rel_l2(outputs[0], outputs[1]) > 0  # the texts differ


@pytest.mark.parametrize("method_name", spec.SPARSE_METHODS)
def test_first_and_steady_calls_run_the_method_twice_on_one_state(method_name):
    """The memory test's driver on a small grid (the methods' CPU paths; no allocator counters here)."""
    grid = (5, 8, 8)
    q, k, v = structured_qkv(heads=2, seq=320, dim=16, dtype=torch.float32, device="cpu")
    options = {"svg2": {"q_clusters": 4, "k_clusters": 8}, "svg": {"block": 16}, "radial": {"block": 16},
               "adaspa": {"block": 16}, "auto": {"block": 32, "recall": 0.5}}[method_name]
    run = first_and_steady_calls(method_name, q, k, v, TokenLayout(*grid, 0, False), FakeMemory(), options)
    assert run.fallback_reason is None and run.all_finite
    assert all(0 < d < 1 for d in run.densities), run.densities
    nothing = PeakMemory(inputs=storage_bytes((q, k, v)), increment=0)
    assert run.first == run.steady == CallPeaks(method=nothing, op=nothing)


def test_the_probe_loop_with_mode_through_the_backend_callable_matches_the_gpu_test_expectations():
    """The GPU test's reduce-overhead run on the CPU (no CUDA graphs here): same options, steps and records."""
    torch.manual_seed(0)
    model, inputs, _ = tiny_models.wan(frames=5, height=16, width=16, layers=spec.LOOP_LAYERS)
    uncond = torch.randn_like(inputs["encoder_hidden_states"])
    backend = functools.partial(sparse_video, options=spec.PROBE_OPTIONS, mode="reduce-overhead")
    run = run_loop(model, inputs, uncond, spec.LOOP_TIMESTEPS, backend=backend)
    assert run.calls == spec.EXPECTED_PROBE_CALLS
    assert len(run.densities) == spec.LOOP_LAYERS
    assert all(d[0] == d[1] == 1.0 and 0 < d[2] == d[3] == d[4] < 1.0 for d in run.densities.values())
    assert run.graphs_after_first_call == run.graphs_after_loop == 1
    assert run.recorded_cuda_graphs == 0
    assert len(run.outputs) == 2 * len(spec.LOOP_TIMESTEPS)


def test_torch_refuses_mode_together_with_options_for_the_backend_name():
    """Why a sparse method reaches mode="reduce-overhead" only through the backend callable."""
    model, _, _ = tiny_models.wan(layers=1)
    with pytest.raises(RuntimeError, match="Either mode or options can be specified"):
        torch.compile(model, backend="sparse_video", options={"method": "svg2"}, mode="reduce-overhead")


@pytest.mark.parametrize("op_name", ["step_marker", "attention"])
def test_inductor_treats_the_ops_as_cudagraph_unsafe(op_name):
    """What keeps the step logic live under mode="reduce-overhead": Inductor never captures these ops."""
    from torch._inductor.utils import is_cudagraph_unsafe_fx_node

    op = getattr(torch.ops.sparse_compile, op_name).default
    assert torch.Tag.cudagraph_unsafe in op.tags
    graph = fx.Graph()
    node = graph.call_function(op, ())
    assert is_cudagraph_unsafe_fx_node(node)


@pytest.mark.parametrize("heads, seq, pairs_per_group", [(24, 118800, 3), (12, 32760, 1), (2, 320, 1)],
                         ids=["hunyuan_720p", "wan_480p", "tiny"])
def test_the_kept_rows_buffer_is_a_share_of_the_calls_output_whatever_the_gpu(heads, seq, pairs_per_group):
    """svg2's cluster kernel holds int32 kept rows ``(pairs, NQC, S)`` per launch group of (batch, head)
    pairs: at most ``ROWS_BUDGET_SHARE`` (0.5) of the call's output bytes, or one pair where a single
    pair needs more. The budget is a function of the call's shape alone, so the peak ratio against
    dense SDPA (inputs + output = 4 outputs) is the same on every GPU: at the memory test's shape
    3 of 24 pairs per group, 0.39 of the output."""
    q = torch.empty(1, heads, seq, 128, dtype=torch.bfloat16, device="meta")
    output_bytes = heads * seq * 128 * 2
    budget = varlen_block_sparse.rows_budget_bytes(q)
    assert budget == int(varlen_block_sparse.ROWS_BUDGET_SHARE * output_bytes)
    q_clusters = Svg2Config().q_clusters
    group = launch_group_size(heads, q_clusters * seq * 4, budget)
    assert group == pairs_per_group
    rows_bytes = group * q_clusters * seq * 4
    assert rows_bytes <= budget or group == 1
    if (heads, seq) == (spec.MEMORY_HEADS, math.prod(spec.MEMORY_GRID)):
        assert rows_bytes / output_bytes == pytest.approx(0.39, abs=0.005)


def test_the_sanitizer_script_sums_every_processs_errors_and_reads_pytests_summary(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import sanitize_kernels

    log = "\n".join([
        "========= COMPUTE-SANITIZER", "..F.", "===== 1 failed, 3 passed, 2 skipped in 40.10s =====",
        "========= ERROR SUMMARY: 0 errors", "========= ERROR SUMMARY: 2 errors",
    ])  # fmt: skip
    assert sanitize_kernels.sanitizer_errors(log) == 2
    assert sanitize_kernels.pytest_summary(log) == "1 failed, 3 passed, 2 skipped in 40.10s"
    assert sanitize_kernels.sanitizer_errors("stopped after 230 s") is None
