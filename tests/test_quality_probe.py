"""``sparse_compile.attention_probe``: error, recall and density of every sparse call, measured exactly."""

from __future__ import annotations

import pytest
import torch

import sparse_compile
import tiny_models
from method_calls import method_call
from sparse_compile.methods.base import AttentionResult, TokenLayout
from sparse_compile.quality import attention_recall, relative_error


def _brute_force_recall(q, k, keep, scale):
    """Mean over rows of the softmax mass on the kept keys: (B, H, S, S) scores, no shortcuts."""
    probs = (q @ k.transpose(-1, -2) * scale).softmax(-1)
    return float((probs * keep).sum(-1).mean())


@pytest.mark.parametrize("text_tokens", [0, 5])
def test_recall_from_the_methods_lse_equals_the_kept_softmax_mass(text_tokens):
    torch.manual_seed(0)
    layout = TokenLayout(2, 3, 4, text_tokens, text_first=False)
    seq, video = layout.video_tokens + text_tokens, layout.video_tokens
    q, k, v = (torch.randn(1, 2, seq, 8) for _ in range(3))
    keep = torch.rand(1, 2, seq, seq) < 0.3
    keep[..., video:] = True  # text keys are always attended
    keep |= torch.eye(seq, dtype=torch.bool)
    scale = 8**-0.5
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf"))
    video_lse = torch.logsumexp(scores, -1)[:, :, :video]
    result = AttentionResult(output=v, kept_density=0.3, video_lse=video_lse)
    expected = _brute_force_recall(q[:, :, :video], k, keep[:, :, :video], scale)
    assert attention_recall(method_call(q, k, v, layout), result) == pytest.approx(expected, rel=1e-5)


def test_a_dense_result_has_recall_one_and_relative_error_zero():
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert attention_recall(method_call(q, k, v, TokenLayout(2, 3, 4, 0, False)), AttentionResult(out, 1.0)) == 1.0
    assert relative_error(out, out) == 0.0


def test_probe_needs_a_compiled_model():
    model, _, _ = tiny_models.wan()
    with pytest.raises(ValueError, match="call it once"):
        with sparse_compile.attention_probe(model):
            pass


def _denoise(model, inputs, steps):
    for t in torch.linspace(900, 100, steps):
        inputs["timestep"] = t.expand(inputs["hidden_states"].shape[0])
        model(**inputs)


def test_probe_records_every_sparse_call_and_nothing_from_dense_steps():
    torch.manual_seed(0)
    model, inputs, expected = tiny_models.wan(frames=4, height=8, width=8, layers=2)
    compiled = torch.compile(model, backend="sparse_video",
                             options={"method": "radial", "min_seq_len": 16, "dense_steps": 1, "block": 16})
    with torch.no_grad():
        compiled(**inputs)
        sparse_compile.reset(compiled)
        with sparse_compile.attention_probe(compiled) as probe:
            _denoise(compiled, inputs, steps=3)
    sparse_steps = 2
    assert len(probe.records) == sparse_steps * expected.video_sites
    assert {r.step for r in probe.records} == {1, 2}
    by_layer = probe.by_layer()
    assert sorted(by_layer) == [0, 1]
    for error, recall, density in by_layer.values():
        assert 0 < density < 1 and 0 < recall < 1 and error > 0
    # Outside the block the probe is detached: calls are no longer measured.
    with torch.no_grad():
        _denoise(compiled, inputs, steps=2)
    assert len(probe.records) == sparse_steps * expected.video_sites
