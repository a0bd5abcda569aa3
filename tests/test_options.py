"""Options are checked before anything compiles; errors name the key and what is allowed."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import sparse_compile
import tiny_models
from sparse_compile.backend import inductor_config_for_mode


@pytest.mark.parametrize(
    "options, message",
    [
        ({"methd": "dense"}, r"unknown sparse_video option .methd. for method .auto.; allowed keys: \[.method."),
        ({"method": "fast"}, r"'method' must be one of \['dense'.*got 'fast'"),
        ({"dense_steps": -1}, r"'dense_steps' must be an int >= 0, got -1"),
        ({"dense_layers": 1.5}, r"'dense_layers' must be an int >= 0, got 1.5"),
        ({"min_seq_len": 0}, r"'min_seq_len' must be an int >= 1"),
        ({"grid": (3, 4)}, r"'grid' must be \(frames, height, width\)"),
        ({"grid": (3, 0, 4)}, r"'grid' must be \(frames, height, width\)"),
        ({"grid": (3, 4, 5), "text_position": "middle"}, r"'text_position' must be one of \['prefix', 'suffix'\]"),
        ({"text_tokens": 6}, r"need 'grid' as well"),
        ({"dense_steps": True}, r"'dense_steps' must be an int"),
        ({"precision": "int8"}, r"'precision' must be one of \['native', 'fp8'\], got 'int8'"),
    ],
)
def test_bad_options_raise_value_error_naming_the_key(options, message):
    with pytest.raises(ValueError, match=message):
        sparse_compile.validate_options(options)


def test_the_default_method_is_auto():
    opts = sparse_compile.validate_options(None)
    assert opts.method == "auto" and opts.dense_steps == 0 and opts.grid is None and opts.precision == "native"


def test_bad_option_fails_the_first_call_with_the_value_error():
    model, inputs, _ = tiny_models.wan(layers=1)
    compiled = torch.compile(model, backend="sparse_video", options={"method": "fast"})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        compiled(**inputs)
    assert isinstance(info.value.inner_exception, ValueError)
    assert "'method' must be one of" in str(info.value)


def test_grid_option_overrides_inference(recording_method):
    model, inputs, _ = tiny_models.wan(layers=1)  # real grid (3, 4, 5): 60 tokens
    compiled = torch.compile(model, backend="sparse_video",
                             options={"method": "recording", "min_seq_len": 16, "grid": (6, 2, 5)})
    with torch.no_grad():
        compiled(**inputs)
    site = sparse_compile.report(compiled).rewritten[0]
    assert site.grid == (6, 2, 5)
    assert recording_method[0].grid == (6, 2, 5)


def test_grid_option_with_text_tokens(recording_method):
    model, inputs, _ = tiny_models.cogvideox()  # 6 text tokens + (3, 4, 4)
    options = {"method": "recording", "min_seq_len": 16, "grid": (3, 2, 8), "text_tokens": 6, "text_position": "prefix"}
    compiled = torch.compile(model, backend="sparse_video", options=options)
    with torch.no_grad():
        compiled(**inputs)
    assert {(c.grid, c.text_tokens, c.text_first) for c in recording_method} == {((3, 2, 8), 6, True)}


def test_grid_option_that_does_not_match_the_sequence_is_refused():
    model, inputs, _ = tiny_models.wan(layers=1)
    compiled = torch.compile(model, backend="sparse_video", options={"min_seq_len": 16, "grid": (3, 4, 6)})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info, torch.no_grad():
        compiled(**inputs)
    assert isinstance(info.value.inner_exception, ValueError)
    assert "'grid'=(3, 4, 6)" in str(info.value) and "has 60" in str(info.value)


def test_modes_map_to_inductor_config():
    assert inductor_config_for_mode(None) == {}
    assert inductor_config_for_mode("default") == {}
    assert inductor_config_for_mode("max-autotune")["max_autotune"] is True
    with pytest.raises(ValueError, match="unknown mode 'fastest'"):
        inductor_config_for_mode("fastest")
