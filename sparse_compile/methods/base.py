"""The interface every attention method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from sparse_compile.options import SparseOptions

if TYPE_CHECKING:
    from sparse_compile.runtime.session import SiteState, StepInfo
    from sparse_compile.runtime.sites import SiteRecord


@dataclass(frozen=True)
class TokenLayout:
    """Run-time token layout of one call: ``frames*height*width`` video tokens plus ``text_tokens``
    text tokens before (``text_first``) or after the video tokens."""

    frames: int
    height: int
    width: int
    text_tokens: int
    text_first: bool

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclass(frozen=True)
class AttentionCall:
    """Everything a method sees of one attention call.

    ``query`` is ``(B, H, S, D)``, ``key``/``value`` ``(B, H, S, D)``/``(B, H, S, Dv)``;
    ``attn_mask`` a boolean mask broadcastable to ``(B, H, S, S)`` or ``None``.
    ``site`` holds the compile-time facts, ``state`` the calling model's cache for this site.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    scale: float | None
    layout: TokenLayout
    step: "StepInfo"
    site: "SiteRecord"
    state: "SiteState"


@dataclass(frozen=True)
class AttentionResult:
    """Output ``(B, H, S, Dv)`` and the fraction of (query, key) pairs that were computed."""

    output: torch.Tensor
    kept_density: float


class AttentionMethod(ABC):
    """A sparse (or dense) attention method, instantiated once per site."""

    name: str
    is_sparse: bool

    def __init__(self, options: SparseOptions) -> None:
        self.options = options

    @abstractmethod
    def attend(self, call: AttentionCall) -> AttentionResult:
        """Compute attention for one call; may read and update ``call.state.cache``."""
