"""The judge reads a clip's class (shape kind, direction of motion) back from its pixels."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.toy.evaluate import balanced_labels, clips_gained_and_lost, generate_clips, score_generation
from sparse_compile.toy.judge import accuracy, connected_components, judge, shape_mask
from sparse_compile.toy.model import class_embeddings
from sparse_compile.toy.videos import NUM_CLASSES, make_videos


@pytest.mark.parametrize("size", [(6, 32, 48), (13, 48, 64), (16, 64, 96)], ids=["demo-cpu-size", "larger", "largest"])
def test_the_judge_reads_the_class_of_ground_truth_clips(size):
    labels = balanced_labels(64)
    clips = make_videos(21, labels, *size)
    assert accuracy(clips, labels) >= 0.98


@pytest.mark.parametrize("size", [(6, 32, 48), (16, 64, 96)], ids=["demo-cpu-size", "largest"])
def test_the_judge_reads_ground_truth_clips_whose_shapes_the_frame_edge_cuts(size):
    labels = balanced_labels(64)
    cropped = make_videos(21, labels, *size)[..., 3:-3, 3:-3]  # the 2-pixel margin and a pixel of the shapes gone
    assert accuracy(cropped, labels) >= 0.95


def test_the_judge_sees_the_opposite_direction_when_time_runs_backwards():
    labels = balanced_labels(16)
    clips = make_videos(5, labels, 6, 32, 48).flip(2)
    reversed_direction = labels // 4 * 4 + torch.tensor([1, 0, 3, 2])[labels % 4]
    assert [v.label for v in judge(clips)] == reversed_direction.tolist()


def test_the_judge_tells_squares_from_circles_of_the_same_motion():
    circles = make_videos(9, torch.tensor([0, 1, 2, 3]), 6, 32, 48)
    squares = make_videos(9, torch.tensor([4, 5, 6, 7]), 6, 32, 48)
    assert [v.label for v in judge(torch.cat([circles, squares]))] == list(range(NUM_CLASSES))


def test_the_judge_gives_no_verdict_without_shapes():
    grey = torch.full((2, 3, 6, 32, 48), -0.2)
    grey[1] += 0.05 * torch.randn(grey[1].shape, generator=torch.Generator().manual_seed(0))
    verdicts = judge(grey)
    assert [v.found for v in verdicts] == [False, False] and accuracy(grey, torch.tensor([0, 4])) == 0.0


def test_the_judge_gives_no_verdict_on_colourful_blobs():
    coarse = torch.rand((8, 3, 6, 4, 6), generator=torch.Generator().manual_seed(2)) * 2 - 1
    blobs = torch.nn.functional.interpolate(coarse, size=(6, 32, 48), mode="trilinear")
    assert not any(v.found for v in judge(blobs))


def test_the_judge_tolerates_pixel_noise():
    labels = balanced_labels(32)
    clips = make_videos(3, labels, 6, 32, 48)
    noisy = clips + 0.1 * torch.randn(clips.shape, generator=torch.Generator().manual_seed(1))
    assert accuracy(noisy, labels) >= 0.9


def test_shape_pixels_are_the_saturated_ones():
    clips = make_videos(2, balanced_labels(8), 4, 32, 48)
    mask = shape_mask(clips)
    background = ~shape_mask(clips * 0 + clips.mean(1, keepdim=True))  # grey version: no chroma anywhere
    assert background.all() and 0.05 < mask.float().mean() < 0.4


def test_connected_components_join_diagonal_neighbours_and_separate_gaps():
    mask = torch.zeros(1, 6, 6, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 1, 1] = True  # diagonal pair: one component
    mask[0, 4, 4] = mask[0, 4, 5] = True  # a separate pair
    ids = connected_components(mask)[0]
    assert ids[0, 0] == ids[1, 1] and ids[4, 4] == ids[4, 5] and ids[0, 0] != ids[4, 4]
    assert (ids[~mask[0]] == 0).all()


def test_judge_rejects_clips_of_the_wrong_layout():
    with pytest.raises(ValueError, match=r"\(N, 3, F, H, W\)"):
        judge(torch.zeros(3, 6, 32, 48))


class _ReplayModel(torch.nn.Module):
    """A 'model' whose flow-matching velocity leads to the ground-truth clip of a class (``shift``: a wrong one)."""

    def __init__(self, frames: int, height: int, width: int, shift: int = 0) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.size, self.shift = (frames, height, width), shift

    def forward(self, hidden_states, timestep, encoder_hidden_states):
        table = class_embeddings(torch.arange(NUM_CLASSES))
        labels = (encoder_hidden_states[:, None] == table[None]).flatten(2).all(-1).int().argmax(1)
        target = make_videos(0, (labels + self.shift) % NUM_CLASSES, *self.size)
        sigma = timestep.view(-1, 1, 1, 1, 1) / 1000
        return type("Output", (), {"sample": (hidden_states - target) / sigma})


@pytest.mark.parametrize("shift, expected", [(0, 1.0), (1, 0.0)], ids=["right-class", "wrong-class"])
def test_score_generation_judges_every_class_of_the_generated_clips(shift, expected):
    score = score_generation(_ReplayModel(6, 32, 48, shift), 6, 32, 48, steps=2, clips=16, batch=8, guidance=1.0)
    assert score.accuracy == expected and score.clips == 16 and len(score.per_class) == NUM_CLASSES
    assert score.correct == [expected == 1.0] * 16


def test_clips_gained_and_lost_count_the_clips_only_one_side_reads_right():
    assert clips_gained_and_lost([True, False, True, False], [True, True, False, False]) == (1, 1)
    assert clips_gained_and_lost([False, False], [True, True]) == (0, 2)
    with pytest.raises(ValueError, match="same clips"):
        clips_gained_and_lost([True], [True, False])


def test_generate_clips_runs_the_between_batches_hook_before_every_batch_but_the_first():
    hook_calls = []
    videos = generate_clips(_ReplayModel(6, 32, 48), 6, 32, 48, steps=1, clips=12, batch=4, guidance=1.0,
                            between_batches=lambda: hook_calls.append(1))
    assert len(hook_calls) == 2 and videos.shape == (12, 3, 6, 32, 48)
