"""``sparse_compile.report``: one row per attention site of the model, densities of sparse steps."""

from __future__ import annotations

import torch

import sparse_compile
import tiny_models
from sparse_compile.report import KEEPS_EVERYTHING

OPTIONS = {"method": "recording", "min_seq_len": 16}


def _call(compiled, inputs, t):
    with torch.no_grad():
        return compiled(**{**inputs, "timestep": torch.tensor([t])}).sample


def test_a_recompiled_model_keeps_one_row_per_site_with_the_latest_facts(recording_method):
    model, inputs, _ = tiny_models.wan(layers=2)  # 2 self- and 2 cross-attention sites
    compiled = torch.compile(model, backend="sparse_video", options=OPTIONS)
    _call(compiled, inputs, 900)
    _, bigger, expected = tiny_models.wan(frames=5, layers=2)
    _call(compiled, bigger, 700)  # a new resolution: a second graph
    rep = sparse_compile.report(compiled)
    assert [s.module_path for s in rep.sites] == ["blocks.0.attn1", "blocks.0.attn2", "blocks.1.attn1", "blocks.1.attn2"]
    assert all(s.grid == expected.grid for s in rep.rewritten)
    assert all(s.density_by_step == {0: 0.5, 1: 0.5} for s in rep.rewritten)
    assert [s.mean_density for s in rep.rewritten] == [0.5, 0.5]  # no stale row of the first graph
    assert str(rep).endswith("4 attention sites: 2 sparse, 2 dense")


def test_a_model_compiled_again_with_other_options_reports_only_the_new_options_calls(recording_method):
    model, inputs, _ = tiny_models.wan(layers=1)
    for options in ({"method": "dense", "min_seq_len": 16}, {**OPTIONS, "dense_steps": 1}):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparse_video", options=options)
        for t in (900, 700):
            _call(compiled, inputs, t)
    (site,) = sparse_compile.report(compiled).rewritten
    assert site.density_by_step == {0: 1.0, 1: 0.5} and site.warmup_steps == {0} and site.mean_density == 0.5
    assert sum(site.head_runs.sparse) == sum(site.head_runs.warmup)  # one call each, no dense-method calls


def test_mean_density_leaves_out_the_dense_warm_up_steps(recording_method):
    model, inputs, _ = tiny_models.wan(layers=1)
    compiled = torch.compile(model, backend="sparse_video", options={**OPTIONS, "dense_steps": 2})
    for t in (900, 700, 500):
        _call(compiled, inputs, t)
    (site,) = sparse_compile.report(compiled).rewritten
    assert site.density_by_step == {0: 1.0, 1: 1.0, 2: 0.5}
    assert site.warmup_steps == {0, 1}
    assert site.mean_density == 0.5


def test_mean_density_is_none_while_only_warm_up_steps_ran(recording_method):
    model, inputs, _ = tiny_models.wan(layers=1)
    compiled = torch.compile(model, backend="sparse_video", options={**OPTIONS, "dense_steps": 2})
    _call(compiled, inputs, 900)
    (site,) = sparse_compile.report(compiled).rewritten
    assert site.status == "sparse" and site.mean_density is None


def test_a_site_whose_pattern_keeps_every_pair_says_so():
    model, inputs, _ = tiny_models.wan(frames=2, layers=1)  # radial keeps every block of 2 frames
    compiled = torch.compile(model, backend="sparse_video",
                             options={"method": "radial", "min_seq_len": 16, "block": 16, "dense_steps": 1})
    for t in (900, 700):
        _call(compiled, inputs, t)
    rep = sparse_compile.report(compiled)
    (site,) = rep.rewritten
    assert site.status == KEEPS_EVERYTHING and not site.sparse and site.mean_density == 1.0
    assert str(rep).endswith("2 attention sites: 0 sparse, 1 keeping every pair, 1 dense")


def test_dense_layers_report_their_density_as_one(recording_method):
    model, inputs, _ = tiny_models.wan(layers=2)
    compiled = torch.compile(model, backend="sparse_video", options={**OPTIONS, "dense_layers": 1})
    _call(compiled, inputs, 900)
    densities = {s.module_path: (s.status, s.mean_density) for s in sparse_compile.report(compiled).rewritten}
    assert densities == {"blocks.0.attn1": ("dense: dense_layers=1", 1.0), "blocks.1.attn1": ("sparse", 0.5)}


def test_a_density_the_method_cannot_keep_at_the_grid_is_noted_with_what_it_kept():
    """At 3 frames svg's narrowest band (a query's own frame and the first frame) keeps two thirds of the pairs:
    density=0.25 cannot be met, and the report says what was kept instead; adaspa keeps what it is asked."""
    model, inputs, expected = tiny_models.wan(layers=1)
    grid = "x".join(map(str, expected.grid))
    for method, noted in (("svg", True), ("adaspa", False)):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="sparse_video",
                                 options={"method": method, "min_seq_len": 16, "block": 16, "density": 0.25})
        _call(compiled, inputs, 900)
        rep = sparse_compile.report(compiled)
        (site,) = rep.rewritten
        notes = [n for n in rep.notes if "asked for density" in n]
        if noted:
            assert site.mean_density > 0.5
            assert notes == [f"svg asked for density=0.25 keeps {site.mean_density:.3f} of grid {grid}: its layouts "
                             f"cannot keep less of this grid (blocks.0.attn1)"]
        else:
            assert notes == []
