"""How close sparse attention stays to dense, measured inside a compiled model.

    with sparse_compile.attention_probe(model) as probe:
        model(...)                      # any number of calls
    print(probe.by_layer())             # {layer: (relative error, recall, density)}

While the probe is attached, every call a sparse method computes (not the dense steps or
layers) is also computed densely and compared: the relative L2 error of the output, the
attention *recall* (the mean over video query rows of the softmax mass on the keys the method
attended, exact, from the method's row log-sum-exp and the full one) and the kept density.
Measuring costs a dense attention and a host sync per call: use it to evaluate, not to serve.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from sparse_compile.kernels.block_select import attention_lse
from sparse_compile.methods.call import AttentionCall, AttentionResult
from sparse_compile.methods.exact import dense_attention
from sparse_compile.methods.text_tokens import attention_over_keys, context_part, video_text_slices
from sparse_compile.runtime.session import find_session


@dataclass(frozen=True)
class AttentionQuality:
    """One sparse call of one site, compared with dense attention on the same inputs."""

    module_path: str
    layer: int
    step: int
    branch: int
    relative_error: float
    recall: float
    density: float


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``||output - reference|| / ||reference||`` in fp32 over whole tensors."""
    reference = reference.float()
    return float((output.float() - reference).norm() / reference.norm().clamp_min(1e-30))


def full_video_lse(call: AttentionCall) -> torch.Tensor:
    """Each video query row's log-sum-exp over every key it may attend, fp32 ``(B, H, Sv)``.

    Video keys via :func:`attention_lse` (O(S) memory); context keys, under the call's key-padding
    mask if any, via :func:`attention_over_keys`.
    """
    layout, scale = call.layout, call.softmax_scale
    video, context = video_text_slices(layout)
    q_video = call.query[:, :, video]
    lse = attention_lse(q_video, call.key[:, :, video], scale)
    if context:
        key_mask = None if call.attn_mask is None else context_part(call.attn_mask, context, -1)
        _, context_lse = attention_over_keys(q_video, context_part(call.key, context, 2),
                                             context_part(call.value, context, 2), key_mask, scale)
        lse = torch.logaddexp(lse, context_lse)
    return lse


def attention_recall(call: AttentionCall, result: AttentionResult) -> float:
    """Mean over batch, heads and video rows of the attention mass the method kept (1 if dense)."""
    if result.video_lse is None:
        return 1.0
    full = full_video_lse(call)
    return float(torch.exp(result.video_lse.float() - full).clamp(max=1.0).nan_to_num(1.0).mean())


@dataclass
class AttentionProbe:
    """The measurements of every sparse call made while the probe was attached."""

    records: list[AttentionQuality] = field(default_factory=list)

    def __call__(self, call: AttentionCall, result: AttentionResult) -> None:
        reference = dense_attention(call.query, call.key, call.value, call.attn_mask, call.scale)
        self.records.append(
            AttentionQuality(
                module_path=call.site_name,
                layer=call.layer,
                step=call.step.step,
                branch=call.step.branch,
                relative_error=relative_error(result.output, reference),
                recall=attention_recall(call, result),
                density=float(result.kept_density),
            )
        )

    def by_layer(self) -> dict[int, tuple[float, float, float]]:
        """``{layer: (mean relative error, mean recall, mean density)}`` over the recorded calls."""
        grouped: dict[int, list[AttentionQuality]] = {}
        for record in self.records:
            grouped.setdefault(record.layer, []).append(record)
        return {
            layer: tuple(sum(getattr(r, name) for r in rs) / len(rs) for name in ("relative_error", "recall", "density"))
            for layer, rs in sorted(grouped.items())
        }


@contextmanager
def attention_probe(model: torch.nn.Module) -> Iterator[AttentionProbe]:
    """Attach an :class:`AttentionProbe` to a model compiled with ``backend="sparse_video"``.

    The model must have been called once (torch.compile compiles on the first call).
    """
    session = find_session(model)
    if session is None:
        raise ValueError(
            "this model has no sparse_video graphs yet: compile it with "
            "torch.compile(model, backend='sparse_video') and call it once"
        )
    probe = AttentionProbe()
    session.probe = probe
    try:
        yield probe
    finally:
        session.probe = None
