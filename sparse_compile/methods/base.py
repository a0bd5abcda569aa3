"""The interface every attention method implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar

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
    """Output ``(B, H, S, Dv)`` and the fraction of (query, key) pairs that were computed
    (a float, or a 0-d tensor so the op never waits for the device).

    ``video_lse`` ``(B, H, Sv)`` fp32, given by sparse methods: each video row's log-sum-exp
    over the keys it attended, so ``exp(video_lse - full_lse)`` is the row's attention recall.
    ``None`` for dense results (recall 1).
    """

    output: torch.Tensor
    kept_density: float | torch.Tensor
    video_lse: torch.Tensor | None = None


@dataclass(frozen=True)
class MethodOption:
    """One method-specific option: its default, a check, and the allowed values in words."""

    default: Any
    check: Callable[[Any], bool]
    allowed: str


def fraction_option(default: float) -> MethodOption:
    """A float in (0, 1]."""
    return MethodOption(default, lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
                        "a number in (0, 1]")


def int_option(default: int, minimum: int) -> MethodOption:
    return MethodOption(default, lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
                        f"an int >= {minimum}")


def choice_option(default: int, choices: tuple[int, ...]) -> MethodOption:
    """One of a few ints (e.g. block sizes)."""
    return MethodOption(default, lambda v: isinstance(v, int) and not isinstance(v, bool) and v in choices,
                        f"one of {', '.join(map(str, choices))}")


def bool_option(default: bool) -> MethodOption:
    return MethodOption(default, lambda v: isinstance(v, bool), "True or False")


class AttentionMethod(ABC):
    """A sparse (or dense) attention method, instantiated once per site.

    ``option_spec`` declares the method's own option keys; their validated values are in
    ``self.params`` (defaults filled in).
    """

    name: str
    is_sparse: bool
    option_spec: ClassVar[dict[str, MethodOption]] = {}

    def __init__(self, options: SparseOptions) -> None:
        self.options = options
        given = dict(options.method_options)
        self.params: dict[str, Any] = {k: given.get(k, spec.default) for k, spec in self.option_spec.items()}

    def observe_dense(self, call: AttentionCall) -> None:
        """Called on calls that run dense because of ``dense_steps`` (e.g. to warm caches)."""

    @abstractmethod
    def attend(self, call: AttentionCall) -> AttentionResult:
        """Compute attention for one call; may read and update ``call.state.cache``."""
