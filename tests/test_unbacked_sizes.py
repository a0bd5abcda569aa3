"""Data-dependent (unbacked) sizes, as ``capture_scalar_outputs=True`` makes them: a layout or a
dense site with a reason, never a backend failure."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

import sparse_compile

OPTIONS = {"method": "recording", "min_seq_len": 16}


class _TrimmedText(torch.nn.Module):
    """Joint attention over video tokens and the text tokens the mask keeps (``mask.sum().item()``)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv3d(3, 8, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, video, text, mask):
        tokens = self.embed(video).flatten(2).transpose(1, 2)
        valid = int(mask.sum().item())
        joint = torch.cat([tokens, text[:, :valid]], dim=1)
        q, k, v = self.proj(joint).view(1, joint.shape[1], 2, 12).transpose(1, 2).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


class _TrimmedFrames(torch.nn.Module):
    """Video self-attention over the first ``frames.item()`` latent frames."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv3d(3, 8, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, video, frames):
        kept = int(frames.item())
        torch._check(kept >= 1)
        tokens = self.embed(video)[:, :, :kept].flatten(2).transpose(1, 2)
        q, k, v = self.proj(tokens).view(1, tokens.shape[1], 2, 12).transpose(1, 2).chunk(3, dim=-1)
        return F.scaled_dot_product_attention(q, k, v)


@pytest.fixture
def capture_scalars():
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        yield


def test_text_length_read_with_item_stays_a_joint_site(capture_scalars, recording_method):
    model = _TrimmedText()
    compiled = torch.compile(model, backend="sparse_video", options=OPTIONS)
    video, text = torch.randn(1, 3, 3, 8, 10), torch.randn(1, 6, 8)
    with torch.no_grad():
        for valid in (4, 5):
            mask = torch.tensor([1] * valid + [0] * (6 - valid))
            torch.testing.assert_close(compiled(video, text, mask), model(video, text, mask), rtol=0, atol=1e-5)
            assert recording_method[-1].text_tokens == valid
            assert recording_method[-1].grid == (3, 4, 5)
    [site] = sparse_compile.report(compiled).sites
    assert site.kind == "joint video+text attention" and site.text_position == "suffix"


def test_frame_count_read_with_item_keeps_a_symbolic_grid(capture_scalars, recording_method):
    model = _TrimmedFrames()
    compiled = torch.compile(model, backend="sparse_video", options=OPTIONS)
    video = torch.randn(1, 3, 4, 8, 10)
    with torch.no_grad():
        for frames in (3, 2):
            out = compiled(video, torch.tensor(frames))
            torch.testing.assert_close(out, model(video, torch.tensor(frames)), rtol=0, atol=1e-5)
            assert recording_method[-1].grid == (frames, 4, 5)
