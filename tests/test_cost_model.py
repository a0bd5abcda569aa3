"""The cost model's calibration: repeated interleaved timings, and the break-even densities it reports."""

from __future__ import annotations

import pytest
import torch
import triton.testing

import sparse_compile
import tiny_models
from sparse_compile.methods import cost_model
from sparse_compile.methods.cost_model import ClusterCosts, KernelCosts, fastest_seconds, line_fit


def test_each_timing_is_the_fastest_of_interleaved_repeats(monkeypatch):
    """A slow repeat (a transient on the GPU) does not set the time; the calls alternate, so a slowdown
    lasting one repeat hits every call at most once."""
    order, medians_ms = [], iter([9.0, 5.0, 1.0, 6.0, 4.0, 2.0, 7.0, 7.0])  # a, b, a, b, ...

    def fake_do_bench(fn, **kwargs):
        order.append(fn())
        return next(medians_ms)

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(cost_model, "CALIBRATION_REPEATS", 4)
    seconds = fastest_seconds([lambda: "a", lambda: "b"])
    assert order == ["a", "b"] * 4
    assert seconds == pytest.approx([1e-3, 2e-3])


def test_two_timed_points_give_the_per_pair_time_and_the_launch():
    assert line_fit([100.0, 300.0], [3.0, 7.0]) == pytest.approx((0.02, 1.0))


@pytest.mark.parametrize("pairs,times", [([100.0, 100.0], [3.0, 4.0]), ([100.0, 300.0], [4.0, 3.0])])
def test_points_without_a_positive_slope_charge_the_slower_time_to_its_pairs(pairs, times):
    """The same kept pairs at both densities (one or two clusters keep everything) or a noisy pair of
    timings: no division by zero, no negative per-pair time, no launch."""
    assert line_fit(pairs, times) == pytest.approx((0.04, 0.0))


def test_the_report_lists_the_break_even_densities_this_process_measured(monkeypatch, recording_method):
    device = torch.device("cuda", 0)
    monkeypatch.setattr(cost_model, "_measured_kernels", {
        (device, torch.bfloat16, 128, 64): KernelCosts(pair_time=1.0, launch=0.0, dense_pair_time=1.0)})
    monkeypatch.setattr(cost_model, "_measured_clusters", {
        (device, torch.bfloat16, 128, 200, 1000, 1): ClusterCosts(pair_time=2.5, launch=0.0, clustering_time=1.0)})
    model, inputs, _ = tiny_models.wan(layers=1)
    compiled = torch.compile(model, backend="sparse_video", options={"method": "recording", "min_seq_len": 16})
    with torch.no_grad():
        compiled(**inputs)
    notes = sparse_compile.report(compiled).notes
    assert notes[-2:] == (
        "cuda:0 bfloat16 head dim 128: block kernel, 64-token blocks, break-even kept density 0.85",
        "cuda:0 bfloat16 head dim 128: cluster kernel, 200 x 1000 clusters, break-even kept density 0.34",
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_svg2s_guard_density_is_the_cluster_kernels_break_even_below_the_block_kernels():
    device = torch.device("cuda", torch.cuda.current_device())
    density = cost_model.cluster_guard_density(device, torch.bfloat16, 128, 200, 1000, 1)
    block = cost_model.kernel_costs(device, torch.bfloat16, 128, cost_model.GUARD_BLOCK).break_even_density
    assert 0.1 < density < block
    assert any("cluster kernel, 200 x 1000 clusters" in line for line in cost_model.calibration_lines())
