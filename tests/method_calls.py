"""Building the ``AttentionCall`` a method receives, for tests that drive methods directly."""

from __future__ import annotations

import torch

from sparse_compile.methods.base import AttentionCall, TokenLayout
from sparse_compile.runtime.session import SiteState, StepInfo


class StubSite:
    """The compile-time site facts a method reads: only its module path."""

    module_path = "blocks.0.attn1"


def method_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    state: SiteState | None = None,
    *,
    step: int = 1,
    branch: int = 0,
    generation: int = 0,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> AttentionCall:
    """One call of ``(B, H, S, D)`` tensors over ``layout``; a fresh site state unless one is given."""
    return AttentionCall(query=q, key=k, value=v, attn_mask=mask, scale=scale, layout=layout,
                         step=StepInfo(step, branch, generation), site=StubSite(), state=state or SiteState())


def record_kernel_calls(monkeypatch, module, name: str) -> list[tuple]:
    """Wrap ``module.name`` (a kernel a method calls) so each call's ``(q, k, v, kwargs)`` is recorded."""
    seen: list[tuple] = []
    real_kernel = getattr(module, name)

    def spy(q, k, v, *layout, **kwargs):
        seen.append((q, k, v, kwargs))
        return real_kernel(q, k, v, *layout, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen
