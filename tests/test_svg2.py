"""method="svg2": k-means clusters of Q and K, top-p cluster pairs, cluster kernel, cached centroids."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

import sparse_compile
import tiny_models
from method_calls import method_call, record_kernel_calls
from sparse_compile.kernels.block_select import kept_kv_tokens, pooled_block_scores, select_top_p
from sparse_compile.kernels.kmeans import kmeans
from sparse_compile.methods import svg2 as svg2_module
from sparse_compile.methods.base import SiteCache, TokenLayout
from sparse_compile.methods.cost_model import NOMINAL_COSTS
from sparse_compile.methods.svg2 import CachedClusters, Svg2Method, kept_pair_fraction
from sparse_compile.options import validate_options
from test_auto import LAYOUT as GUARD_LAYOUT
from test_auto import synthetic_heads


def _method(**params) -> Svg2Method:
    return Svg2Method(validate_options({"method": "svg2", **params}))


_call = method_call


def _qkv(seq, heads=2, dim=16, batch=1, dtype=torch.float32):
    return (torch.randn(batch, heads, seq, dim, dtype=dtype) for _ in range(3))


def _token_mask(q, k, params, iters):
    """The boolean (query, key) mask SVG2 keeps, recomputed independently: (B, H, S, S)."""
    scale = q.shape[-1] ** -0.5
    stride = round(1 / params["kmeans_sample"])
    cq = kmeans(q, params["q_clusters"], iters, None, seed=0, sample_stride=stride)
    ck = kmeans(k, params["k_clusters"], iters, None, seed=1, sample_stride=stride)
    probs = pooled_block_scores(cq.centroids, ck.centroids, ck.sizes, scale)
    min_blocks = max(math.ceil(params["min_kc_ratio"] * probs.shape[-1]), 1)
    counts, indices = select_top_p(probs, params["top_p"], min_blocks=min_blocks)
    valid = torch.arange(indices.shape[-1]) < counts.unsqueeze(-1)
    pair_kept = torch.zeros(probs.shape, dtype=torch.int32).scatter_add_(-1, indices.long(), valid.int()) > 0
    q_lab, k_lab = cq.labels.long(), ck.labels.long()
    rows = torch.gather(pair_kept, 2, q_lab.unsqueeze(-1).expand(-1, -1, -1, pair_kept.shape[-1]))
    return torch.gather(rows, 3, k_lab.unsqueeze(2).expand(-1, -1, q.shape[2], -1))


@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_output_equals_attention_under_the_kept_cluster_pairs(top_p):
    torch.manual_seed(0)
    params = dict(q_clusters=6, k_clusters=10, top_p=top_p, min_kc_ratio=0.1, kmeans_iters_init=5, kmeans_sample=0.25)
    layout = TokenLayout(frames=3, height=5, width=7, text_tokens=0, text_first=False)
    q, k, v = _qkv(layout.video_tokens)
    result = _method(**params).attend(_call(q, k, v, layout))
    mask = _token_mask(q, k, params, iters=5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.isfinite(result.output).all()
    assert ((result.output - expected).norm() / expected.norm()).item() <= 1e-4
    assert float(result.kept_density) == pytest.approx(mask.float().mean().item(), rel=1e-6)
    assert float(result.kept_density) < 1.0


@pytest.mark.parametrize("text_first", [True, False])
def test_keeping_every_pair_equals_dense_attention_with_text(text_first):
    torch.manual_seed(1)
    layout = TokenLayout(frames=2, height=4, width=6, text_tokens=5, text_first=text_first)
    q, k, v = _qkv(layout.video_tokens + 5)
    result = _method(q_clusters=4, k_clusters=8, top_p=1.0, min_kc_ratio=1.0).attend(_call(q, k, v, layout))
    expected = F.scaled_dot_product_attention(q, k, v)
    assert ((result.output - expected).norm() / expected.norm()).item() <= 1e-5
    assert float(result.kept_density) == pytest.approx(1.0)


def test_centroids_are_cached_per_branch_and_warm_start_the_next_step(monkeypatch):
    iterations = []
    real_kmeans = svg2_module.kmeans

    def spy(x, n, iters, init=None, **kwargs):
        iterations.append((iters, init is not None or kwargs.get("reuse") is not None))
        return real_kmeans(x, n, iters, init, **kwargs)

    monkeypatch.setattr(svg2_module, "kmeans", spy)
    torch.manual_seed(2)
    layout = TokenLayout(frames=2, height=4, width=4, text_tokens=0, text_first=False)
    q, k, v = _qkv(layout.video_tokens)
    method, state = _method(q_clusters=4, k_clusters=6, kmeans_iters_init=7, kmeans_iters_step=2), SiteCache()
    method.attend(_call(q, k, v, layout, state, branch=0))
    method.attend(_call(q, k, v, layout, state, branch=1))
    method.attend(_call(q, k, v, layout, state, branch=0))
    assert iterations == [(7, False), (7, False), (7, False), (7, False), (2, True), (2, True)]
    assert set(state.entries()) == {(CachedClusters, 0), (CachedClusters, 1)}


def test_dense_steps_cluster_already_so_the_first_sparse_step_is_warm(monkeypatch):
    iterations = []
    real_kmeans = svg2_module.kmeans
    monkeypatch.setattr(svg2_module, "kmeans",
                        lambda x, n, iters, init=None, **kw: iterations.append(iters) or real_kmeans(x, n, iters, init, **kw))
    layout = TokenLayout(frames=2, height=4, width=4, text_tokens=0, text_first=False)
    q, k, v = _qkv(layout.video_tokens)
    method, state = _method(q_clusters=4, k_clusters=6, kmeans_iters_init=9, kmeans_iters_step=1), SiteCache()
    method.observe_dense(_call(q, k, v, layout, state))
    method.attend(_call(q, k, v, layout, state))
    assert iterations == [9, 9, 1, 1]
    iterations.clear()
    _method(kmeans_during_dense=False).observe_dense(_call(q, k, v, layout, SiteCache()))
    assert iterations == []


def test_the_reuse_rule_keeps_the_clusters_of_tokens_that_stay_and_reclusters_tokens_that_move():
    torch.manual_seed(3)
    layout = TokenLayout(frames=2, height=4, width=4, text_tokens=0, text_first=False)
    q, k, v = _qkv(layout.video_tokens, heads=3)
    method, state = _method(q_clusters=4, k_clusters=6, kmeans_reuse=0.2), SiteCache()
    method.attend(_call(q, k, v, layout, state))
    first = state.entries()[(CachedClusters, 0)]
    method.attend(_call(q + 1e-4 * torch.randn_like(q), k, v, layout, state))  # the tokens stay
    kept = state.entries()[(CachedClusters, 0)]
    assert kept.query.settled.all() and kept.key.settled.all()
    for field in ("centroids", "labels", "sizes", "ranks"):
        assert torch.equal(getattr(kept.query, field), getattr(first.query, field))
    moved = q.clone()
    moved[:, 1] = q[:, 1, torch.randperm(q.shape[2])]  # head 1's tokens change places
    method.attend(_call(moved, k, v, layout, state))
    after = state.entries()[(CachedClusters, 0)]
    assert after.query.settled.tolist() == [[True, False, True]] and after.key.settled.all()
    assert not torch.equal(after.query.labels[:, 1], first.query.labels[:, 1])


def test_without_the_reuse_rule_every_warm_call_reclusters():
    layout = TokenLayout(frames=2, height=4, width=4, text_tokens=0, text_first=False)
    q, k, v = _qkv(layout.video_tokens)
    method, state = _method(q_clusters=4, k_clusters=6, kmeans_reuse=0.0), SiteCache()
    for _ in range(2):
        method.attend(_call(q, k, v, layout, state))
    assert state.entries()[(CachedClusters, 0)].query.settled is None


def test_the_same_calls_from_an_empty_cache_give_bit_identical_outputs_with_reuse_and_subsample():
    """A generation starts from an empty site cache (the backend clears it; test_reproducibility runs
    whole generations): the same calls then give the same outputs, reused heads included."""
    torch.manual_seed(4)
    layout = TokenLayout(frames=2, height=4, width=4, text_tokens=0, text_first=False)
    q, k, v = _qkv(layout.video_tokens, heads=3)
    steps = [(q, k), (q + 1e-4, k), (q.flip(2), k.flip(2))]  # cold, reused, re-clustered
    method = _method(q_clusters=4, k_clusters=6, kmeans_iters_init=4, kmeans_iters_step=2, kmeans_sample=0.5,
                     kmeans_reuse=0.2)

    def generation() -> list[torch.Tensor]:
        state = SiteCache()
        return [method.attend(_call(sq, sk, v, layout, state)).output for sq, sk in steps]

    first, second = generation(), generation()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_identical_and_zero_tokens_stay_finite():
    layout = TokenLayout(frames=2, height=3, width=3, text_tokens=0, text_first=False)
    q = torch.zeros(1, 2, 18, 8)
    k = torch.ones(1, 2, 18, 8)
    v = torch.randn(1, 2, 18, 8)
    result = _method(q_clusters=4, k_clusters=5).attend(_call(q, k, v, layout))
    assert torch.isfinite(result.output).all()
    torch.testing.assert_close(result.output, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("break_even, sparse_heads", [(NOMINAL_COSTS.break_even_density, 2), (1e3, 3)],
                         ids=["uniform head guarded", "no head guarded"])  # fmt: skip
def test_the_guards_host_read_sizes_the_kernels_kept_rows(monkeypatch, break_even, sparse_heads):
    """The guard's one host read also gives the kernel the most keys a query cluster keeps and the kept
    keys of all query clusters of the heads it runs, with each cluster's kept keys: what a ragged
    kept-rows buffer needs. The CPU op checks them against the layout (an understated bound raises)."""
    monkeypatch.setattr(svg2_module, "cluster_guard_density", lambda *args: break_even)
    seen = record_kernel_calls(monkeypatch, svg2_module, "varlen_block_sparse_attention")
    q, k, v = synthetic_heads()
    result = _method(q_clusters=8, k_clusters=8, top_p=0.9).attend(_call(q, k, v, GUARD_LAYOUT))
    assert len(result.guarded_heads) == 3 - sparse_heads
    [(_, _, _, kwargs)] = seen
    kept = kwargs["kept_keys"]
    assert kept.shape == (1, sparse_heads, 8)
    assert kwargs["kept_rows_total"] == int(kept.long().sum()) > 0
    assert kwargs["max_kept_keys"] == int(kept.max())


def test_kept_pair_fraction_counts_cluster_sizes():
    q_sizes = torch.tensor([[[3, 1]]])
    k_sizes = torch.tensor([[[2, 2]]])
    counts = torch.tensor([[[1, 2]]], dtype=torch.int32)
    indices = torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32)
    kept_tokens = kept_kv_tokens(k_sizes, counts, indices)
    assert kept_tokens.tolist() == [[[2, 4]]]
    assert kept_pair_fraction(q_sizes, kept_tokens, seq=4).item() == pytest.approx((3 * 2 + 1 * 4) / 16)


@pytest.mark.parametrize("options, message", [
    ({"top_p": 0.0}, "'top_p' of method 'svg2' must be a number in \\(0, 1\\]"),
    ({"q_clusters": 0}, "'q_clusters' of method 'svg2' must be an int >= 1"),
    ({"min_kc_ratio": 2}, "'min_kc_ratio' of method 'svg2' must be a number in \\[0, 1\\]"),
    ({"kmeans_sample": 0}, "'kmeans_sample' of method 'svg2' must be a number in \\(0, 1\\]"),
    ({"kmeans_reuse": 1.5}, "'kmeans_reuse' of method 'svg2' must be a number in \\[0, 1\\]"),
    ({"kmeans_reuse": True}, "'kmeans_reuse' of method 'svg2' must be a number in \\[0, 1\\]"),
])
def test_bad_svg2_options(options, message):
    with pytest.raises(ValueError, match=message):
        validate_options({"method": "svg2", **options})


def test_svg2_options_are_refused_for_another_method():
    with pytest.raises(ValueError, match="'top_p' \\(an option of method \\['svg2'\\]\\) for method 'dense'"):
        validate_options({"method": "dense", "top_p": 0.9})


def test_end_to_end_on_a_wan_transformer():
    torch.manual_seed(0)
    model, inputs, expected = tiny_models.wan(frames=3, height=8, width=10)
    options = {"method": "svg2", "min_seq_len": 16, "q_clusters": 4, "k_clusters": 8, "top_p": 0.5,
               "kmeans_iters_init": 5, "dense_steps": 1}
    compiled = torch.compile(model, backend="sparse_video", options=options)
    with torch.no_grad():
        eager = model(**inputs).sample
        for t in (900, 700):
            out = compiled(**{**inputs, "timestep": torch.tensor([t])}).sample
    assert torch.isfinite(out).all()
    assert ((out - eager).norm() / eager.norm()).item() < 0.5
    for site in sparse_compile.report(compiled).rewritten:
        assert site.status == "sparse" and site.grid == expected.grid
        assert site.density_by_step[0] == 1.0 and site.density_by_step[1] < 1.0


def test_more_clusters_than_video_tokens_are_clamped_to_the_tokens_with_one_note(caplog):
    torch.manual_seed(5)
    layout = TokenLayout(frames=2, height=3, width=3, text_tokens=0, text_first=False)  # 18 video tokens
    q, k, v = _qkv(layout.video_tokens)
    method = _method(q_clusters=5000, k_clusters=20, top_p=1.0, min_kc_ratio=1.0)
    with caplog.at_level(logging.INFO, logger="sparse_compile"):
        results = [method.attend(_call(q, k, v, layout)) for _ in range(2)]
    note = "blocks.0.attn1 has 18 video tokens: svg2 uses q_clusters=18, k_clusters=18 (options: 5000, 20)"
    assert caplog.text.count(note) == 1
    # every key cluster kept: exact attention
    torch.testing.assert_close(results[-1].output, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_a_head_dim_the_cluster_kernel_cannot_take_runs_dense_with_the_reason():
    q, k, v = (torch.randn(1, 2, 64, 80) for _ in range(3))
    method = Svg2Method(validate_options({"method": "svg2", "q_clusters": 4, "k_clusters": 8}))
    result = method.attend(method_call(q, k, v, TokenLayout(4, 4, 4, 0, False)))
    assert "head dim 80" in result.fallback_reason
    torch.testing.assert_close(result.output, F.scaled_dot_product_attention(q, k, v))
