"""Read a clip's class back from its pixels, with plain image operations (no learned network).

The procedural videos (:mod:`sparse_compile.toy.videos`) put saturated shapes on a grey
background, so a pixel belongs to a shape when its chroma (max minus min channel) is high.
After a 3x3 opening and closing of that mask the judge recovers:

- the direction of motion: the least-squares slope of the mask's centroid over the frames,
  along its larger axis;
- the shape kind: the median fill ratio (area / bounding-box area) of the mask's connected
  components (a disc fills pi/4 of its box, a square all of it).

A clip gets no verdict (label -1, which counts as wrong) unless it looks like the procedural
videos: shape pixels in at least two frames, at most ``MAX_MASK_FRACTION`` of the clip, at least
``MIN_SHAPE_SHARE`` of them in components of at least ``MIN_COMPONENT_PIXELS``, and at most twice
as many such components per frame as the videos have shapes. A shape the frame edge cuts still
counts (where it sits is not part of the class); the fill ratio is read from the shapes clear of
the edge when there are any, since a cut square stays a rectangle but a cut disc does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparse_compile.toy.videos import SHAPES_PER_VIDEO

CHROMA_THRESHOLD = 0.6
SQUARE_FILL = 0.88
MIN_COMPONENT_PIXELS = 6
MIN_SHAPE_SHARE = 0.8  # of the mask's pixels that must lie in components of MIN_COMPONENT_PIXELS or more
MAX_MASK_FRACTION = 0.3  # of the clip's pixels the mask may cover


@dataclass(frozen=True)
class Verdict:
    """What the judge read from one clip: the class label (-1: no shapes found) and its evidence."""

    label: int
    motion: tuple[float, float]  # centroid (dx, dy) in pixels per frame
    fill: float  # median fill ratio of the shapes' bounding boxes (nan: none found)

    @property
    def found(self) -> bool:
        return self.label >= 0


def _dilate(mask: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(mask, 3, stride=1, padding=1)


def _erode(mask: torch.Tensor) -> torch.Tensor:
    return -F.max_pool2d(-mask, 3, stride=1, padding=1)


def shape_mask(clips: torch.Tensor) -> torch.Tensor:
    """Boolean ``(N, F, H, W)``: pixels whose chroma exceeds ``CHROMA_THRESHOLD`` in clips ``(N, 3, F, H, W)``,
    cleaned by a 3x3 opening (drops specks) and closing (fills pinholes and notches)."""
    clips = clips.float().clamp(-1, 1)
    n, _, f, h, w = clips.shape
    mask = ((clips.amax(1) - clips.amin(1)) > CHROMA_THRESHOLD).float().view(n * f, 1, h, w)
    mask = _erode(_dilate(_dilate(_erode(mask))))
    return mask.view(n, f, h, w) > 0.5


def connected_components(mask: torch.Tensor) -> torch.Tensor:
    """Component ids ``(B, H, W)`` (0 = background, 8-connectivity) of a boolean mask ``(B, H, W)``.

    Each pixel takes the largest ``1 + y * W + x`` in its component (max-propagation until
    nothing changes), so ids are unique within a frame, not across the batch.
    """
    b, h, w = mask.shape
    keep = mask[:, None].float()
    ids = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, 1, h, w) * keep
    while True:
        grown = ids
        for _ in range(4):
            grown = F.max_pool2d(grown, 3, stride=1, padding=1) * keep
        if torch.equal(grown, ids):
            return ids[:, 0].long()
        ids = grown


def fill_ratios(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per connected component of ``mask`` ``(B, H, W)`` with at least ``MIN_COMPONENT_PIXELS``:
    fill ratio (area / bounding-box area), index in ``B``, area in pixels, and whether it is clear of
    the frame border; ``(C,)`` each.
    """
    b, h, w = mask.shape
    ids = connected_components(mask)
    flat = ids.flatten() + torch.arange(b, device=mask.device).repeat_interleave(h * w) * (h * w)
    chosen = ids.flatten() > 0
    if not chosen.any():
        empty = torch.empty(0, device=mask.device)
        return empty, empty.long(), empty, empty.bool()
    _, component = torch.unique(flat[chosen], return_inverse=True)
    count = int(component.max()) + 1
    pos = torch.arange(b * h * w, device=mask.device)[chosen]
    frame, y, x = pos // (h * w), (pos // w) % h, pos % w

    def reduce(values: torch.Tensor, how: str) -> torch.Tensor:
        start = torch.full((count,), -1 if how == "amax" else b * h * w, device=mask.device)
        return start.scatter_reduce(0, component, values, how, include_self=True)

    area = torch.zeros(count, device=mask.device).index_add_(0, component, torch.ones_like(component, dtype=torch.float32))
    y0, y1, x0, x1 = reduce(y, "amin"), reduce(y, "amax"), reduce(x, "amin"), reduce(x, "amax")
    box = ((y1 - y0 + 1) * (x1 - x0 + 1)).float()
    big = area >= MIN_COMPONENT_PIXELS
    inside = (y0 > 0) & (x0 > 0) & (y1 < h - 1) & (x1 < w - 1)
    return (area / box)[big], reduce(frame, "amax")[big], area[big], inside[big]


def _centroid_motion(mask: torch.Tensor) -> tuple[float, float] | None:
    """Least-squares ``(dx, dy)`` per frame of the shape pixels' centroid in one clip's mask ``(F, H, W)``."""
    f, h, w = mask.shape
    weight = mask.float()
    pixels = weight.sum((1, 2))
    present = pixels >= MIN_COMPONENT_PIXELS
    if int(present.sum()) < 2:
        return None
    ys = torch.arange(h, device=mask.device, dtype=torch.float32)
    xs = torch.arange(w, device=mask.device, dtype=torch.float32)
    cy = (weight.sum(2) * ys).sum(1)[present] / pixels[present]
    cx = (weight.sum(1) * xs).sum(1)[present] / pixels[present]
    t = torch.arange(f, device=mask.device, dtype=torch.float32)[present]
    t = t - t.mean()
    slope = lambda c: float((t * (c - c.mean())).sum() / (t * t).sum())  # noqa: E731
    return slope(cx), slope(cy)


def _direction(motion: tuple[float, float]) -> int:
    """Direction index (0 right, 1 left, 2 down, 3 up) of a motion ``(dx, dy)`` along its larger axis."""
    dx, dy = motion
    if abs(dx) >= abs(dy):
        return 0 if dx > 0 else 1
    return 2 if dy > 0 else 3


def judge(clips: torch.Tensor) -> list[Verdict]:
    """One :class:`Verdict` per clip of ``clips`` ``(N, 3, F, H, W)`` in ``[-1, 1]``."""
    if clips.dim() != 5 or clips.shape[1] != 3:
        raise ValueError(f"judge expects clips (N, 3, F, H, W), got shape {tuple(clips.shape)}")
    n, _, f, h, w = clips.shape
    masks = shape_mask(clips)  # (N, F, H, W)
    fills, clip_of, areas, inside = fill_ratios(masks.reshape(n * f, h, w))
    clip_of = clip_of // f
    verdicts = []
    for i in range(n):
        motion = _centroid_motion(masks[i])
        mine, mine_inside = fills[clip_of == i], inside[clip_of == i]
        shape_pixels = float(masks[i].sum())
        plausible = (
            float(areas[clip_of == i].sum()) >= MIN_SHAPE_SHARE * shape_pixels
            and shape_pixels <= MAX_MASK_FRACTION * f * h * w
            and mine.numel() <= 2 * SHAPES_PER_VIDEO * f
        )
        if motion is None or mine.numel() == 0 or not plausible:
            verdicts.append(Verdict(-1, motion or (0.0, 0.0), float("nan")))
            continue
        fill = float((mine[mine_inside] if mine_inside.any() else mine).median())
        verdicts.append(Verdict(4 * int(fill > SQUARE_FILL) + _direction(motion), motion, fill))
    return verdicts


def accuracy(clips: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``clips`` ``(N, 3, F, H, W)`` whose judged label equals ``labels`` ``(N,)``."""
    verdicts = judge(clips)
    return sum(v.label == int(t) for v, t in zip(verdicts, labels)) / max(len(verdicts), 1)
