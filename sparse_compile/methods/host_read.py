"""Host reads of small device values that let GPU work be launched before the host waits for them."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def read_while(values: torch.Tensor, work: Callable[[], T] | None) -> tuple[list, T | None]:
    """``values.tolist()`` and ``work()`` (``None`` without it), launched before the host waits: on CUDA the
    values are copied out first and the host waits for that copy only, while ``work``'s kernels run on."""
    if work is None:
        return values.tolist(), None
    if not values.is_cuda:
        return values.tolist(), work()
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)  # so the copy runs asynchronously
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    result = work()
    copied.synchronize()
    return host.tolist(), result
