"""SVG2's clusters as a candidate of ``method="auto"``: exact cluster-pair masses, the per-head choice by
cost, one cluster-kernel launch beside the block-sparse one, and the recall check of cluster heads."""

from __future__ import annotations

import pytest
import torch

from method_calls import method_call
from sparse_compile.kernels.block_select import attention_lse
from sparse_compile.kernels.kmeans import cluster_permutation, kmeans
from sparse_compile.kernels.varlen_block_sparse import check_varlen_layout_values
from sparse_compile.kernels.varlen_block_sparse_reference import VarlenLayout
from sparse_compile.methods import auto, auto_clusters
from sparse_compile.methods.auto import AutoMethod, Choice, block_kept_keys, check_rows, sampled_recall
from sparse_compile.methods.auto_choice import CLUSTERS, GUARD
from sparse_compile.methods.auto_clusters import (
    MassRows,
    cluster_candidate,
    cluster_mass,
    every_row,
    kept_pairs_floor,
    sampled_rows,
)
from sparse_compile.methods.base import SiteCache, TokenLayout
from sparse_compile.methods.cost_model import (
    CLUSTER_PAIR_RATIO,
    NOMINAL_COSTS,
    ClusterCosts,
    banded_cluster_layout,
    nominal_cluster_costs,
)
from sparse_compile.options import validate_options

FRAMES, HEIGHT, WIDTH, BLOCK, DIM = 8, 8, 16, 32, 32
POSITIONS = HEIGHT * WIDTH
SEQ = FRAMES * POSITIONS
LAYOUT = TokenLayout(FRAMES, HEIGHT, WIDTH, 0, False)
SHARPNESS = 9.5  # feature length: same-group logits ~ 16 above the rest at scale 1/sqrt(32)
WAN_480P_TOKENS = 32760
BLOBS = 4


@pytest.fixture(autouse=True)
def clustering_priced_as_at_video_sizes(monkeypatch):
    """svg2's k-means (200 + 1000 clusters, 50 iterations) costs more than attention itself on these
    1024 tokens; price it per token as a Wan 480p call sees it, so its share of a head's dense time is
    the one a real model pays."""
    def costs(device, dtype, head_dim, q_clusters, k_clusters, iters):
        nominal = nominal_cluster_costs(q_clusters, k_clusters, iters)
        return ClusterCosts(nominal.pair_time, nominal.launch, nominal.clustering_time * SEQ / WAN_480P_TOKENS)

    monkeypatch.setattr(auto, "cluster_costs", costs)


def _features(groups: torch.Tensor) -> torch.Tensor:
    """``(SEQ, DIM)`` features equal within a group and orthogonal between groups."""
    return torch.nn.functional.one_hot(groups, DIM).float() * SHARPNESS


def blob_groups(seed: int) -> torch.Tensor:
    """Each token's blob, ``(SEQ,)``: :data:`BLOBS` equal blobs scattered at random over the positions."""
    return torch.randperm(SEQ, generator=torch.Generator().manual_seed(seed)) % BLOBS


def mixed_heads(blob_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q = k, v ``(1, 3, SEQ, DIM)``: head 0 attends its blob (no band, every key block holds every blob),
    head 1 its own frame, head 2 every key alike."""
    frame = torch.arange(SEQ) // POSITIONS
    qk = torch.stack([_features(blob_groups(blob_seed)), _features(frame), torch.zeros(SEQ, DIM)]).unsqueeze(0)
    v = torch.randn(1, 3, SEQ, DIM, generator=torch.Generator().manual_seed(1))
    return qk, qk.clone(), v


def _auto(**options) -> AutoMethod:
    return AutoMethod(validate_options({"method": "auto", "block": BLOCK, **options}))


def _choice(cache: SiteCache) -> Choice:
    return cache.entries()[(Choice, 0)]


def _token_mask(choice: Choice, heads: int) -> torch.Tensor:
    """Token keep-mask ``(B, heads, SEQ, SEQ)`` of a choice: block layout, cluster layout, or every key."""
    device = choice.recall.device
    mask = torch.ones(choice.recall.shape[0], heads, SEQ, SEQ, dtype=torch.bool, device=device)
    every_row = torch.arange(SEQ, device=device)
    if choice.counts is not None:
        mask[:, choice.block_heads] = block_kept_keys(choice.counts, choice.indices, BLOCK, SEQ, every_row)(slice(None))
    if choice.clusters is not None:
        mask[:, choice.cluster_heads] = choice.clusters.kept_keys(every_row)(slice(None))
    return mask


def _exact_recall(q: torch.Tensor, k: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    probs = (q @ k.transpose(-1, -2) * DIM**-0.5).softmax(dim=-1)
    return (probs * token_mask).sum(dim=-1).mean(dim=-1)


def test_cluster_pair_masses_equal_the_dense_softmax_mass_between_clusters():
    gen = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 3, 48, 8, generator=gen) for _ in range(2))
    scale = 8**-0.5
    q_clusters, k_clusters = kmeans(q, 5, 3, seed=0), kmeans(k, 7, 3, seed=1)
    probs = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)
    q_onehot = torch.nn.functional.one_hot(q_clusters.labels.long(), 5).float()  # (B, H, S, 5)
    k_onehot = torch.nn.functional.one_hot(k_clusters.labels.long(), 7).float()
    expected = q_onehot.transpose(-1, -2) @ probs @ k_onehot / q_clusters.sizes.clamp_min(1).unsqueeze(-1)
    expected = expected / expected.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    k_order = cluster_permutation(k_clusters.labels, k_clusters.sizes, k_clusters.ranks)
    torch.testing.assert_close(cluster_mass(q, k, attention_lse(q, k, scale), every_row(q_clusters), *k_order, scale),
                               expected)


def test_cluster_pair_masses_do_not_depend_on_the_chunking(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 4, 96, 8, generator=gen) for _ in range(2))
    lse = attention_lse(q, k, 0.3)
    q_clusters, k_clusters = kmeans(q, 6, 2, seed=0), kmeans(k, 9, 2, seed=1)
    k_order = cluster_permutation(k_clusters.labels, k_clusters.sizes, k_clusters.ranks)
    whole = cluster_mass(q, k, lse, every_row(q_clusters), *k_order, 0.3)
    monkeypatch.setattr(auto_clusters, "_MASS_CHUNK_ENTRIES", 96 * 40)  # one head, 40 rows per chunk
    torch.testing.assert_close(cluster_mass(q, k, lse, every_row(q_clusters), *k_order, 0.3), whole)


def _row_masses(device: str = "cpu") -> tuple:
    """Masses' inputs for 2 heads of 600 tokens: q, k, LSE, every row, the keys in cluster order."""
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(1, 2, 600, 16, generator=gen).to(device) for _ in range(2))
    q_clusters, k_clusters = kmeans(q, 12, 2, seed=0), kmeans(k, 20, 2, seed=1)
    k_order = cluster_permutation(k_clusters.labels, k_clusters.sizes, k_clusters.ranks)
    return q, k, attention_lse(q, k, 0.25), every_row(q_clusters), k_order


def test_cluster_pair_masses_do_not_depend_on_the_order_of_the_rows():
    """The rows' masses are summed as exact fixed-point parts: rows in any order give the same bits (fp32 sums in
    another order would not)."""
    q, k, lse, rows, k_order = _row_masses()
    want = cluster_mass(q, k, lse, rows, *k_order, 0.25)
    for seed in range(3):
        order = torch.randperm(600, generator=torch.Generator().manual_seed(seed)).expand(1, 2, 600)
        shuffled = MassRows(rows.tokens.gather(-1, order), rows.labels.gather(-1, order), rows.per_cluster)
        assert torch.equal(cluster_mass(q, k, lse, shuffled, *k_order, 0.25), want)


def test_sampled_cluster_masses_average_the_dense_softmax_over_evenly_spaced_rows_of_each_cluster():
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 2, 120, 8, generator=gen) for _ in range(2))
    scale, per_cluster = 8**-0.5, 3
    q_clusters, k_clusters = kmeans(q, 4, 3, seed=0), kmeans(k, 5, 3, seed=1)
    q_perm, q_offsets = cluster_permutation(q_clusters.labels, q_clusters.sizes, q_clusters.ranks)
    rows = sampled_rows(q_clusters, q_perm, q_offsets, per_cluster)
    probs = (q @ k.transpose(-1, -2) * scale).softmax(dim=-1)
    k_onehot = torch.nn.functional.one_hot(k_clusters.labels.long(), 5).float()
    expected = torch.zeros(1, 2, 4, 5)
    for h in range(2):
        for a in range(4):
            members = q_perm[0, h, q_offsets[0, h, a]:q_offsets[0, h, a + 1]]
            picked = members[torch.arange(per_cluster) * members.numel() // per_cluster]
            expected[0, h, a] = (probs[0, h, picked] @ k_onehot[0, h]).mean(dim=0)
    assert bool((rows.labels.flatten().bincount(minlength=4) == 2 * per_cluster).all())
    expected = expected / expected.sum(dim=-1, keepdim=True)
    k_order = cluster_permutation(k_clusters.labels, k_clusters.sizes, k_clusters.ranks)
    torch.testing.assert_close(cluster_mass(q, k, attention_lse(q, k, scale), rows, *k_order, scale), expected)


def test_an_empty_query_cluster_gets_no_sampled_rows_and_no_mass():
    q = torch.zeros(1, 1, 8, 4)
    q_clusters = kmeans(q, 3, 2, seed=0)  # identical tokens: one cluster holds them all
    q_perm, q_offsets = cluster_permutation(q_clusters.labels, q_clusters.sizes, q_clusters.ranks)
    rows = sampled_rows(q_clusters, q_perm, q_offsets, 2)
    assert rows.per_cluster.tolist() == [[[2.0 if n else 0.0 for n in q_clusters.sizes[0, 0].tolist()]]]
    k = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(0))
    k_order = cluster_permutation(*(lambda c: (c.labels, c.sizes, c.ranks))(kmeans(k, 2, 2, seed=1)))
    mass = cluster_mass(q, k, attention_lse(q, k, 0.5), rows, *k_order, 0.5)
    assert bool((mass.sum(dim=-1)[q_clusters.sizes == 0] == 0).all())


def test_the_kept_pairs_floor_on_every_row_is_below_the_cluster_candidates_pairs():
    gen = torch.Generator().manual_seed(4)
    q, k = (torch.randn(2, 3, 200, 16, generator=gen) * 1.5 for _ in range(2))
    every_row = torch.arange(200)
    for target in (0.5, 0.9, 0.99):
        candidate = cluster_candidate(q, k, attention_lse(q, k, 0.25), torch.arange(3), 0.25, target)
        floor = kept_pairs_floor(q, k, 0.25, every_row, target)
        assert bool((floor <= candidate.kept_pairs).all()) and bool((floor > 0).all())


def test_a_candidate_built_a_head_at_a_time_equals_one_built_in_one_piece(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 4, 200, 16, generator=gen) * 1.5 for _ in range(2))
    lse, heads = attention_lse(q, k, 0.25), torch.tensor([3, 0, 2])
    whole = cluster_candidate(q, k, lse, heads, 0.25, 0.9)
    monkeypatch.setattr(auto_clusters, "_MASS_CHUNK_ENTRIES", 1)
    assert len(auto_clusters.head_groups(heads, 2 * 200 * 16)) == 3
    by_head = cluster_candidate(q, k, lse, heads, 0.25, 0.9)
    for name in ("q_perm", "k_perm", "q_offsets", "k_offsets", "kept_pairs"):
        assert torch.equal(getattr(by_head, name), getattr(whole, name)), name
    torch.testing.assert_close(by_head.recall, whole.recall, rtol=1e-6, atol=0)  # matmuls batched otherwise
    assert torch.equal(by_head.selection.counts, whole.selection.counts)  # ids may swap between near-equal masses
    assert torch.equal(by_head.selection.kept_tokens, whole.selection.kept_tokens)
    alone = cluster_candidate(q[:, 2:3], k[:, 2:3], lse[:, 2:3], torch.tensor([0]), 0.25, 0.9)
    assert torch.equal(alone.k_perm[:, 0], whole.k_perm[:, 2])


def test_the_kept_pairs_floor_of_a_uniform_head_is_the_target_share_of_all_pairs():
    q = torch.zeros(1, 1, SEQ, DIM)
    floor = kept_pairs_floor(q, q, DIM**-0.5, check_rows(SEQ, 0), 0.9)
    assert abs(float(floor) / SEQ**2 - 0.9) < 1e-3


def test_a_clustered_head_chooses_clusters_a_banded_one_its_band_and_a_uniform_one_dense():
    q, k, v = mixed_heads()
    state = SiteCache()
    result = _auto().attend(method_call(q, k, v, LAYOUT, state))
    choice = _choice(state)
    assert choice.head_labels == ((CLUSTERS, "spatial 0", GUARD),)
    assert (choice.cluster_heads.tolist(), choice.block_heads.tolist(), choice.dense_heads.tolist()) == ([0], [1], [2])
    token_mask = _token_mask(choice, 3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
    torch.testing.assert_close(result.output, expected, atol=1e-5, rtol=1e-5)
    exact = _exact_recall(q, k, token_mask)
    assert float(exact[0, 0]) >= 0.95
    torch.testing.assert_close(choice.recall[0, :2], exact[0, :2], atol=1e-4, rtol=0)
    cluster_density = float(token_mask[0, 0].float().mean())
    assert cluster_density <= 1.05 / BLOBS, "each query blob keeps its own blob's keys"
    assert result.guarded_heads == (2,) and bool(torch.isinf(result.video_lse[:, 2]).all())


def test_only_heads_where_clusters_could_win_are_clustered(monkeypatch):
    clustered = []
    real_kmeans = auto_clusters.kmeans
    monkeypatch.setattr(auto_clusters, "kmeans", lambda x, *args, **kw: clustered.append(x) or real_kmeans(x, *args, **kw))
    q, k, v = mixed_heads()
    _auto().attend(method_call(q, k, v, LAYOUT))
    assert [x.shape[1] for x in clustered] == [1, 1], "the queries and keys of the blob head only"
    assert torch.equal(clustered[0][0, 0], q[0, 0])


def test_clusters_lose_to_a_band_that_keeps_fewer_pairs_for_their_cost():
    q, k, v = mixed_heads()
    band_only = q[:, 1:2]
    state = SiteCache()
    _auto().attend(method_call(band_only, band_only, v[:, 1:2], LAYOUT, state))
    assert _choice(state).head_labels == (("spatial 0",),) and _choice(state).clusters is None


def test_cluster_heads_run_in_one_cluster_kernel_launch(monkeypatch):
    from method_calls import record_kernel_calls

    q, k, v = mixed_heads()
    q, k, v = (torch.cat([t, t[:, :1]], dim=1) for t in (q, k, v))  # two clustered heads
    calls = record_kernel_calls(monkeypatch, auto_clusters, "varlen_block_sparse_attention")
    state = SiteCache()
    result = _auto().attend(method_call(q, k, v, LAYOUT, state))
    assert _choice(state).cluster_heads.tolist() == [0, 3] and len(calls) == 1
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=_token_mask(_choice(state), 4))
    torch.testing.assert_close(result.output, expected, atol=1e-5, rtol=1e-5)


def test_joint_attention_with_cluster_heads_keeps_text_dense():
    q, k, v = mixed_heads()
    text = 16
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.cat([torch.randn(1, 3, text, DIM, generator=gen), t], dim=2) for t in (q, k, v))
    state = SiteCache()
    result = _auto().attend(method_call(q, k, v, TokenLayout(FRAMES, HEIGHT, WIDTH, text, True), state))
    token_mask = torch.ones(1, 3, SEQ + text, SEQ + text, dtype=torch.bool)
    token_mask[..., text:, text:] = _token_mask(_choice(state), 3)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=token_mask)
    torch.testing.assert_close(result.output, expected, atol=1e-5, rtol=1e-5)


def test_the_recall_check_covers_cluster_heads():
    q, k, v = mixed_heads()
    method, state = _auto(recheck_every=5), SiteCache()  # the k-means share of 5 calls still lets clusters win
    method.attend(method_call(q, k, v, LAYOUT, state, step=0))
    first = _choice(state)
    assert first.cluster_heads.tolist() == [0]
    rows = check_rows(SEQ, 5)
    recall = sampled_recall(q[:, :1], k[:, :1], DIM**-0.5, rows, first.clusters.kept_keys(rows))
    torch.testing.assert_close(recall, _exact_recall(q[:, :1, rows], k[:, :1], _token_mask(first, 3)[:, :1, rows]))
    method.attend(method_call(q, k, v, LAYOUT, state, step=5))
    assert _choice(state) is first, "recall still holds at the check"
    moved, _, _ = mixed_heads(blob_seed=7)  # the blobs move to other tokens: the kept clusters miss them
    method.attend(method_call(moved, moved, v, LAYOUT, state, step=7))
    assert _choice(state) is first, "no check between scheduled steps"
    method.attend(method_call(moved, moved, v, LAYOUT, state, step=10))
    assert _choice(state) is not first and _choice(state).head_labels == first.head_labels


def test_the_report_counts_cluster_heads_as_sparse():
    from sparse_compile.runtime.session import SiteState

    q, k, v = mixed_heads()
    state = SiteState()
    state.record("blocks.0.attn1", 1, _auto().run(method_call(q, k, v, LAYOUT, state.cache)))
    assert (state.head_runs.sparse, state.head_runs.guard) == ([1, 1, 0], [0, 0, 1])


def test_same_inputs_give_the_same_output_in_every_generation():
    q, k, v = mixed_heads()
    method = _auto()
    outputs = [method.attend(method_call(q, k, v, LAYOUT, SiteCache(), generation=g)).output for g in (0, 1)]
    assert torch.equal(outputs[0], outputs[1])


def test_nominal_cluster_pairs_cost_more_than_block_pairs_and_k_means_by_its_flops():
    costs = nominal_cluster_costs(200, 1000, 50)
    assert costs.pair_time == CLUSTER_PAIR_RATIO * NOMINAL_COSTS.pair_time and costs.launch == 0
    assert costs.clustering_time == 50 * 1200 / 2


def test_the_calibration_layout_is_a_valid_cluster_layout_of_the_asked_density():
    tokens = 1000
    q_off, k_off, counts, indices, pairs = banded_cluster_layout(tokens, 20, 50, 0.125, torch.device("cpu"))
    check_varlen_layout_values(VarlenLayout(q_off, k_off, counts, indices), tokens, tokens)
    assert pairs == tokens * 6 * 20  # 6 of 50 clusters of 20 keys per query row
    assert abs(pairs / tokens**2 - 0.125) < 0.01


@pytest.mark.gpu
def test_cluster_heads_on_the_gpu_match_masked_sdpa_in_bf16(monkeypatch):
    monkeypatch.setattr(auto, "kernel_costs", lambda *args: NOMINAL_COSTS)  # this tiny call would run dense
    q, k, v = (t.cuda().bfloat16() for t in mixed_heads())
    state = SiteCache()
    result = _auto().attend(method_call(q, k, v, LAYOUT, state))
    choice = _choice(state)
    assert choice.head_labels[0][0] == CLUSTERS
    token_mask = _token_mask(choice, 3)
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=token_mask)
    error = (result.output.float() - expected).norm() / expected.norm()
    assert torch.isfinite(result.output).all() and float(error) <= 1e-2


@pytest.mark.gpu
def test_cluster_pair_masses_on_the_gpu_repeat_bit_for_bit():
    q, k, lse, rows, k_order = _row_masses("cuda")
    first, second = (cluster_mass(q, k, lse, rows, *k_order, 0.25) for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.gpu
def test_the_measured_cluster_costs_are_positive_and_cluster_pairs_cost_more_than_block_pairs():
    from sparse_compile.methods.cost_model import kernel_costs, measured_cluster_costs

    device = torch.device("cuda", torch.cuda.current_device())
    clusters = measured_cluster_costs(device, torch.bfloat16, 128, 200, 1000, 50)
    block = kernel_costs(device, torch.bfloat16, 128, 64)
    assert clusters.pair_time > block.pair_time and clusters.launch >= 0 and clusters.clustering_time > 0
