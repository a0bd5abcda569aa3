"""Train the toy video DiT: ``python -m sparse_compile.toy.train --minutes 5 --out DIR``.

Flow matching on procedural videos (:mod:`sparse_compile.toy.videos`), drawn fresh every step
from the step's seed, at a mix of three sizes so the model serves several grids. bf16
autocast, AdamW with warm-up and cosine decay over the time budget, classifier-free-guidance
label dropout; the EMA of the weights is saved as fp16 safetensors with a JSON log (loss
curve, and the attention locality of every layer at the end, :func:`local_attention_mass`).
Meant for one GPU; a few minutes on an H100 is enough for local attention to appear.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from sparse_compile.toy.attention_stats import capture_self_attention, local_attention_mass
from sparse_compile.toy.model import build_toy_wan, class_embeddings
from sparse_compile.toy.videos import NUM_CLASSES, make_videos

# (frames, height, width, batch): about 48k tokens per batch each.
TRAIN_SIZES = ((9, 32, 48, 14), (13, 48, 64, 5), (16, 64, 96, 2))
LABEL_DROPOUT = 0.1


def learning_rate(progress: float, step: int, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% as ``progress`` goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def training_batch(
    step: int, sizes: tuple[tuple[int, int, int, int], ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(noisy videos, timesteps, conditioning, velocity targets)`` of one step, from its seed.

    ``sizes`` lists ``(frames, height, width, batch)``; step ``i`` uses entry ``i % len(sizes)``.
    """
    gen = torch.Generator().manual_seed(step)
    frames, height, width, batch = sizes[step % len(sizes)]
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    videos = make_videos(step, labels, frames, height, width, device)
    noise = torch.randn(videos.shape, generator=gen).to(device)
    sigma = torch.rand((batch,), generator=gen).to(device)
    noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * videos + sigma.view(-1, 1, 1, 1, 1) * noise
    dropped = torch.rand((batch,), generator=gen) < LABEL_DROPOUT
    conditioning = class_embeddings(torch.where(dropped, -1, labels)).to(device)
    return noisy, sigma * 1000, conditioning, noise - videos


def attention_locality(
    model: torch.nn.Module, video_size: tuple[int, int, int], device: torch.device
) -> list[dict[str, float]]:
    """Per layer: attention mass near the query vs the near keys' share, at mid noise, on two videos
    of ``video_size`` (frames, height, width)."""
    frames, height, width = video_size
    labels = torch.arange(2) % NUM_CLASSES
    videos = make_videos(10**6, labels, frames, height, width, device)
    noisy = 0.5 * videos + 0.5 * torch.randn(videos.shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad(), _autocast(device), capture_self_attention() as calls:
        model(hidden_states=noisy, timestep=torch.full((2,), 500.0, device=device),
              encoder_hidden_states=class_embeddings(labels).to(device))
    grid = (frames, height // 2, width // 2)
    stats = []
    for call in calls:
        mass, share = local_attention_mass(call.query, call.key, grid)
        stats.append({"near_mass": mass, "near_share": share, "ratio": mass / share})
    return stats


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; none on the CPU (where bf16 matmuls are slow)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def train(
    minutes: float,
    out: Path,
    peak_lr: float = 4e-4,
    seed: int = 0,
    sizes: tuple[tuple[int, int, int, int], ...] = TRAIN_SIZES,
    max_steps: int | None = None,
    locality_size: tuple[int, int, int] = (16, 64, 96),
) -> dict:
    """Train for ``minutes`` (or ``max_steps``), write ``toy_wan.safetensors`` and ``train_log.json`` to ``out``."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    model = build_toy_wan(device, torch.float32, weights=None).train()
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=peak_lr, betas=(0.9, 0.99), weight_decay=0.01)
    budget, start, step, losses = minutes * 60, time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - start) < budget and (max_steps is None or step < max_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(elapsed / budget, step, peak_lr, warmup=200)
        noisy, timesteps, conditioning, target = training_batch(step, sizes, device)
        with _autocast(device):
            prediction = model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=conditioning).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, value in model.state_dict().items():
                ema[name].lerp_(value, 1 - decay)
        if step % 50 == 0:
            losses.append((step, round(time.perf_counter() - start, 1), float(loss.detach())))
            print(f"step {step} {losses[-1][1]:.0f}s loss {losses[-1][2]:.4f}", flush=True)
        step += 1
    model.load_state_dict(ema)
    model.eval()
    locality = attention_locality(model, locality_size, device)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in ema.items()}, str(out / "toy_wan.safetensors"))
    log = {"steps": step, "minutes": minutes, "peak_lr": peak_lr, "losses": losses, "locality": locality,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    (out / "train_log.json").write_text(json.dumps(log, indent=1))
    return log


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    log = train(args.minutes, args.out, args.lr, args.seed)
    ratios = ", ".join(f"{s['ratio']:.1f}" for s in log["locality"])
    print(f"{log['steps']} steps; final loss {log['losses'][-1][2]:.4f}; "
          f"attention near-mass / near-share per layer: {ratios}")


if __name__ == "__main__":
    main()
