"""The backend on real diffusers video transformers (tiny random-weight configs, fp32, CPU)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch._dynamo.utils

import sparse_compile
import tiny_models

MODELS = {
    "wan": tiny_models.wan,
    "hunyuan": tiny_models.hunyuan,
    "cogvideox-1.0": lambda **kw: tiny_models.cogvideox(**kw),
    "cogvideox-1.5": lambda **kw: tiny_models.cogvideox(patch_size_t=2, frames=4, **kw),
    "ltx": tiny_models.ltx,
}
OPTIONS = {"method": "recording", "min_seq_len": 16}


def _sample(output):
    return output[0] if isinstance(output, tuple) else output.sample


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_matches_eager_and_reports_every_video_site(name, recording_method):
    torch.manual_seed(0)
    model, inputs, expected = MODELS[name]()
    with torch.no_grad():
        eager = _sample(model(**inputs))
        compiled = torch.compile(model, backend="sparse_video", options=OPTIONS)
        out = _sample(compiled(**inputs))
    assert torch.isfinite(out).all()
    assert _rel_err(out, eager) <= 1e-5

    rep = sparse_compile.report(compiled)
    video = [s for s in rep.sites if s.rewritten]
    assert len(video) == expected.video_sites
    for site in video:
        assert site.status == "sparse"
        assert site.grid == expected.grid
        assert site.text_tokens == expected.text_tokens
        assert site.text_position == expected.text_position
        assert site.density_by_step == {0: 0.5}
    cross = [s for s in rep.sites if s.kind == "cross-attention"]
    assert len(cross) == expected.cross_sites
    assert all(s.status.startswith("dense: ") for s in cross)
    # The op saw the same grid at run time, once per video site.
    assert [c.grid for c in recording_method] == [expected.grid] * expected.video_sites
    assert all(c.text_tokens == expected.text_tokens for c in recording_method)
    assert all(c.text_first == (expected.text_position == "prefix") for c in recording_method)


@pytest.mark.parametrize("name", ["wan", "hunyuan", "cogvideox-1.0"])
def test_second_resolution_on_the_same_compiled_model(name, recording_method):
    torch.manual_seed(0)
    model, inputs, _ = MODELS[name]()
    compiled = torch.compile(model, backend="sparse_video", options=OPTIONS)
    _, inputs2, expected2 = MODELS[name](frames=5, height=12, width=8) if name != "cogvideox-1.0" else \
        MODELS[name](frames=5, height=12, width=8)
    with torch.no_grad():
        compiled(**inputs)
        recording_method.clear()
        out = _sample(compiled(**inputs2))
        eager = _sample(model(**inputs2))
    assert _rel_err(out, eager) <= 1e-5
    assert [c.grid for c in recording_method] == [expected2.grid] * expected2.video_sites


def test_dynamic_shapes_keep_the_grid_symbolic(recording_method):
    """One dynamic compile serves several resolutions, each with its own grid, no recompile."""
    torch.manual_seed(0)
    torch._dynamo.utils.counters.clear()
    model, inputs, _ = tiny_models.wan()
    compiled = torch.compile(model, backend="sparse_video", options=OPTIONS, dynamic=True)
    grids = []
    with torch.no_grad():
        for frames, height, width in [(3, 8, 10), (5, 12, 8), (2, 16, 6)]:
            _, inp, expected = tiny_models.wan(frames, height, width)
            recording_method.clear()
            out = _sample(compiled(**inp))
            assert _rel_err(out, _sample(model(**inp))) <= 1e-5
            grids.append(recording_method[0].grid)
            assert grids[-1] == expected.grid
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "dynamic=True must not recompile per resolution"
    assert len(sparse_compile.report(compiled).sites) == 4


def test_backend_name_works_without_importing_the_package():
    code = (
        "import sys, torch\n"
        "assert 'sparse_compile' not in sys.modules\n"
        "f = torch.compile(lambda x: x * 2, backend='sparse_video')\n"
        "assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_before_first_call_says_nothing_was_compiled():
    model, _, _ = tiny_models.wan()
    compiled = torch.compile(model, backend="sparse_video")
    rep = sparse_compile.report(compiled)
    assert rep.sites == ()
    assert "no graph compiled yet" in str(rep)


def test_report_table_lists_sites_and_statuses(recording_method):
    model, inputs, _ = tiny_models.wan()
    compiled = torch.compile(model, backend="sparse_video", options=OPTIONS)
    with torch.no_grad():
        compiled(**inputs)
    text = str(sparse_compile.report(compiled))
    assert "blocks.0.attn1" in text and "blocks.1.attn2" in text
    assert "3x4x5" in text
    assert "cross-attention (key length 7 != query length 60)" in text
    assert "4 attention sites: 2 sparse, 2 dense" in text


def test_two_models_of_one_class_keep_separate_state(recording_method):
    """They share the compiled graph (parameters are graph inputs) but not steps or caches."""
    model_a, inputs, _ = tiny_models.wan()
    model_b, _, _ = tiny_models.wan()
    a = torch.compile(model_a, backend="sparse_video", options=OPTIONS)
    b = torch.compile(model_b, backend="sparse_video", options=OPTIONS)
    with torch.no_grad():
        for t in (900, 700):
            a(**{**inputs, "timestep": torch.tensor([t])})
            b(**{**inputs, "timestep": torch.tensor([t])})
    steps = [(c.step, c.branch) for c in recording_method if c.module_path == "blocks.0.attn1"]
    assert steps == [(0, 0), (0, 0), (1, 0), (1, 0)], "b's calls must not count as a's CFG branch"
    report_a, report_b = sparse_compile.report(a), sparse_compile.report(b)
    assert len(report_a.sites) == len(report_b.sites) == 4
    assert report_a.rewritten[0].density_by_step == {0: 0.5, 1: 0.5}
    sparse_compile.reset(a)
    assert sparse_compile.report(a).rewritten[0].density_by_step == {}
    assert sparse_compile.report(b).rewritten[0].density_by_step == {0: 0.5, 1: 0.5}


def test_cross_attention_to_as_many_text_tokens_as_video_tokens_is_not_rewritten(recording_method):
    """Equal query and key lengths do not make self-attention: the keys must be the video tokens too."""
    model, inputs, _ = tiny_models.wan(frames=1, height=2, width=14)  # 7 video tokens
    inputs["encoder_hidden_states"] = torch.randn(1, 7, 32)  # 7 text tokens
    compiled = torch.compile(model, backend="sparse_video", options={"method": "recording", "min_seq_len": 1})
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs).sample, model(**inputs).sample, rtol=1e-5, atol=1e-5)
    rewritten = [s.module_path for s in sparse_compile.report(compiled).rewritten]
    assert rewritten == ["blocks.0.attn1", "blocks.1.attn1"]
