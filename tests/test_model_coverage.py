"""Coverage matrix: every diffusers video transformer class, tiny random weights, CPU.

For each class: the rewritten graph computes what the model computes, the number of attention
sites the backend rewrites is the number in the table, and a sparse method runs with finite
output. ``method="dense"`` against plain Inductor runs for :data:`INDUCTOR_CLASSES` (every class
with ``SPARSE_COMPILE_FULL_MATRIX=1``: two Inductor compiles per class are too slow for CI).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
import torch._dynamo

from coverage_models import FACTORIES

import sparse_compile
from sparse_compile.backend import rewrite_graph
from sparse_compile.report import KEEPS_EVERYTHING


@dataclass(frozen=True)
class Coverage:
    """What the backend does with one class.

    Attributes:
        graphs: Dynamo graphs of one forward call (more than one: graph breaks).
        video_sites: the model's attention sites over the whole clip (video self- or joint attention).
        rewritten: of those, the sites the backend rewrites.
        status: one line for the README table.
    """

    graphs: int
    video_sites: int
    rewritten: int
    status: str


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
        11, 2, 0, "not covered: MochiAttnProcessor2_0's per-sample nonzero breaks the graph; Dynamo runs the "
                  "attention eagerly"),
    "HunyuanVideo15Transformer3DModel": Coverage(
        3, 2, 0, "not covered: `if is_t2v:` on tensor data breaks the graph; the blocks compile in a fragment "
                 "without the patchify"),
    "HunyuanVideoFramepackTransformer3DModel": Coverage(
        4, 2, 0, "not covered: `.item()` breaks the graph; with capture_scalar_outputs one graph, dense: history "
                 "latents beside the window are several video segments"),
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


def _run(name: str, options: dict) -> tuple[torch.Tensor, torch.Tensor, int, sparse_compile.Report]:
    torch.manual_seed(0)
    model, inputs = FACTORIES[name]()
    graphs: list = []
    with torch.no_grad():
        eager = _sample(model(**inputs))
        out = _sample(torch.compile(model, backend=_rewrite_only(options, graphs))(**inputs))
    return out, eager, len(graphs), sparse_compile.report(model)


def test_the_matrix_lists_every_class():
    assert set(COVERAGE) == set(FACTORIES)


@pytest.mark.parametrize("name", list(COVERAGE))
def test_rewrite_keeps_the_output_and_covers_the_expected_sites(name):
    expected = COVERAGE[name]
    out, eager, graphs, rep = _run(name, DENSE)
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)
    assert graphs == expected.graphs
    assert len(rep.rewritten) == expected.rewritten
    assert all(s.kind in ("video self-attention", "joint video+text attention") for s in rep.rewritten)
    assert all(s.status == "dense: method='dense'" for s in rep.rewritten)


@pytest.mark.parametrize("name", [n for n, c in COVERAGE.items() if c.rewritten])
def test_a_sparse_method_runs_with_finite_output(name):
    out, _, _, rep = _run(name, SPARSE)
    assert torch.isfinite(out).all()
    assert len(rep.rewritten) == COVERAGE[name].rewritten
    assert all(s.status in ("sparse", KEEPS_EVERYTHING) for s in rep.rewritten), "the sparse method ran at every site"


_FULL = os.environ.get("SPARSE_COMPILE_FULL_MATRIX") == "1"


@pytest.mark.parametrize("name", [n for n, c in COVERAGE.items() if c.rewritten and (_FULL or n in INDUCTOR_CLASSES)])
def test_dense_method_equals_plain_inductor(name):
    torch.manual_seed(0)
    model, inputs = FACTORIES[name]()
    with torch.no_grad():
        plain = _sample(torch.compile(model, backend="inductor")(**inputs))
        torch._dynamo.reset()
        ours = _sample(torch.compile(model, backend="sparse_video", options=DENSE)(**inputs))
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5)
    assert len(sparse_compile.report(model).rewritten) == COVERAGE[name].rewritten


def _statuses(rep: sparse_compile.Report, kind: str = "self-attention") -> dict[str, str]:
    return {s.module_path: s.status for s in rep.sites if s.kind == kind}


def test_factorized_attention_says_it_does_not_cover_the_whole_clip():
    _, _, _, rep = _run("LatteTransformer3DModel", {"method": "dense", "min_seq_len": 1})
    statuses = _statuses(rep)
    assert set(statuses) == {"transformer_blocks.0.attn1", "temporal_transformer_blocks.0.attn1"}
    assert all("no video self-attention over the whole clip" in s for s in statuses.values())


def test_linear_attention_model_has_no_softmax_self_attention_site():
    _, _, _, rep = _run("SanaVideoTransformer3DModel", DENSE)
    assert rep.sites and all(s.kind == "cross-attention" for s in rep.sites)


def test_audio_tokens_beside_video_stay_dense_as_a_plain_token_axis():
    _, _, _, rep = _run("LTX2VideoTransformer3DModel", DENSE)
    assert "a plain token axis of 20 tokens" in _statuses(rep)["transformer_blocks.0.audio_attn1"]


def test_history_latents_beside_the_window_are_reported_as_several_video_segments():
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        out, eager, graphs, rep = _run("HunyuanVideoFramepackTransformer3DModel", DENSE)
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)
    assert graphs == 1
    statuses = _statuses(rep)
    joint = [statuses["transformer_blocks.0.attn"], statuses["single_transformer_blocks.0.attn"]]
    assert all("several video segments" in s for s in joint)


@pytest.mark.parametrize("name", ["MochiTransformer3DModel", "HunyuanVideo15Transformer3DModel"])
def test_captured_scalars_leave_the_graph_breaks_of_mochi_and_hunyuan15_without_failing(name):
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        out, eager, graphs, rep = _run(name, DENSE)
    torch.testing.assert_close(out, eager, rtol=0, atol=1e-5)
    assert graphs == COVERAGE[name].graphs
    assert rep.rewritten == ()
