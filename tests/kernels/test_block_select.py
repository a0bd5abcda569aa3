"""Block scoring / selection helpers: references vs naive dense math, fast paths vs references,
Triton kernels under the interpreter (in a subprocess) and on the GPU; SVG2's fused cluster-pair
selection vs its torch specification."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_interpreter_support import interp, rel_l2, run_interpreted
from sparse_compile.kernels import block_select as bs
from sparse_compile.kernels import block_select_reference as ref

FAST = settings(max_examples=25, deadline=None)


def make_qk(b, h, s_q, s_k, d, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s_q, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, h, s_k, d, generator=g).to(device=device, dtype=dtype)
    return q, k


def dense_scores(q, k, scale):
    return torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale


def naive_block_mass(q, k, block_q, block_k, scale):
    """Exact block mass from the full softmax matrix, fp64 (small sizes only)."""
    p = torch.softmax(dense_scores(q, k, scale), dim=-1)
    s_q, s_k = q.shape[2], k.shape[2]
    nq, nk = math.ceil(s_q / block_q), math.ceil(s_k / block_k)
    out = torch.zeros(*q.shape[:2], nq, nk, dtype=torch.float64)
    for i in range(nq):
        for j in range(nk):
            blk = p[:, :, i * block_q : (i + 1) * block_q, j * block_k : (j + 1) * block_k]
            out[:, :, i, j] = blk.sum((-1, -2)) / blk.shape[2]
    return out


def layout_to_mask(counts, indices, nk):
    mask = torch.zeros(*counts.shape, nk + 1, dtype=torch.bool)
    valid = torch.arange(indices.shape[-1]) < counts.unsqueeze(-1)
    return mask.scatter_(-1, torch.where(valid, indices.long(), nk), True)[..., :nk]


def assert_csr(counts, indices):
    """Valid entries ascending and distinct, padding zero."""
    valid = torch.arange(indices.shape[-1]) < counts.unsqueeze(-1).long()
    assert (indices[~valid] == 0).all()
    pairs_valid = valid[..., 1:]
    assert (indices[..., 1:] > indices[..., :-1])[pairs_valid].all()


# ------------------------------------------------------------------------------------------------
# References vs naive dense computations
# ------------------------------------------------------------------------------------------------


def test_pooled_block_scores_gives_empty_blocks_zero():
    qp, kp = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 5, 4)
    sizes = torch.tensor([3, 0, 7, 1, 0])
    p = bs.pooled_block_scores(qp, kp, sizes, 0.5)
    assert (p[..., 1] == 0).all() and (p[..., 4] == 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-6)


@FAST
@given(s_q=st.integers(1, 70), s_k=st.integers(1, 90), block=st.integers(1, 64))
def test_attention_lse_reference(s_q, s_k, block):
    q, k = make_qk(2, 1, s_q, s_k, 16, seed=s_q + 1000 * s_k)
    naive = torch.logsumexp(dense_scores(q, k, 0.3), -1)
    got = ref.attention_lse_reference(q, k, 0.3, block=block)
    assert got.dtype == torch.float32
    assert rel_l2(got, naive) < 1e-5


@FAST
@given(s_q=st.integers(1, 70), s_k=st.integers(1, 90), block_q=st.integers(1, 40), block_k=st.integers(1, 40))
def test_block_mass_reference(s_q, s_k, block_q, block_k):
    q, k = make_qk(1, 2, s_q, s_k, 16, seed=7 * s_q + s_k)
    lse = ref.attention_lse_reference(q, k, 0.25)
    got = ref.block_mass_with_lse_reference(q, k, lse, block_q, block_k, 0.25)
    naive = naive_block_mass(q, k, block_q, block_k, 0.25)
    assert got.dtype == torch.float32
    assert rel_l2(got, naive) < 1e-4
    assert torch.allclose(got.sum(-1), torch.ones(()), atol=1e-4)


def test_block_mass_ignores_rows_with_neg_inf_lse():
    q, k = make_qk(1, 1, 8, 16, 16)
    lse = ref.attention_lse_reference(q, k)
    lse[0, 0, 4:] = float("-inf")
    got = ref.block_mass_with_lse_reference(q, k, lse, 8, 4)
    assert torch.isfinite(got).all()
    assert torch.allclose(got.sum(-1), torch.tensor(0.5), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------


def distinct_scores(shape, seed):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    return torch.randperm(n, generator=g).float().reshape(shape) / n


@FAST
@given(nq=st.integers(1, 6), nk=st.integers(1, 30), top_p=st.floats(0.0, 1.0), min_blocks=st.integers(0, 4),
       seed=st.integers(0, 99))  # fmt: skip
def test_select_top_p_matches_reference(nq, nk, top_p, min_blocks, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(1, 2, nq, nk, generator=g) * 3, -1)
    counts, indices = bs.select_top_p(probs, top_p, min_blocks)
    r_counts, r_indices = ref.select_top_p_reference(probs, top_p, min_blocks)
    assert torch.equal(counts, r_counts) and torch.equal(indices, r_indices)
    assert_csr(counts, indices)
    mask = layout_to_mask(counts, indices, nk)
    kept_mass = (probs * mask).sum(-1)
    assert (kept_mass >= min(top_p, 1.0) - 1e-5).all()
    assert (counts >= min(min_blocks, nk)).all()


def test_select_top_p_is_minimal():
    probs = torch.tensor([[0.05, 0.5, 0.2, 0.25]])
    counts, indices = bs.select_top_p(probs, 0.7, min_blocks=1)
    assert counts.tolist() == [2] and indices[0, :2].tolist() == [1, 3]
    counts, indices = bs.select_top_p(probs, 0.76, min_blocks=1)
    assert counts.tolist() == [3] and indices[0, :3].tolist() == [1, 2, 3]
    counts, _ = bs.select_top_p(probs, 0.0, min_blocks=2)
    assert counts.tolist() == [2]


def test_keep_mask_to_layout_round_trip():
    mask = torch.rand(3, 2, 5, 17, generator=torch.Generator().manual_seed(3)) < 0.3
    counts, indices = bs.keep_mask_to_layout(mask)
    assert_csr(counts, indices)
    assert torch.equal(layout_to_mask(counts, indices, 17), mask)


def test_selection_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_p"):
        bs.select_top_p(torch.rand(2, 3), 1.5)
    with pytest.raises(ValueError, match="min_blocks"):
        bs.select_top_p(torch.rand(2, 3), 0.5, min_blocks=-1)
    with pytest.raises(ValueError, match="block"):
        bs.attention_lse(torch.rand(1, 1, 4, 16), torch.rand(1, 1, 4, 16), block=0)
    with pytest.raises(ValueError, match="lse"):
        bs.block_mass_with_lse(torch.rand(1, 1, 4, 16), torch.rand(1, 1, 4, 16), torch.rand(1, 1, 3), 2, 2)


# ------------------------------------------------------------------------------------------------
# SVG2 cluster pairs: select_top_p_clusters (fused Triton path vs the torch ops that specify it)
# ------------------------------------------------------------------------------------------------


def cluster_inputs(b, h, nq, nk, d, seed, zero_sizes=True, spread=2.0, device="cpu"):
    """Random fp32 centroids (keys scaled by ``spread``: the larger, the more peaked the rows) and int32
    cluster sizes in [1, 50); with ``zero_sizes`` about one cluster in five is empty, never cluster 0."""
    g = torch.Generator().manual_seed(seed)
    q_centroids = torch.randn(b, h, nq, d, generator=g)
    k_centroids = torch.randn(b, h, nk, d, generator=g) * spread
    sizes = torch.randint(1, 50, (b, h, nk), generator=g, dtype=torch.int32)
    if zero_sizes:
        sizes[(torch.rand(b, h, nk, generator=g) < 0.2) & (torch.arange(nk) > 0)] = 0
    return q_centroids.to(device), k_centroids.to(device), sizes.to(device)


def exact_cluster_probs(q_centroids, k_centroids, sizes, scale):
    """``softmax_j(scale * cq_i . ck_j + log(size_j))`` in fp64, ``(B, H, NQ, NK)``."""
    logits = torch.matmul(q_centroids.double(), k_centroids.double().transpose(-1, -2)) * scale
    return torch.softmax(logits + sizes.double().log().unsqueeze(-2), -1)


def ambiguous_rows(probs, top_p, min_blocks, tol=1e-5):
    """Rows ``(B, H, NQ)`` of exact probabilities ``probs`` whose selection fp32 rounding may change.

    Either the mass before some rank r >= 1 lies within ``tol`` of ``top_p`` (summed in another order
    it may fall on the other side), or the last kept and the first dropped rank are a near tie
    (relative gap in (0, ``tol``); exact ties break to the lower id on every path).
    """
    nk = probs.shape[-1]
    values = probs.sort(-1, descending=True).values
    mass_before = torch.nn.functional.pad(values.cumsum(-1)[..., :-1], (1, 0))
    near_top_p = ((mass_before[..., 1:] - top_p).abs() < tol).any(-1)
    n = (mass_before < top_p).sum(-1, keepdim=True).clamp_min(min(min_blocks, nk))
    last = values.gather(-1, (n - 1).clamp_min(0)).squeeze(-1)
    first_dropped = values.gather(-1, n.clamp_max(nk - 1)).squeeze(-1)
    gap = last - first_dropped
    near_tie = ((n > 0) & (n < nk)).squeeze(-1) & (gap > 0) & (gap < tol * last)
    return near_top_p | near_tie


def assert_selection_matches_reference(got, want, probs, sizes, top_p, min_blocks, max_ambiguous=0.05):
    """``got`` equals ``want`` in every row but the (rare) :func:`ambiguous_rows`; every row of ``got`` is
    a CSR row that reaches ``top_p`` with at least ``min_blocks`` clusters, its kept tokens their sizes."""
    ambiguous = ambiguous_rows(probs, top_p, min_blocks)
    assert ambiguous.float().mean() <= max_ambiguous
    exact = ~ambiguous
    for name, g, w in zip(got._fields, got, want):
        assert g.dtype == torch.int32 and g.shape == w.shape, name
        assert torch.equal(g[exact], w[exact]), name
    counts, indices = got.counts.cpu(), got.indices.cpu()
    assert_csr(counts, indices)
    assert (indices >= 0).all() and (indices < probs.shape[-1]).all()
    assert torch.equal(got.kept_tokens, bs.kept_kv_tokens(sizes, got.counts, got.indices))
    mask = layout_to_mask(counts, indices, probs.shape[-1])
    assert ((probs.cpu() * mask).sum(-1) >= top_p - 1e-5).all()
    assert (counts >= min(min_blocks, probs.shape[-1])).all()


def poisoned_selection(b, h, nq, nk):
    """Output buffers filled with -7, so that an element the kernel leaves unwritten shows."""
    counts = torch.full((b, h, nq), -7, dtype=torch.int32)
    return bs.ClusterSelection(counts, torch.full((b, h, nq, nk), -7, dtype=torch.int32), counts.clone())


# Query centroid 0: probabilities proportional to the sizes [1, 5, 2, 0, 2], i.e. [0.1, 0.5, 0.2, 0, 0.2];
# ranked: id 1, then the exact tie 2 before 4 (lower id first), then 0, then the empty cluster 3.
WORKED_EXAMPLE_SIZES = [1, 5, 2, 0, 2]
WORKED_EXAMPLE = [
    # (top_p, min_blocks, kept ids, kept key tokens)
    (0.6, 1, [1, 2], 7),  # mass before id 4 is 0.7 >= 0.6
    (0.75, 1, [1, 2, 4], 9),
    (0.95, 1, [0, 1, 2, 4], 10),  # the empty cluster has probability 0: never needed for top-p
    (0.0, 2, [1, 2], 7),  # top_p 0: exactly min_blocks
    (0.0, 0, [], 0),
    (0.3, 9, [0, 1, 2, 3, 4], 10),  # min_blocks above NK: every cluster
]


def check_worked_example(select) -> None:
    """``select(q_centroids, k_centroids, k_sizes, scale, top_p, min_blocks)`` on :data:`WORKED_EXAMPLE`."""
    q_centroids = torch.zeros(1, 1, 1, 16)
    k_centroids = torch.randn(1, 1, 5, 16, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[WORKED_EXAMPLE_SIZES]], dtype=torch.int32)
    for top_p, min_blocks, ids, tokens in WORKED_EXAMPLE:
        got = select(q_centroids, k_centroids, sizes, 0.3, top_p, min_blocks)
        assert got.counts.tolist() == [[[len(ids)]]], (top_p, min_blocks)
        assert got.indices.tolist() == [[[ids + [0] * (5 - len(ids))]]], (top_p, min_blocks)
        assert got.kept_tokens.tolist() == [[[tokens]]], (top_p, min_blocks)


def test_select_top_p_clusters_worked_example():
    check_worked_example(bs.select_top_p_clusters)  # CPU: the torch ops


def test_select_top_p_clusters_on_cpu_is_scores_then_select_top_p():
    q_centroids, k_centroids, sizes = cluster_inputs(2, 3, 7, 40, 16, seed=5)
    got = bs.select_top_p_clusters(q_centroids, k_centroids, sizes, 0.25, 0.8, 4)
    counts, indices = bs.select_top_p(bs.pooled_block_scores(q_centroids, k_centroids, sizes, 0.25), 0.8, 4)
    assert torch.equal(got.counts, counts) and torch.equal(got.indices, indices)
    assert torch.equal(got.kept_tokens, bs.kept_kv_tokens(sizes, counts, indices))


def test_kept_kv_tokens_sums_the_sizes_of_the_kept_clusters():
    sizes = torch.tensor([[[4, 0, 9, 2]]], dtype=torch.int32)
    counts = torch.tensor([[[2, 0, 4]]], dtype=torch.int32)
    indices = torch.tensor([[[[0, 2, 0, 0], [0, 0, 0, 0], [0, 1, 2, 3]]]], dtype=torch.int32)
    assert bs.kept_kv_tokens(sizes, counts, indices).tolist() == [[[13, 0, 15]]]


def test_select_top_p_clusters_rejects_bad_arguments():
    q_centroids, k_centroids, sizes = cluster_inputs(1, 2, 3, 6, 16, seed=0)
    with pytest.raises(ValueError, match="top_p"):
        bs.select_top_p_clusters(q_centroids, k_centroids, sizes, 0.1, 1.5)
    with pytest.raises(ValueError, match="min_blocks"):
        bs.select_top_p_clusters(q_centroids, k_centroids, sizes, 0.1, 0.5, -1)
    with pytest.raises(ValueError, match="k_sizes"):
        bs.select_top_p_clusters(q_centroids, k_centroids, sizes.float(), 0.1, 0.5)
    with pytest.raises(ValueError, match="k_sizes"):
        bs.select_top_p_clusters(q_centroids, k_centroids, sizes[..., :5], 0.1, 0.5)
    with pytest.raises(ValueError, match="at least one cluster"):
        bs.select_top_p_clusters(q_centroids, k_centroids[:, :, :0], sizes[..., :0], 0.1, 0.5)
    with pytest.raises(ValueError, match="out.indices"):
        out = poisoned_selection(1, 2, 3, 5)
        bs.select_top_p_clusters_triton(q_centroids, k_centroids, sizes, 0.1, 0.5, out=out)


# ------------------------------------------------------------------------------------------------
# Custom ops (CPU path = reference)
# ------------------------------------------------------------------------------------------------


def test_custom_ops_cpu_and_fakes():
    q, k = make_qk(1, 2, 40, 24, 16)
    lse = bs.attention_lse(q, k, block=16)
    assert torch.allclose(lse, ref.attention_lse_reference(q, k))
    mass = bs.block_mass_with_lse(q, k, lse, 16, 8)
    assert torch.allclose(mass, ref.block_mass_with_lse_reference(q, k, lse, 16, 8))
    torch.library.opcheck(torch.ops.sparse_compile.attention_lse, (q, k, 0.25, 16))
    torch.library.opcheck(torch.ops.sparse_compile.block_mass_with_lse, (q, k, lse, 16, 8, 0.25))


# ------------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (TRITON_INTERPRET must be set before triton's import)
# ------------------------------------------------------------------------------------------------


def test_interpreter_tests_in_subprocess():
    """Run this file's ``interp_`` tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted(__file__, "interp_")


INTERP_CASES = [
    # (s_q, s_k, d, block_q, block_k)
    (96, 80, 32, 32, 16),
    (100, 77, 16, 64, 48),
    (33, 130, 64, 16, 64),
]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", INTERP_CASES)
def test_interp_attention_lse(case, dtype):
    s_q, s_k, d, block_q, _ = case
    q, k = make_qk(2, 2, s_q, s_k, d, dtype, seed=s_q)
    out = torch.full((2, 2, s_q), float("nan"))
    got = bs.attention_lse_triton(q, k, 0.2, block=max(16, block_q), out=out)
    assert got is out and not got.isnan().any()
    assert rel_l2(got, ref.attention_lse_reference(q, k, 0.2)) < 1e-5


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", INTERP_CASES)
def test_interp_block_mass(case, dtype):
    s_q, s_k, d, block_q, block_k = case
    q, k = make_qk(1, 3, s_q, s_k, d, dtype, seed=s_k)
    lse = ref.attention_lse_reference(q, k, 0.2)
    lse[0, 1, :5] = float("-inf")  # rows that attend nothing contribute nothing
    nq, nk = math.ceil(s_q / block_q), math.ceil(s_k / block_k)
    out = torch.full((1, 3, nq, nk), float("nan"))
    got = bs.block_mass_triton(q, k, lse, block_q, block_k, 0.2, out=out)
    assert got is out and not got.isnan().any()
    assert rel_l2(got, ref.block_mass_with_lse_reference(q, k, lse, block_q, block_k, 0.2)) < 1e-5


@interp
def test_interp_block_mass_non_contiguous_inputs():
    q, k = make_qk(1, 2, 64, 64, 32, torch.float16)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, S, H, D) storage
    lse = ref.attention_lse_reference(q, k).transpose(1, 2).contiguous().transpose(1, 2)
    got = bs.block_mass_triton(q_t, k, lse, 32, 32, 0.3)
    assert rel_l2(got, ref.block_mass_with_lse_reference(q, k, lse, 32, 32, 0.3)) < 1e-5


CLUSTER_CASES = [
    # (NK, top_p, min_blocks, some empty clusters, key spread)
    pytest.param(37, 0.9, 2, True, 2.0, id="min_blocks-below-the-top-p-count"),
    pytest.param(37, 0.6, 30, True, 2.0, id="min_blocks-above-the-top-p-count"),
    pytest.param(32, 0.8, 1, True, 2.0, id="NK-a-power-of-two"),
    pytest.param(37, 0.0, 3, True, 2.0, id="top_p-0-keeps-min_blocks"),
    # every probability well above rounding, so that the mass before the last rank is clearly below 1
    pytest.param(37, 1.0, 0, False, 0.5, id="top_p-1-keeps-every-cluster"),
    pytest.param(5, 0.5, 9, True, 2.0, id="min_blocks-above-NK"),
    pytest.param(1, 0.5, 0, False, 2.0, id="one-cluster"),
]


@interp
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("nk, top_p, min_blocks, zero_sizes, spread", CLUSTER_CASES)
def test_interp_select_top_p_clusters_matches_torch(nk, top_p, min_blocks, zero_sizes, spread, seed):
    q_centroids, k_centroids, sizes = cluster_inputs(1, 2, 5, nk, 16, seed=100 * nk + seed, zero_sizes=zero_sizes,
                                                     spread=spread)  # fmt: skip
    out = poisoned_selection(1, 2, 5, nk)
    got = bs.select_top_p_clusters_triton(q_centroids, k_centroids, sizes, 0.25, top_p, min_blocks, out=out)
    assert all(g is o for g, o in zip(got, out))
    want = bs.select_top_p_clusters_torch(q_centroids, k_centroids, sizes, 0.25, top_p, min_blocks)
    probs = exact_cluster_probs(q_centroids, k_centroids, sizes, 0.25)
    assert_selection_matches_reference(got, want, probs, sizes, top_p, min_blocks, max_ambiguous=0.2)
    if top_p == 0.0:
        assert (got.counts == min(min_blocks, nk)).all()
    if top_p == 1.0 or min_blocks >= nk:
        assert (got.counts == nk).all()


@interp
@pytest.mark.parametrize("top_p, min_blocks", [(0.5, 1), (0.9, 4), (0.2, 30)])
def test_interp_select_top_p_clusters_breaks_exact_ties_by_lower_id(top_p, min_blocks):
    """Key clusters repeating 3 centroids with sizes 0 or 10: rows of a few exactly equal probabilities and zeros."""
    g = torch.Generator().manual_seed(min_blocks)
    q_centroids = torch.randn(1, 2, 5, 16, generator=g)
    pattern = torch.randint(0, 3, (40,), generator=g)
    k_centroids = torch.randn(1, 2, 3, 16, generator=g)[:, :, pattern]
    sizes = 10 * torch.randint(0, 2, (1, 2, 40), generator=g, dtype=torch.int32)
    sizes[..., 0] = 10
    got = bs.select_top_p_clusters_triton(q_centroids, k_centroids, sizes, 0.25, top_p, min_blocks)
    want = bs.select_top_p_clusters_torch(q_centroids, k_centroids, sizes, 0.25, top_p, min_blocks)
    probs = exact_cluster_probs(q_centroids, k_centroids, sizes, 0.25)
    assert_selection_matches_reference(got, want, probs, sizes, top_p, min_blocks, max_ambiguous=0.2)


@interp
def test_interp_select_top_p_clusters_worked_example():
    check_worked_example(bs.select_top_p_clusters_triton)


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("block", [64, 128])
def test_gpu_lse_and_block_mass_bf16(block):
    q, k = make_qk(1, 2, 32760, 32760, 128, torch.bfloat16, device="cuda")
    lse = torch.full((1, 2, 32760), float("nan"), device="cuda")
    bs.attention_lse_triton(q, k, 1 / math.sqrt(128), block=block, out=lse)
    lse_ref = ref.attention_lse_reference(q, k, block=1024)
    assert not lse.isnan().any() and rel_l2(lse, lse_ref) < 1e-4
    mass = bs.block_mass_with_lse(q, k, lse_ref, block, block)
    mass_ref = ref.block_mass_with_lse_reference(q, k, lse_ref, block, block)
    assert not mass.isnan().any() and rel_l2(mass, mass_ref) < 2e-3
    assert torch.allclose(mass.sum(-1), torch.ones((), device="cuda"), atol=2e-2)


@pytest.mark.gpu
def test_gpu_select_top_p_keeps_the_mass_on_cuda():
    probs = torch.softmax(torch.randn(1, 12, 256, 256, generator=torch.Generator().manual_seed(0)) * 3, -1)
    counts, indices = bs.select_top_p(probs.cuda(), 0.9, 4)
    assert_csr(counts.cpu(), indices.cpu())
    mask = layout_to_mask(counts.cpu(), indices.cpu(), probs.shape[-1])
    assert ((probs * mask).sum(-1) >= 0.9 - 1e-4).all() and (counts >= 4).all()


@pytest.mark.gpu
@pytest.mark.parametrize("nk, top_p", [(1000, 0.5), (1000, 0.9), (1000, 0.95), (3000, 0.8)])
def test_gpu_select_top_p_clusters_matches_torch(nk, top_p):
    """SVG2's shape (12 heads, 200 x 1000 clusters, D = 128, min_kc_ratio 0.1) and a longer row.

    Near top_p = 1 the boundary ranks hold tiny probabilities, so more rows are ambiguous (up to 10% here).
    """
    q_centroids, k_centroids, sizes = cluster_inputs(1, 12, 200, nk, 128, seed=nk, device="cuda")
    scale, min_blocks = 128**-0.5, nk // 10
    got = bs.select_top_p_clusters(q_centroids, k_centroids, sizes, scale, top_p, min_blocks)  # CUDA: Triton
    want = bs.select_top_p_clusters_torch(q_centroids, k_centroids, sizes, scale, top_p, min_blocks)
    probs = exact_cluster_probs(q_centroids, k_centroids, sizes, scale)
    assert_selection_matches_reference(got, want, probs, sizes, top_p, min_blocks, max_ambiguous=0.1)


@pytest.mark.gpu
def test_gpu_select_top_p_clusters_no_host_sync():
    q_centroids, k_centroids, sizes = cluster_inputs(1, 12, 200, 1000, 128, seed=3, device="cuda")
    bs.select_top_p_clusters(q_centroids, k_centroids, sizes, 0.1, 0.9, 100)  # compiles the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = bs.select_top_p_clusters(q_centroids, k_centroids, sizes, 0.1, 0.9, 100)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert (got.counts >= 100).all()
