"""Block scoring / selection helpers: references vs naive dense math, fast paths vs references,
Triton kernels under the interpreter (in a subprocess) and on the GPU."""

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


@FAST
@given(s=st.integers(1, 70), block=st.integers(1, 33), d=st.sampled_from([1, 8]))
def test_mean_pool_reference_and_fast(s, block, d):
    x = torch.randn(2, 1, s, d, dtype=torch.float64)
    nb = math.ceil(s / block)
    naive = torch.stack([x[:, :, i * block : min(s, (i + 1) * block)].mean(2) for i in range(nb)], 2)
    assert torch.allclose(ref.mean_pool_blocks_reference(x, block).double(), naive, atol=1e-6)
    assert torch.allclose(bs.mean_pool_blocks(x, block).double(), naive, atol=1e-6)
    assert bs.mean_pool_blocks(x, block).dtype == torch.float32


@FAST
@given(s_q=st.integers(1, 80), s_k=st.integers(1, 80), block_q=st.integers(1, 40), block_k=st.integers(1, 40))
def test_estimate_block_scores(s_q, s_k, block_q, block_k):
    q, k = make_qk(1, 2, s_q, s_k, 8, seed=s_q * 97 + s_k)
    scale = 0.4
    nk = math.ceil(s_k / block_k)
    qp = torch.stack([q[:, :, i : i + block_q].double().mean(2) for i in range(0, s_q, block_q)], 2)
    kp = torch.stack([k[:, :, i : i + block_k].double().mean(2) for i in range(0, s_k, block_k)], 2)
    sizes = torch.tensor([min(block_k, s_k - j * block_k) for j in range(nk)], dtype=torch.float64)
    naive = torch.softmax(qp @ kp.transpose(-1, -2) * scale + sizes.log(), -1)
    got_ref = ref.estimate_block_scores_reference(q, k, block_q, block_k, scale)
    got = bs.estimate_block_scores(q, k, block_q, block_k, scale)
    assert got.dtype == torch.float32 and got.shape == naive.shape
    assert rel_l2(got_ref, naive) < 1e-5 and rel_l2(got, naive) < 1e-5
    assert torch.allclose(got.sum(-1), torch.ones(()), atol=1e-5)


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
@given(nq=st.integers(1, 6), nk=st.integers(1, 20), k=st.integers(0, 25), n_always=st.integers(0, 3), seed=st.integers(0, 99))
def test_select_topk_matches_reference(nq, nk, k, n_always, seed):
    scores = distinct_scores((2, 1, nq, nk), seed)
    always = torch.randperm(nk, generator=torch.Generator().manual_seed(seed))[: min(n_always, nk)]
    counts, indices = bs.select_topk(scores, k, always)
    r_counts, r_indices = ref.select_topk_reference(scores, k, always)
    assert counts.dtype == indices.dtype == torch.int32
    assert torch.equal(counts, r_counts) and torch.equal(indices, r_indices)
    assert indices.shape[-1] == min(nk, k + len(always))
    assert_csr(counts, indices)
    mask = layout_to_mask(counts, indices, nk)
    assert mask[..., always].all()
    topk = scores.topk(min(k, nk), -1).indices
    assert torch.gather(mask, -1, topk).all()


@FAST
@given(nq=st.integers(1, 6), nk=st.integers(1, 30), top_p=st.floats(0.0, 1.0), min_blocks=st.integers(0, 4),
       n_always=st.integers(0, 2), seed=st.integers(0, 99))  # fmt: skip
def test_select_top_p_matches_reference(nq, nk, top_p, min_blocks, n_always, seed):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(1, 2, nq, nk, generator=g) * 3, -1)
    always = torch.randperm(nk, generator=g)[: min(n_always, nk)]
    counts, indices = bs.select_top_p(probs, top_p, min_blocks, always)
    r_counts, r_indices = ref.select_top_p_reference(probs, top_p, min_blocks, always)
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
    with pytest.raises(ValueError, match="k must be"):
        bs.select_topk(torch.rand(2, 3), -1)
    with pytest.raises(ValueError, match="always_kept"):
        bs.select_topk(torch.rand(2, 3), 1, torch.tensor([[0]]))
    with pytest.raises(ValueError, match="block"):
        bs.mean_pool_blocks(torch.rand(1, 1, 4, 2), 0)
    with pytest.raises(ValueError, match="lse"):
        bs.block_mass_with_lse(torch.rand(1, 1, 4, 16), torch.rand(1, 1, 4, 16), torch.rand(1, 1, 3), 2, 2)


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
def test_gpu_selection_matches_cpu():
    q, k = make_qk(1, 12, 32760, 32760, 128, torch.bfloat16, device="cuda")
    scores = bs.estimate_block_scores(q, k, 128, 128)
    scores_cpu = bs.estimate_block_scores(q.cpu(), k.cpu(), 128, 128)
    assert rel_l2(scores.cpu(), scores_cpu) < 1e-4
    counts, indices = bs.select_top_p(scores, 0.9, 4, torch.tensor([0, 1]))
    assert_csr(counts.cpu(), indices.cpu())
    mask = layout_to_mask(counts.cpu(), indices.cpu(), scores.shape[-1])
    assert ((scores.cpu() * mask).sum(-1) >= 0.9 - 1e-4).all()
