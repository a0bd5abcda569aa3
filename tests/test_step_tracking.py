"""Denoising-step tracking with stock diffusers call patterns, dense warm-up, and the explicit API."""

from __future__ import annotations

import logging

import pytest
import torch
import torch._dynamo.utils

import sparse_compile
import tiny_models

OPTIONS = {"method": "recording", "min_seq_len": 16}
TIMESTEPS = [900, 700, 500]


def _compiled_wan(batch=1, layers=1, **options):
    model, inputs, _ = tiny_models.wan(batch=batch, layers=layers)
    compiled = torch.compile(model, backend="sparse_video", options={**OPTIONS, **options})
    return compiled, inputs


def _call(compiled, inputs, t):
    batch = inputs["hidden_states"].shape[0]
    with torch.no_grad():
        compiled(**{**inputs, "timestep": torch.full((batch,), t)})


def _steps(calls):
    return [(c.step, c.branch, c.generation) for c in calls]


def test_cfg_as_two_calls_per_step(recording_method):
    compiled, inputs = _compiled_wan()
    for t in TIMESTEPS:
        _call(compiled, inputs, t)  # conditional
        _call(compiled, inputs, t)  # unconditional
    assert _steps(recording_method) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (2, 0, 0), (2, 1, 0)]


def test_cfg_batched_is_one_call_per_step(recording_method):
    compiled, inputs = _compiled_wan(batch=2)
    for t in TIMESTEPS:
        _call(compiled, inputs, t)
    assert _steps(recording_method) == [(0, 0, 0), (1, 0, 0), (2, 0, 0)]


def test_a_higher_timestep_starts_a_new_generation(recording_method):
    compiled, inputs = _compiled_wan()
    for t in TIMESTEPS + TIMESTEPS:
        _call(compiled, inputs, t)
    assert _steps(recording_method)[3:] == [(0, 0, 1), (1, 0, 1), (2, 0, 1)]


def test_the_same_timestep_a_third_time_starts_a_new_generation(recording_method):
    compiled, inputs = _compiled_wan()
    for _ in range(5):
        _call(compiled, inputs, 900)
    assert _steps(recording_method) == [(0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (0, 0, 2)]


def test_dense_steps_run_dense_then_sparse(recording_method):
    compiled, inputs = _compiled_wan(dense_steps=2)
    for t in TIMESTEPS:
        _call(compiled, inputs, t)
    assert [c.step for c in recording_method] == [2]
    site = sparse_compile.report(compiled).rewritten[0]
    assert site.density_by_step == {0: 1.0, 1: 1.0, 2: 0.5}


def test_dense_layers_keep_the_first_layers_dense(recording_method):
    compiled, inputs = _compiled_wan(layers=3, dense_layers=2)
    _call(compiled, inputs, 900)
    assert [c.module_path for c in recording_method] == ["blocks.2.attn1"]
    statuses = {s.module_path: s.status for s in sparse_compile.report(compiled).rewritten}
    assert statuses == {"blocks.0.attn1": "dense: dense_layers=2", "blocks.1.attn1": "dense: dense_layers=2",
                        "blocks.2.attn1": "sparse"}


def test_set_step_pins_the_step_for_custom_loops(recording_method):
    compiled, inputs = _compiled_wan()
    _call(compiled, inputs, 900)
    sparse_compile.set_step(compiled, 7, branch=1)
    _call(compiled, inputs, 700)
    _call(compiled, inputs, 500)
    sparse_compile.set_step(compiled, None)
    _call(compiled, inputs, 300)
    assert _steps(recording_method) == [(0, 0, 0), (7, 1, 0), (7, 1, 0), (8, 0, 0)]
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        sparse_compile.set_step(compiled, -1)


def test_set_step_rejects_a_cfg_branch_other_than_0_or_1(recording_method):
    compiled, inputs = _compiled_wan()
    _call(compiled, inputs, 900)
    for branch in (2, 5, -1, True):
        with pytest.raises(ValueError, match=r"branch must be 0 \(conditional\) or 1 \(unconditional\).*got"):
            sparse_compile.set_step(compiled, 2, branch=branch)


def test_a_pinned_step_lower_than_the_current_one_starts_a_new_generation(recording_method):
    compiled, inputs = _compiled_wan()
    _call(compiled, inputs, 500)
    for step in (1, 2, 0):
        sparse_compile.set_step(compiled, step)
        _call(compiled, inputs, 500)
    assert _steps(recording_method) == [(0, 0, 0), (1, 0, 0), (2, 0, 0), (0, 0, 1)]


def test_reset_starts_a_clean_generation(recording_method):
    compiled, inputs = _compiled_wan()
    for t in TIMESTEPS:
        _call(compiled, inputs, t)
    sparse_compile.reset(compiled)
    assert sparse_compile.report(compiled).rewritten[0].density_by_step == {}
    _call(compiled, inputs, 100)  # lower than the last timestep, yet a fresh start after reset
    assert _steps(recording_method)[-1][:2] == (0, 0)


def test_reset_of_an_uncompiled_model_is_an_error():
    model, _, _ = tiny_models.wan(layers=1)
    with pytest.raises(ValueError, match="no sparse_video graphs yet"):
        sparse_compile.reset(model)


def test_no_recompilation_across_steps_and_dense_to_sparse_switch(recording_method):
    torch._dynamo.utils.counters.clear()
    compiled, inputs = _compiled_wan(dense_steps=3)
    for t in range(1000, 0, -100):  # 10 steps, 3 dense then 7 sparse
        _call(compiled, inputs, t)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert [c.step for c in recording_method] == list(range(3, 10))


class _NoTimestepModel(torch.nn.Module):
    """Video self-attention with the grid from a Conv3d and no timestep input."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv3d(4, 16, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def test_without_a_timestep_each_forward_is_a_step(recording_method, caplog):
    compiled = torch.compile(_NoTimestepModel(), backend="sparse_video", options=OPTIONS)
    x = torch.randn(1, 4, 3, 8, 10)
    with caplog.at_level(logging.WARNING, logger="sparse_compile"), torch.no_grad():
        for _ in range(3):
            compiled(x)
    assert "no timestep input found" in caplog.text
    assert [c.step for c in recording_method] == [0, 1, 2]
    assert recording_method[0].grid == (3, 4, 5)


class _FullMaskModel(_NoTimestepModel):
    """Video self-attention with a full (B, 1, S, S) boolean mask, which sparse methods cannot honour."""

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        mask = torch.ones(1, 1, q.shape[2], q.shape[2], dtype=torch.bool, device=x.device)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_a_run_time_dense_fallback_is_logged_once_and_reported(caplog):
    model = _FullMaskModel()
    options = {"method": "svg2", "min_seq_len": 16, "q_clusters": 4, "k_clusters": 4}
    compiled = torch.compile(model, backend="sparse_video", options=options)
    x = torch.randn(1, 4, 3, 8, 10)
    with caplog.at_level(logging.WARNING, logger="sparse_compile"), torch.no_grad():
        out = compiled(x)
        compiled(x)
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    reason = "attn_mask of shape (1, 1, 60, 60) is not a key-padding mask (B, H, 1, S)"
    assert caplog.text.count(f"runs dense: {reason}") == 1
    (site,) = sparse_compile.report(compiled).rewritten
    assert site.status == f"dense: {reason} (at run time)"
    assert site.density_by_step == {0: 1.0, 1: 1.0}
