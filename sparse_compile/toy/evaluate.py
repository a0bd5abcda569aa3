"""Task score of a video model without a dense reference: generate clips of every class, judge them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from sparse_compile.toy.judge import judge
from sparse_compile.toy.sampling import generate
from sparse_compile.toy.videos import NUM_CLASSES


@dataclass(frozen=True)
class GenerationScore:
    """Judge accuracy of ``clips`` generated clips (classes in turn) at one size and step count."""

    frames: int
    height: int
    width: int
    steps: int
    clips: int
    accuracy: float
    found: float  # fraction of clips where the judge found shapes at all
    per_class: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def balanced_labels(clips: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels ``(clips,)`` cycling through every class: ``0, 1, ..., 7, 0, 1, ...``."""
    return torch.arange(clips, device=device) % NUM_CLASSES


def score_generation(
    model: Callable[..., object],
    frames: int,
    height: int,
    width: int,
    steps: int,
    clips: int = 32,
    seed: int = 0,
    batch: int = 16,
    guidance: float = 4.0,
    before_batch: Callable[[], None] | None = None,
) -> GenerationScore:
    """Generate ``clips`` clips (all classes, batches of ``batch``, seed ``seed + batch index``) and judge them.

    ``before_batch`` runs before each batch's generation (e.g. ``sparse_compile.reset`` of a compiled model).
    """
    labels = balanced_labels(clips)
    correct, found = torch.zeros(clips, dtype=torch.bool), torch.zeros(clips, dtype=torch.bool)
    for start in range(0, clips, batch):
        chunk = labels[start:start + batch]
        if before_batch is not None:
            before_batch()
        videos = generate(model, chunk, seed + start // batch, frames, height, width, steps, guidance)
        for offset, verdict in enumerate(judge(videos)):
            correct[start + offset] = verdict.label == int(chunk[offset])
            found[start + offset] = verdict.found
    per_class = [float(correct[labels == c].float().mean()) for c in range(NUM_CLASSES) if (labels == c).any()]
    return GenerationScore(frames, height, width, steps, clips, float(correct.float().mean()),
                           float(found.float().mean()), per_class)
