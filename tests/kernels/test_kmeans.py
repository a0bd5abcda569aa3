"""k-means for SVG2: the reference (blobs, monotone objective, warm starts, empty clusters, edge
cases), the cluster permutation, the Triton kernels under the interpreter (in a subprocess) and
on the GPU (accuracy against the reference, no host sync); timings: benchmarks/bench_kmeans.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gluon_compile import compile_sm90a, resource_usage
from triton_interpreter_support import interp, run_interpreted
from sparse_compile.kernels import kmeans as km
from sparse_compile.kernels.kmeans_reference import (
    Clustering,
    Reuse,
    assign_reference,
    cluster_sizes,
    fine_factor,
    fixed_point_scales,
    fixed_point_terms,
    initial_centroids,
    kmeans_objective,
    kmeans_reference,
    lloyd_reference,
    sample_stride_for,
    update_reference,
)
from sparse_compile.kernels.tile_configs import PERMUTATION_TOKENS, TileConfig

FAST = settings(max_examples=25, deadline=None)


def blobs(b, h, k, per, d, seed, contiguous, spread=10.0, noise=0.01, dtype=torch.float32, device="cpu"):
    """``k`` well-separated blobs of ``per`` tokens per (b, h): x ``(b, h, k * per, d)``, the blob of
    each token int64 ``(b, h, S)`` and the true centers fp32 ``(b, h, k, d)``. ``contiguous``: each
    blob is one run of tokens (runs in random order), else the tokens are shuffled."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, h, k, d, generator=g) * spread
    base = torch.arange(k).repeat_interleave(per)
    if contiguous:  # blob runs in a random order
        ids = torch.stack([torch.randperm(k, generator=g)[base] for _ in range(b * h)])
    else:
        ids = torch.stack([base[torch.randperm(k * per, generator=g)] for _ in range(b * h)])
    ids = ids.view(b, h, k * per)
    jitter = noise * torch.randn(b, h, k * per, d, generator=g)
    x = torch.gather(centers, 2, ids.unsqueeze(-1).expand(-1, -1, -1, d)) + jitter
    return x.to(device=device, dtype=dtype), ids.to(device), centers.to(device)


def with_far_cluster(centers, index, value=200.0):
    """``centers`` ``(B, H, K, D)`` with an extra centroid of all ``value`` inserted at ``index`` (it stays empty)."""
    far = torch.full((*centers.shape[:2], 1, centers.shape[3]), value, device=centers.device)
    return torch.cat([centers[:, :, :index], far, centers[:, :, index:]], 2)


def member_means(x, ids, k):
    """Mean of the tokens of each blob, fp32 ``(B, H, k, D)`` (loops: independent of the kernels)."""
    b, h, _, d = x.shape
    out = torch.empty(b, h, k, d)
    for bi in range(b):
        for hi in range(h):
            for c in range(k):
                out[bi, hi, c] = x[bi, hi][ids[bi, hi] == c].float().mean(0)
    return out


def assert_same_partition(labels, ids, k):
    """Each cluster holds exactly one blob and each blob one cluster (ids up to a permutation)."""
    for lab, blob in zip(labels.reshape(-1, labels.shape[-1]), ids.reshape(-1, ids.shape[-1])):
        pairs = torch.unique(lab.long() * k + blob.long())
        assert pairs.numel() == k and torch.unique(lab).numel() == k


def distance_excess(x, centroids, labels, chunk=2048):
    """Per token ``(||x - c_label||^2 - min_k ||x - c_k||^2, min_k ||x - c_k||^2)`` in fp64, chunked."""
    c = centroids.double()
    c_sq = c.square().sum(-1).unsqueeze(-2)
    chosen, best = [], []
    for s0 in range(0, x.shape[2], chunk):
        xs = x[:, :, s0 : s0 + chunk].double()
        dist = xs.square().sum(-1, keepdim=True) - 2 * xs @ c.transpose(-1, -2) + c_sq
        best.append(dist.min(-1).values)
        chosen.append(dist.gather(-1, labels[:, :, s0 : s0 + chunk].long().unsqueeze(-1)).squeeze(-1))
    best_t = torch.cat(best, -1)
    return torch.cat(chosen, -1) - best_t, best_t


def assert_ranks_number_each_cluster(labels, ranks, sizes):
    """Within every cluster the ranks are 0 .. size - 1, each once."""
    assert ranks.dtype == torch.int32 and ranks.shape == labels.shape
    assert (ranks >= 0).all() and (ranks.long() < sizes.gather(-1, labels.long())).all()
    keys = (labels.long() * labels.shape[-1] + ranks.long()).sort(-1).values
    assert (keys[..., 1:] != keys[..., :-1]).all()  # no (label, rank) pair twice: with the bound, each rank once


def assert_consistent(x, cl, iters, rtol=1e-5):
    """Shapes and dtypes; sizes are the label counts and sum to S; ranks number each cluster in token order; no NaN.
    With ``iters >= 1`` every
    non-empty cluster's centroid is the mean of its tokens (up to ``rtol * max |x|``); with
    ``iters = 0`` every label is an argmin for the returned (initial) centroids up to
    ``rtol * (max ||x||^2 + max ||c||^2)`` (the rounding of the score ``x . c - ||c||^2 / 2``)."""
    b, h, s, d = x.shape
    k = cl.centroids.shape[2]
    assert cl.centroids.dtype == torch.float32 and cl.labels.dtype == torch.int32 and cl.sizes.dtype == torch.int32
    assert cl.centroids.shape == (b, h, k, d) and cl.labels.shape == (b, h, s) and cl.sizes.shape == (b, h, k)
    assert not cl.centroids.isnan().any()
    assert torch.equal(cl.sizes, cluster_sizes(cl.labels, k))
    assert (cl.sizes.sum(-1) == s).all()
    assert torch.equal(cl.ranks, km.cluster_ranks_reference(cl.labels, cl.sizes))
    if iters == 0:
        scale = float(x.float().square().sum(-1).max() + cl.centroids.square().sum(-1).max())
        excess, _ = distance_excess(x, cl.centroids, cl.labels)
        assert excess.max() <= rtol * scale
        return
    index = cl.labels.long().unsqueeze(-1).expand(b, h, s, d)
    sums = torch.zeros(b, h, k, d, dtype=torch.float64, device=x.device).scatter_add_(2, index, x.double())
    means = sums / cl.sizes.clamp_min(1).unsqueeze(-1)
    filled = (cl.sizes > 0).unsqueeze(-1).expand(b, h, k, d)
    assert ((cl.centroids.double() - means).abs()[filled] <= rtol * float(x.abs().max()) + 1e-12).all()


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------


def test_reference_recovers_contiguous_blobs_from_cold_start():
    x, ids, _ = blobs(2, 2, 7, 12, 8, seed=0, contiguous=True)
    cl = km.kmeans_reference(x, 7, 3)
    assert_same_partition(cl.labels, ids, 7)
    assert_consistent(x, cl, 3)
    # cluster c's centroid is its blob's mean
    blob_of = torch.gather(ids, 2, torch.sort(cl.labels.long(), dim=-1, stable=True).indices)[..., ::12]
    means = member_means(x, ids, 7)
    assert torch.allclose(cl.centroids, torch.gather(means, 2, blob_of.unsqueeze(-1).expand(-1, -1, -1, 8)), atol=1e-5)


def test_objective_never_increases_and_iterations_compose():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 300, 8, generator=g)
    runs = [km.kmeans_reference(x, 10, n, seed=3) for n in range(9)]
    objective = torch.stack([kmeans_objective(x, r.centroids, r.labels) for r in runs])  # (iters, B, H)
    assert (objective[1:] <= objective[:-1] * (1 + 1e-7)).all()
    assert (objective[-1] < objective[0]).all()  # random data: the iterations do move
    for n, r in enumerate(runs):
        assert_consistent(x, r, n)
        if n > 0:  # each iteration is one assignment (against the previous centroids), then the update
            assert torch.equal(r.labels, assign_reference(x, runs[n - 1].centroids))
    warm = km.kmeans_reference(x, 10, 5, runs[3].centroids)
    assert torch.equal(warm.centroids, runs[8].centroids) and torch.equal(warm.labels, runs[8].labels)


def test_warm_start_from_true_centers_converges_in_one_iteration():
    x, ids, centers = blobs(1, 3, 6, 15, 16, seed=2, contiguous=False)
    zero = km.kmeans_reference(x, 6, 0, centers)
    assert torch.equal(zero.centroids, centers) and torch.equal(zero.labels.long(), ids)
    one = km.kmeans_reference(x, 6, 1, centers)
    assert torch.equal(one.labels.long(), ids)
    assert torch.allclose(one.centroids, member_means(x, ids, 6), atol=1e-5)
    more = km.kmeans_reference(x, 6, 4, centers)
    assert torch.equal(more.labels, one.labels) and torch.allclose(more.centroids, one.centroids, atol=1e-6)
    assert (one.sizes == 15).all()


def test_empty_cluster_keeps_its_centroid():
    x, ids, centers = blobs(2, 1, 4, 10, 8, seed=3, contiguous=False)
    init = with_far_cluster(centers, 2, 1e3)  # cluster 2 attracts nothing
    init_copy = init.clone()
    cl = km.kmeans_reference(x, 5, 3, init)
    assert torch.equal(init, init_copy)  # the caller's centroids are not modified
    assert (cl.sizes[..., 2] == 0).all() and (cl.centroids[:, :, 2] == 1e3).all()
    assert_consistent(x, cl, 3)
    assert torch.equal(torch.where(cl.labels > 2, cl.labels - 1, cl.labels).long(), ids)


@pytest.mark.parametrize("value", [0.0, 1.5], ids=["zeros", "identical"])
def test_identical_points_go_to_the_lowest_cluster(value):
    x = torch.full((1, 2, 20, 8), value)
    cl = km.kmeans_reference(x, 4, 3)
    assert (cl.labels == 0).all()
    assert torch.equal(cl.sizes, torch.tensor([20, 0, 0, 0], dtype=torch.int32).expand(1, 2, 4))
    assert (cl.centroids == value).all()


def test_single_token_and_one_cluster_per_token():
    x = torch.randn(1, 2, 1, 8, dtype=torch.float16)  # fp16 values are exact in the fixed-point sums
    cl = km.kmeans_reference(x, 1, 2)
    assert (cl.labels == 0).all() and (cl.sizes == 1).all() and torch.equal(cl.centroids, x.float())
    x = torch.randn(2, 1, 9, 4, dtype=torch.float16)
    cl = km.kmeans_reference(x, 9, 2)  # segments of one token: every token seeds its own cluster
    assert torch.equal(cl.labels, torch.arange(9, dtype=torch.int32).expand(2, 1, 9))
    assert torch.equal(cl.centroids, x.float()) and (cl.sizes == 1).all()


def test_member_sums_do_not_depend_on_the_order_of_the_tokens():
    """The update sums fixed-point parts exactly: any order of the members gives the same centroid bits (plain
    fp32 sums would not), within a fine part's unit (plus the fp32 rounding) of the members' exact mean."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 500, 16, generator=g) * torch.logspace(-3, 3, 500).view(1, 1, 500, 1)
    labels = torch.randint(0, 3, (1, 2, 500), generator=g, dtype=torch.int32)
    previous = torch.zeros(1, 2, 3, 16)
    want = update_reference(x, labels, previous)
    for seed in range(3):
        order = torch.randperm(500, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(update_reference(x[:, :, order], labels[:, :, order], previous), want)
    exact = torch.stack([x[:, :, labels[0, 0] == c].double().mean(2) for c in range(3)], 2)  # head 0's clusters
    unit = 1.0 / (float(fixed_point_scales(x)[0, 0]) * fine_factor(500))
    assert ((want[:, 0] - exact[:, 0]).abs() <= unit + exact[:, 0].abs() * 2.0**-23).all()


@pytest.mark.parametrize("largest", [65504.0, 1.0, 1e-6, 0.0])
@pytest.mark.parametrize("seq", [1, 9, 32760])
def test_fixed_point_parts_of_a_heads_tokens_sum_exactly_in_fp32(largest, seq):
    """Scales are powers of two; each part is an integer of at most 2**(23 - ceil(log2 S)), so the S tokens' sum
    stays within 2**23 (exact in fp32) and, for a nonzero head, uses most of that range."""
    x = torch.full((1, 2, seq, 4), largest, dtype=torch.float32)
    x[:, 1] *= -0.5
    scales = fixed_point_scales(x)
    assert torch.equal(torch.frexp(scales)[0], torch.full_like(scales, 0.5))
    parts = torch.stack(fixed_point_terms(x, scales, seq), dim=3)  # (B, H, S, 2, D)
    assert torch.equal(parts, parts.round()) and (parts.abs() <= 2.0 ** (23 - max(seq - 1, 1).bit_length())).all()
    sums = parts.double().sum(2).abs()
    assert (sums <= 2**23).all()  # integers up to 2**24 are exact in fp32
    if largest > 0:
        assert (sums[:, 0, 0] >= 2**21).all()


def test_initial_centroids_one_token_per_segment_and_seeded():
    b, h, s, k = 2, 3, 50, 7
    x = torch.arange(s, dtype=torch.float32).view(1, 1, s, 1).expand(b, h, s, 4)  # token i is the vector (i, i, i, i)
    picked = initial_centroids(x, k, seed=5)[..., 0].long()
    i = torch.arange(k)
    assert ((picked >= i * s // k) & (picked < (i + 1) * s // k)).all()
    assert torch.equal(picked, initial_centroids(x, k, seed=5)[..., 0].long())
    assert not torch.equal(picked, initial_centroids(x, k, seed=6)[..., 0].long())



def test_a_heads_seeding_does_not_depend_on_the_other_heads_in_the_call():
    """Context parallelism splits heads across GPUs: each head must cluster as it would on one GPU."""
    x = torch.randn(2, 4, 60, 8)
    together = initial_centroids(x, 9, seed=3)
    for head in range(4):
        alone = initial_centroids(x[:, head : head + 1], 9, seed=3)
        assert torch.equal(alone, together[:, head : head + 1])
    assert torch.equal(initial_centroids(x[1:], 9, seed=3), together[1:])


def test_assignment_chunking_and_strided_input():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 100, 3, 8, generator=g).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
    c = torch.randn(2, 3, 11, 8, generator=g)
    labels = assign_reference(x, c, chunk_rows=5)
    assert torch.equal(labels, assign_reference(x.contiguous(), c, chunk_rows=10**6))
    assert torch.equal(km.kmeans_reference(x, 11, 2).labels, km.kmeans_reference(x.contiguous(), 11, 2).labels)


@FAST
@given(b=st.integers(1, 2), h=st.integers(1, 2), s=st.integers(1, 60), k=st.integers(1, 12),
       iters=st.integers(0, 3), seed=st.integers(0, 1000))  # fmt: skip
def test_reference_invariants_on_random_data(b, h, s, k, iters, seed):
    k = min(k, s)
    x = torch.randn(b, h, s, 4, generator=torch.Generator().manual_seed(seed)).half()
    assert_consistent(x, km.kmeans_reference(x, k, iters, seed=seed), iters)


def test_cpu_dispatch_is_the_reference():
    x = torch.randn(1, 2, 40, 16)
    got, want = km.kmeans(x, 5, 2, seed=1), kmeans_reference(x, 5, 2, seed=1)
    for field in ("centroids", "labels", "sizes"):
        assert torch.equal(getattr(got, field), getattr(want, field))


def test_validation_errors():
    x = torch.randn(1, 2, 10, 8)
    run = km.kmeans
    for bad_k in (0, 11):
        with pytest.raises(ValueError, match="num_clusters"):
            run(x, bad_k, 1)
    with pytest.raises(ValueError, match="iters"):
        run(x, 3, -1)
    with pytest.raises(ValueError, match="iters"):
        run(x, 3, True)
    with pytest.raises(ValueError, match="4-D"):
        run(x[0], 3, 1)
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(ValueError, match="must be one of"):
            run(x.to(dtype), 3, 1)
    with pytest.raises(ValueError, match="init_centroids"):
        run(x, 3, 1, torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match="init_centroids"):
        run(x, 3, 1, torch.zeros(1, 2, 3, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="head dim"):
        km.kmeans_triton(torch.randn(1, 1, 10, 24), 3, 1)


def test_subsampled_iterations_run_on_every_rth_token_then_once_on_all():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2, 90, 8, generator=g)
    init = initial_centroids(x, 6, seed=2)
    got = kmeans_reference(x, 6, 4, init, sample_stride=3)
    scales = (fixed_point_scales(x), x.shape[2])  # of all tokens, for the sample's sums too
    on_sample, _ = lloyd_reference(x[:, :, ::3], init, 3, scales)
    centroids, labels = lloyd_reference(x, on_sample, 1, scales)
    assert torch.equal(got.centroids, centroids) and torch.equal(got.labels, labels)
    assert_consistent(x, got, 4)
    cold = kmeans_reference(x, 6, 4, seed=2, sample_stride=3)  # seeded from the sample
    assert torch.equal(cold.centroids, lloyd_reference(x, lloyd_reference(x[:, :, ::3], initial_centroids(
        x[:, :, ::3], 6, seed=2), 3, scales)[0], 1, scales)[0])
    for iters in (0, 1):  # no iteration before the last: nothing to subsample
        assert torch.equal(kmeans_reference(x, 6, iters, init, sample_stride=3).labels,
                           kmeans_reference(x, 6, iters, init).labels)


def test_the_sample_keeps_at_least_as_many_tokens_as_clusters():
    assert sample_stride_for(1000, 100, 4) == 4
    assert sample_stride_for(1000, 300, 4) == 3  # 1000 // 3 = 333 >= 300
    assert sample_stride_for(50, 50, 8) == 1
    x = torch.randn(1, 1, 40, 4)
    assert_consistent(x, kmeans_reference(x, 20, 3, sample_stride=16), 3)


def drifted(x, heads, scale, seed):
    """``x`` with the tokens of ``heads`` moved by ``scale`` times unit noise."""
    moved = x.clone()
    moved[:, heads] += scale * torch.randn(moved[:, heads].shape, generator=torch.Generator().manual_seed(seed))
    return moved


def shuffled(x, head, seed):
    """``x`` with the tokens of ``head`` in a random order: the same clusters, most tokens in another one."""
    moved = x.clone()
    moved[:, head] = x[:, head, torch.randperm(x.shape[2], generator=torch.Generator().manual_seed(seed))]
    return moved


def test_reuse_keeps_a_head_whose_tokens_stay_and_reclusters_one_whose_tokens_move():
    x, _, centers = blobs(2, 3, 12, 10, 8, seed=12, contiguous=False)
    previous = kmeans_reference(x, 12, 3, centers)
    moved = shuffled(drifted(x, [0, 2], 1e-4, seed=2), 1, seed=1)
    got = kmeans_reference(moved, 12, 2, reuse=Reuse(previous, 0.05, 2))
    assert got.settled.tolist() == [[True, False, True], [True, False, True]]
    for field in ("centroids", "labels", "sizes", "ranks"):
        assert torch.equal(getattr(got, field)[:, [0, 2]], getattr(previous, field)[:, [0, 2]])
    fresh = kmeans_reference(moved, 12, 2, previous.centroids)
    for field in ("centroids", "labels", "sizes", "ranks"):
        assert torch.equal(getattr(got, field)[:, 1], getattr(fresh, field)[:, 1])


def test_reuse_tolerance_zero_never_reuses_and_one_always_does_unless_every_probe_moved():
    x, _, centers = blobs(1, 2, 6, 10, 8, seed=13, contiguous=False)
    previous = kmeans_reference(x, 6, 2, centers)
    never = kmeans_reference(x, 6, 2, reuse=Reuse(previous, 0.0, 1))
    assert not never.settled.any() and torch.equal(never.centroids, kmeans_reference(x, 6, 2, previous.centroids).centroids)
    assert kmeans_reference(shuffled(x, 0, seed=3), 6, 2, reuse=Reuse(previous, 1.0, 1)).settled.all()


def test_reuse_validation_errors():
    x = torch.randn(1, 2, 10, 8)
    previous = kmeans_reference(x, 3, 1)
    with pytest.raises(ValueError, match="not both"):
        km.kmeans(x, 3, 1, previous.centroids, reuse=Reuse(previous, 0.1, 2))
    with pytest.raises(ValueError, match="tolerance"):
        km.kmeans(x, 3, 1, reuse=Reuse(previous, 1.5, 2))
    with pytest.raises(ValueError, match="probe_stride"):
        km.kmeans(x, 3, 1, reuse=Reuse(previous, 0.1, 0))
    with pytest.raises(ValueError, match="reuse.previous.labels"):
        km.kmeans(x[:, :, :9], 3, 1, reuse=Reuse(previous, 0.1, 2))
    with pytest.raises(ValueError, match="reuse.previous.sizes"):
        km.kmeans(x, 4, 1, reuse=Reuse(previous, 0.1, 2))
    with pytest.raises(ValueError, match="sample_stride"):
        km.kmeans(x, 3, 1, sample_stride=0)


# ------------------------------------------------------------------------------------------------
# Cluster permutation
# ------------------------------------------------------------------------------------------------


@FAST
@given(b=st.integers(1, 2), h=st.integers(1, 3), s=st.integers(1, 80), k=st.integers(1, 20), seed=st.integers(0, 1000))
def test_cluster_permutation_with_stable_ranks_groups_tokens_stably(b, h, s, k, seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, k, (b, h, s), generator=g, dtype=torch.int32)  # some clusters empty
    sizes = cluster_sizes(labels, k)
    ranks = km.cluster_ranks_reference(labels, sizes)
    assert_ranks_number_each_cluster(labels, ranks, sizes)
    perm, offsets = km.cluster_permutation(labels, sizes, ranks)
    assert perm.dtype == torch.int64 and offsets.dtype == torch.int32 and offsets.shape == (b, h, k + 1)
    assert torch.equal(perm.sort(-1).values, torch.arange(s).expand(b, h, s))
    grouped = torch.gather(labels, 2, perm)
    assert (grouped[..., 1:] >= grouped[..., :-1]).all()
    same = grouped[..., 1:] == grouped[..., :-1]
    assert (perm[..., 1:] > perm[..., :-1])[same].all()  # stable: ascending token index within a cluster
    assert (offsets[..., 0] == 0).all() and (offsets[..., -1] == s).all()
    assert torch.equal(offsets[..., 1:] - offsets[..., :-1], sizes)
    starts = torch.gather(grouped, 2, offsets[..., :-1].clamp_max(s - 1).long())
    assert (starts == torch.arange(k, dtype=torch.int32))[sizes > 0].all()  # cluster c begins at offsets[c]


def test_cluster_permutation_places_each_token_at_its_clusters_offset_plus_its_rank():
    """Any ranks that number each cluster give a permutation with the cluster contiguous and the token
    of rank r at offsets[label] + r: here every cluster in reverse token order."""
    labels = torch.tensor([[[2, 0, 2, 2, 0, 3]]], dtype=torch.int32)
    sizes = cluster_sizes(labels, 4)  # 2, 0, 3, 1
    stable = km.cluster_ranks_reference(labels, sizes)
    assert stable.tolist() == [[[0, 0, 1, 2, 1, 0]]]
    reverse = (sizes.gather(-1, labels.long()) - 1 - stable).int()
    perm, offsets = km.cluster_permutation(labels, sizes, reverse)
    assert offsets.tolist() == [[[0, 2, 2, 5, 6]]]
    assert perm.tolist() == [[[4, 1, 3, 2, 0, 5]]]


def test_cluster_permutation_validation():
    labels = torch.zeros(1, 2, 5, dtype=torch.int32)
    sizes = torch.zeros(1, 2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="integer"):
        km.cluster_permutation(labels.float(), sizes, labels)
    with pytest.raises(ValueError, match="share B, H"):
        km.cluster_permutation(labels, torch.zeros(1, 1, 3, dtype=torch.int32), labels)
    with pytest.raises(ValueError, match="ranks"):
        km.cluster_permutation(labels, sizes, labels[..., :4])


# ------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (TRITON_INTERPRET must be set before triton's import)
# ------------------------------------------------------------------------------------------------


def test_interpreter_tests_in_subprocess():
    """Run this file's ``interp_`` tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted(__file__, "interp_")


def run_triton(x, k, iters, init=None, config=TileConfig(32, 16, 4, 1), seed=0, **kwargs):
    cl = km.kmeans_triton(x, k, iters, init, seed=seed, config=config, **kwargs)
    assert_consistent(x, cl, iters, rtol=1e-5 if x.dtype == torch.float32 or iters > 0 else 1e-3)
    return cl


def assert_same_clustering(got, want):
    """Same labels, sizes and ranks; then the same integer member sums, so the same centroid bits."""
    for name in ("labels", "sizes", "ranks", "centroids"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


INTERP_CONFIGS = [TileConfig(32, 16, 4, 1), TileConfig(16, 32, 4, 1), TileConfig(16, 64, 4, 1)]


@interp
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("config", INTERP_CONFIGS, ids=["s32k16", "s16k32", "s16k64 (32-wide last chunk)"])
def test_interp_cold_start_matches_reference_on_blobs(dtype, config):
    # contiguous blobs: tiles of one cluster, so the atomics collide; S and K not tile multiples
    x, ids, _ = blobs(1, 2, 20, 7, 32, seed=5, contiguous=True, dtype=dtype)
    got = run_triton(x, 20, 3, config=config)
    assert_same_partition(got.labels, ids, 20)
    assert_same_clustering(got, km.kmeans_reference(x, 20, 3))


@interp
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_warm_start_with_empty_cluster_on_shuffled_blobs(dtype):
    x, ids, centers = blobs(2, 1, 24, 10, 16, seed=6, contiguous=False, dtype=dtype)
    init = with_far_cluster(centers + 0.5 * torch.randn(centers.shape, generator=torch.Generator().manual_seed(0)), 5)
    got = run_triton(x, 25, 2, init)
    assert (got.sizes[..., 5] == 0).all() and (got.centroids[:, :, 5] == 200.0).all()
    assert torch.equal(torch.where(got.labels > 5, got.labels - 1, got.labels).long(), ids)
    assert_same_clustering(got, km.kmeans_reference(x, 25, 2, init))


@interp
@pytest.mark.usefixtures("poisoned_empty")
def test_interp_random_data_objective_matches_reference():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 2, 256, 16, generator=g)
    init = initial_centroids(x, 32, seed=1)
    got, want = run_triton(x, 32, 3, init), km.kmeans_reference(x, 32, 3, init)
    got_obj, want_obj = kmeans_objective(x, got.centroids, got.labels), kmeans_objective(x, want.centroids, want.labels)
    assert ((got_obj - want_obj).abs() / want_obj).max() <= 1e-5


@interp
@pytest.mark.usefixtures("poisoned_empty")
def test_interp_iters_zero_ties_and_edge_shapes():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 40, 2, 16, generator=g).half().transpose(1, 2)  # strided (B, H, S, D) view
    init = torch.randn(1, 2, 20, 16, generator=g).half().float()  # exact in the dot's fp16: same argmax as fp32
    got = run_triton(x, 20, 0, init)
    assert torch.equal(got.centroids, init) and torch.equal(got.labels, assign_reference(x, init))
    same = run_triton(torch.full((1, 1, 40, 16), 0.5, dtype=torch.float16), 20, 2)  # ties across both K chunks
    assert (same.labels == 0).all() and same.sizes[0, 0, 0] == 40 and (same.centroids == 0.5).all()
    one = run_triton(x[:, :, :1], 1, 1)
    assert (one.labels == 0).all() and torch.equal(one.centroids, x[:, :, :1].float())
    empty = km.kmeans_triton(torch.randn(0, 2, 10, 16), 3, 1)
    assert empty.centroids.shape == (0, 2, 3, 16) and empty.labels.shape == (0, 2, 10)


@interp
@pytest.mark.parametrize("s, k", [(1300, 7), (5, 9), (512, 1000), (1025, 64), (40, km.MAX_RANKED_CLUSTERS + 1)],
                         ids=["three tiles", "empty clusters", "one tile", "one token past two tiles", "reference"])
def test_interp_stable_ranks_equal_the_reference(s, k):
    labels = torch.randint(0, k, (2, 2, s), generator=torch.Generator().manual_seed(s), dtype=torch.int32)
    sizes = cluster_sizes(labels, k)
    assert torch.equal(km.stable_ranks_triton(labels, sizes), km.cluster_ranks_reference(labels, sizes))


@interp
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("offsets", ["summed by the scatter", "cumsum first"])
@pytest.mark.parametrize("s, k", [(80, 20), (1500, 7), (3, 5)], ids=["small", "two programs", "empty clusters"])
def test_interp_triton_permutation_equals_the_reference(monkeypatch, s, k, offsets):
    """Same permutation and offsets as the torch specification, with stable and with reversed ranks,
    int32 and int64 labels, over more tokens than one program handles; offsets summed by the scatter's
    programs and, past :data:`MAX_SUMMED_CLUSTERS`, by a cumsum first."""
    if offsets == "cumsum first":
        monkeypatch.setattr(km, "MAX_SUMMED_CLUSTERS", k - 1)
    g = torch.Generator().manual_seed(s)
    labels = torch.randint(0, k, (2, 3, s), generator=g, dtype=torch.int32)
    sizes = cluster_sizes(labels, k)
    stable = km.cluster_ranks_reference(labels, sizes)
    reverse = (sizes.gather(-1, labels.long()) - 1 - stable).int()
    for lab, ranks in ((labels, stable), (labels.long(), reverse)):
        got, want = km.cluster_permutation_triton(lab, sizes, ranks), km.cluster_permutation_reference(lab, sizes, ranks)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@interp
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_interp_subsampled_iterations_match_the_reference(warm):
    x, ids, centers = blobs(1, 2, 10, 12, 16, seed=14, contiguous=False)
    init = centers + 0.3 if warm else None
    got = run_triton(x, 10, 3, init, seed=4, sample_stride=4)
    want = kmeans_reference(x, 10, 3, init, seed=4, sample_stride=4)
    if warm:
        assert_same_partition(got.labels, ids, 10)
        assert_same_clustering(got, want)
    else:  # seeded from the sample, two clusters share a blob: near-ties split it, so compare objectives
        got_obj, want_obj = kmeans_objective(x, got.centroids, got.labels), kmeans_objective(x, want.centroids, want.labels)
        assert ((got_obj - want_obj).abs() / want_obj).max() <= 1e-5


@interp
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize(("iters", "sample_stride"), [(2, 1), (2, 3), (1, 1), (0, 1)])
def test_interp_reuse_skips_settled_heads_and_matches_the_reference(iters, sample_stride):
    """Settled heads come back as the previous clustering bit for bit (copied by the last assignment: an
    element it missed would show the poisoned buffers); the moved head re-clusters as the reference does."""
    x, _, centers = blobs(2, 3, 12, 10, 16, seed=15, contiguous=False)
    previous = kmeans_reference(x, 12, 3, centers)
    x = shuffled(drifted(x, [0, 2], 1e-4, seed=5), 1, seed=4)
    reuse = Reuse(previous, 0.05, 2)
    got = km.kmeans_triton(x, 12, iters, reuse=reuse, sample_stride=sample_stride, config=TileConfig(32, 16, 4, 1))
    moved_head = Clustering(*(t[:, 1:2] for t in (got.centroids, got.labels, got.sizes, got.ranks)))
    assert_consistent(x[:, 1:2], moved_head, iters)  # the settled heads' centroids are the previous tokens' means
    want = kmeans_reference(x, 12, iters, reuse=reuse, sample_stride=sample_stride)
    assert torch.equal(got.settled, want.settled) and got.settled.tolist() == [[True, False, True]] * 2
    assert_same_clustering(got, want)
    for field in ("centroids", "labels", "sizes", "ranks"):
        assert torch.equal(getattr(got, field)[:, [0, 2]], getattr(previous, field)[:, [0, 2]])


# ------------------------------------------------------------------------------------------------
# sm_90a code (CPU, ahead of time)
# ------------------------------------------------------------------------------------------------


def test_the_permutation_scatter_sums_the_most_clusters_it_takes_without_spilling_on_sm90a(tmp_path):
    """At :data:`MAX_SUMMED_CLUSTERS` every program holds its head's cluster sizes in registers: no local memory."""
    signature = dict(labels_ptr="*i32", ranks_ptr="*i32", sizes_ptr="*i32", offsets_ptr="*i32", perm_ptr="*i64",
                     seq_len="i32", num_clusters="i32", BLOCK="constexpr", CLUSTERS_PAD="constexpr")  # fmt: skip
    compiled = compile_sm90a(km._permutation_kernel, signature,
                             dict(BLOCK=PERMUTATION_TOKENS, CLUSTERS_PAD=km.MAX_SUMMED_CLUSTERS), dict(num_warps=4),
                             ("labels_ptr", "ranks_ptr", "sizes_ptr", "offsets_ptr", "perm_ptr"))  # fmt: skip
    assert resource_usage(compiled, tmp_path)["LOCAL"] == 0


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


def svg2_tokens(h=12, s=32760, d=128, dtype=torch.bfloat16, seed=0):
    """Clustered tokens like DiT queries/keys: 3000 latent directions + noise, (1, h, s, d) on CUDA."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    modes = torch.randn(h, 3000, d, device="cuda", generator=g)
    pick = torch.randint(0, 3000, (h, s), device="cuda", generator=g)
    noise = 0.7 * torch.randn(h, s, d, device="cuda", generator=g)
    x = torch.gather(modes, 1, pick.unsqueeze(-1).expand(-1, -1, d)) + noise
    return x.unsqueeze(0).to(dtype)


@pytest.mark.gpu
def test_gpu_matches_reference_objective_bf16():
    x = svg2_tokens()
    init = initial_centroids(x, 1000, seed=0)
    got = km.kmeans_triton(x, 1000, 5, init)
    want = kmeans_reference(x, 1000, 5, init)
    assert not got.centroids.isnan().any()
    assert torch.equal(got.sizes, cluster_sizes(got.labels, 1000)) and (got.sizes.sum(-1) == x.shape[2]).all()
    got_obj, want_obj = kmeans_objective(x, got.centroids, got.labels), kmeans_objective(x, want.centroids, want.labels)
    assert ((got_obj - want_obj).abs() / want_obj).max() <= 1e-3, (got_obj, want_obj)
    # labels are argmins for the centroids of the last assignment (4 iterations in) up to their bf16 rounding
    before_last = km.kmeans_triton(x, 1000, 4, init).centroids
    excess, best = distance_excess(x, before_last, got.labels)
    assert (excess <= 1e-2 * best + 1e-3).all()
    assert (got.labels == assign_reference(x, before_last)).float().mean() >= 0.98


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_small_blobs_match_reference(dtype):
    x, ids, centers = blobs(2, 3, 100, 30, 64, seed=9, contiguous=False, dtype=dtype, device="cuda")
    init = with_far_cluster(centers, 7, 500.0)
    got = km.kmeans(x, 101, 3, init)  # CUDA dispatch: the Triton path
    assert_same_clustering(got, kmeans_reference(x, 101, 3, init))
    assert (got.sizes[..., 7] == 0).all() and (got.centroids[:, :, 7] == 500.0).all()
    assert torch.equal(torch.where(got.labels > 7, got.labels - 1, got.labels).long(), ids)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 96], ids=["triton", "reference"])
def test_gpu_repeated_calls_give_bit_identical_clusterings(d):
    """Wan-like bf16 tokens, cold, warm and reused calls twice each: every output the same bits (the member sums
    are integers and the ranks a sort, whatever order the programs and their atomics run in)."""
    x = svg2_tokens(h=12, s=8192, d=d)

    def calls():
        cold = km.kmeans(x, 300, 3, seed=1)
        warm = km.kmeans(x, 1000, 2, sample_stride=4)
        reused = km.kmeans(x, 300, 2, reuse=Reuse(cold, 0.1, 8))
        return [*(getattr(c, f) for c in (cold, warm, reused) for f in ("centroids", "labels", "sizes", "ranks")),
                *km.cluster_permutation(warm.labels, warm.sizes, warm.ranks)]

    first, second = calls(), calls()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 96], ids=["triton", "reference"])
def test_gpu_no_host_sync(d):
    x = svg2_tokens(h=4, s=4096, d=d)
    warm_up = km.kmeans(x, 300, 3)  # compiles the kernels, initialises the sort
    km.cluster_permutation(warm_up.labels, warm_up.sizes, warm_up.ranks)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cold = km.kmeans(x, 300, 3, seed=1)
        warm = km.kmeans(x, 300, 2, cold.centroids)
        perm, offsets = km.cluster_permutation(warm.labels, warm.sizes, warm.ranks)
        reused = km.kmeans(x, 300, 2, sample_stride=4, reuse=Reuse(warm, 0.1, 8))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(offsets[..., 1:] - offsets[..., :-1], warm.sizes)
    assert torch.equal(torch.gather(warm.labels, 2, perm).sort(-1).values, torch.gather(warm.labels, 2, perm))
    assert reused.settled.shape == (1, 4) and torch.equal(reused.sizes, cluster_sizes(reused.labels, 300))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_reuse_keeps_settled_heads_and_reclusters_moved_ones(dtype):
    x, _, centers = blobs(2, 3, 100, 30, 64, seed=16, contiguous=False, device="cuda")
    previous = kmeans_reference(x, 100, 3, centers)
    x = shuffled(x, 1, seed=6).to(dtype)
    reuse = Reuse(previous, 0.05, 8)
    got, want = km.kmeans(x, 100, 2, sample_stride=4, reuse=reuse), kmeans_reference(x, 100, 2, sample_stride=4, reuse=reuse)
    assert got.settled.tolist() == want.settled.tolist() == [[True, False, True]] * 2
    for field in ("centroids", "labels", "sizes", "ranks"):
        assert torch.equal(getattr(got, field)[:, [0, 2]], getattr(previous, field)[:, [0, 2]])
    assert_same_clustering(got, want)
