"""``method="auto"``: exact candidate recalls, the break-even guard, and per-head choices."""

from __future__ import annotations

import pytest
import torch

from method_calls import method_call
from sparse_compile.kernels.block_select import attention_lse
from sparse_compile.methods import adaspa_search, base
from sparse_compile.methods.adaspa_search import normalised_mass
from sparse_compile.methods.auto import AutoMethod, Choice, block_kept_keys, check_rows, sampled_recall
from sparse_compile.methods.auto_choice import GUARD, TOP_P, candidate_recall, choose_heads, masks_to_layout, top_p_blocks
from sparse_compile.methods.auto_patterns import static_candidates
from sparse_compile.methods.base import SiteCache, TokenLayout
from sparse_compile.methods.cost_model import NOMINAL_COSTS, nominal_cluster_costs
from sparse_compile.options import validate_options
from sparse_compile.registry import METHODS
from sparse_compile.runtime.session import SiteState

FRAMES, HEIGHT, WIDTH, BLOCK, DIM = 8, 8, 16, 32, 32
POSITIONS = HEIGHT * WIDTH
SEQ = FRAMES * POSITIONS
LAYOUT = TokenLayout(FRAMES, HEIGHT, WIDTH, 0, False)
SHARPNESS = 9.5  # feature length: same-group logits ~ 16 above the rest at scale 1/sqrt(32)


def _choice(cache: SiteCache) -> Choice:
    """The choice cached for CFG branch 0."""
    return cache.entries()[(Choice, 0)]


def _one_hot_features(groups: torch.Tensor) -> torch.Tensor:
    """``(SEQ, DIM)`` features equal within a group and orthogonal between groups."""
    return torch.nn.functional.one_hot(groups, DIM).float() * SHARPNESS


def synthetic_heads() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(1, 3, SEQ, DIM)``: head 0 attends its own frame, head 1 the same position group
    (32 raster positions) in every frame, head 2 every key alike."""
    token = torch.arange(SEQ)
    frame, position = token // POSITIONS, token % POSITIONS
    spatial = _one_hot_features(frame)
    temporal = _one_hot_features(position // BLOCK)
    uniform = torch.zeros(SEQ, DIM)
    qk = torch.stack([spatial, temporal, uniform]).unsqueeze(0)
    v = torch.randn(1, 3, SEQ, DIM, generator=torch.Generator().manual_seed(0))
    return qk, qk.clone(), v


def _token_mask(block_mask: torch.Tensor) -> torch.Tensor:
    """Block keep-mask ``(..., N, N)`` -> token keep-mask ``(..., SEQ, SEQ)``."""
    blocks = torch.arange(SEQ) // BLOCK
    return block_mask[..., blocks, :][..., blocks]


def _exact_recall(q: torch.Tensor, k: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean over query rows of the softmax mass on kept keys, ``(B, H)``, from full attention."""
    probs = (q @ k.transpose(-1, -2) * DIM**-0.5).softmax(dim=-1)
    return (probs * token_mask).sum(dim=-1).mean(dim=-1)


def _masses(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    scale = DIM**-0.5
    return normalised_mass(q, k, attention_lse(q, k, scale), BLOCK, scale)


def test_every_candidates_recall_equals_the_exact_recall_of_full_attention():
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 3, SEQ, DIM, generator=gen) * 2 for _ in range(2))
    candidates = static_candidates(FRAMES, HEIGHT, WIDTH, BLOCK, torch.device("cpu"))
    estimated = candidate_recall(_masses(q, k), candidates)
    for c, name in enumerate(candidates.names):
        exact = _exact_recall(q, k, _token_mask(candidates.masks[c]))
        torch.testing.assert_close(estimated[..., c], exact, atol=0.02, rtol=0, msg=name)


def test_top_p_blocks_reach_the_target_in_every_row_and_report_their_exact_recall():
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(1, 2, SEQ, DIM, generator=gen) * 2 for _ in range(2))
    mass = _masses(q, k)
    sizes = static_candidates(FRAMES, HEIGHT, WIDTH, BLOCK, torch.device("cpu")).block_sizes
    masks, recall = top_p_blocks(mass, 0.9, sizes.float() / SEQ)
    assert bool(((mass * masks).sum(dim=-1) >= 0.9 - 1e-5).all())
    torch.testing.assert_close(recall, _exact_recall(q, k, _token_mask(masks)), atol=0.02, rtol=0)
    assert bool((masks.sum(dim=-1) < mass.shape[-1]).any()), "random attention still leaves blocks out"


def test_auto_chooses_spatial_temporal_and_dense_per_head():
    q, k, _ = synthetic_heads()
    candidates = static_candidates(FRAMES, HEIGHT, WIDTH, BLOCK, torch.device("cpu"))
    choice = choose_heads(_masses(q, k), candidates, 0.95, NOMINAL_COSTS.break_even_density)
    names = (*candidates.names, TOP_P, GUARD)
    assert [names[i] for i in choice.labels[0].tolist()] == ["spatial 0", "temporal 0", GUARD]
    assert bool((choice.recall >= 0.95).all())
    assert bool(choice.masks[0, 2].all()), "a guarded head computes every block"


def test_the_guard_sends_a_uniform_head_dense():
    q = torch.zeros(1, 1, SEQ, DIM)
    candidates = static_candidates(FRAMES, HEIGHT, WIDTH, BLOCK, torch.device("cpu"))
    choice = choose_heads(_masses(q, q), candidates, 0.95, NOMINAL_COSTS.break_even_density)
    assert choice.labels.tolist() == [[len(candidates.names) + 1]]
    assert float(choice.kept_pairs) == SEQ**2


@pytest.mark.parametrize("heads_per_pass", [1, 3])
def test_layout_lists_each_rows_kept_blocks_ascending(monkeypatch, heads_per_pass):
    monkeypatch.setattr(adaspa_search, "_CHUNK_ENTRIES", heads_per_pass * 2 * 10 * 10)  # batch 2
    masks = torch.rand(2, 3, 10, 10, generator=torch.Generator().manual_seed(3)) < 0.3
    masks |= torch.eye(10, dtype=torch.bool)
    counts, indices = masks_to_layout(masks)
    for b, h, i in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(10)).tolist():
        kept = masks[b, h, i].nonzero().flatten().tolist()
        assert counts[b, h, i] == len(kept)
        assert indices[b, h, i, : len(kept)].tolist() == kept
        assert not indices[b, h, i, len(kept):].any()


def test_sampled_recall_is_exact_on_the_sampled_rows():
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, SEQ, DIM, generator=gen) * 2 for _ in range(2))
    masks = torch.rand(1, 2, SEQ // BLOCK, SEQ // BLOCK, generator=gen) < 0.4
    counts, indices = masks_to_layout(masks)
    rows = check_rows(SEQ, step=3)
    exact = _exact_recall(q[:, :, rows], k, _token_mask(masks)[:, :, rows])
    kept = block_kept_keys(counts, indices, BLOCK, SEQ, rows)
    torch.testing.assert_close(sampled_recall(q, k, DIM**-0.5, rows, kept), exact)


def _auto(**options) -> AutoMethod:
    return AutoMethod(validate_options({"method": "auto", "block": BLOCK, **options}))


def _layout_token_mask(choice, heads: int) -> torch.Tensor:
    """Token keep-mask ``(B, heads, SEQ, SEQ)`` of a choice: its layout on sparse heads, all keys on dense ones."""
    n = SEQ // BLOCK
    device = choice.counts.device
    kept = torch.arange(choice.indices.shape[-1], device=device) < choice.counts.unsqueeze(-1).long()
    sparse = torch.zeros(*choice.counts.shape, n + 1, dtype=torch.bool, device=device)
    sparse.scatter_(-1, torch.where(kept, choice.indices.long(), n), True)
    block_mask = torch.ones(sparse.shape[0], heads, n, n, dtype=torch.bool, device=device)
    block_mask[:, choice.block_heads] = sparse[..., :n]
    blocks = torch.arange(SEQ, device=device) // BLOCK
    return block_mask[..., blocks, :][..., blocks]


def test_auto_computes_the_chosen_layout_exactly_and_keeps_the_recall():
    q, k, v = synthetic_heads()
    state = SiteCache()
    result = _auto().attend(method_call(q, k, v, LAYOUT, state))
    choice = _choice(state)
    assert choice.block_heads.tolist() == [0, 1] and choice.dense_heads.tolist() == [2]
    token_mask = _layout_token_mask(choice, 3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
    torch.testing.assert_close(result.output, expected, atol=1e-5, rtol=1e-5)
    assert float(_exact_recall(q, k, token_mask).min()) >= 0.95
    assert 0 < float(result.kept_density) < 1
    assert bool(torch.isinf(result.video_lse[:, 2]).all()), "the dense head reads as recall 1"


def test_joint_attention_keeps_text_dense_and_honours_the_key_padding_mask():
    q, k, v = synthetic_heads()
    text = 16
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.cat([t, torch.randn(1, 3, text, DIM, generator=gen)], dim=2) for t in (q, k, v))
    padding = torch.ones(1, 1, 1, SEQ + text, dtype=torch.bool)
    padding[..., -4:] = False
    state = SiteCache()
    layout = TokenLayout(FRAMES, HEIGHT, WIDTH, text, False)
    result = _auto().attend(method_call(q, k, v, layout, state, mask=padding))
    token_mask = torch.ones(1, 3, SEQ + text, SEQ + text, dtype=torch.bool)
    token_mask[..., :SEQ, :SEQ] = _layout_token_mask(_choice(state), 3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=token_mask & padding)
    torch.testing.assert_close(result.output, expected, atol=1e-5, rtol=1e-5)


def test_auto_runs_dense_sdpa_when_no_head_can_win():
    q = torch.zeros(1, 2, SEQ, DIM)
    v = torch.randn(1, 2, SEQ, DIM)
    result = _auto().attend(method_call(q, q, v, LAYOUT))
    assert result.kept_density == 1.0 and result.video_lse is None
    torch.testing.assert_close(result.output, torch.nn.functional.scaled_dot_product_attention(q, q, v))


def test_one_sparse_head_among_many_dense_ones_leaves_the_whole_call_dense():
    q, k, v = synthetic_heads()
    uniform = [2] * 7
    few, many = ([0, *uniform], [0, 1, 0, 1, 0, 1, 2, 2])  # 1 / 6 of 8 heads could run sparse
    states = SiteCache(), SiteCache()
    for heads, state in zip((few, many), states):
        _auto().attend(method_call(q[:, heads], k[:, heads], v[:, heads], LAYOUT, state))
    assert _choice(states[0]).dense, "saving on 1 of 8 heads does not pay for splitting the call"
    assert not _choice(states[1]).dense and _choice(states[1]).dense_heads.tolist() == [6, 7]


def test_a_site_that_chose_dense_skips_the_input_checks_until_it_chooses_again(monkeypatch):
    q = torch.zeros(1, 2, SEQ, DIM)
    v = torch.randn(1, 2, SEQ, DIM)
    method, state = _auto(), SiteCache()
    method.attend(method_call(q, q, v, LAYOUT, state, step=0))
    assert _choice(state).dense

    def no_check(*args):
        raise AssertionError("the finiteness check reads the device")

    monkeypatch.setattr(base, "input_checks", no_check)
    result = method.attend(method_call(q, q, v, LAYOUT, state, step=1))
    assert result.guarded_heads == (0, 1)
    torch.testing.assert_close(result.output, torch.nn.functional.scaled_dot_product_attention(q, q, v))


class UnreadableHeads(torch.Tensor):
    """Head indices whose values the host must not read (on a GPU that waits for every queued kernel)."""

    def tolist(self):
        raise AssertionError("the head indices were read back from the device")


def test_a_call_split_into_sparse_and_dense_heads_reports_its_dense_heads_from_the_host():
    q, k, v = synthetic_heads()
    sparse, dense = (torch.tensor(ids).as_subclass(UnreadableHeads) for ids in ([1, 2], [0]))  # 3 heads

    def exact(q, k, v):
        return (*base.attention_over_keys(q, k, v, None, q.shape[-1] ** -0.5), 1.0)

    result = base.attend_split_heads(method_call(q, k, v, LAYOUT), sparse, dense, (0,), exact)
    assert result.guarded_heads == (0,) and float(result.kept_density) == 1.0
    torch.testing.assert_close(result.output, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_a_choice_is_reused_until_its_recall_check_fails():
    q, k, v = synthetic_heads()
    method, state = _auto(recheck_every=2), SiteCache()
    method.attend(method_call(q, k, v, LAYOUT, state, step=0))
    first = _choice(state)
    method.attend(method_call(q, k, v, LAYOUT, state, step=2))
    assert _choice(state) is first, "recall still holds at the check"
    swapped = q[:, [1, 0, 2]]  # the spatial and temporal heads trade places
    method.attend(method_call(swapped, swapped, v, LAYOUT, state, step=3))
    assert _choice(state) is first, "no check between scheduled steps"
    method.attend(method_call(swapped, swapped, v, LAYOUT, state, step=4))
    assert _choice(state).head_labels[0][:2] == ("temporal 0", "spatial 0")


def test_another_batch_size_chooses_anew():
    q, k, v = synthetic_heads()
    method, state = _auto(), SiteCache()
    method.attend(method_call(q, k, v, LAYOUT, state))
    first = _choice(state)
    doubled = [torch.cat([t, t]) for t in (q, k, v)]
    method.attend(method_call(*doubled, LAYOUT, state))
    assert _choice(state) is not first and _choice(state).head_labels == first.head_labels * 2


def test_head_runs_count_sparse_guard_and_warmup_calls():
    q, k, v = synthetic_heads()
    method = AutoMethod(validate_options({"method": "auto", "block": BLOCK, "dense_steps": 1}))
    state = SiteState()
    for step in (0, 1):
        state.record("blocks.0.attn1", step, method.run(method_call(q, k, v, LAYOUT, state.cache, step=step)))
    runs = state.head_runs
    assert (runs.sparse, runs.guard, runs.warmup) == ([1, 1, 0], [0, 0, 1], [1, 1, 1])


@pytest.mark.parametrize("method_name, options", [("radial", {"block": 32}), ("adaspa", {"density": 0.9, "block": 32}),
                                                   ("svg", {"density": 0.9, "block": 32})])
def test_the_guard_runs_a_single_method_dense_past_break_even(monkeypatch, method_name, options):
    q, k, v = synthetic_heads()
    method = METHODS[method_name](validate_options({"method": method_name, **options}))
    call = method_call(q, k, v, LAYOUT)
    assert method.predicted_density(call) > NOMINAL_COSTS.break_even_density
    assert method.attend(call).guarded_heads == (), "no guard where costs are not measured"
    monkeypatch.setattr(base, "guard_costs", lambda *args: NOMINAL_COSTS)
    result = method.attend(call)
    assert result.guarded_heads == (0, 1, 2) and result.kept_density == 1.0
    torch.testing.assert_close(result.output, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    unguarded = METHODS[method_name](validate_options({"method": method_name, "break_even_guard": False, **options}))
    assert unguarded.attend(call).guarded_heads == () and unguarded.attend(call).kept_density < 1.0


def test_a_head_with_an_infinite_key_runs_dense_and_gives_what_dense_gives():
    q, k, v = synthetic_heads()
    k = k.clone()
    k[0, 0, 5, 0] = torch.inf  # the spatial head: rows of frame 0 see it, the others would not
    result = _auto().attend(method_call(q, k, v, LAYOUT))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert result.fallback_reason == "key holds NaN or Inf (dense attention defines the result)"
    assert torch.equal(torch.isnan(result.output), torch.isnan(expected)) and bool(torch.isnan(expected).any())


@pytest.mark.parametrize("option, value", [("recall", 0.0), ("recall", 1.5), ("block", 48), ("recheck_every", 0),
                                           ("break_even_guard", 1)])
def test_bad_options_name_the_option(option, value):
    with pytest.raises(ValueError, match=option):
        validate_options({"method": "auto", option: value})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_the_gpu_matches_masked_sdpa_on_its_layout_in_bf16(monkeypatch):
    from sparse_compile.methods import auto

    monkeypatch.setattr(auto, "kernel_costs", lambda *args: NOMINAL_COSTS)  # this tiny call would run dense
    monkeypatch.setattr(auto, "cluster_costs", lambda device, dtype, head_dim, *counts: nominal_cluster_costs(*counts))
    q, k, v = (t.cuda().bfloat16() for t in synthetic_heads())
    state = SiteCache()
    result = _auto().attend(method_call(q, k, v, LAYOUT, state))
    choice = _choice(state)
    assert choice.head_labels[0] == ("spatial 0", "temporal 0", GUARD)
    token_mask = _layout_token_mask(choice, 3)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=token_mask)
    error = (result.output.float() - expected).norm() / expected.norm()
    assert torch.isfinite(result.output).all() and float(error) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_measured_cost_model_is_positive_and_puts_break_even_below_dense():
    from sparse_compile.methods.cost_model import kernel_costs

    costs = kernel_costs(torch.device("cuda"), torch.bfloat16, 128, 64)
    assert costs.pair_time > 0 and costs.dense_pair_time > 0 and costs.launch >= 0
    assert 0.3 < costs.break_even_density < 1.2


def test_a_compiled_model_without_a_method_runs_auto_and_reports_guarded_heads():
    import tiny_models

    import sparse_compile
    from sparse_compile.report import GUARDED

    model, inputs, _ = tiny_models.wan(frames=4, height=16, width=16, layers=1)  # 256 tokens, heads of 16
    compiled = torch.compile(model, backend="sparse_video", options={"min_seq_len": 16, "block": 32, "recall": 0.99})
    with torch.no_grad():
        out = compiled(**inputs).sample
        expected = model(**inputs).sample
    site = sparse_compile.report(compiled).rewritten[0]
    assert site.method == "auto"
    runs = site.head_runs  # near-uniform attention of random weights: every head dense by the guard
    assert (runs.sparse, runs.guard, runs.warmup) == ([0, 0], [1, 1], [0, 0])
    assert site.status == GUARDED
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
