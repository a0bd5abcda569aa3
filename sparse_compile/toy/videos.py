"""Procedural training videos: bright shapes moving over a panning grey texture.

Every video is a pure function of ``(seed, labels, frames, height, width)``. A grey,
low-contrast background texture (sine grating, checkerboard or smooth waves, faintly tinted)
moves with a camera pan of random direction and speed. Two shapes of saturated colours move
over it in two parallel lanes, so they never overlap, and stay wholly inside the frame for the
whole clip. Sizes and speeds are in pixels, the same at every frame size: the model sees
positions only through relative RoPE, so it cannot tell how large the frame is, and a scale
drawn relative to the frame would make every grid a different task. The class label picks the
shape kind and the direction of motion:

    label = 4 * shape_kind + direction,   shape_kind: 0 circle, 1 square
                                          direction: 0 right, 1 left, 2 down, 3 up

Colour separates shapes from background (the shapes' chroma is at least 1.6, the background's
at most 0.15, in ``[-1, 1]`` units), which is what :mod:`sparse_compile.toy.judge` relies on.

Pixels are in ``[-1, 1]``, videos ``(N, 3, F, H, W)``.
"""

from __future__ import annotations

import math

import torch

NUM_CLASSES = 8
SHAPE_NAMES = ("circle", "square")
DIRECTION_NAMES = ("right", "left", "down", "up")
SHAPES_PER_VIDEO = 2
MIN_SIZE = 16
DATA_VERSION = "pixel-scale"  # recorded with each training run: the videos its weights were trained on
RADIUS_PIXELS = (4.5, 6.0)  # half the width of a circle or square: two lanes fit 32 pixels
SPEED_PIXELS = (1.0, 2.0)  # per frame, less where the frame is too short for the clip
PAN_PIXELS = 1.0  # the camera pan's largest speed per frame
PERIOD_PIXELS = (7.0, 18.0)  # the background texture's period
_MARGIN = 2.0  # pixels between a shape and the frame edge
_DIRECTIONS = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # (dx, dy) per direction


def class_name(label: int) -> str:
    """``"squares moving right"`` and the like for a class label."""
    return f"{SHAPE_NAMES[label // 4]}s moving {DIRECTION_NAMES[label % 4]}"


def _uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=gen) * (high - low) + low


def _saturated_colours(hue: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """RGB in ``[-1, 1]`` ``(..., 3)`` of fully saturated HSV colours (hue in ``[0, 1)``)."""
    k = torch.remainder(hue[..., None] * 6 + torch.tensor([5.0, 3.0, 1.0]), 6)
    rgb01 = value[..., None] * (1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return rgb01 * 2 - 1


def _background(params: dict[str, torch.Tensor], t: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Texture value in ``[-1, 1]``, ``(N, F, H, W)``, for each video's kind, scale and pan."""
    px = x - params["pan"][:, 0, None, None, None] * t
    py = y - params["pan"][:, 1, None, None, None] * t
    period = params["period"][:, None, None, None]
    angle = params["angle"][:, None, None, None]
    grating = torch.sin(2 * math.pi * (torch.cos(angle) * px + torch.sin(angle) * py) / period)
    checker = torch.tanh(4 * torch.sin(math.pi * px / period) * torch.sin(math.pi * py / period))
    waves = 0.5 * torch.sin(2 * math.pi * px / (3 * period)) + 0.5 * torch.cos(2 * math.pi * py / (2 * period))
    kind = params["texture"][:, None, None, None]
    return torch.where(kind == 0, grating, torch.where(kind == 1, checker, waves))


def _shape_paths(gen: torch.Generator, direction: torch.Tensor, frames: int, height: int,
                 width: int) -> dict[str, torch.Tensor]:
    """Radius ``(N, S)``, start centre ``(N, S, 2)`` and velocity ``(N, S, 2)`` (pixels, pixels per frame).

    Shape ``s`` keeps to lane ``s`` across the motion. Along it, it moves at a speed drawn from
    ``SPEED_PIXELS``, slowed where the clip would carry it out of the frame, from a random start
    that keeps it ``_MARGIN`` pixels inside the frame.
    """
    n = direction.shape[0]
    horizontal = direction[:, 0] != 0  # (N,)
    along = torch.where(horizontal, float(width), float(height))[:, None]  # (N, 1)
    across = torch.where(horizontal, float(height), float(width))[:, None]
    lane_width = across / SHAPES_PER_VIDEO
    radius = torch.minimum(_uniform(gen, (n, SHAPES_PER_VIDEO), *RADIUS_PIXELS), lane_width / 2 - _MARGIN)
    reach = radius + _MARGIN  # closest a centre comes to a frame edge
    lane_centre = (torch.arange(SHAPES_PER_VIDEO) + 0.5) * lane_width
    cross = lane_centre + _uniform(gen, (n, SHAPES_PER_VIDEO), -1.0, 1.0) * (lane_width / 2 - reach).clamp(min=0)
    free = (along - 2 * reach).clamp(min=0)  # the length a centre can travel
    speed = torch.minimum(_uniform(gen, (n, SHAPES_PER_VIDEO), *SPEED_PIXELS), free / max(frames - 1, 1))
    travel = speed * (frames - 1)
    first = reach + torch.rand((n, SHAPES_PER_VIDEO), generator=gen) * (free - travel)
    sign = direction.sum(1, keepdim=True)  # +1 right/down, -1 left/up
    start_along = torch.where(sign > 0, first, along - first)
    start = torch.where(horizontal[:, None, None], torch.stack([start_along, cross], -1),
                        torch.stack([cross, start_along], -1))
    velocity = direction[:, None, :] * speed[..., None]
    return {"radius": radius, "centre": start, "velocity": velocity}


def _video_params(seed: int, labels: torch.Tensor, frames: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """Every random choice of ``len(labels)`` videos, drawn on the CPU from ``seed``."""
    n = labels.shape[0]
    gen = torch.Generator().manual_seed(seed)
    pan_angle = _uniform(gen, (n,), 0.0, 2 * math.pi)
    pan_speed = _uniform(gen, (n,), 0.0, PAN_PIXELS)
    grey = _uniform(gen, (n, 1, 1), -0.7, 0.1)
    contrast = _uniform(gen, (n, 1, 1), 0.1, 0.35)
    tint = _uniform(gen, (n, 1, 3), -0.05, 0.05)
    params = {
        "texture": torch.randint(0, 3, (n,), generator=gen),
        "period": _uniform(gen, (n,), *PERIOD_PIXELS),
        "angle": _uniform(gen, (n,), 0.0, math.pi),
        "pan": torch.stack([torch.cos(pan_angle), torch.sin(pan_angle)], -1) * pan_speed[:, None],
        "bg_colours": grey + tint + torch.tensor([1.0, -1.0])[None, :, None] * contrast,  # (N, 2, 3)
        "square": (labels // 4 == 1),
        "shape_colours": _saturated_colours(torch.rand((n, SHAPES_PER_VIDEO), generator=gen),
                                            _uniform(gen, (n, SHAPES_PER_VIDEO), 0.9, 1.0)),
    }
    params.update(_shape_paths(gen, _DIRECTIONS[labels % 4], frames, height, width))
    return params


def make_videos(
    seed: int, labels: torch.Tensor, frames: int, height: int, width: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Videos ``(N, 3, F, H, W)`` in ``[-1, 1]`` for class ``labels`` ``(N,)``, deterministic in ``seed``.

    Frames must be at least ``MIN_SIZE`` pixels high and wide.
    """
    labels = labels.cpu().long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be in [0, {NUM_CLASSES}), got {labels.tolist()}")
    if min(height, width) < MIN_SIZE or frames < 1:
        raise ValueError(f"videos need frames >= 1 and height, width >= {MIN_SIZE}; got {frames}x{height}x{width}")
    params = {k: v.to(device) for k, v in _video_params(seed, labels, frames, height, width).items()}
    t = torch.arange(frames, device=device, dtype=torch.float32)[:, None, None]
    y = torch.arange(height, device=device, dtype=torch.float32)[None, :, None] + 0.5
    x = torch.arange(width, device=device, dtype=torch.float32)[None, None, :] + 0.5
    texture = _background(params, t, y, x)  # (N, F, H, W)
    colours = params["bg_colours"]  # (N, 2, 3)
    weight = ((texture + 1) / 2)[:, None]  # (N, 1, F, H, W)
    video = colours[:, 0, :, None, None, None] * weight + colours[:, 1, :, None, None, None] * (1 - weight)
    for s in range(SHAPES_PER_VIDEO):
        centre = params["centre"][:, s, :, None, None, None] + params["velocity"][:, s, :, None, None, None] * t
        dx, dy = x - centre[:, 0], y - centre[:, 1]  # (N, F, H, W)
        round_dist = torch.sqrt(dx * dx + dy * dy)
        square_dist = torch.maximum(dx.abs(), dy.abs())
        dist = torch.where(params["square"][:, None, None, None], square_dist, round_dist)
        cover = torch.sigmoid(2.0 * (params["radius"][:, s, None, None, None] - dist))[:, None]
        video = video * (1 - cover) + params["shape_colours"][:, s, :, None, None, None] * cover
    return video.clamp(-1, 1)
