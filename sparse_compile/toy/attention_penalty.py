"""A training penalty that concentrates the toy's attention: the normalised entropy of sampled query rows.

:func:`attention_entropy_penalty` wraps ``torch.nn.functional.scaled_dot_product_attention`` during
one training forward (:func:`~sparse_compile.toy.attention_stats.on_self_attention`). Every call still
runs the real SDPA; a self-attention call (queries and keys of equal length) also computes, for
``rows`` of its query rows per (batch, head), the softmax over every key explicitly, with gradients to
q and k, and appends the rows' mean entropy divided by ``log(S)`` (1: uniform over the keys, 0: all
mass on one key) to the yielded list. Memory ``O(B * H * rows * S)`` per call.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch

from sparse_compile.kernels.common import default_scale
from sparse_compile.toy.attention_stats import on_self_attention, row_log_probs


def normalised_entropy(q_rows: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean entropy / ``log(S)`` of ``softmax(scale * q_rows @ k^T)``: q_rows ``(B, H, R, D)``, k
    ``(B, H, S, D)`` -> a 0-dim fp32 tensor in ``[0, 1]``."""
    log_probs = row_log_probs(q_rows, k, scale)
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    return entropy.mean() / math.log(k.shape[-2])


@contextmanager
def attention_entropy_penalty(
    rows: int, generator: torch.Generator, grad: bool = True
) -> Iterator[list[torch.Tensor]]:
    """Within the block, collect :func:`normalised_entropy` of ``rows`` query rows (drawn with
    ``generator``, a CPU generator) of every self-attention SDPA call, in call order; with ``grad``
    False from detached q and k (a statistic only: no graph kept)."""
    if rows < 1:
        raise ValueError(f"rows must be at least 1, got {rows}")
    entropies: list[torch.Tensor] = []

    def penalise(query, key, value, kwargs):
        seq = key.shape[-2]
        if seq > 1:
            pick = torch.randint(0, seq, (min(rows, seq),), generator=generator).to(query.device)
            scale = default_scale(query.shape[-1], kwargs.get("scale"))
            q_rows = query[..., pick, :]
            if not grad:
                q_rows, key = q_rows.detach(), key.detach()
            entropies.append(normalised_entropy(q_rows, key, scale))

    with on_self_attention(penalise):
        yield entropies
