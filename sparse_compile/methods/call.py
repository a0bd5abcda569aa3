"""What an attention method is handed for one call, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparse_compile.methods.cache import SiteCache


@dataclass(frozen=True)
class TokenLayout:
    """Run-time token layout of one call: the video grid the sparse methods run on,
    ``frames*height*width`` tokens, and the context tokens beside it, which every query attends and
    which attend every key (dense rows and columns).

    ``text_tokens`` context tokens sit on one side of the video: before it when ``text_first``, else
    after it; ``context_tokens`` more sit on the other side (latents packed beside the video
    window, e.g. Framepack's history latents before it when the text follows it). Sequence:
    ``[text, video, context]`` when ``text_first``, else ``[context, video, text]``.
    """

    frames: int
    height: int
    width: int
    text_tokens: int
    text_first: bool
    context_tokens: int = 0

    @property
    def video_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    @property
    def tokens_before(self) -> int:
        """Context tokens before the video tokens."""
        return self.text_tokens if self.text_first else self.context_tokens

    @property
    def dense_tokens(self) -> int:
        """All context tokens (text and other), on both sides."""
        return self.text_tokens + self.context_tokens


@dataclass(frozen=True)
class StepInfo:
    """Where a forward call sits in the denoising loop: step, CFG branch (0 or 1), generation, and
    the forward's timestep with the first one of its generation (``None`` without a timestep input)."""

    step: int
    branch: int
    generation: int
    timestep: float | None = None
    first_timestep: float | None = None


@dataclass(frozen=True)
class AttentionCall:
    """Everything a method sees of one attention call.

    ``query`` is ``(B, H, S, D)``, ``key``/``value`` ``(B, H, S, D)``/``(B, H, S, Dv)``;
    ``attn_mask`` a boolean mask broadcastable to ``(B, H, S, S)`` or ``None``.
    ``site_name`` is the site's module path, ``layer`` its index among the model's video attention
    sites, ``cache`` the calling model's cache at this site.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    scale: float | None
    layout: TokenLayout
    step: StepInfo
    site_name: str
    layer: int
    cache: SiteCache

    @property
    def softmax_scale(self) -> float:
        """``scale``, or SDPA's default ``D ** -0.5`` when it is ``None``."""
        return self.scale if self.scale is not None else self.query.shape[-1] ** -0.5


@dataclass(frozen=True)
class AttentionResult:
    """Output ``(B, H, S, Dv)`` and the fraction of (query, key) pairs that were computed
    (a float, or a 0-d tensor so the op never waits for the device).

    ``video_lse`` ``(B, H, Sv)`` fp32, given by sparse methods: each video row's log-sum-exp
    over the keys it attended, so ``exp(video_lse - full_lse)`` is the row's attention recall.
    ``None`` for dense results (recall 1). ``scheduled_dense``: the call ran dense because the
    options say so (a dense layer or step, or ``method="dense"``); ``fallback_reason``: why a
    call the method should have run sparse ran dense; ``guarded_heads``: the heads the break-even
    guard ran dense because sparse would not have been faster (their video rows may report the
    LSE ``+inf``, read as recall 1).
    """

    output: torch.Tensor
    kept_density: float | torch.Tensor
    video_lse: torch.Tensor | None = None
    scheduled_dense: bool = False
    fallback_reason: str | None = None
    guarded_heads: tuple[int, ...] = ()
