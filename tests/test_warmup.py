"""The default warm-up: steps near the generation's first timestep run dense, without a step count."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import sparse_compile
import tiny_models
from method_calls import method_call
from sparse_compile.methods.base import StepInfo, TokenLayout, in_timestep_warmup
from sparse_compile.options import validate_options
from sparse_compile.registry import METHODS


def _dense_share(timesteps: list[float], fraction: float) -> float:
    """Share of the steps the timestep warm-up runs dense; asserts they are the first ones."""
    first = timesteps[0]
    dense = [in_timestep_warmup(StepInfo(i, 0, 0, t, first), fraction) for i, t in enumerate(timesteps)]
    count = sum(dense)
    assert dense == [True] * count + [False] * (len(dense) - count), "the dense steps are the first ones"
    return count / len(timesteps)


def _flow_matching_timesteps(shift: float, steps: int = 50) -> list[float]:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


def _toy_sampler_timesteps(steps: int = 20) -> list[float]:
    """The timesteps of :func:`sparse_compile.toy.sampling.generate`: linear in the noise level."""
    return (torch.linspace(1.0, 0.0, steps + 1)[:-1] * 1000).tolist()


def test_the_default_warm_up_runs_a_fifth_to_over_a_quarter_of_flow_matching_steps_dense(default_timestep_warmup):
    fraction = validate_options(None).dense_timestep_fraction
    shares = {shift: _dense_share(_flow_matching_timesteps(shift), fraction) for shift in (3.0, 5.0, 7.0)}
    assert 0.2 <= shares[3.0] <= 0.3 and 0.2 <= shares[5.0] <= 0.3, shares
    assert shares[7.0] <= 0.4, "the schedule that lingers longest at high noise stays under two fifths"
    assert shares[3.0] < shares[5.0] < shares[7.0], "a larger shift spends more steps at high noise"


def test_on_a_schedule_linear_in_the_noise_level_the_warm_up_is_that_share_of_the_steps():
    assert _dense_share(_toy_sampler_timesteps(20), 0.2) == pytest.approx(0.2)
    assert _dense_share(_toy_sampler_timesteps(20), 0.0) == 0.0


def test_a_generation_that_starts_at_a_lower_timestep_warms_up_relative_to_it():
    assert _dense_share([600.0, 590.0, 560.0, 500.0, 300.0], 0.05) == pytest.approx(0.4)


def test_dense_steps_alone_turn_the_timestep_warm_up_off_and_both_combine_as_either():
    assert validate_options({"dense_steps": 3}).dense_timestep_fraction == 0.0
    assert validate_options({"dense_timestep_fraction": 0.2}).dense_steps == 0
    options = validate_options({"method": "radial", "dense_steps": 2, "dense_timestep_fraction": 0.2})
    radial = METHODS["radial"](options)
    schedule = [radial.is_dense_step(StepInfo(i, 0, 0, t, 1000.0)) for i, t in enumerate([1000, 900, 850, 790, 700])]
    assert schedule == [True, True, True, False, False], "steps 0-1 by dense_steps, step 2 by its timestep"


@pytest.mark.parametrize("value", [1.0, -0.1, "0.1", True, None])
def test_a_bad_dense_timestep_fraction_names_the_option_and_the_range(value):
    with pytest.raises(ValueError, match=r"'dense_timestep_fraction' must be a number in \[0, 1\)"):
        validate_options({"dense_timestep_fraction": value})


def test_a_forward_without_a_timestep_is_not_warmed_up_and_says_so(caplog):
    from sparse_compile.methods import base

    base._note_no_timestep_warmup.cache_clear()
    method = METHODS["radial"](validate_options({"method": "radial", "block": 32, "dense_timestep_fraction": 0.5}))
    q = torch.randn(1, 2, 4 * 8 * 8, 32)
    call = method_call(q, q, q, TokenLayout(4, 8, 8, 0, False), step=0)
    assert call.step.timestep is None
    with caplog.at_level(logging.WARNING, logger="sparse_compile"):
        result = method.run(call)
    assert not result.scheduled_dense
    assert "dense_timestep_fraction) does not apply" in caplog.text
    with_timestep = dataclasses.replace(call, step=StepInfo(0, 0, 0, 1000.0, 1000.0))
    assert method.run(with_timestep).scheduled_dense, "the same call with its timestep is warm-up"


def test_a_compiled_model_runs_its_first_timesteps_dense_and_reports_them_as_warm_up(default_timestep_warmup,
                                                                                    recording_method):
    model, inputs, _ = tiny_models.wan(layers=1)
    compiled = torch.compile(model, backend="sparse_video", options={"method": "recording", "min_seq_len": 16})
    with torch.no_grad():
        for t in (1000, 960, 900, 600):  # 960 is above 0.93 x 1000: dense; 900 is not
            compiled(**{**inputs, "timestep": torch.tensor([t])})
    assert [c.step for c in recording_method] == [2, 3]
    site = sparse_compile.report(compiled).rewritten[0]
    assert site.warmup_steps == frozenset({0, 1})
    assert site.head_runs.warmup == [2, 2] and site.head_runs.sparse == [2, 2]


def test_a_compiled_model_without_a_timestep_input_runs_its_method_from_the_first_forward(default_timestep_warmup,
                                                                                         recording_method):
    from test_step_tracking import OPTIONS, _NoTimestepModel

    compiled = torch.compile(_NoTimestepModel(), backend="sparse_video", options=OPTIONS)
    with torch.no_grad():
        for _ in range(2):
            compiled(torch.randn(1, 4, 3, 8, 10))
    assert [c.step for c in recording_method] == [0, 1]
    assert sparse_compile.report(compiled).rewritten[0].warmup_steps == frozenset()
