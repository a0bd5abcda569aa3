"""Side-by-side frame strips of videos ``(N, 3, F, H, W)`` (pixels in ``[-1, 1]``) as PNG images."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from PIL import Image


def frame_strip(rows: dict[str, torch.Tensor], frames: list[int], video: int = 0, zoom: int = 3) -> "Image.Image":
    """One row per entry of ``rows`` (e.g. dense, then each method), the chosen ``frames`` of one video side by side.

    A label column is not drawn; the row order is the dict's order.
    """
    from PIL import Image

    tiles = []
    for videos in rows.values():
        clip = videos[video].float().clamp(-1, 1)[:, frames]  # (3, len(frames), H, W)
        tiles.append(clip.permute(2, 1, 3, 0).reshape(clip.shape[2], -1, 3))  # (H, len(frames) * W, 3)
    image = ((torch.cat(tiles, dim=0) + 1) * 127.5).round().byte().cpu().numpy()
    picture = Image.fromarray(image)
    return picture.resize((picture.width * zoom, picture.height * zoom), Image.NEAREST)


def save_frame_strip(path: Path, rows: dict[str, torch.Tensor], frames: list[int], video: int = 0) -> Path:
    """Write :func:`frame_strip` to ``path`` (PNG) and return the path."""
    frame_strip(rows, frames, video).save(path)
    return path
