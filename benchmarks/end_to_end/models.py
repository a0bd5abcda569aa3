"""Random-weight diffusers video transformers at real model sizes (and tiny ones for a CPU smoke run)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import HunyuanVideoTransformer3DModel, WanTransformer3DModel

HUNYUAN_PROMPT_TOKENS = 64  # valid text tokens of the 256 (a typical prompt after the template crop)
HUNYUAN_GUIDANCE = 6000.0  # embedded guidance 6.0, times 1000 as the pipeline passes it


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked transformer: its diffusers class, constructor config and input shapes.

    ``latent`` is the latent video ``(frames, height, width)``; the patch is 1x2x2, so the video
    tokens are ``frames * height/2 * width/2``. ``calls_per_step`` is 2 for CFG as two calls, 1
    for a guidance-distilled model.
    """

    name: str
    family: str
    config: dict[str, Any]
    latent: tuple[int, int, int]
    text_tokens: int
    calls_per_step: int
    description: str

    @property
    def blocks(self) -> str:
        """Transformer blocks, e.g. ``30`` (Wan) or ``1+1`` (HunyuanVideo double+single stream)."""
        if self.family == "wan":
            return str(self.config["num_layers"])
        return f"{self.config['num_layers']}+{self.config['num_single_layers']}"

    @property
    def video_tokens(self) -> int:
        frames, height, width = self.latent
        return frames * (height // 2) * (width // 2)

    def with_layers(self, layers: int) -> "ModelSpec":
        """The same model with ``layers`` blocks (HunyuanVideo: of each kind, double and single stream)."""
        keys = ("num_layers",) if self.family == "wan" else ("num_layers", "num_single_layers")
        return ModelSpec(self.name, self.family, {**self.config, **{k: layers for k in keys}}, self.latent,
                         self.text_tokens, self.calls_per_step, self.description)


MODEL_CLASSES = {"wan": WanTransformer3DModel, "hunyuan": HunyuanVideoTransformer3DModel}
WAN_COMMON = dict(patch_size=(1, 2, 2), attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
                  freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
HUNYUAN_COMMON = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                      num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
                      guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
                      rope_axes_dim=(16, 56, 56))

FULL_MODELS = {
    "wan1.3b": ModelSpec("wan1.3b", "wan", {**WAN_COMMON, "num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
                         (21, 60, 104), 512, 2, "Wan2.1-T2V-1.3B (30 blocks), 480p 81 frames"),
    "wan14b-stack": ModelSpec("wan14b-stack", "wan",
                              {**WAN_COMMON, "num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 2},
                              (21, 90, 160), 512, 2, "Wan2.1-T2V-14B blocks (of 40), 720p 81 frames"),
    "hunyuan-stack": ModelSpec("hunyuan-stack", "hunyuan", {**HUNYUAN_COMMON, "num_layers": 1, "num_single_layers": 1},
                               (33, 90, 160), 256, 1,
                               "HunyuanVideo double+single-stream blocks (of 20+40), 720p 129 frames, joint attention"),
}

TINY_WAN = dict(patch_size=(1, 2, 2), attention_head_dim=32, in_channels=16, out_channels=16, text_dim=32, freq_dim=32,
                ffn_dim=128, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
TINY_MODELS = {
    "wan1.3b": ModelSpec("wan1.3b", "wan", {**TINY_WAN, "num_attention_heads": 2, "num_layers": 1},
                         (3, 16, 24), 16, 2, "tiny Wan (2 heads x 32)"),
    "wan14b-stack": ModelSpec("wan14b-stack", "wan",
                              {**TINY_WAN, "num_attention_heads": 4, "attention_head_dim": 16, "num_layers": 1},
                              (3, 16, 24), 16, 2, "tiny Wan (4 heads x 16)"),
    "hunyuan-stack": ModelSpec("hunyuan-stack", "hunyuan", dict(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
        guidance_embeds=True, text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(8, 12, 12)),
        (3, 16, 24), 16, 1, "tiny HunyuanVideo (2 heads x 32)"),
}
# --tiny: sequences are a few hundred tokens, so sites must count as video from 64 tokens and the
# methods' blocks and cluster counts shrink with them.


def keep_in_fp32(model: torch.nn.Module) -> None:
    """Cast the modules diffusers keeps in fp32 when loading in bf16 (``_keep_in_fp32_modules``) back to fp32."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if any(part in keep for part in name.split(".")):
            tensor.data = tensor.data.float()


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A seeded random-weight transformer on ``device``, cast as ``from_pretrained(torch_dtype=dtype)`` would."""
    torch.manual_seed(0)
    with device:
        model = MODEL_CLASSES[spec.family](**spec.config)
    model = model.to(device=device, dtype=dtype).eval()
    if dtype != torch.float32:
        keep_in_fp32(model)
    return model


def make_inputs(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Keyword inputs of each call of a step (timestep aside): [cond, uncond] with CFG, else [cond]."""
    g = torch.Generator(device="cpu").manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    latents = rand(1, spec.config["in_channels"], *spec.latent)
    if spec.family == "wan":
        return [dict(hidden_states=latents, encoder_hidden_states=rand(1, spec.text_tokens, spec.config["text_dim"]))
                for _ in range(spec.calls_per_step)]
    valid = min(HUNYUAN_PROMPT_TOKENS, spec.text_tokens // 2)
    mask = (torch.arange(spec.text_tokens) < valid).unsqueeze(0).to(device)
    return [dict(hidden_states=latents, encoder_hidden_states=rand(1, spec.text_tokens, spec.config["text_embed_dim"]),
                 encoder_attention_mask=mask, pooled_projections=rand(1, spec.config["pooled_projection_dim"]),
                 guidance=torch.full((1,), HUNYUAN_GUIDANCE, device=device, dtype=dtype))
            for _ in range(spec.calls_per_step)]


def model_info(spec: ModelSpec) -> dict[str, Any]:
    """Shape facts of a model for the results file (parameters counted on the meta device)."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in MODEL_CLASSES[spec.family](**spec.config).parameters())
    return {"description": spec.description, "blocks": spec.blocks, "family": spec.family, "latent": list(spec.latent),
            "video_tokens": spec.video_tokens, "text_tokens": spec.text_tokens,
            "calls_per_step": spec.calls_per_step, "parameters": parameters,
            "config": json.loads(json.dumps(spec.config))}
