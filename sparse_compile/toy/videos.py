"""Procedural training videos: moving shapes over a panning textured background.

Every video is a pure function of ``(seed, index)``: a background texture (sine grating,
checkerboard or smooth colour waves) moves with a camera pan, and two shapes move over it,
wrapping around the frame edges. The class label picks the shape kind and the direction of
motion, so a class-conditioned model has something to follow:

    label = 4 * shape_kind + direction,   shape_kind: 0 circle, 1 square
                                          direction: 0 right, 1 left, 2 down, 3 up

Pixels are in ``[-1, 1]``, videos ``(N, 3, F, H, W)``.
"""

from __future__ import annotations

import math

import torch

NUM_CLASSES = 8
_SHAPES_PER_VIDEO = 2
_DIRECTIONS = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # (dx, dy) per direction


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def _wrapped_offset(coord: torch.Tensor, centre: torch.Tensor, period: float) -> torch.Tensor:
    """Signed distance from ``centre`` to ``coord`` on a circle of length ``period``."""
    return torch.remainder(coord - centre + period / 2, period) - period / 2


def _background(params: dict[str, torch.Tensor], t: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
                height: int, width: int) -> torch.Tensor:
    """Texture value in ``[-1, 1]``, ``(N, F, H, W)``, for each video's kind, scale and pan."""
    px = x - params["pan"][:, 0, None, None, None] * t
    py = y - params["pan"][:, 1, None, None, None] * t
    period = params["period"][:, None, None, None]
    angle = params["angle"][:, None, None, None]
    grating = torch.sin(2 * math.pi * (torch.cos(angle) * px + torch.sin(angle) * py) / period)
    checker = torch.tanh(4 * torch.sin(math.pi * px / period) * torch.sin(math.pi * py / period))
    waves = 0.5 * torch.sin(2 * math.pi * px / width) + 0.5 * torch.cos(2 * math.pi * py / height)
    kind = params["texture"][:, None, None, None]
    return torch.where(kind == 0, grating, torch.where(kind == 1, checker, waves))


def _video_params(seed: int, labels: torch.Tensor, frames: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """Every random choice of ``len(labels)`` videos, drawn on the CPU from ``seed``."""
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(seed)
    direction = _DIRECTIONS[labels % 4]  # (N, 2)
    size = min(height, width)
    speed = _uniform(gen, (n, 1), 0.5, 2.0) * size / 32  # background pan, pixels per frame
    return {
        "texture": torch.randint(0, 3, (n,), generator=gen),
        "period": _uniform(gen, (n,), 0.15, 0.4) * size,
        "angle": _uniform(gen, (n,), 0.0, math.pi),
        "pan": direction * speed,
        "bg_colours": _uniform(gen, (n, 2, 3), -1.0, 1.0),
        "square": (labels // 4 == 1),
        "centre": torch.rand((n, _SHAPES_PER_VIDEO, 2), generator=gen) * torch.tensor([width, height]),
        "velocity": direction[:, None, :] * _uniform(gen, (n, _SHAPES_PER_VIDEO, 1), 1.0, 3.0) * size / 32,
        "radius": _uniform(gen, (n, _SHAPES_PER_VIDEO), 0.1, 0.22) * size,
        "shape_colours": _uniform(gen, (n, _SHAPES_PER_VIDEO, 3), -1.0, 1.0),
    }


def make_videos(
    seed: int, labels: torch.Tensor, frames: int, height: int, width: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Videos ``(N, 3, F, H, W)`` in ``[-1, 1]`` for class ``labels`` ``(N,)``, deterministic in ``seed``."""
    labels = labels.cpu().long()
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise ValueError(f"labels must be in [0, {NUM_CLASSES}), got {labels.tolist()}")
    params = {k: v.to(device) for k, v in _video_params(seed, labels, frames, height, width).items()}
    t = torch.arange(frames, device=device, dtype=torch.float32)[:, None, None]
    y = torch.arange(height, device=device, dtype=torch.float32)[None, :, None] + 0.5
    x = torch.arange(width, device=device, dtype=torch.float32)[None, None, :] + 0.5
    texture = _background(params, t, y, x, height, width)  # (N, F, H, W)
    colours = params["bg_colours"]  # (N, 2, 3)
    weight = ((texture + 1) / 2)[:, None]  # (N, 1, F, H, W)
    video = colours[:, 0, :, None, None, None] * weight + colours[:, 1, :, None, None, None] * (1 - weight)
    for s in range(_SHAPES_PER_VIDEO):
        centre = params["centre"][:, s, :, None, None, None] + params["velocity"][:, s, :, None, None, None] * t
        dx = _wrapped_offset(x, centre[:, 0], width)  # (N, F, H, W)
        dy = _wrapped_offset(y, centre[:, 1], height)
        round_dist = torch.sqrt(dx * dx + dy * dy)
        square_dist = torch.maximum(dx.abs(), dy.abs())
        dist = torch.where(params["square"][:, None, None, None], square_dist, round_dist)
        cover = torch.sigmoid(2.0 * (params["radius"][:, s, None, None, None] - dist))[:, None]
        video = video * (1 - cover) + params["shape_colours"][:, s, :, None, None, None] * cover
    return video.clamp(-1, 1)
