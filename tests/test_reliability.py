"""Reliability: hostile inputs stay finite, failures leave no corrupt state, caches never skip the rewrite."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sparse_compile
import tiny_models
from method_calls import method_call
from sparse_compile.methods import METHODS
from sparse_compile.methods.base import TokenLayout
from sparse_compile.methods.fallback import finite_flags, nonfinite_reason
from sparse_compile.options import validate_options

SMALL = {
    "svg2": {"q_clusters": 4, "k_clusters": 6, "kmeans_iters_init": 3},
    "svg": {"block": 16},
    "radial": {"block": 16},
    "dense": {},
}


def _attend(method_name, q, k, v, layout):
    method = METHODS[method_name](validate_options({"method": method_name, **SMALL[method_name]}))
    return method.attend(method_call(q, k, v, layout)).output


def _hostile_inputs():
    torch.manual_seed(0)
    big = lambda shape: (torch.randn(shape) * 300).clamp(-6e4, 6e4).half()  # noqa: E731
    shape = (1, 2, 48, 16)
    return {
        "fp16 near overflow": (big(shape), big(shape), big(shape), TokenLayout(3, 4, 4, 0, False)),
        "identical tokens": (torch.ones(shape), torch.ones(shape), torch.randn(shape), TokenLayout(3, 4, 4, 0, False)),
        "zero vectors": (torch.zeros(shape), torch.zeros(shape), torch.randn(shape), TokenLayout(3, 4, 4, 0, False)),
        "single frame": (*(torch.randn(1, 2, 48, 16) for _ in range(3)), TokenLayout(1, 6, 8, 0, False)),
        "one row": (*(torch.randn(1, 2, 48, 16) for _ in range(3)), TokenLayout(4, 1, 12, 0, False)),
    }


@pytest.mark.parametrize("case", list(_hostile_inputs()))
@pytest.mark.parametrize("method_name", list(SMALL))
def test_hostile_inputs_give_finite_outputs(method_name, case):
    q, k, v, layout = _hostile_inputs()[case]
    out = _attend(method_name, q, k, v, layout)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    # Uniform attention: an output row averages the values of the keys the method kept.
    if case in ("identical tokens", "zero vectors"):
        assert (out.float().abs() <= v.float().abs().amax(dim=2, keepdim=True) + 1e-4).all()


def test_an_exception_mid_step_leaves_the_next_generation_clean(recording_method, monkeypatch):
    model, inputs, _ = tiny_models.wan(layers=2)
    compiled = torch.compile(model, backend="sparse_video", options={"method": "recording", "min_seq_len": 16})
    calls = {"n": 0}
    real_attend = METHODS["recording"].attend

    def failing(self, call):
        calls["n"] += 1
        if calls["n"] == 4:  # second step, second layer
            raise RuntimeError("boom")
        return real_attend(self, call)

    monkeypatch.setattr(METHODS["recording"], "attend", failing)
    with torch.no_grad():
        compiled(**{**inputs, "timestep": torch.tensor([900])})
        with pytest.raises(RuntimeError, match="boom"):
            compiled(**{**inputs, "timestep": torch.tensor([700])})
        recording_method.clear()
        out = compiled(**{**inputs, "timestep": torch.tensor([900])}).sample  # a new generation
    assert [(c.step, c.branch, c.generation) for c in recording_method] == [(0, 0, 1), (0, 0, 1)]
    torch.testing.assert_close(out, model(**{**inputs, "timestep": torch.tensor([900])}).sample, rtol=1e-5, atol=1e-5)


def test_sites_stay_dense_when_gradients_are_required():
    model, inputs, _ = tiny_models.wan(layers=1)
    compiled = torch.compile(model, backend="sparse_video", options={"method": "svg2", "min_seq_len": 16})
    out = compiled(**inputs).sample
    out.square().mean().backward()
    assert model.blocks[0].attn1.to_q.weight.grad is not None
    statuses = {s.module_path: s.status for s in sparse_compile.report(compiled).sites}
    assert statuses == {
        "blocks.0.attn1": "dense: gradient required (training): the sparse op has no backward",
        "blocks.0.attn2": "dense: gradient required (training): the sparse op has no backward",
    }


_CACHED_RUN = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import tiny_models, sparse_compile
    torch.manual_seed(0)
    model, inputs, _ = tiny_models.wan(layers=1)
    options = {{"method": "svg2", "min_seq_len": 16, "q_clusters": 4, "k_clusters": 6, "kmeans_iters_init": 3,
               "dense_timestep_fraction": 0}}
    compiled = torch.compile(model, backend="sparse_video", options=options)
    with torch.no_grad():
        compiled(**inputs)
    site = sparse_compile.report(compiled).rewritten[0]
    print(site.status, site.density_by_step[0] < 1.0)
""")


def test_a_warm_inductor_cache_in_a_second_process_still_rewrites(tmp_path):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    code = _CACHED_RUN.format(tests=os.path.dirname(__file__))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    assert [r.stdout.strip() for r in runs] == ["sparse True", "sparse True"]
    assert any(tmp_path.rglob("*")), "the first process must have written the Inductor cache"


def test_the_finiteness_check_reads_diffusers_layout_inputs_in_place():
    """q/k/v arrive as (B, H, S, D) views of (B, S, H, D) storage: checking them for NaN/Inf must not copy them."""
    q, k, v = (torch.randn(1, 64, 3, 16).transpose(1, 2) for _ in range(3))
    k[0, 1, 5, 2] = float("nan")
    with torch.profiler.profile(record_shapes=True) as prof:
        names, flags = finite_flags(q, k, v)
        reason = nonfinite_reason(names, flags.tolist())
    copies = [e.input_shapes for e in prof.events() if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")]
    assert all(math.prod(shapes[0]) < q.numel() for shapes in copies), copies
    assert reason is not None and reason.startswith("key holds NaN or Inf")
