"""Q/K/V captured from an eager model's self-attention, and how local its attention is.

:func:`capture_self_attention` records the ``(B, H, S, D)`` inputs of every SDPA call whose
queries and keys have the same length (self-attention), in call order, by wrapping
``torch.nn.functional.scaled_dot_product_attention`` during one eager forward
(:func:`on_self_attention`, which other observers use too).
:func:`row_log_probs` is the exact attention of sampled query rows, :func:`near_mask` marks the keys
near each query in the video grid and :func:`local_attention_mass` tells whether attention is local there.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from sparse_compile.kernels.common import default_scale


@dataclass(frozen=True)
class CapturedAttention:
    """One self-attention call: ``(B, H, S, D)`` tensors (detached) and its scale."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float | None


@contextmanager
def on_self_attention(observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], None]) -> Iterator[None]:
    """Within the block, call ``observe(query, key, value, kwargs)`` before every self-attention SDPA call
    (queries and keys of the same length), by wrapping ``F.scaled_dot_product_attention`` (eager code only)."""
    original: Callable = F.scaled_dot_product_attention

    def observed(query, key, value, *args, **kwargs):
        if query.shape[-2] == key.shape[-2]:
            observe(query, key, value, kwargs)
        return original(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = observed
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextmanager
def capture_self_attention() -> Iterator[list[CapturedAttention]]:
    """Record every self-attention SDPA call made inside the block (eager code only)."""
    captured: list[CapturedAttention] = []

    def record(query, key, value, kwargs):
        captured.append(CapturedAttention(query.detach(), key.detach(), value.detach(), kwargs.get("scale")))

    with on_self_attention(record):
        yield captured


def _grid_coords(index: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return index // (height * width), (index // width) % height, index % width


def near_mask(rows: torch.Tensor, grid: tuple[int, int, int], radius: int = 2) -> torch.Tensor:
    """Bool ``(R, S)``: which of the ``S`` frame-major keys of ``grid`` (frames, height, width) lie within
    one frame and ``radius`` tokens in height and width of each query row of ``rows`` (int64 ``(R,)``)."""
    frames, height, width = grid
    tq, hq, wq = _grid_coords(rows, height, width)
    tk, hk, wk = _grid_coords(torch.arange(frames * height * width, device=rows.device), height, width)
    return (
        ((tq[:, None] - tk[None]).abs() <= 1)
        & ((hq[:, None] - hk[None]).abs() <= radius)
        & ((wq[:, None] - wk[None]).abs() <= radius)
    )


def row_log_probs(q_rows: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``log_softmax(scale * q_rows @ k^T)`` in fp32, the exact attention of some query rows over every key:
    q_rows ``(B, H, R, D)``, k ``(B, H, S, D)`` -> ``(B, H, R, S)``."""
    return (torch.matmul(q_rows.float(), k.float().transpose(-1, -2)) * scale).log_softmax(-1)


def local_attention_mass(
    q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int, int], radius: int = 2, rows: int = 256, seed: int = 0
) -> tuple[float, float]:
    """Attention mass near the query vs the share of keys near it.

    For ``rows`` sampled query rows of ``q``/``k`` ``(B, H, S, D)`` over a frame-major
    ``grid`` (frames, height, width), "near" is :func:`near_mask`. Returns ``(mean attention mass
    on near keys, mean fraction of keys that are near)``; attention that ignores position gives
    equal numbers, local attention a mass many times the fraction. Memory ``O(rows * S)``.
    """
    seq = q.shape[2]
    pick = torch.randperm(seq, generator=torch.Generator().manual_seed(seed))[:rows].to(q.device)
    probs = row_log_probs(q[:, :, pick], k, default_scale(q.shape[-1], None)).exp()  # (B, H, rows, S)
    near = near_mask(pick, grid, radius)  # (rows, S)
    mass = (probs * near).sum(-1).mean()
    return float(mass), float(near.float().mean())
