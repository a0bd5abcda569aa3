"""``python -m sparse_compile.demo``: compile a diffusers Wan transformer with the backend.

Runs a short denoising loop (CFG as two calls per step) three ways: eager, Inductor
(``torch.compile`` default backend) and ``backend="sparse_video"`` (``--method``, SVG2 by
default), then prints what the backend rewrote, the time per transformer call and how far its
output is from eager.
Random weights: this shows the mechanics and the speed, not video quality.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

import sparse_compile


def build_wan(device: torch.device, dtype: torch.dtype, layers: int) -> torch.nn.Module:
    """A Wan2.1-architecture transformer (12 heads of 64 would be 1.3B-sized; this keeps 4 of 32)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=32, ffn_dim=256, num_layers=layers, cross_attn_norm=True,
    )
    model = model.to(device) if dtype == torch.float32 else model.to(device=device, dtype=dtype)
    return model.eval()


def denoise(model, latents: torch.Tensor, text: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """A few flow-matching Euler steps with CFG as two calls; returns the latents and seconds per call."""
    timesteps = torch.linspace(1000, 1000 / steps, steps)
    x = latents.clone()
    elapsed = 0.0
    for t in timesteps:
        t_batch = t.expand(x.shape[0]).to(x.device)
        start = time.perf_counter()
        with torch.no_grad():
            cond = model(hidden_states=x, timestep=t_batch, encoder_hidden_states=text).sample
            uncond = model(hidden_states=x, timestep=t_batch, encoder_hidden_states=torch.zeros_like(text)).sample
        if x.is_cuda:
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        x = x - (uncond + 5.0 * (cond - uncond)) / steps
    return x, elapsed / (2 * steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="svg2", choices=sparse_compile.available_methods())
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dense-steps", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--frames", type=int, default=5, help="latent frames")
    parser.add_argument("--height", type=int, default=32, help="latent height (tokens: height/2)")
    parser.add_argument("--width", type=int, default=48, help="latent width (tokens: width/2)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_wan(device, dtype, args.layers)
    latents = torch.randn(1, 16, args.frames, args.height, args.width, device=device, dtype=dtype)
    text = torch.randn(1, 16, 64, device=device, dtype=dtype)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"Wan transformer, {args.layers} layers, {tokens} video tokens, {args.steps} steps with CFG, "
          f"{device.type} {dtype}, method={args.method!r}")

    denoise(model, latents, text, 1)  # warm-up: kernel selection and library handles
    eager_out, eager_s = denoise(model, latents, text, args.steps)
    inductor = torch.compile(model)
    denoise(inductor, latents, text, 1)  # compile outside the timing
    _, inductor_s = denoise(inductor, latents, text, args.steps)
    options = {"method": args.method, "dense_steps": args.dense_steps, "min_seq_len": 256}
    if args.method == "svg2":  # cluster counts in proportion to the defaults' ~30k tokens
        options.update(q_clusters=max(8, tokens // 160), k_clusters=max(16, tokens // 32))
    print("options:", options)
    sparse = torch.compile(model, backend="sparse_video", options=options)
    denoise(sparse, latents, text, 1)
    sparse_compile.reset(sparse)
    sparse_out, sparse_s = denoise(sparse, latents, text, args.steps)

    print(sparse_compile.report(sparse))
    rel = ((sparse_out.float() - eager_out.float()).norm() / eager_out.float().norm()).item()
    print(f"time per transformer call: eager {eager_s * 1e3:.1f} ms, inductor {inductor_s * 1e3:.1f} ms, "
          f"sparse_video {sparse_s * 1e3:.1f} ms ({inductor_s / sparse_s:.2f}x vs inductor)")
    print(f"final latents vs eager: relative L2 error {rel:.2e}")
    if device.type == "cpu":
        print("on the CPU the sparse methods run their PyTorch reference kernels (the specification): "
              "their speed is only meaningful on a GPU, see benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
