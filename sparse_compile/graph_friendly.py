"""Attention processors that keep a model's forward in one Dynamo graph.

diffusers' ``MochiAttnProcessor2_0`` loops over the batch and gathers each sample's valid text
tokens with ``torch.nonzero``: a data-dependent shape, so Dynamo skips the processor frame, the
joint attention runs eagerly outside every compiled graph and the backend never sees it (and the
forward falls apart into a graph per module). :class:`MaskedMochiAttnProcessor` computes the same
output with static shapes: one SDPA over ``[video; text]`` for the whole batch with a key-padding
mask. :func:`use_graph_friendly_attention` installs it; call it once before ``torch.compile``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's rotary embedding on interleaved (even, odd) channel pairs; ``x`` ``(B, S, H, D)``."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    rotated = torch.stack([(even * cos - odd * sin).to(x.dtype), (even * sin + odd * cos).to(x.dtype)], dim=-1)
    return rotated.flatten(-2)


def _heads(x: torch.Tensor, heads: int, norm: torch.nn.Module | None) -> torch.Tensor:
    """``(B, S, H*D)`` -> ``(B, S, H, D)``, normalised per head when ``norm`` is given."""
    x = x.unflatten(2, (heads, -1))
    return x if norm is None else norm(x)


class MaskedMochiAttnProcessor:
    """Drop-in for diffusers' ``MochiAttnProcessor2_0`` without data-dependent shapes.

    The valid text tokens of each sample are moved to the front of the text segment (a stable
    sort of the mask keeps their order), the padding behind them; one SDPA over
    ``[video (S); text (L)]`` masks the padding keys, and the padding rows' output is zero. That is
    what diffusers computes sample by sample (valid tokens gathered, output zero-padded at the end).
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: ``hidden_states`` ``(B, S, C)`` video tokens, ``encoder_hidden_states`` ``(B, L, C)``
        text tokens, ``attention_mask`` ``(B, L)`` (nonzero = valid text token), ``image_rotary_emb``
        ``(cos, sin)`` of the video tokens. Returns the video and text outputs ``(B, S, C)``, ``(B, L, C')``."""
        heads = attn.heads
        query = _heads(attn.to_q(hidden_states), heads, attn.norm_q)
        key = _heads(attn.to_k(hidden_states), heads, attn.norm_k)
        value = _heads(attn.to_v(hidden_states), heads, None)
        if image_rotary_emb is not None:
            query, key = (_rotate(x, *image_rotary_emb) for x in (query, key))
        valid = attention_mask.bool()
        order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
        text_valid = torch.gather(valid, 1, order)
        index = order[:, :, None, None].expand(-1, -1, heads, query.shape[-1])
        text_q = _heads(attn.add_q_proj(encoder_hidden_states), heads, attn.norm_added_q).gather(1, index)
        text_k = _heads(attn.add_k_proj(encoder_hidden_states), heads, attn.norm_added_k).gather(1, index)
        text_v = _heads(attn.add_v_proj(encoder_hidden_states), heads, None).gather(1, index)
        joint_q, joint_k, joint_v = (torch.cat(pair, dim=1).transpose(1, 2) for pair in
                                     ((query, text_q), (key, text_k), (value, text_v)))  # fmt: skip
        token_valid = torch.cat([valid.new_ones(valid.shape[0], query.shape[1]), text_valid], dim=1)
        out = F.scaled_dot_product_attention(joint_q, joint_k, joint_v, attn_mask=token_valid[:, None, None, :])
        out = out * token_valid[:, None, :, None].to(out.dtype)
        out = out.transpose(1, 2).flatten(2, 3)
        video_out, text_out = out.split_with_sizes((query.shape[1], text_q.shape[1]), dim=1)
        video_out = attn.to_out[1](attn.to_out[0](video_out))
        if hasattr(attn, "to_add_out"):
            text_out = attn.to_add_out(text_out)
        return video_out, text_out


def _mochi_processor() -> type | None:
    try:
        from diffusers.models.attention_processor import MochiAttnProcessor2_0
    except ImportError:
        return None
    return MochiAttnProcessor2_0


def graph_breaking_attention_note(model: torch.nn.Module) -> str | None:
    """One line for the report when ``model`` still has processors that keep attention out of the graphs."""
    processor = _mochi_processor()
    if processor is None or not any(isinstance(getattr(m, "processor", None), processor) for m in model.modules()):
        return None
    return ("MochiAttnProcessor2_0 gathers each sample's text tokens with torch.nonzero, so its attention runs "
            "outside the compiled graphs: call sparse_compile.use_graph_friendly_attention(model) before compiling")


def use_graph_friendly_attention(model: torch.nn.Module) -> int:
    """Replace every diffusers ``MochiAttnProcessor2_0`` in ``model`` with
    :class:`MaskedMochiAttnProcessor`, so the forward compiles into one graph and the backend sees
    the joint attention. Same output as before (up to float rounding). Other processors are left
    as they are, so it is safe on any model.

    Returns:
        the number of attention modules whose processor was replaced.
    """
    processor = _mochi_processor()
    replaced = 0
    for module in model.modules() if processor is not None else ():
        if isinstance(getattr(module, "processor", None), processor):
            module.processor = MaskedMochiAttnProcessor()
            replaced += 1
    return replaced
