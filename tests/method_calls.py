"""For tests that drive methods directly: the ``AttentionCall`` a method receives, its inputs in
diffusers' layout, and the kernel calls it makes."""

from __future__ import annotations

import torch

from sparse_compile.methods.base import AttentionCall, SiteCache, StepInfo, TokenLayout


def method_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    cache: SiteCache | None = None,
    *,
    step: int = 1,
    branch: int = 0,
    generation: int = 0,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    layer: int = 0,
) -> AttentionCall:
    """One call of ``(B, H, S, D)`` tensors over ``layout`` at site ``blocks.0.attn1``; a fresh cache
    unless one is given."""
    return AttentionCall(query=q, key=k, value=v, attn_mask=mask, scale=scale, layout=layout,
                         step=StepInfo(step, branch, generation), site_name="blocks.0.attn1", layer=layer,
                         cache=SiteCache() if cache is None else cache)


def record_kernel_calls(monkeypatch, module, name: str) -> list[tuple]:
    """Wrap ``module.name`` (a kernel a method calls) so each call's ``(q, k, v, kwargs)`` is recorded."""
    seen: list[tuple] = []
    real_kernel = getattr(module, name)

    def spy(q, k, v, *layout, **kwargs):
        seen.append((q, k, v, kwargs))
        return real_kernel(q, k, v, *layout, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def token_major_qkv(batch: int, heads: int, seq: int, dim: int, device="cpu", dtype=torch.float32):
    """q, k, v ``(B, H, S, D)`` as views of ``(B, S, H, D)`` storage, as diffusers hands them to attention."""
    return tuple(torch.randn(batch, seq, heads, dim, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))


def assert_kernel_read_callers_qkv(recorded: tuple, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """One :func:`record_kernel_calls` entry got the caller's q, k, v themselves (same storage and
    strides: no reordered copy); returns that call's keyword arguments."""
    got_q, got_k, got_v, kwargs = recorded
    for got, given in ((got_q, q), (got_k, k), (got_v, v)):
        assert got.data_ptr() == given.data_ptr() and got.stride() == given.stride()
    return kwargs
