"""The small trained video DiT: a diffusers ``WanTransformer3DModel`` in pixel space.

8 layers, dim 384 (6 heads of 64), Wan's 3D RoPE, patch (1, 2, 2) over RGB videos, conditioned
on a class label through Wan's text cross-attention: each class has a fixed random
"text" embedding ``(TEXT_TOKENS, TEXT_DIM)`` (drawn from a fixed seed), the unconditional one is
zeros. Trained with flow matching on :mod:`sparse_compile.toy.videos` by
:mod:`sparse_compile.toy.train`; the weights ship with the package (``toy_wan.safetensors``).
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS = Path(__file__).with_name("toy_wan.safetensors")
TEXT_TOKENS = 8
TEXT_DIM = 64
CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=6,
    attention_head_dim=64,
    in_channels=3,
    out_channels=3,
    text_dim=TEXT_DIM,
    freq_dim=256,
    ffn_dim=1536,
    num_layers=8,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)


def build_toy_wan(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  weights: Path | None = WEIGHTS) -> torch.nn.Module:
    """The toy Wan transformer in eval mode, with the shipped weights (``weights=None``: random init), in
    ``dtype`` but for what diffusers keeps in fp32 (:func:`kept_in_fp32`), as ``from_pretrained(...,
    torch_dtype=dtype)`` loads Wan."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = WanTransformer3DModel(**CONFIG)
    if weights is not None:
        if not weights.exists():
            raise FileNotFoundError(f"toy model weights not found at {weights}: train them with "
                                    "python -m sparse_compile.toy.train")
        model.load_state_dict(load_file(str(weights)))
    model = model.to(device=device).eval()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not kept_in_fp32(model, name):
            tensor.data = tensor.data.to(dtype)
    return model


def kept_in_fp32(model: torch.nn.Module, name: str) -> bool:
    """Whether parameter or buffer ``name`` of ``model`` (or of its torch.compile wrapper) belongs to a module
    diffusers keeps in fp32 whatever the model's dtype (``_keep_in_fp32_modules``: Wan's RoPE, time
    embedding, modulation tables and block norms)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    return any(part in keep for part in name.split("."))


def compute_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and the dtype ``model`` computes in: its parameters' but those :func:`kept_in_fp32`."""
    computing = [p for name, p in model.named_parameters() if not kept_in_fp32(model, name)]
    first = computing[0] if computing else next(model.parameters())
    return first.device, first.dtype


def class_embeddings(labels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The conditioning ``(N, TEXT_TOKENS, TEXT_DIM)`` of class ``labels`` ``(N,)``; label -1 = unconditional (zeros)."""
    from sparse_compile.toy.videos import NUM_CLASSES

    table = torch.randn((NUM_CLASSES, TEXT_TOKENS, TEXT_DIM), generator=torch.Generator().manual_seed(1234))
    table = torch.cat([table, torch.zeros(1, TEXT_TOKENS, TEXT_DIM)])
    return table[labels.cpu().long()].to(device=labels.device, dtype=dtype)
