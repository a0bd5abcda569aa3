"""Tiny random-weight configs of every diffusers video transformer class, for the coverage matrix.

Each factory returns ``(model, inputs)``: a model in eval mode and the keyword inputs of one
forward call (batch 1, a few frames, a few tokens per frame).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


Factory = Callable[[], tuple[torch.nn.Module, dict[str, Any]]]

_WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
)


def _wan_inputs(frames: int = 3, size: int = 8, channels: int = 4) -> dict[str, Any]:
    return dict(
        hidden_states=torch.randn(1, channels, frames, size, size),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 6, 16),
    )


def wan() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(**_WAN_CONFIG).eval(), _wan_inputs()


def wan22_ti2v() -> tuple[torch.nn.Module, dict[str, Any]]:
    """Wan 2.2 TI2V: one timestep per token, ``(B, S)``."""
    from diffusers import WanTransformer3DModel

    inputs = _wan_inputs()
    inputs["timestep"] = torch.randint(0, 1000, (1, 3 * 4 * 4))
    return WanTransformer3DModel(**_WAN_CONFIG).eval(), inputs


def wan_vace() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import WanVACETransformer3DModel

    model = WanVACETransformer3DModel(**_WAN_CONFIG, vace_layers=[0], vace_in_channels=8).eval()
    inputs = _wan_inputs()
    inputs["control_hidden_states"] = torch.randn(1, 8, 3, 8, 8)
    return model, inputs


def skyreels_v2() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import SkyReelsV2Transformer3DModel

    return SkyReelsV2Transformer3DModel(**_WAN_CONFIG).eval(), _wan_inputs()


def skyreels_v2_diffusion_forcing() -> tuple[torch.nn.Module, dict[str, Any]]:
    """SkyReels-V2 diffusion forcing: one timestep per latent frame."""
    from diffusers import SkyReelsV2Transformer3DModel

    inputs = _wan_inputs()
    inputs.update(timestep=torch.tensor([[900, 500, 100]]), enable_diffusion_forcing=True)
    return SkyReelsV2Transformer3DModel(**_WAN_CONFIG).eval(), inputs


def chronoedit() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import ChronoEditTransformer3DModel

    return ChronoEditTransformer3DModel(**_WAN_CONFIG, rope_temporal_skip_len=2).eval(), _wan_inputs()


def wan_animate() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import WanAnimateTransformer3DModel

    config = dict(_WAN_CONFIG, in_channels=12)
    model = WanAnimateTransformer3DModel(
        **config, latent_channels=4, image_dim=16, motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=16,
        face_encoder_hidden_dim=16, face_encoder_num_heads=2, inject_face_latents_blocks=2,
    ).eval()
    inputs = _wan_inputs(frames=3, channels=12)
    inputs.update(
        encoder_hidden_states_image=torch.randn(1, 4, 16),
        pose_hidden_states=torch.randn(1, 4, 2, 8, 8),
        face_pixel_values=torch.randn(1, 3, 5, 16, 16),
    )
    return model, inputs


def hunyuan_video() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, mlp_ratio=2.0,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 4, 8), guidance_embeds=True,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 6, 16), encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
        pooled_projections=torch.randn(1, 8), guidance=torch.tensor([3000.0]),
    )
    return model, inputs


def _cogvideox(frames: int, patch_size_t: int | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import CogVideoXTransformer3DModel

    extra = {} if patch_size_t is None else dict(
        patch_size_t=patch_size_t, use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False
    )
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6, **extra,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, frames, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([500]),
    )
    return model, inputs


def cogvideox() -> tuple[torch.nn.Module, dict[str, Any]]:
    return _cogvideox(frames=3, patch_size_t=None)


def cogvideox_15() -> tuple[torch.nn.Module, dict[str, Any]]:
    return _cogvideox(frames=4, patch_size_t=2)


def consisid() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import ConsisIDTransformer3DModel

    model = ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 3, 4, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([500]),
    )
    return model, inputs


def ltx_video() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import LTXVideoTransformer3DModel

    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=1, caption_channels=16,
    ).eval()
    frames, height, width = 3, 4, 5
    inputs = dict(
        hidden_states=torch.randn(1, frames * height * width, 4), encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, 6),
        num_frames=frames, height=height, width=width,
    )
    return model, inputs


def allegro() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import AllegroTransformer3DModel

    model = AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=1, cross_attention_dim=32, sample_height=8, sample_width=8, sample_frames=3, caption_channels=16,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([500]),
    )
    return model, inputs


def easyanimate() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import EasyAnimateTransformer3DModel

    model = EasyAnimateTransformer3DModel(
        attention_head_dim=16, num_attention_heads=2, in_channels=4, out_channels=4, mmdit_layers=1, num_layers=1,
        patch_size=2, sample_height=8, sample_width=8, text_embed_dim=16, time_embed_dim=8,
        time_position_encoding_type="3d_rope",
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 6, 16),
    )
    return model, inputs


def cosmos() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import CosmosTransformer3DModel

    model = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), concat_padding_mask=False,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8), timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 6, 16), attention_mask=torch.ones(1, 6), fps=30,
    )
    return model, inputs


def kandinsky5() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import Kandinsky5Transformer3DModel

    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=16, time_dim=16, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 8),
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 3, 8, 8, 4), encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([500.0]), pooled_projections=torch.randn(1, 16),
        visual_rope_pos=[torch.arange(3), torch.arange(4), torch.arange(4)], text_rope_pos=torch.arange(6),
    )
    return model, inputs


def mochi() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import MochiTransformer3DModel

    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=16, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=8,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([500]), encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]),
    )
    return model, inputs


def hunyuan_video_15() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import HunyuanVideo15Transformer3DModel

    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
        image_embed_dim=12, rope_axes_dim=(4, 4, 8), target_size=16, task_type="t2v",
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 4, 4), timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 6, 16), encoder_hidden_states_2=torch.randn(1, 4, 8),
        encoder_attention_mask=torch.ones(1, 6), encoder_attention_mask_2=torch.ones(1, 4),
        image_embeds=torch.zeros(1, 3, 12),
    )
    return model, inputs


def hunyuan_video_framepack() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), image_condition_type=None,
        has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True,
    ).eval()
    frames, size = 3, 4
    inputs = dict(
        hidden_states=torch.randn(1, 4, frames, size, size), timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 6, 16), encoder_attention_mask=torch.ones(1, 6),
        pooled_projections=torch.randn(1, 8), image_embeds=torch.randn(1, 6, 16),
        indices_latents=torch.arange(frames), guidance=torch.tensor([3000.0]),
        latents_clean=torch.randn(1, 4, frames - 1, size, size), indices_latents_clean=torch.arange(frames - 1),
        latents_history_2x=torch.randn(1, 4, frames - 1, size, size),
        indices_latents_history_2x=torch.arange(frames - 1),
        latents_history_4x=torch.randn(1, 4, (frames - 1) * 4, size, size),
        indices_latents_history_4x=torch.arange((frames - 1) * 4),
    )
    return model, inputs


def ltx2() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import LTX2VideoTransformer3DModel

    model = LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=1, qk_norm="rms_norm_across_heads",
        caption_channels=16, rope_double_precision=False,
    ).eval()
    frames, size = 2, 4
    inputs = dict(
        hidden_states=torch.randn(1, frames * size * size, 4), audio_hidden_states=torch.randn(1, 20, 4),
        encoder_hidden_states=torch.randn(1, 6, 16), audio_encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([500.0]), encoder_attention_mask=torch.ones(1, 6, dtype=torch.bool),
        num_frames=frames, height=size, width=size, audio_num_frames=20, fps=25.0,
    )
    return model, inputs


def sana_video() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import SanaVideoTransformer3DModel

    model = SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=1,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
        sample_size=8, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8), encoder_hidden_states=torch.randn(1, 6, 16),
        timestep=torch.tensor([500]),
    )
    return model, inputs


def latte() -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers import LatteTransformer3DModel

    model = LatteTransformer3DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=4, num_attention_heads=2, caption_channels=8,
        in_channels=4, cross_attention_dim=8, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        video_length=3,
    ).eval()
    inputs = dict(
        hidden_states=torch.randn(1, 4, 3, 8, 8), encoder_hidden_states=torch.randn(1, 6, 8),
        timestep=torch.tensor([500]),
    )
    return model, inputs


FACTORIES: dict[str, Factory] = {
    "WanTransformer3DModel": wan,
    "WanTransformer3DModel (2.2 TI2V, per-token timesteps)": wan22_ti2v,
    "WanVACETransformer3DModel": wan_vace,
    "SkyReelsV2Transformer3DModel": skyreels_v2,
    "SkyReelsV2Transformer3DModel (diffusion forcing)": skyreels_v2_diffusion_forcing,
    "ChronoEditTransformer3DModel": chronoedit,
    "WanAnimateTransformer3DModel": wan_animate,
    "HunyuanVideoTransformer3DModel": hunyuan_video,
    "CogVideoXTransformer3DModel (1.0)": cogvideox,
    "CogVideoXTransformer3DModel (1.5)": cogvideox_15,
    "ConsisIDTransformer3DModel": consisid,
    "LTXVideoTransformer3DModel": ltx_video,
    "AllegroTransformer3DModel": allegro,
    "EasyAnimateTransformer3DModel": easyanimate,
    "CosmosTransformer3DModel": cosmos,
    "Kandinsky5Transformer3DModel": kandinsky5,
    "MochiTransformer3DModel": mochi,
    "HunyuanVideo15Transformer3DModel": hunyuan_video_15,
    "HunyuanVideoFramepackTransformer3DModel": hunyuan_video_framepack,
    "LTX2VideoTransformer3DModel": ltx2,
    "SanaVideoTransformer3DModel": sana_video,
    "LatteTransformer3DModel": latte,
}
