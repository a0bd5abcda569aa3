"""A test-only attention method: computes dense attention and records what the op handed it."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from sparse_compile.methods.base import AttentionCall, AttentionMethod, AttentionResult
from sparse_compile.methods.dense import dense_attention
from sparse_compile.registry import METHODS


@dataclass(frozen=True)
class RecordedCall:
    module_path: str
    step: int
    branch: int
    generation: int
    grid: tuple[int, int, int]
    text_tokens: int
    text_first: bool
    seq_len: int


class RecordingMethod(AttentionMethod):
    """Marks itself sparse, reports density 0.5, and appends every call to ``CALLS``."""

    name = "recording"
    is_sparse = True
    calls: list[RecordedCall] = []

    def attend(self, call: AttentionCall) -> AttentionResult:
        lay = call.layout
        RecordingMethod.calls.append(
            RecordedCall(
                call.site_name, call.step.step, call.step.branch, call.step.generation,
                (lay.frames, lay.height, lay.width), lay.text_tokens, lay.text_first, call.query.shape[2],
            )
        )
        out = dense_attention(call.query, call.key, call.value, call.attn_mask, call.scale)
        return AttentionResult(output=out, kept_density=0.5)


@pytest.fixture
def recording_method(monkeypatch):
    """Registers ``method="recording"`` for one test and yields its list of calls."""
    monkeypatch.setitem(METHODS, RecordingMethod.name, RecordingMethod)
    RecordingMethod.calls = []
    yield RecordingMethod.calls
