"""Tiny random-weight diffusers video transformers and inputs for CPU tests.

Each factory returns ``(model, inputs, expected)`` where ``expected`` lists what the
backend must find: the number of video attention sites, their grid and text placement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Expected:
    video_sites: int
    grid: tuple[int, int, int]
    text_tokens: int
    text_position: str | None
    cross_sites: int


def wan(frames: int = 3, height: int = 8, width: int = 10, batch: int = 1, layers: int = 2, head_dim: int = 16):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=16, ffn_dim=64, num_layers=layers, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(batch, 4, frames, height, width),
        timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, 7, 32),
    )
    return model, inputs, Expected(layers, (frames, height // 2, width // 2), 0, None, layers)


def hunyuan(frames: int = 3, height: int = 8, width: int = 8, batch: int = 1):
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, mlp_ratio=2.0,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=True,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(batch, 4, frames, height, width),
        timestep=torch.full((batch,), 500),
        encoder_hidden_states=torch.randn(batch, 6, 16),
        encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]] * batch),
        pooled_projections=torch.randn(batch, 8),
        guidance=torch.full((batch,), 3000.0),
    )
    return model, inputs, Expected(2, (frames, height // 2, width // 2), 6, "suffix", 0)


def cogvideox(frames: int = 3, height: int = 8, width: int = 8, patch_size_t: int | None = None):
    """CogVideoX 1.0 (``patch_size_t=None``: Conv2d + view) or 1.5 (``patch_size_t=2``: 8-D patchify)."""
    from diffusers import CogVideoXTransformer3DModel

    extra = {} if patch_size_t is None else dict(
        patch_size_t=patch_size_t, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False
    )
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=width, sample_height=height, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=6, **extra,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, frames, 4, height, width),
        encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([500]),
    )
    latent_frames = frames if patch_size_t is None else frames // patch_size_t
    return model, inputs, Expected(2, (latent_frames, height // 2, width // 2), 6, "prefix", 0)


def ltx(frames: int = 3, height: int = 4, width: int = 5):
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=8, cross_attention_dim=16, num_layers=1, caption_channels=16,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, frames * height * width, 4),
        encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([500]),
        encoder_attention_mask=torch.ones(1, 6),
        num_frames=frames, height=height, width=width,
    )
    return model, inputs, Expected(1, (frames, height, width), 0, None, 1)
