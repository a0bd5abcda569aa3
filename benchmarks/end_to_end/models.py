"""Random-weight diffusers video transformers at real model sizes (and tiny ones for a CPU smoke run)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    MochiTransformer3DModel,
    WanTransformer3DModel,
)

import sparse_compile

HUNYUAN_PROMPT_TOKENS = 64  # valid text tokens of the 256 (a typical prompt after the template crop)
HUNYUAN_GUIDANCE = 6000.0  # embedded guidance 6.0, times 1000 as the pipeline passes it
HUNYUAN15_BYT5_TOKENS = 64  # glyph-text tokens of the second text encoder (ByT5), all valid
HUNYUAN15_IMAGE_TOKENS = 729  # SigLIP image tokens at most (as many as the text tokens here); zero for
# text-to-video, where the model masks them


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked transformer: its diffusers class, constructor config and input shapes.

    ``latent`` is the latent video ``(frames, height, width)``; the patch is 1 x ``patch`` x ``patch``,
    so the video tokens are ``frames * height/patch * width/patch``. ``calls_per_step`` is 2 for CFG
    as two calls, 1 for a guidance-distilled model.
    """

    name: str
    family: str
    config: dict[str, Any]
    latent: tuple[int, int, int]
    text_tokens: int
    calls_per_step: int
    description: str
    patch: int = 2

    @property
    def blocks(self) -> str:
        """Transformer blocks, e.g. ``30`` (Wan) or ``1+1`` (HunyuanVideo double+single stream)."""
        if "num_single_layers" not in self.config:
            return str(self.config["num_layers"])
        return f"{self.config['num_layers']}+{self.config['num_single_layers']}"

    @property
    def video_tokens(self) -> int:
        frames, height, width = self.latent
        return frames * (height // self.patch) * (width // self.patch)

    def with_layers(self, layers: int) -> "ModelSpec":
        """The same model with ``layers`` blocks (HunyuanVideo: of each kind, double and single stream)."""
        keys = [k for k in ("num_layers", "num_single_layers") if k in self.config]
        return ModelSpec(self.name, self.family, {**self.config, **{k: layers for k in keys}}, self.latent,
                         self.text_tokens, self.calls_per_step, self.description, self.patch)


MODEL_CLASSES = {"wan": WanTransformer3DModel, "hunyuan": HunyuanVideoTransformer3DModel,
                 "mochi": MochiTransformer3DModel, "hunyuan15": HunyuanVideo15Transformer3DModel}
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
    # Mochi 1 preview as published (diffusers' defaults): 24 heads x 128; 480p (480x848) 163 frames through
    # its VAE (6x temporal, 8x spatial): latent 28x60x106, patch 2: 44520 video tokens + 256 T5 tokens.
    # Its pipeline, like HunyuanVideo-1.5's, batches the CFG branches: one step is one batch-2 call; a
    # batch-1 call is timed here (calls_per_step 1).
    "mochi-stack": ModelSpec("mochi-stack", "mochi", {"num_layers": 4}, (28, 60, 106), 256, 1,
                             "Mochi 1 blocks (of 48), 480p 163 frames, joint attention"),
    # HunyuanVideo-1.5 (8.3B) as published (diffusers' defaults: 16 heads x 128, patch 1, 54 blocks); 480p
    # (480x848) 121 frames through its VAE (4x temporal, 16x spatial): latent 31x30x53 = 49290 video tokens,
    # + 256 Qwen + 64 ByT5 + 256 image tokens (zero: text-to-video, masked).
    "hunyuan15-stack": ModelSpec("hunyuan15-stack", "hunyuan15", {"num_layers": 4, "task_type": "t2v"},
                                 (31, 30, 53), 256, 1,
                                 "HunyuanVideo-1.5 blocks (of 54), 480p 121 frames, joint attention", patch=1),
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
    "mochi-stack": ModelSpec("mochi-stack", "mochi", dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=32, num_layers=1, pooled_projection_dim=16,
        in_channels=12, text_embed_dim=32, time_embed_dim=16, max_sequence_length=16),
        (3, 16, 24), 16, 2, "tiny Mochi (2 heads x 32)"),
    "hunyuan15-stack": ModelSpec("hunyuan15-stack", "hunyuan15", dict(
        in_channels=12, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=32, text_embed_2_dim=16, image_embed_dim=16,
        rope_axes_dim=(8, 12, 12), target_size=64, task_type="t2v"),
        (3, 8, 12), 16, 2, "tiny HunyuanVideo-1.5 (2 heads x 32)", patch=1),
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
    sparse_compile.use_graph_friendly_attention(model)  # Mochi's joint attention in the graph; no-op elsewhere
    model = model.to(device=device, dtype=dtype).eval()
    if dtype != torch.float32:
        keep_in_fp32(model)
    return model


def make_inputs(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Keyword inputs of each call of a step (timestep aside): [cond, uncond] with CFG, else [cond]."""
    g = torch.Generator(device="cpu").manual_seed(1)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    config = {**_defaults(spec.family), **spec.config}
    latents = rand(1, config["in_channels"], *spec.latent)
    if spec.family == "wan":
        return [dict(hidden_states=latents, encoder_hidden_states=rand(1, spec.text_tokens, spec.config["text_dim"]))
                for _ in range(spec.calls_per_step)]
    valid = min(HUNYUAN_PROMPT_TOKENS, spec.text_tokens // 2)
    mask = (torch.arange(spec.text_tokens) < valid).unsqueeze(0).to(device)
    if spec.family == "mochi":
        return [dict(hidden_states=latents, encoder_hidden_states=rand(1, spec.text_tokens, config["text_embed_dim"]),
                     encoder_attention_mask=mask) for _ in range(spec.calls_per_step)]
    if spec.family == "hunyuan15":
        byt5, image = min(HUNYUAN15_BYT5_TOKENS, spec.text_tokens), min(HUNYUAN15_IMAGE_TOKENS, spec.text_tokens)
        return [dict(hidden_states=latents, encoder_hidden_states=rand(1, spec.text_tokens, config["text_embed_dim"]),
                     encoder_attention_mask=mask, encoder_hidden_states_2=rand(1, byt5, config["text_embed_2_dim"]),
                     encoder_attention_mask_2=torch.ones(1, byt5, device=device),
                     image_embeds=torch.zeros(1, image, config["image_embed_dim"], device=device, dtype=dtype))
                for _ in range(spec.calls_per_step)]
    mask = (torch.arange(spec.text_tokens) < valid).unsqueeze(0).to(device)
    return [dict(hidden_states=latents, encoder_hidden_states=rand(1, spec.text_tokens, spec.config["text_embed_dim"]),
                 encoder_attention_mask=mask, pooled_projections=rand(1, spec.config["pooled_projection_dim"]),
                 guidance=torch.full((1,), HUNYUAN_GUIDANCE, device=device, dtype=dtype))
            for _ in range(spec.calls_per_step)]


def timestep_dtype(spec: ModelSpec, dtype: torch.dtype) -> torch.dtype:
    """The timestep's dtype as the family's diffusers pipeline passes it: the latents' dtype, except
    Wan's, which passes the scheduler's fp32 (HunyuanVideo-1.5 fails on an fp32 timestep in bf16)."""
    return torch.float32 if spec.family == "wan" else dtype


def _defaults(family: str) -> dict[str, Any]:
    """The constructor defaults of a family's class (the published config where diffusers keeps it)."""
    import inspect

    parameters = inspect.signature(MODEL_CLASSES[family].__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def model_info(spec: ModelSpec) -> dict[str, Any]:
    """Shape facts of a model for the results file (parameters counted on the meta device)."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in MODEL_CLASSES[spec.family](**spec.config).parameters())
    return {"description": spec.description, "blocks": spec.blocks, "family": spec.family, "latent": list(spec.latent),
            "video_tokens": spec.video_tokens, "text_tokens": spec.text_tokens,
            "calls_per_step": spec.calls_per_step, "parameters": parameters,
            "config": json.loads(json.dumps(spec.config))}
