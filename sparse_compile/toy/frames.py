"""Labelled frame strips of videos ``(N, 3, F, H, W)`` (pixels in ``[-1, 1]``) as PNG images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image

CAPTION_HEIGHT = 14  # pixels of the text band above each row


def frame_strip(rows: dict[str, torch.Tensor], frames: list[int], video: int = 0, zoom: int = 3) -> "Image.Image":
    """One row per entry of ``rows`` (e.g. dense, then each method), the chosen ``frames`` of one video
    side by side, each row under a band with its key as caption (white text on black).

    Image size: ``(len(frames) * W * zoom, len(rows) * (H * zoom + CAPTION_HEIGHT))``.
    """
    from PIL import Image, ImageDraw

    bands = []
    for caption, videos in rows.items():
        clip = videos[video].float().clamp(-1, 1)[:, frames]  # (3, len(frames), H, W)
        tile = clip.permute(2, 1, 3, 0).reshape(clip.shape[2], -1, 3)  # (H, len(frames) * W, 3)
        picture = Image.fromarray(((tile + 1) * 127.5).round().byte().cpu().numpy())
        picture = picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)
        band = Image.new("RGB", (picture.width, picture.height + CAPTION_HEIGHT))
        ImageDraw.Draw(band).text((2, 1), caption, fill=(255, 255, 255))
        band.paste(picture, (0, CAPTION_HEIGHT))
        bands.append(band)
    strip = Image.new("RGB", (bands[0].width, sum(b.height for b in bands)))
    top = 0
    for band in bands:
        strip.paste(band, (0, top))
        top += band.height
    return strip


def save_frame_strip(path: Path, rows: dict[str, torch.Tensor], frames: list[int], video: int = 0) -> Path:
    """Write :func:`frame_strip` to ``path`` (PNG) and return the path."""
    frame_strip(rows, frames, video).save(path)
    return path
