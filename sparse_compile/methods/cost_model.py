"""The cost model ``method="auto"`` chooses by: block-sparse kernel vs dense SDPA on this device.

A block-sparse call over ``B*H`` heads costs ``launch + pair_time * kept_pairs`` and dense SDPA
``dense_pair_time * B*H*Sv^2`` (pairs: computed (query, key) token pairs, kept blocks counted
whole). On CUDA the three numbers are measured once per process, device, dtype, head dim and block
size (:func:`measured_costs`): ``triton.testing.do_bench`` medians of the block-sparse kernel at
kept densities 1/8 and 1/2 (banded layouts) and of ``F.scaled_dot_product_attention`` at
``B=1, H=8, S=16384``; the two sparse points give ``pair_time`` (slope) and ``launch`` (intercept).
Elsewhere (the CPU reference path, whose timings say nothing about a GPU) the nominal model
:data:`NOMINAL_COSTS` is used: kept pairs 1.25x as expensive as dense ones, no launch cost.

Sparse must win by :data:`GUARD_MARGIN`: the model leaves out the work around the kernel (the
head copies of a call that mixes sparse and dense heads, the text merge, Python), which on the
toy DiT's small heads turned a predicted win at 0.78 kept density into 0.94x cuDNN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_compile.kernels.block_sparse import block_sparse_attention

_CALIBRATION_HEADS = 8
_CALIBRATION_TOKENS = 16384
_CALIBRATION_DENSITIES = (0.125, 0.5)
GUARD_MARGIN = 0.85


@dataclass(frozen=True)
class KernelCosts:
    """Seconds (or nominal units) per kept pair of the block-sparse kernel, per call, and per dense pair."""

    pair_time: float
    launch: float
    dense_pair_time: float

    @property
    def break_even_density(self) -> float:
        """Kept density above which a head runs dense: where its sparse time passes
        :data:`GUARD_MARGIN` of its dense time (launch cost aside)."""
        return GUARD_MARGIN * self.dense_pair_time / self.pair_time

    def sparse_wins(self, kept_pairs: float, dense_pairs: float) -> bool:
        """Whether a block-sparse call computing ``kept_pairs`` takes under :data:`GUARD_MARGIN` of
        dense SDPA's time over ``dense_pairs``."""
        return self.launch + self.pair_time * kept_pairs < GUARD_MARGIN * self.dense_pair_time * dense_pairs


NOMINAL_COSTS = KernelCosts(pair_time=1.25, launch=0.0, dense_pair_time=1.0)


def _banded_layout(n_blocks: int, kept: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts int32 ``(1, 1, N)`` and ascending indices int32 ``(1, 1, N, kept)`` of ``kept`` blocks per row."""
    first = (torch.arange(n_blocks, device=device) - kept // 2).clamp(0, n_blocks - kept)
    indices = (first[:, None] + torch.arange(kept, device=device)).to(torch.int32)
    counts = torch.full((n_blocks,), kept, dtype=torch.int32, device=device)
    return counts.view(1, 1, -1), indices.view(1, 1, n_blocks, kept)


@functools.cache
def measured_costs(device: torch.device, dtype: torch.dtype, head_dim: int, block: int) -> KernelCosts:
    """:class:`KernelCosts` timed on a CUDA ``device`` (once per process and arguments)."""
    from triton.testing import do_bench

    shape = (1, _CALIBRATION_HEADS, _CALIBRATION_TOKENS, head_dim)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=gen) for _ in range(3))
    n_blocks = _CALIBRATION_TOKENS // block
    pairs, times = [], []
    for density in _CALIBRATION_DENSITIES:
        kept = max(1, round(density * n_blocks))
        counts, indices = _banded_layout(n_blocks, kept, device)
        ms = do_bench(lambda: block_sparse_attention(q, k, v, counts, indices, block_q=block, block_k=block))
        pairs.append(_CALIBRATION_HEADS * n_blocks * kept * block * block)
        times.append(ms * 1e-3)
    pair_time = (times[1] - times[0]) / (pairs[1] - pairs[0])
    dense_s = do_bench(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e-3
    return KernelCosts(
        pair_time=pair_time,
        launch=max(0.0, times[0] - pair_time * pairs[0]),
        dense_pair_time=dense_s / (_CALIBRATION_HEADS * _CALIBRATION_TOKENS**2),
    )


def guard_costs(device: torch.device, dtype: torch.dtype, head_dim: int, block: int) -> KernelCosts | None:
    """The costs the break-even guard of a single method uses: measured on CUDA; ``None`` elsewhere
    (the reference path keeps every method as chosen)."""
    return kernel_costs(device, dtype, head_dim, block) if device.type == "cuda" else None


def kernel_costs(device: torch.device, dtype: torch.dtype, head_dim: int, block: int) -> KernelCosts:
    """The cost model for calls on ``device``: measured on CUDA, :data:`NOMINAL_COSTS` elsewhere."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return measured_costs(torch.device("cuda", index), dtype, head_dim, block)
    return NOMINAL_COSTS
