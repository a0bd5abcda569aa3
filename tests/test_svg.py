"""method="svg": spatial/temporal block bands, the temporal layout transform (folded into the kernel),
online head profiling."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_compile
import tiny_models
from method_calls import assert_kernel_read_callers_qkv, method_call, record_kernel_calls, token_major_qkv
from sparse_compile.kernels.block_sparse import check_layout_values
from sparse_compile.kernels.block_sparse_reference import layout_to_dense_mask
from sparse_compile.kernels.common import attention_output_like
from sparse_compile.methods import svg as svg_module
from sparse_compile.methods.base import TokenLayout
from sparse_compile.methods.svg import SvgMethod
from sparse_compile.methods.svg_patterns import build_patterns, temporal_order, temporal_permutation
from sparse_compile.methods.svg_profile import classify_heads, pattern_errors, sample_rows
from sparse_compile.options import validate_options
from sparse_compile.methods.base import SiteCache
from sparse_compile.runtime.session import find_session

CPU = torch.device("cpu")


def _method(**params) -> SvgMethod:
    return SvgMethod(validate_options({"method": "svg", **params}))


_call = method_call


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ------------------------------------------------------------------------------------------
# An independent statement of the patterns: token rule, reduced to blocks by brute force (small sizes)
# ------------------------------------------------------------------------------------------


def _kernel_orders(frames: int, height: int, width: int) -> dict[str, list[int]]:
    """Frame-major token at each kernel slot: spatial = frame-major; temporal = first frame, then position-major."""
    positions = height * width
    temporal = list(range(positions)) + [t * positions + p for p in range(positions) for t in range(1, frames)]
    return {"spatial": list(range(frames * positions)), "temporal": temporal}


def _reference_block_mask(frames, height, width, block, kind, band) -> torch.Tensor:
    """Block keep-mask (NB, NB) in the kernel order of ``kind``: a block pair is kept if any token pair is."""
    positions = height * width
    order = torch.tensor(_kernel_orders(frames, height, width)[kind])
    coord = order // positions if kind == "spatial" else order % positions
    sink = order < positions
    token_keep = sink[None, :] | ((coord[:, None] - coord[None, :]).abs() <= band)
    nb = -(-order.numel() // block)
    blocks = torch.arange(order.numel()) // block
    keep = torch.zeros(nb, nb, dtype=torch.bool)
    keep.index_put_((blocks[:, None].expand_as(token_keep), blocks[None, :].expand_as(token_keep)), token_keep,
                    accumulate=True)
    return keep


def _reference_token_mask(frames, height, width, block, kind, band) -> torch.Tensor:
    """Frame-major token keep-mask (Sv, Sv) of one pattern."""
    order = torch.tensor(_kernel_orders(frames, height, width)[kind])
    keep = _reference_block_mask(frames, height, width, block, kind, band)
    slot_block = torch.arange(order.numel()) // block
    in_slots = keep[slot_block][:, slot_block]
    slot_of = torch.argsort(order)
    return in_slots[slot_of][:, slot_of]


def _token_fraction(block_mask: torch.Tensor, tokens: int, block: int) -> float:
    """Fraction of the token pairs a block mask (NB, NB) keeps, counted on the expanded token mask."""
    expanded = block_mask.repeat_interleave(block, 0).repeat_interleave(block, 1)[:tokens, :tokens]
    return expanded.double().mean().item()


def _method_mask(layout: TokenLayout, block: int, density: float, head_is_temporal: torch.Tensor) -> torch.Tensor:
    """Boolean (B, H, S, S) mask of what SVG keeps for a head choice, text rows and columns included."""
    patterns = build_patterns(layout.frames, layout.height, layout.width, block, density, CPU)
    video = {kind: _reference_token_mask(layout.frames, layout.height, layout.width, block, kind, pattern.width)
             for kind, pattern in (("spatial", patterns.spatial), ("temporal", patterns.temporal))}
    per_head = torch.where(head_is_temporal[..., None, None], video["temporal"], video["spatial"])
    n_text, n_video = layout.text_tokens, layout.video_tokens
    start = n_text if layout.text_first else 0
    full = torch.ones((*head_is_temporal.shape, n_video + n_text, n_video + n_text), dtype=torch.bool)
    full[..., start : start + n_video, start : start + n_video] = per_head
    return full


# ------------------------------------------------------------------------------------------
# Patterns and the layout transform
# ------------------------------------------------------------------------------------------


def test_temporal_order_puts_the_first_frame_first_then_positions():
    to_temporal, from_temporal = temporal_order(3, 1, 2)
    # frame-major tokens: (t, p) = (0,0) (0,1) (1,0) (1,1) (2,0) (2,1)
    assert to_temporal.tolist() == [0, 1, 2, 4, 3, 5]
    assert from_temporal.tolist() == [0, 1, 2, 4, 3, 5]


grids = st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8))


@settings(max_examples=40, deadline=None)
@given(grid=grids, block=st.sampled_from([16, 32]), density=st.floats(0.01, 1.0))
def test_patterns_are_valid_layouts_of_the_stated_band(grid, block, density):
    frames, height, width = grid
    patterns = build_patterns(frames, height, width, block, density, CPU)
    tokens = frames * height * width
    to_temporal, from_temporal = temporal_order(frames, height, width)
    assert patterns.to_temporal.dtype == torch.int32 and torch.equal(patterns.to_temporal.long(), to_temporal)
    assert torch.equal(torch.sort(to_temporal).values, torch.arange(tokens))
    assert torch.equal(to_temporal[from_temporal], torch.arange(tokens))
    assert torch.equal(from_temporal[to_temporal], torch.arange(tokens))
    rows = torch.arange(tokens)
    row_masks = dict(zip(("spatial", "temporal"), patterns.row_masks(rows)))
    for kind, pattern, max_width in (("spatial", patterns.spatial, frames - 1),
                                     ("temporal", patterns.temporal, height * width - 1)):
        nb = pattern.mask.shape[0]
        counts, indices = pattern.counts[None, None], pattern.indices[None, None]
        check_layout_values(counts, indices, nb)  # counts in range; ids ascending, unique, in [0, NB)
        assert pattern.mask.diagonal().all()  # own block kept
        assert torch.equal(pattern.mask, _reference_block_mask(frames, height, width, block, kind, pattern.width))
        dense = layout_to_dense_mask(counts, indices, tokens, tokens, block, block)[0, 0]
        expanded = pattern.mask.repeat_interleave(block, 0).repeat_interleave(block, 1)
        assert torch.equal(dense, expanded[:tokens, :tokens])
        assert pattern.kept == pytest.approx(dense.double().mean().item())
        # the widest band within the density (width 0 if even that is above it)
        assert pattern.width == 0 or pattern.kept <= density + 1e-9
        if pattern.width < max_width:
            wider = _reference_block_mask(frames, height, width, block, kind, pattern.width + 1)
            assert _token_fraction(wider, tokens, block) > density + 1e-9
        # the profiler's row masks are the kernel's token masks, in frame-major order
        expected = dense if kind == "spatial" else dense[from_temporal][:, from_temporal]
        assert torch.equal(row_masks[kind], expected)


@settings(max_examples=25, deadline=None)
@given(grid=grids, block=st.sampled_from([16, 32]), densities=st.lists(st.floats(0.01, 1.0), min_size=2, max_size=2))
def test_more_density_keeps_a_superset(grid, block, densities):
    low, high = sorted(densities)
    a, b = (build_patterns(*grid, block, d, CPU) for d in (low, high))
    for small, large in ((a.spatial, b.spatial), (a.temporal, b.temporal)):
        assert (small.mask <= large.mask).all() and small.kept <= large.kept


def test_density_moves_the_band_on_the_wan_480p_grid():
    kept = [build_patterns(21, 30, 52, 128, d, CPU) for d in (0.125, 0.25, 0.5, 1.0)]
    for kind in ("spatial", "temporal"):
        values = [getattr(p, kind).kept for p in kept]
        assert values == sorted(values) and len(set(values)) == 4 and values[-1] == 1.0
        assert all(v <= d for v, d in zip(values, (0.125, 0.25, 0.5, 1.0)))


def test_sampled_rows_are_distinct_spread_and_deterministic():
    rows = sample_rows(1000, 64, CPU)
    assert rows.numel() == 64 and torch.equal(rows, torch.unique(rows)) and rows.max() < 1000
    assert torch.equal(torch.bucketize(rows, torch.arange(1, 65) * 1000 // 64, right=True), torch.arange(64))
    assert torch.equal(sample_rows(10, 64, CPU), torch.arange(10))


# ------------------------------------------------------------------------------------------
# Profiling
# ------------------------------------------------------------------------------------------


def _structured_qk(layout: TokenLayout, temporal: torch.Tensor, dim: int = 16, strength: float = 1.5):
    """q = k = an embedding of the token's frame (spatial heads) or position (temporal heads), plus noise."""
    torch.manual_seed(3)
    positions = layout.height * layout.width
    token = torch.arange(layout.video_tokens)
    frame_emb = F.normalize(torch.randn(layout.frames, dim), dim=-1) * dim**0.5
    pos_emb = F.normalize(torch.randn(positions, dim), dim=-1) * dim**0.5
    structure = torch.where(temporal[..., None, None], pos_emb[token % positions], frame_emb[token // positions])
    q = strength * structure + 0.1 * torch.randn(*temporal.shape, layout.video_tokens, dim)
    return q, q.clone()


def test_profiling_tells_spatial_from_temporal_heads():
    layout = TokenLayout(frames=6, height=4, width=4, text_tokens=0, text_first=False)
    temporal = torch.tensor([[False, True, False, True], [True, True, False, False]])
    q, k = _structured_qk(layout, temporal)
    v = torch.randn_like(q)
    patterns = build_patterns(6, 4, 4, 16, 0.3, CPU)
    rows = sample_rows(layout.video_tokens, 64, CPU)
    assert torch.equal(classify_heads(q, k, v, patterns, rows, 0.25), temporal)
    errors = pattern_errors(q, k, v, patterns, rows, 0.25)
    chosen = torch.where(temporal, errors[..., 1], errors[..., 0])
    other = torch.where(temporal, errors[..., 0], errors[..., 1])
    assert (chosen * 10 < other).all()


def test_profiling_in_head_chunks_gives_the_same_errors(monkeypatch):
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 5, 96, 16) for _ in range(3))
    patterns = build_patterns(6, 4, 4, 16, 0.3, CPU)
    rows = sample_rows(96, 20, CPU)
    whole = pattern_errors(q, k, v, patterns, rows, 0.25)
    monkeypatch.setattr("sparse_compile.methods.svg_profile._SCORE_BUDGET", 2 * 20 * 96)  # 2 heads per chunk
    torch.testing.assert_close(pattern_errors(q, k, v, patterns, rows, 0.25), whole)
    spatial, temporal = patterns.row_masks(rows)
    for b, h in ((0, 0), (1, 4)):
        scores = q[b, h, rows] @ k[b, h].T * 0.25
        full = torch.softmax(scores, -1) @ v[b, h]
        for i, keep in enumerate((spatial, temporal)):
            masked = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v[b, h]
            assert whole[b, h, i].item() == pytest.approx((masked - full).square().mean().item(), rel=1e-4)


# ------------------------------------------------------------------------------------------
# The method against dense attention under the equivalent token mask
# ------------------------------------------------------------------------------------------

HEAD_CHOICES = {
    "spatial": torch.zeros(2, 3, dtype=torch.bool),
    "temporal": torch.ones(2, 3, dtype=torch.bool),
    "mixed": torch.tensor([[True, False, True], [False, False, True]]),
}


@pytest.mark.parametrize("storage", ["bhsd", "bshd"])
@pytest.mark.parametrize("heads", sorted(HEAD_CHOICES))
@pytest.mark.parametrize("text", [(0, False), (5, True), (5, False)], ids=["video", "text-prefix", "text-suffix"])
def test_method_equals_dense_attention_under_the_kept_token_mask(monkeypatch, heads, text, storage):
    choice = HEAD_CHOICES[heads]
    monkeypatch.setattr(svg_module, "classify_heads", lambda *args: choice)
    torch.manual_seed(5)
    layout = TokenLayout(frames=5, height=4, width=6, text_tokens=text[0], text_first=text[1])
    seq = layout.video_tokens + layout.text_tokens
    if storage == "bshd":
        q, k, v = token_major_qkv(2, 3, seq, 16)
    else:
        q, k, v = (torch.randn(2, 3, seq, 16) for _ in range(3))
    result = _method(block=16, density=0.3).attend(_call(q, k, v, layout))
    mask = _method_mask(layout, 16, 0.3, choice)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert _rel_l2(result.output, expected) <= 1e-4
    assert float(result.kept_density) == pytest.approx(mask.double().mean().item(), rel=1e-6)
    assert float(result.kept_density) < 1.0


def test_the_kernel_reads_the_callers_qkv_through_each_heads_permutation(monkeypatch):
    """The layout transform is folded into the kernel: it gets the caller's q, k, v (no gathered copy),
    temporal heads' q_perm = kv_perm is the temporal order and spatial heads' the identity, and the
    output comes back in the op's layout (no copy after the op)."""
    choice = torch.tensor([[True, False, True]])
    monkeypatch.setattr(svg_module, "classify_heads", lambda *args: choice)
    seen = record_kernel_calls(monkeypatch, svg_module, "block_sparse_attention")
    torch.manual_seed(9)
    layout = TokenLayout(frames=5, height=4, width=6, text_tokens=0, text_first=False)
    q, k, v = token_major_qkv(1, 3, layout.video_tokens, 16)
    result = _method(block=16, density=0.3).attend(_call(q, k, v, layout))
    [recorded] = seen
    kwargs = assert_kernel_read_callers_qkv(recorded, q, k, v)
    assert kwargs["q_perm"] is kwargs["kv_perm"]
    perm = kwargs["q_perm"]
    to_temporal, _ = temporal_order(5, 4, 6)
    assert perm.shape == (1, 3, 120) and perm.dtype == torch.int32
    assert torch.equal(perm[0, 0].long(), to_temporal) and torch.equal(perm[0, 2].long(), to_temporal)
    assert torch.equal(perm[0, 1].long(), torch.arange(120))
    assert result.output.stride() == attention_output_like(q, v).stride()


def test_the_temporal_permutation_is_built_once_per_grid_and_device():
    first = temporal_permutation(5, 4, 6, CPU)
    assert temporal_permutation(5, 4, 6, CPU) is first
    assert build_patterns(5, 4, 6, 16, 0.3, CPU).to_temporal is build_patterns(5, 4, 6, 32, 0.5, CPU).to_temporal
    assert first.dtype == torch.int32 and torch.equal(first.long(), temporal_order(5, 4, 6)[0])
    assert temporal_permutation(4, 5, 6, CPU) is not first


@pytest.mark.parametrize("text", [(0, False), (3, True)])
def test_density_one_is_dense_attention(text):
    torch.manual_seed(6)
    layout = TokenLayout(frames=3, height=5, width=7, text_tokens=text[0], text_first=text[1])
    seq = layout.video_tokens + layout.text_tokens
    q, k, v = (torch.randn(2, 2, seq, 32) for _ in range(3))
    result = _method(block=32, density=1.0).attend(_call(q, k, v, layout))
    assert _rel_l2(result.output, F.scaled_dot_product_attention(q, k, v)) <= 1e-5
    assert float(result.kept_density) == pytest.approx(1.0)


def test_profiles_per_cfg_branch_every_profile_every_steps(monkeypatch):
    profiled = []

    def spy(q, *args):
        profiled.append(q.shape[0])
        return classify_heads(q, *args)

    monkeypatch.setattr(svg_module, "classify_heads", spy)
    layout = TokenLayout(frames=3, height=4, width=4, text_tokens=0, text_first=False)
    q, k, v = (torch.randn(1, 2, 48, 16) for _ in range(3))
    method, state = _method(block=16, profile_every=2), SiteCache()
    seen = []
    for generation, step, branch in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1), (1, 0, 0)]:
        count = len(profiled)
        method.attend(_call(q, k, v, layout, state, step=step, branch=branch, generation=generation))
        seen.append(len(profiled) > count)
    assert seen == [True, True, False, False, True, True, True]
    plans = state.entries()
    assert set(plans) == {(svg_module.HeadPlan, 0), (svg_module.HeadPlan, 1)}
    assert (plans[(svg_module.HeadPlan, 0)].step, plans[(svg_module.HeadPlan, 1)].step) == (0, 2)


def test_unsupported_masks_and_head_dims_run_dense_with_the_reason():
    layout = TokenLayout(frames=2, height=4, width=4, text_tokens=0, text_first=False)
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    full_mask = torch.rand(1, 1, 32, 32) > 0.3
    full_mask[..., 0] = True
    method, state = _method(block=16), SiteCache()
    result = method.attend(_call(q, k, v, layout, state, mask=full_mask))
    small = method.attend(_call(*(torch.randn(1, 2, 32, 8) for _ in range(3)), layout))
    torch.testing.assert_close(result.output, F.scaled_dot_product_attention(q, k, v, attn_mask=full_mask))
    assert result.kept_density == 1.0 and small.kept_density == 1.0
    assert "not a key-padding mask" in result.fallback_reason and not state
    assert "head dim 8 is not one of the block kernels'" in small.fallback_reason


# ------------------------------------------------------------------------------------------
# Options and the backend end to end
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"density": 0.0}, "'density' of method 'svg' must be a number in \\(0, 1\\]"),
    ({"density": 1.5}, "'density' of method 'svg' must be a number in \\(0, 1\\]"),
    ({"block": 48}, "'block' of method 'svg' must be one of 16, 32, 64, 128"),
    ({"block": True}, "'block' of method 'svg' must be one of 16, 32, 64, 128"),
    ({"block": 16.0}, "'block' of method 'svg' must be one of 16, 32, 64, 128"),
    ({"profile_rows": 0}, "'profile_rows' of method 'svg' must be an int >= 1"),
    ({"profile_every": 0}, "'profile_every' of method 'svg' must be an int >= 1"),
])
def test_bad_svg_options(options, message):
    with pytest.raises(ValueError, match=message):
        validate_options({"method": "svg", **options})


def test_end_to_end_on_a_wan_transformer_with_cfg_as_two_calls():
    torch.manual_seed(0)
    model, inputs, expected = tiny_models.wan(frames=4, height=16, width=16)
    options = {"method": "svg", "min_seq_len": 16, "block": 16, "density": 0.25}
    compiled = torch.compile(model, backend="sparse_video", options=options)
    with torch.no_grad():
        eager = model(**inputs).sample
        for t in (900, 700):
            for _ in ("conditional", "unconditional"):
                out = compiled(**{**inputs, "timestep": torch.tensor([t])}).sample
    assert torch.isfinite(out).all()
    assert _rel_l2(out, eager) < 0.5
    sites = sparse_compile.report(compiled).rewritten
    assert len(sites) == expected.video_sites
    for site in sites:
        assert site.status == "sparse" and site.grid == expected.grid
        assert all(d < 1.0 for d in site.density_by_step.values()) and set(site.density_by_step) == {0, 1}
    states = find_session(model).site_states.values()
    plans = [s.cache.entries() for s in states if len(s.cache)]
    assert len(plans) == expected.video_sites
    head_plan = svg_module.HeadPlan
    for cache in plans:
        assert set(cache) == {(head_plan, 0), (head_plan, 1)}
        assert cache[(head_plan, 0)] is not cache[(head_plan, 1)] and cache[(head_plan, 1)].step == 1


@pytest.mark.gpu
def test_cuda_bf16_folded_layout_transform_equals_gathering_per_head():
    """Wan 480p (S = 32760, 12 heads, bf16, (B, S, H, D) storage), half the heads temporal: the method's
    output and LSE equal the kernel run on q, k, v gathered into each head's kernel order and scattered back."""
    choice = torch.tensor([[True, False] * 6], device="cuda")
    layout = TokenLayout(frames=21, height=30, width=52, text_tokens=0, text_first=False)
    torch.manual_seed(10)
    q, k, v = (torch.randn(1, layout.video_tokens, 12, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
               for _ in range(3))  # fmt: skip
    state = SiteCache()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(svg_module, "classify_heads", lambda *args: choice)
        result = _method().attend(_call(q, k, v, layout, state))
    plan = state.entries()[(svg_module.HeadPlan, 0)]
    index = plan.perm.long()[..., None].expand(-1, -1, -1, 128)
    gathered = [torch.gather(x, 2, index) for x in (q, k, v)]
    out, lse = svg_module.block_sparse_attention(*gathered, plan.counts, plan.indices, block_q=128, block_k=128,
                                                 return_lse=True)  # fmt: skip
    want_out = torch.empty_like(out).scatter_(2, index, out)
    want_lse = torch.empty_like(lse).scatter_(2, plan.perm.long(), lse)
    assert result.output.stride() == attention_output_like(q, v).stride()
    assert _rel_l2(result.output.float(), want_out.float()) <= 1e-2
    assert (result.video_lse - want_lse).abs().max().item() <= 1e-2
