"""Coverage matrix: every diffusers video transformer class, tiny random weights, CPU.

For each class: the rewritten graphs compute what the model computes, the number of attention
sites the backend rewrites is the number in the table, all in one session whose report lists them
(graph breaks included), and a sparse method runs with finite output. Every model gets
``sparse_compile.use_graph_friendly_attention`` after its eager run (it changes only Mochi).
``method="dense"`` against plain Inductor runs for :data:`INDUCTOR_CLASSES` (every class with
``SPARSE_COMPILE_FULL_MATRIX=1``: two Inductor compiles per class are too slow for CI).
The README's "Models checked" table is :func:`coverage_table` (``python tests/test_model_coverage.py``
writes it).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch._dynamo

from coverage_models import FACTORIES

import sparse_compile
from sparse_compile.backend import rewrite_graph
from sparse_compile.report import KEEPS_EVERYTHING
from sparse_compile.runtime.session import SESSIONS


@dataclass(frozen=True)
class Coverage:
    """What the backend does with one class.

    Attributes:
        graphs: Dynamo graphs of one forward call (more than one: graph breaks).
        video_sites: the model's attention sites over the whole clip (video self- or joint attention).
        rewritten: of those, the sites the backend rewrites.
        status: one line for the README table.
        capture_scalar_outputs: the matrix compiles the class with
            ``torch._dynamo.config.capture_scalar_outputs = True`` (one graph in spite of ``.item()``).
    """

    graphs: int
    video_sites: int
    rewritten: int
    status: str
    capture_scalar_outputs: bool = False


COVERED = "covered"
COVERAGE: dict[str, Coverage] = {
    "WanTransformer3DModel": Coverage(1, 2, 2, COVERED),
    "WanTransformer3DModel (2.2 TI2V, per-token timesteps)": Coverage(1, 2, 2, COVERED),
    "WanVACETransformer3DModel": Coverage(1, 3, 3, COVERED),
    "SkyReelsV2Transformer3DModel": Coverage(1, 2, 2, COVERED),
    "SkyReelsV2Transformer3DModel (diffusion forcing)": Coverage(1, 2, 2, COVERED),
    "ChronoEditTransformer3DModel": Coverage(1, 2, 2, COVERED),
    "WanAnimateTransformer3DModel": Coverage(1, 2, 2, COVERED),
    "HunyuanVideoTransformer3DModel": Coverage(1, 2, 2, COVERED),
    "CogVideoXTransformer3DModel (1.0)": Coverage(1, 2, 2, COVERED),
    "CogVideoXTransformer3DModel (1.5)": Coverage(1, 2, 2, COVERED),
    "ConsisIDTransformer3DModel": Coverage(1, 2, 2, COVERED),
    "LTXVideoTransformer3DModel": Coverage(1, 1, 1, COVERED),
    "AllegroTransformer3DModel": Coverage(1, 1, 1, COVERED),
    "EasyAnimateTransformer3DModel": Coverage(1, 1, 1, COVERED),
    "CosmosTransformer3DModel": Coverage(1, 1, 1, COVERED),
    "Kandinsky5Transformer3DModel": Coverage(1, 2, 2, COVERED),
    "LTX2VideoTransformer3DModel": Coverage(1, 1, 1, "covered (video self-attention; audio and audio-video attention stay dense)"),
    "MochiTransformer3DModel": Coverage(
        1, 2, 2, "covered after `sparse_compile.use_graph_friendly_attention(model)` (one graph; without it "
                 "diffusers' processor runs the attention outside the graphs, which the report says)"),
    "HunyuanVideo15Transformer3DModel": Coverage(
        3, 2, 2, "covered across graph breaks (the blocks compile as separate graphs and take the clip grid "
                 "of the call)"),
    "HunyuanVideoFramepackTransformer3DModel": Coverage(
        1, 2, 2, "covered with `torch._dynamo.config.capture_scalar_outputs = True` (one graph: the video window "
                 "runs sparse, the history and clean latents before it and the text after it are dense context); "
                 "without it the blocks compile as graphs of flat tokens and stay dense with the reason",
        capture_scalar_outputs=True),
    "SanaVideoTransformer3DModel": Coverage(1, 0, 0, "no full 3D softmax attention (linear attention)"),
    "LatteTransformer3DModel": Coverage(1, 0, 0, "no full 3D softmax attention (spatial and temporal attention)"),
}
INDUCTOR_CLASSES = ("LTX2VideoTransformer3DModel",)
SPARSE = {"method": "radial", "block": 16, "min_seq_len": 16}
DENSE = {"method": "dense", "min_seq_len": 16}


def _sample(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output.sample


def _rewrite_only(options: dict, graphs: list):
    """A backend that rewrites and runs the graph as is (no Inductor)."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return rewrite_graph(gm, example_inputs, options).forward

    return backend


@dataclass(frozen=True)
class Run:
    """One eager and one compiled forward of a class: outputs, Dynamo graphs, SDPA sites in them,
    sessions the compile created, and the report."""

    out: torch.Tensor
    eager: torch.Tensor
    graphs: int
    sdpa_nodes: int
    sessions: int
    report: sparse_compile.Report


def _run(name: str, options: dict, capture_scalar_outputs: bool | None = None) -> Run:
    """One run of a class, with the matrix's ``capture_scalar_outputs`` unless one is given."""
    torch.manual_seed(0)
    model, inputs = FACTORIES[name]()
    graphs: list = []
    before = set(SESSIONS)
    if capture_scalar_outputs is None:
        capture_scalar_outputs = COVERAGE[name].capture_scalar_outputs
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=capture_scalar_outputs):
        eager = _sample(model(**inputs))
        sparse_compile.use_graph_friendly_attention(model)
        out = _sample(torch.compile(model, backend=_rewrite_only(options, graphs))(**inputs))
    sdpa = sum(len(g.meta["sparse_compile_graph"].sites) for g in graphs)
    return Run(out, eager, len(graphs), sdpa, len(set(SESSIONS) - before), sparse_compile.report(model))


@functools.cache
def _dense_run(name: str) -> Run:
    """:func:`_run` with :data:`DENSE`, once per class for the tests that read it."""
    return _run(name, DENSE)


def test_the_matrix_lists_every_class():
    assert set(COVERAGE) == set(FACTORIES)


@pytest.mark.parametrize("name", list(COVERAGE))
def test_rewrite_keeps_the_output_and_covers_the_expected_sites(name):
    expected = COVERAGE[name]
    run = _dense_run(name)
    torch.testing.assert_close(run.out, run.eager, rtol=0, atol=1e-5)
    assert run.graphs == expected.graphs
    assert run.sessions == 1, "one model, one session"
    assert len(run.report.sites) >= run.sdpa_nodes, "the report lists every site of every graph"
    assert len(run.report.rewritten) == expected.rewritten
    assert all(s.kind in ("video self-attention", "joint video+text attention") for s in run.report.rewritten)
    assert all(s.status == "dense: method='dense'" for s in run.report.rewritten)


@pytest.mark.parametrize("name", [n for n, c in COVERAGE.items() if c.rewritten])
def test_a_sparse_method_runs_with_finite_output(name):
    run = _run(name, SPARSE)
    assert torch.isfinite(run.out).all()
    assert len(run.report.rewritten) == COVERAGE[name].rewritten
    statuses = [s.status for s in run.report.rewritten]
    assert all(s in ("sparse", KEEPS_EVERYTHING) for s in statuses), "the sparse method ran at every site"


_FULL = os.environ.get("SPARSE_COMPILE_FULL_MATRIX") == "1"


@pytest.mark.parametrize("name", [n for n, c in COVERAGE.items() if c.rewritten and (_FULL or n in INDUCTOR_CLASSES)])
def test_dense_method_equals_plain_inductor(name):
    torch.manual_seed(0)
    model, inputs = FACTORIES[name]()
    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=COVERAGE[name].capture_scalar_outputs):
        plain = _sample(torch.compile(model, backend="inductor")(**inputs))
        torch._dynamo.reset()
        ours = _sample(torch.compile(model, backend="sparse_video", options=DENSE)(**inputs))
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
    assert len(sparse_compile.report(model).rewritten) == COVERAGE[name].rewritten


def _statuses(rep: sparse_compile.Report, kind: str = "self-attention") -> dict[str, str]:
    return {s.module_path: s.status for s in rep.sites if s.kind == kind}


def test_factorized_attention_says_it_does_not_cover_the_whole_clip():
    rep = _run("LatteTransformer3DModel", {"method": "dense", "min_seq_len": 1}).report
    statuses = _statuses(rep)
    assert set(statuses) == {"transformer_blocks.0.attn1", "temporal_transformer_blocks.0.attn1"}
    assert all("no video self-attention over the whole clip" in s for s in statuses.values())


def test_linear_attention_model_has_no_softmax_self_attention_site():
    rep = _dense_run("SanaVideoTransformer3DModel").report
    assert rep.sites and all(s.kind == "cross-attention" for s in rep.sites)


def test_audio_tokens_beside_video_stay_dense_as_a_plain_token_axis():
    rep = _dense_run("LTX2VideoTransformer3DModel").report
    assert "a plain token axis of 20 tokens" in _statuses(rep)["transformer_blocks.0.audio_attn1"]


def test_history_latents_before_the_window_are_dense_context_of_the_window_grid():
    run = _dense_run("HunyuanVideoFramepackTransformer3DModel")
    assert run.graphs == 1
    joint = [s for s in run.report.rewritten if s.module_path in ("transformer_blocks.0.attn",
                                                                   "single_transformer_blocks.0.attn")]
    assert len(joint) == 2
    # [4x history 2x1x1, 2x history 1x1x1, clean latents 2x2x2, window 3x2x2, text]
    assert all(s.grid == (3, 2, 2) and s.facts.context_tokens == 11 and s.text_position == "suffix" for s in joint)
    # the text length is data-dependent (compile-time hints differ per block); the report shows it as run
    assert [s.text_tokens for s in joint] == [12, 12]
    assert [s.q_shape for s in joint] == [(1, 2, 11 + 12 + 12, 16)] * 2
    assert [n for n in run.report.notes if n.startswith("video window")] == [
        "video window 3x2x2 runs the method; 11 context tokens before it and 12 after it (text) are attended "
        "densely (transformer_blocks.0.attn, single_transformer_blocks.0.attn)"]


@pytest.mark.parametrize("name", ["MochiTransformer3DModel", "HunyuanVideo15Transformer3DModel"])
def test_captured_scalars_keep_the_coverage_of_mochi_and_hunyuan15(name):
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        run = _run(name, DENSE)
    torch.testing.assert_close(run.out, run.eager, rtol=0, atol=1e-5)
    assert run.graphs == COVERAGE[name].graphs
    assert run.sessions == 1
    assert len(run.report.rewritten) == COVERAGE[name].rewritten


def test_fragments_of_one_call_under_inductor_are_one_step_with_a_row_per_block():
    """Through Inductor: the step marker of the graph that holds the timestep but no attention op
    survives, so the block graphs join its call and take its grid."""
    torch.manual_seed(0)
    model, inputs = FACTORIES["HunyuanVideo15Transformer3DModel"]()
    with torch.no_grad():
        eager = _sample(model(**inputs))
        compiled = torch.compile(model, backend="sparse_video", options=DENSE)
        first = _sample(compiled(**{**inputs, "timestep": torch.tensor([900.0])}))
        torch.testing.assert_close(_sample(compiled(**inputs)), eager, rtol=0, atol=1e-5)
    rep = sparse_compile.report(model)
    assert [s.module_path for s in rep.rewritten] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert all(s.grid == (3, 4, 4) and s.text_tokens == 13 for s in rep.rewritten)
    assert all(list(s.density_by_step) == [0, 1] for s in rep.rewritten), "the blocks count in their call's step"
    assert torch.isfinite(first).all()


def test_fragments_whose_clip_is_several_segments_stay_dense_and_say_how_to_cover_them():
    run = _run("HunyuanVideoFramepackTransformer3DModel", DENSE, capture_scalar_outputs=False)
    torch.testing.assert_close(run.out, run.eager, rtol=0, atol=1e-5)
    assert run.graphs == 4
    assert run.report.rewritten == ()
    statuses = _statuses(run.report)
    joint = [statuses["transformer_blocks.0.attn"], statuses["single_transformer_blocks.0.attn"]]
    assert all("reach this graph flat from an earlier graph" in s and "several video segments" in s
               and "capture_scalar_outputs = True" in s for s in joint)


def test_mochi_without_the_graph_friendly_processor_is_reported_with_the_fix():
    torch.manual_seed(0)
    model, inputs = FACTORIES["MochiTransformer3DModel"]()
    with torch.no_grad():
        torch.compile(model, backend=_rewrite_only(DENSE, []))(**inputs)
    rep = sparse_compile.report(model)
    assert rep.rewritten == ()
    assert "sparse_compile.use_graph_friendly_attention(model)" in str(rep)


README = Path(__file__).resolve().parents[1] / "README.md"
TABLE_START = "<!-- coverage-table (tests/test_model_coverage.py COVERAGE; python tests/test_model_coverage.py) -->"
TABLE_END = "<!-- /coverage-table -->"


def coverage_table() -> str:
    """The README's "Models checked" table, from :data:`COVERAGE`."""
    rows = ["| class (tiny config) | Dynamo graphs | video attention sites | rewritten | status |", "|---|---|---|---|---|"]
    rows += [f"| {name} | {c.graphs} | {c.video_sites} | {c.rewritten} | {c.status} |" for name, c in COVERAGE.items()]
    return "\n".join(rows)


def _table_span(text: str) -> tuple[int, int]:
    start = text.index(TABLE_START) + len(TABLE_START)
    return start, text.index(TABLE_END, start)


def test_the_readme_table_is_the_coverage_matrix():
    text = README.read_text()
    start, end = _table_span(text)
    assert text[start:end].strip() == coverage_table(), "run python tests/test_model_coverage.py"


if __name__ == "__main__":
    text = README.read_text()
    start, end = _table_span(text)
    README.write_text(text[:start] + "\n\n" + coverage_table() + "\n\n" + text[end:])
