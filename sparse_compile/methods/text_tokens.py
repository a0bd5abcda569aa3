"""Joint attention of a video grid and its context for sparse methods: context tokens (text, and
latents packed beside the video window) are always attended and always attend.

A sparse method sees only the video tokens (frame-major ``frames x height x width``) and
returns their output with its row log-sum-exp; :func:`attend_video_and_text` adds, by LSE
merging, the video rows' attention to the context keys (before and after the video), and
computes the context rows densely over every key. A boolean key-padding mask
``(B or 1, H or 1, 1, S)`` is applied to the context keys; other masks are not supported by
sparse methods (:func:`mask_problem` says why).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sparse_compile.methods.call import AttentionCall, AttentionResult, TokenLayout

VideoAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, "float | torch.Tensor"]]
"""``(q, k, v)`` video-only ``(B, H, Sv, D)`` -> ``(out (B, H, Sv, Dv), lse (B, H, Sv) fp32, kept density of the Sv x Sv pairs)``."""

_TEXT_ROW_CHUNK = 4096


def video_text_slices(layout: TokenLayout) -> tuple[slice, tuple[slice, ...]]:
    """``(video, context)`` index ranges along the sequence: the video tokens' range and the
    non-empty ranges of context tokens (before the video, then after it)."""
    start = layout.tokens_before
    end = start + layout.video_tokens
    after = layout.dense_tokens - start
    context = tuple(r for r, n in ((slice(0, start), start), (slice(end, end + after), after)) if n)
    return slice(start, end), context


def context_part(x: torch.Tensor, context: tuple[slice, ...], dim: int) -> torch.Tensor:
    """The context tokens of ``x`` along ``dim`` (ranges from :func:`video_text_slices`), in
    sequence order: a view for one range, a copy joining two."""
    parts = [x.narrow(dim, r.start, r.stop - r.start) for r in context]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


MASKED_VIDEO_KEYS = "attn_mask masks video keys"
"""Why a call whose key-padding mask drops a video key runs dense (sparse kernels drop keys by block, not by token)."""


def mask_problem(mask: torch.Tensor | None, layout: TokenLayout) -> str | None:
    """Why a sparse method cannot honour this mask whatever it holds, or ``None`` if it may.

    Supported: no mask, or a key-padding mask (query dim 1) that keeps every video key; that is read on
    the device with the call's other input checks (:func:`video_keys_kept`).
    """
    if mask is None or (mask.dim() == 4 and mask.shape[2] == 1):
        return None
    return f"attn_mask of shape {tuple(mask.shape)} is not a key-padding mask (B, H, 1, S)"


def video_keys_kept(mask: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """int64 0-d on the key-padding ``mask``'s device: 1 when it keeps every video key, else 0; not read."""
    video, _ = video_text_slices(layout)
    return mask[..., video].all().long()


def _merge(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-merge two partial attentions over disjoint key sets ((B, H, S, Dv), LSE (B, H, S)).

    Returns the merged output and LSE.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    w_a = torch.where(finite, torch.exp(lse_a - safe), torch.zeros_like(lse)).unsqueeze(-1)
    w_b = torch.where(finite, torch.exp(lse_b - safe), torch.zeros_like(lse)).unsqueeze(-1)
    dtype = torch.promote_types(out_a.dtype, torch.float32)
    return out_a.to(dtype) * w_a + out_b.to(dtype) * w_b, lse


def attention_over_keys(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention of many queries over few keys, with its LSE, chunked over query rows.

    Args:
        q: ``(B, H, Sq, D)``; k, v: ``(B, H, L, D)``/``(B, H, L, Dv)`` with small ``L``.
        key_mask: boolean, broadcastable to ``(B, H, 1, L)``, or ``None``.

    Returns:
        out ``(B, H, Sq, Dv)`` and LSE ``(B, H, Sq)`` in fp32 (fp64 for fp64 inputs); where every
        key is masked the output is 0 and the LSE -inf.
    """
    outs, lses = [], []
    dtype = torch.promote_types(q.dtype, torch.float32)
    kf, vf = k.to(dtype), v.to(dtype)
    for start in range(0, q.shape[2], _TEXT_ROW_CHUNK):
        scores = q[:, :, start : start + _TEXT_ROW_CHUNK].to(dtype) @ kf.transpose(-1, -2) * scale
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        weights = torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))
        outs.append(weights @ vf)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def attend_video_and_text(call: AttentionCall, video_attention: VideoAttention) -> AttentionResult:
    """Attention of a call with a sparse video part and dense context (or of a video-only call).

    Returns the full ``(B, H, S, Dv)`` output, the kept fraction of all ``S x S`` pairs
    (context rows and columns count as kept) and the video rows' LSE over the keys they attended.
    """
    q, k, v, layout = call.query, call.key, call.value, call.layout
    video, context = video_text_slices(layout)
    out_v, lse_v, density_v = video_attention(q[:, :, video], k[:, :, video], v[:, :, video])
    seq, n_video, n_context = q.shape[2], layout.video_tokens, layout.dense_tokens
    kept_pairs = density_v * n_video * n_video + 2 * n_video * n_context + n_context * n_context
    if not context:
        return AttentionResult(output=out_v.to(q.dtype), kept_density=kept_pairs / (seq * seq), video_lse=lse_v)
    key_mask = None if call.attn_mask is None else context_part(call.attn_mask, context, -1)
    out_vc, lse_vc = attention_over_keys(q[:, :, video], context_part(k, context, 2), context_part(v, context, 2),
                                         key_mask, call.softmax_scale)
    output = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    merged, lse = _merge(out_v, lse_v, out_vc, lse_vc)
    output[:, :, video] = merged.to(q.dtype)
    for rows in context:
        output[:, :, rows] = F.scaled_dot_product_attention(q[:, :, rows], k, v, attn_mask=call.attn_mask,
                                                            scale=call.scale)
    return AttentionResult(output=output, kept_density=kept_pairs / (seq * seq), video_lse=lse)
