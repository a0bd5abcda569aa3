"""Property tests of the rewrite on random small attention graphs.

Whatever the layout, mask, scale, text placement or call style, the rewritten graph
computes what the original did; provable sites carry the true grid and text placement;
the rest keep their SDPA call and say why.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch._dynamo
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_compile.options import validate_options
from sparse_compile.passes import rewrite_attention
from sparse_compile.passes.sdpa_sites import SDPA_TARGETS
from sparse_compile.runtime.session import session_for_parameters


@dataclass(frozen=True)
class Case:
    batch: int
    frames: int
    height: int
    width: int
    heads: int
    head_dim: int
    tokens: str  # conv3d | patchify | packed
    text: str | None  # None | prefix | suffix
    text_len: int
    qkv_layout: str  # bhsd | fused_permute
    mask: str | None  # None | bool | float
    scale: float | None
    positional: bool
    causal: bool

    @property
    def provable(self) -> bool:
        return self.tokens != "packed" and not self.causal and self.mask != "float"


cases = st.builds(
    Case,
    batch=st.integers(1, 2),
    frames=st.integers(1, 3),
    height=st.integers(1, 4),
    width=st.integers(2, 4),
    heads=st.integers(1, 2),
    head_dim=st.sampled_from([4, 8]),
    tokens=st.sampled_from(["conv3d", "patchify", "packed"]),
    text=st.sampled_from([None, "prefix", "suffix"]),
    text_len=st.integers(1, 5),
    qkv_layout=st.sampled_from(["bhsd", "fused_permute"]),
    mask=st.sampled_from([None, "bool", "float"]),
    scale=st.sampled_from([None, 0.25]),
    positional=st.booleans(),
    causal=st.booleans(),
)


class RandomAttention(torch.nn.Module):
    """Tokens from a video (three ways), optional text joined, one SDPA call."""

    def __init__(self, case: Case):
        super().__init__()
        self.case = case
        channels = case.heads * case.head_dim
        self.conv = torch.nn.Conv3d(3, channels, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.patch_proj = torch.nn.Linear(4 * 3, channels)
        self.packed_proj = torch.nn.Linear(3, channels)
        self.qkv = torch.nn.Linear(channels, 3 * channels)

    def tokens(self, video: torch.Tensor) -> torch.Tensor:
        c = self.case
        if c.tokens == "conv3d":  # video (B, 3, T, 2H, 2W)
            return self.conv(video).flatten(2).transpose(1, 2)
        if c.tokens == "patchify":  # video (B, T, 2H, 2W, 3)
            b, t, h2, w2, ch = video.shape
            patches = video.reshape(b, t, h2 // 2, 2, w2 // 2, 2, ch).permute(0, 1, 2, 4, 3, 5, 6)
            return self.patch_proj(patches.flatten(4).flatten(1, 3))
        return self.packed_proj(video)  # video (B, S, 3): no grid in the graph

    def forward(self, video: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        c = self.case
        x = self.tokens(video)
        if c.text == "prefix":
            x = torch.cat([text, x], dim=1)
        elif c.text == "suffix":
            x = torch.cat([x, text], dim=1)
        b, s, _ = x.shape
        if c.qkv_layout == "bhsd":
            q, k, v = (t.view(b, s, c.heads, c.head_dim).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        else:
            q, k, v = self.qkv(x).unflatten(-1, (3, c.heads, c.head_dim)).permute(2, 0, 3, 1, 4)
        attn_mask = None if c.mask is None else mask
        if c.positional:
            return F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, c.causal, scale=c.scale)
        return F.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=attn_mask, is_causal=c.causal,
                                              scale=c.scale)


def _inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, t, h, w = case.batch, case.frames, case.height, case.width
    if case.tokens == "conv3d":
        video = torch.randn(b, 3, t, 2 * h, 2 * w)
    elif case.tokens == "patchify":
        video = torch.randn(b, t, 2 * h, 2 * w, 3)
    else:
        video = torch.randn(b, t * h * w, 3)
    text = torch.randn(b, case.text_len, case.heads * case.head_dim)
    seq = t * h * w + (case.text_len if case.text else 0)
    if case.mask == "float":
        mask = torch.randn(b, 1, 1, seq)
    else:
        mask = torch.rand(b, 1, 1, seq) > 0.3
        mask[..., 0] = True  # every query keeps at least one key
    return video, text, mask


def _rewrite_only(records: list):
    options = validate_options({"method": "recording", "min_seq_len": 1})

    def backend(gm: torch.fx.GraphModule, example_inputs):
        session = session_for_parameters(t for t in example_inputs if isinstance(t, torch.Tensor))
        records.extend(rewrite_attention(gm, options, session))
        records.append(sum(n.target in SDPA_TARGETS for n in gm.graph.nodes))
        return gm.forward

    return backend


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases)
def test_rewritten_graph_equals_original(case, recording_method):
    torch._dynamo.reset()
    recording_method.clear()
    torch.manual_seed(0)
    module = RandomAttention(case).eval()
    inputs = _inputs(case)
    records: list = []
    with torch.no_grad():
        expected = module(*inputs)
        got = torch.compile(module, backend=_rewrite_only(records), fullgraph=True)(*inputs)
    *sites, sdpa_left = records
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (site,) = sites
    if case.provable:
        assert site.status == "sparse", site.status
        assert site.facts.grid == (case.frames, case.height, case.width)
        assert site.facts.text_tokens == (case.text_len if case.text else 0)
        assert site.facts.text_position == case.text
        assert sdpa_left == 0
        assert len(recording_method) == 1
    else:
        assert site.status.startswith("dense: ")
        assert not site.rewritten and sdpa_left == 1
        assert recording_method == []
        if case.causal:
            assert "is_causal" in site.status
        elif case.mask == "float":
            assert "float attn_mask" in site.status
        else:
            assert "a plain token axis" in site.status and "grid=(frames, height, width)" in site.status
