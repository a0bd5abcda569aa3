"""Every sparse call checks that q, k and v are finite with one host read: after its kernels are launched when
it reuses its cached pattern (so the GPU does not wait on the host between the read and the kernels), before it
plans when it computes its pattern from them. A call that is not finite runs dense with its reason and leaves
the site's cache as it was before it."""

from __future__ import annotations

import pytest
import torch

from method_calls import method_call
from sparse_compile.methods import METHODS, base
from sparse_compile.methods.adaspa import BranchState
from sparse_compile.methods.base import SiteCache, TokenLayout
from sparse_compile.methods.host_read import read_while
from sparse_compile.methods.text_tokens import MASKED_VIDEO_KEYS
from sparse_compile.options import validate_options

LAYOUT = TokenLayout(16, 2, 4, 0, False)
SMALL = {
    "svg2": {"q_clusters": 4, "k_clusters": 6, "kmeans_iters_init": 3, "top_p": 0.5},
    "svg": {"block": 16, "density": 0.5},
    "radial": {"block": 16, "first_frame_sink": False},
    "adaspa": {"block": 16, "density": 0.5},
    "auto": {"block": 32, "recall": 0.6},
}
"""Per method, options that make it sparse on LAYOUT's 128 video tokens."""
REASON = "key holds NaN or Inf (dense attention defines the result)"


def qkv(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 2, LAYOUT.video_tokens, 16, generator=generator) for _ in range(3))


def with_nan_key(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = qkv(seed)
    k[0, 1, 5, 3] = float("nan")
    return q, k, v


def method(name: str):
    return METHODS[name](validate_options({"method": name, **SMALL[name]}))


def attend_recording_reads(monkeypatch, method, call) -> tuple[object, list[bool]]:
    """``method.attend(call)`` and, per host read of the finiteness flags, whether work was launched before it."""
    launched_first = []
    monkeypatch.setattr(base, "read_while",
                        lambda values, work: launched_first.append(work is not None) or read_while(values, work))
    return method.attend(call), launched_first


@pytest.mark.parametrize("name", ["svg", "adaspa", "auto"])
def test_a_call_that_plans_reads_first_and_one_that_reuses_its_plan_launches_first(monkeypatch, name):
    sparse, cache = method(name), SiteCache()
    planned, planned_reads = attend_recording_reads(monkeypatch, sparse, method_call(*qkv(0), LAYOUT, cache))
    reused, reused_reads = attend_recording_reads(monkeypatch, sparse, method_call(*qkv(1), LAYOUT, cache))
    assert planned_reads == [False] and reused_reads == [True]
    for result in (planned, reused):
        assert result.fallback_reason is None and float(result.kept_density) < 1


def test_radial_launches_first_from_its_first_call_and_svg2_on_the_base_recipe_always_plans(monkeypatch):
    result, reads = attend_recording_reads(monkeypatch, method("radial"), method_call(*qkv(0), LAYOUT))
    assert reads == [True] and float(result.kept_density) < 1
    svg2, cache = method("svg2"), SiteCache()
    for seed in (0, 1):
        result, reads = attend_recording_reads(monkeypatch, svg2, method_call(*qkv(seed), LAYOUT, cache))
        assert reads == [False] and float(result.kept_density) < 1


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("warm", [False, True], ids=["planning call", "reusing call"])
def test_a_call_holding_nan_runs_dense_with_its_reason_and_leaves_the_cache_as_it_was(name, warm):
    sparse, cache = method(name), SiteCache()
    if warm:
        sparse.attend(method_call(*qkv(1), LAYOUT, cache))
    before = cache.entries()
    q, k, v = with_nan_key(2)
    result = sparse.attend(method_call(q, k, v, LAYOUT, cache))
    assert result.fallback_reason == REASON
    torch.testing.assert_close(result.output, torch.nn.functional.scaled_dot_product_attention(q, k, v),
                               equal_nan=True)  # fmt: skip
    assert cache.entries().keys() == before.keys()
    assert all(cache.entries()[slot] is entry for slot, entry in before.items())
    if name != "radial" and not warm:  # radial's layout depends on the grid only: nothing per site
        sparse.attend(method_call(*qkv(1), LAYOUT, cache))
        assert len(cache) > 0, "a finite call would have cached its plan"


@pytest.mark.parametrize("name", ["radial", "svg"])
def test_a_reusing_call_whose_mask_drops_a_video_key_runs_dense_with_its_reason(monkeypatch, name):
    sparse, cache = method(name), SiteCache()
    sparse.attend(method_call(*qkv(0), LAYOUT, cache))
    q, k, v = qkv(1)
    keep = torch.ones(1, 1, 1, LAYOUT.video_tokens, dtype=torch.bool)
    keep[..., 7] = False
    result, reads = attend_recording_reads(monkeypatch, sparse, method_call(q, k, v, LAYOUT, cache, mask=keep))
    assert reads == [True] and result.fallback_reason == MASKED_VIDEO_KEYS
    torch.testing.assert_close(result.output, torch.nn.functional.scaled_dot_product_attention(q, k, v, keep))


def test_a_call_holding_nan_at_a_search_step_keeps_the_last_search():
    adaspa = method("adaspa")
    cache = SiteCache()
    adaspa.attend(method_call(*qkv(2), LAYOUT, cache, step=1))
    search_step = adaspa.first_sparse_step + adaspa.config.search_interval
    assert adaspa.is_search_step(search_step) and adaspa.plans_from_inputs(method_call(*qkv(3), LAYOUT, cache,
                                                                                       step=search_step))
    result = adaspa.attend(method_call(*with_nan_key(3), LAYOUT, cache, step=search_step))
    assert result.fallback_reason == REASON
    assert adaspa.cached(method_call(*qkv(3), LAYOUT, cache), BranchState).search_step == 1


def test_read_while_returns_the_values_and_the_works_result():
    values = torch.arange(3)
    assert read_while(values, None) == ([0, 1, 2], None)
    assert read_while(values, lambda: "ran") == ([0, 1, 2], "ran")


@pytest.mark.gpu
def test_gpu_read_while_reads_the_values_as_they_were_before_the_work():
    """The values are copied out before the work is launched (stream order), so the work may overwrite them."""
    values = torch.arange(5, device="cuda")

    def work() -> str:
        values.add_(10)
        return "launched"

    assert read_while(values, work) == ([0, 1, 2, 3, 4], "launched")
    assert values.tolist() == [10, 11, 12, 13, 14]
