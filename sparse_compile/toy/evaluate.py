"""Task score of a video model without a dense reference: generate clips of every class, judge them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from sparse_compile.toy.judge import judge
from sparse_compile.toy.sampling import GUIDANCE, generate
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
    correct: list[bool]  # per clip, in generation order: read back as the class asked for

    def as_dict(self) -> dict:
        return asdict(self)


def balanced_labels(clips: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Labels ``(clips,)`` cycling through every class: ``0, 1, ..., 7, 0, 1, ...``."""
    return torch.arange(clips, device=device) % NUM_CLASSES


def generate_clips(
    model: Callable[..., object],
    frames: int,
    height: int,
    width: int,
    steps: int,
    clips: int = 32,
    seed: int = 0,
    batch: int = 16,
    guidance: float = GUIDANCE,
    between_batches: Callable[[], None] | None = None,
    shift: float = 1.0,
) -> torch.Tensor:
    """``clips`` videos ``(clips, 3, F, H, W)`` of :func:`balanced_labels`, in batches of ``batch``
    (noise seed ``seed + batch index``), so every model given the same arguments starts each clip
    from the same noise.

    ``between_batches`` runs before every batch but the first (e.g. ``sparse_compile.reset`` of a
    compiled model, so that each batch is a new generation). ``shift``: the schedule's
    (:func:`~sparse_compile.toy.sampling.noise_levels`).
    """
    labels = balanced_labels(clips)
    videos = []
    for start in range(0, clips, batch):
        if start and between_batches is not None:
            between_batches()
        videos.append(generate(model, labels[start:start + batch], seed + start // batch, frames, height, width,
                               steps, guidance, shift=shift).cpu())
    return torch.cat(videos)


def score_clips(videos: torch.Tensor, steps: int) -> GenerationScore:
    """Judge videos ``(N, 3, F, H, W)`` generated for :func:`balanced_labels` ``(N,)`` in ``steps`` steps."""
    clips, _, frames, height, width = videos.shape
    labels = balanced_labels(clips)
    verdicts = judge(videos)
    correct = torch.tensor([v.label == int(t) for v, t in zip(verdicts, labels)], dtype=torch.bool)
    found = torch.tensor([v.found for v in verdicts], dtype=torch.bool)
    per_class = [float(correct[labels == c].float().mean()) for c in range(NUM_CLASSES) if (labels == c).any()]
    return GenerationScore(frames, height, width, steps, clips, float(correct.float().mean()),
                           float(found.float().mean()), per_class, correct.tolist())


def clips_gained_and_lost(correct: list[bool], reference: list[bool]) -> tuple[int, int]:
    """Clips judged right in ``correct`` but not in ``reference`` (same noise, same class asked), and the reverse:
    what moves a paired accuracy difference, which a difference of two accuracies hides."""
    if len(correct) != len(reference):
        raise ValueError(f"correct and reference must judge the same clips, got {len(correct)} and {len(reference)}")
    gained = sum(c and not r for c, r in zip(correct, reference))
    lost = sum(r and not c for c, r in zip(correct, reference))
    return gained, lost


def score_generation(model: Callable[..., object], frames: int, height: int, width: int, steps: int, clips: int = 32,
                     **generation: Any) -> GenerationScore:
    """:func:`generate_clips` (``generation``: its other arguments) then :func:`score_clips`."""
    return score_clips(generate_clips(model, frames, height, width, steps, clips, **generation), steps)
