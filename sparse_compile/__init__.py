"""sparse_compile: a torch.compile backend that makes video DiT attention sparse.

    model = torch.compile(model, backend="sparse_video", options={"method": "svg2"})
    print(sparse_compile.report(model))
"""

from __future__ import annotations

import torch

from sparse_compile import backend as _backend  # noqa: F401  (registers "sparse_video" with Dynamo)
from sparse_compile import methods as _methods  # noqa: F401  (registers the attention methods)
from sparse_compile.graph_friendly import use_graph_friendly_attention
from sparse_compile.options import SparseOptions, available_methods, validate_options
from sparse_compile.quality import AttentionProbe, AttentionQuality, attention_probe
from sparse_compile.report import Report, SiteReport, report
from sparse_compile.runtime import ops as _ops  # noqa: F401  (registers the custom ops)
from sparse_compile.runtime.session import find_session

__version__ = "0.1.0"


def _session_of(model: torch.nn.Module):
    session = find_session(model)
    if session is None:
        raise ValueError(
            "this model has no sparse_video graphs yet: compile it with "
            "torch.compile(model, backend='sparse_video') and call it once"
        )
    return session


def set_step(model: torch.nn.Module, step: int | None, branch: int = 0) -> None:
    """Pin the denoising step (and CFG branch: 0 or 1) the next calls belong to, for custom loops.

    A pinned step lower than the current one starts a new generation. ``set_step(model, None)``
    returns to automatic tracking from the graph's timestep input, continuing from the pinned step.

    Raises:
        ValueError: ``step`` is not an int >= 0 or ``None``, or ``branch`` is not 0 or 1.
    """
    _session_of(model).set_step(step, branch)


def reset(model: torch.nn.Module) -> None:
    """Start a new generation: clears step tracking and every site's cached state."""
    _session_of(model).reset()


__all__ = [
    "AttentionProbe",
    "AttentionQuality",
    "attention_probe",
    "Report",
    "SiteReport",
    "SparseOptions",
    "available_methods",
    "report",
    "reset",
    "set_step",
    "use_graph_friendly_attention",
    "validate_options",
]
