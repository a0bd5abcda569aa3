"""Variable-block-size (cluster) sparse attention: reference vs masked dense attention, fixed-block
equivalence, the Triton kernel under the interpreter (in a subprocess) and on the GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_interpreter_support import interp, rel_l2, run_interpreted
from sparse_compile.kernels import varlen_block_sparse as vb
from sparse_compile.kernels.block_sparse_reference import block_sparse_attention_reference
from sparse_compile.kernels.varlen_block_sparse_reference import (
    VarlenLayout,
    check_varlen_layout_values,
    validate_varlen_inputs,
    varlen_block_sparse_attention_reference,
    varlen_kept_pairs,
    varlen_layout_to_dense_mask,
)

FAST = settings(max_examples=30, deadline=None)


def random_offsets(b, h, n, seq, g, device="cpu"):
    """(b, h, n + 1) int32 offsets of n random (possibly empty) clusters covering [0, seq)."""
    cuts = torch.sort(torch.randint(0, seq + 1, (b, h, n - 1), generator=g), -1).values
    ends = torch.full((b, h, 1), seq)
    return torch.cat([torch.zeros(b, h, 1, dtype=torch.long), cuts, ends], -1).int().to(device)


def random_selection(b, h, nqc, nkc, density, g, padding=0, device="cpu"):
    """Counts (b, h, nqc) and indices (b, h, nqc, nkc) keeping each pair with prob ``density``;
    the unused tail of every row holds ``padding`` (kernels must ignore it)."""
    keep = torch.rand(b, h, nqc, nkc, generator=g) < density
    counts = keep.sum(-1).int()
    ids = torch.where(keep, torch.arange(nkc), nkc).sort(-1).values
    return counts.to(device), torch.where(ids == nkc, padding, ids).int().to(device)


def random_problem(b, h, s_q, s_k, d, nqc, nkc, density, seed, dtype=torch.float32, device="cpu", padding=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype) for s in (s_q, s_k, s_k))
    layout = (
        random_offsets(b, h, nqc, s_q, g, device),
        random_offsets(b, h, nkc, s_k, g, device),
        *random_selection(b, h, nqc, nkc, density, g, padding, device),
    )
    return q, k, v, layout


def masked_dense(q, k, v, mask, scale):
    """fp64 attention with a boolean mask; rows with nothing kept give 0 / -inf."""
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    return torch.matmul(p, v.double()), lse


def expanded(q, k, v, layout) -> VarlenLayout:
    return validate_varlen_inputs(q, k, v, *layout)


# ------------------------------------------------------------------------------------------------
# Reference
# ------------------------------------------------------------------------------------------------


@FAST
@given(
    b=st.integers(1, 2), h=st.integers(1, 2), s_q=st.integers(1, 60), s_k=st.integers(1, 60),
    nqc=st.integers(1, 7), nkc=st.integers(1, 12), density=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    seed=st.integers(0, 10_000),
)  # fmt: skip
def test_reference_matches_masked_dense(b, h, s_q, s_k, nqc, nkc, density, seed):
    q, k, v, layout = random_problem(b, h, s_q, s_k, 8, nqc, nkc, density, seed, padding=seed % 3)
    out, lse = varlen_block_sparse_attention_reference(q, k, v, *layout, scale=0.3, return_lse=True)
    mask = varlen_layout_to_dense_mask(expanded(q, k, v, layout), s_q, s_k)
    want_out, want_lse = masked_dense(q, k, v, mask, 0.3)
    assert out.is_contiguous() and lse.dtype == torch.float32
    assert torch.allclose(out.double(), want_out, atol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse[finite].double(), want_lse[finite], atol=1e-5)
    assert (out[~finite] == 0).all()


def test_reference_density_one_equals_sdpa():
    q, k, v, (q_off, kv_off, _, _) = random_problem(2, 3, 70, 50, 16, 5, 9, 1.0, seed=1)
    counts = torch.full((1, 1, 5), 9, dtype=torch.int32)
    indices = torch.arange(9, dtype=torch.int32).expand(1, 1, 5, 9)
    out = varlen_block_sparse_attention_reference(q, k, v, q_off, kv_off, counts, indices)
    assert rel_l2(out, F.scaled_dot_product_attention(q, k, v)) < 1e-5


def test_reference_empty_clusters_and_cluster_keeping_nothing():
    q, k, v, _ = random_problem(1, 1, 10, 12, 8, 1, 1, 1.0, seed=2)
    q_off = torch.tensor([[[0, 0, 4, 4, 10]]], dtype=torch.int32)  # clusters 0 and 2 empty
    kv_off = torch.tensor([[[0, 5, 5, 12]]], dtype=torch.int32)  # kv cluster 1 empty
    counts = torch.tensor([[[3, 0, 1, 2]]], dtype=torch.int32)  # q cluster 1 (rows 0-3) keeps nothing
    indices = torch.tensor([[[[0, 1, 2], [0, 0, 0], [1, 0, 0], [0, 2, 0]]]], dtype=torch.int32)
    out, lse = varlen_block_sparse_attention_reference(q, k, v, q_off, kv_off, counts, indices, return_lse=True)
    assert (out[0, 0, :4] == 0).all() and torch.isneginf(lse[0, 0, :4]).all()
    want = F.scaled_dot_product_attention(q[:, :, 4:], k, v)
    assert rel_l2(out[:, :, 4:], want) < 1e-5


@pytest.mark.parametrize("s_q,s_k,block_q,block_k", [(64, 96, 16, 32), (70, 50, 32, 16)])
def test_fixed_size_clusters_equal_block_sparse_reference(s_q, s_k, block_q, block_k):
    g = torch.Generator().manual_seed(5)
    b, h, d = 2, 2, 16
    q, k, v = (torch.randn(b, h, s, d, generator=g) for s in (s_q, s_k, s_k))
    nq, nk = math.ceil(s_q / block_q), math.ceil(s_k / block_k)
    counts, indices = random_selection(b, h, nq, nk, 0.5, g)
    fixed = block_sparse_attention_reference(q, k, v, counts, indices, block_q=block_q, block_k=block_k, return_lse=True)
    q_off = torch.tensor([min(i * block_q, s_q) for i in range(nq + 1)], dtype=torch.int32).view(1, 1, -1)
    kv_off = torch.tensor([min(i * block_k, s_k) for i in range(nk + 1)], dtype=torch.int32).view(1, 1, -1)
    varlen = varlen_block_sparse_attention_reference(q, k, v, q_off, kv_off, counts, indices, return_lse=True)
    assert rel_l2(varlen[0], fixed[0]) < 1e-6
    assert torch.equal(torch.isneginf(varlen[1]), torch.isneginf(fixed[1]))
    finite = torch.isfinite(fixed[1])
    assert torch.allclose(varlen[1][finite], fixed[1][finite], atol=1e-5)


def test_kept_pairs_matches_dense_mask():
    q, k, v, layout = random_problem(2, 2, 40, 33, 8, 6, 7, 0.4, seed=9)
    lay = expanded(q, k, v, layout)
    assert torch.equal(varlen_kept_pairs(lay), varlen_layout_to_dense_mask(lay, 40, 33).sum((-1, -2)))


def test_validation_errors():
    q, k, v, (q_off, kv_off, counts, indices) = random_problem(1, 2, 20, 16, 8, 3, 4, 0.5, seed=3)
    run = varlen_block_sparse_attention_reference
    with pytest.raises(ValueError, match="int32"):
        run(q, k, v, q_off.long(), kv_off, counts, indices)
    with pytest.raises(ValueError, match="share a dtype"):
        run(q, k.half(), v, q_off, kv_off, counts, indices)
    with pytest.raises(ValueError, match="k and v"):
        run(q, k[:, :, :-1], v, q_off, kv_off, counts, indices)
    with pytest.raises(ValueError, match="kv_cluster_counts"):
        run(q, k, v, q_off, kv_off, counts[..., :2], indices)
    with pytest.raises(ValueError, match="batch/head"):
        run(q, k, v, q_off.expand(3, 2, -1), kv_off, counts, indices)
    bad_end = q_off.clone()
    bad_end[..., -1] = 19
    with pytest.raises(ValueError, match="start at 0 and end"):
        run(q, k, v, bad_end, kv_off, counts, indices)
    descending = torch.tensor([2, 1, 0, 0], dtype=torch.int32).expand(1, 2, 3, 4)
    with pytest.raises(ValueError, match="ascending"):
        run(q, k, v, q_off, kv_off, torch.full((1, 2, 3), 2, dtype=torch.int32), descending)
    with pytest.raises(ValueError, match="NKC"):
        check_varlen_layout_values(expanded(q, k, v, (q_off, kv_off, counts, indices + 4)), 20, 16)


def test_public_op_cpu_and_fake():
    q, k, v, layout = random_problem(1, 2, 30, 20, 16, 3, 4, 0.6, seed=4)
    out, lse = vb.varlen_block_sparse_attention(q, k, v, *layout, return_lse=True)
    want = varlen_block_sparse_attention_reference(q, k, v, *layout, return_lse=True)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    torch.library.opcheck(torch.ops.sparse_compile.varlen_block_sparse_attention, (q, k, v, *layout, 0.25))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = torch.ops.sparse_compile.varlen_block_sparse_attention(
            *(mode.from_tensor(t) for t in (q, k, v, *layout)), 0.25
        )
    assert [f.stride() for f in fake] == [out.stride(), lse.stride()]


def test_tile_table_covers_every_row_once():
    g = torch.Generator().manual_seed(0)
    q_off = random_offsets(3, 1, 9, 200, g).view(3, 10)
    total = torch.randint(0, 50, (3, 9), generator=g, dtype=torch.int32)
    block_m = 16
    num_tiles = math.ceil(200 / block_m) + 9
    cluster, rows = vb._tile_table(q_off, total, block_m, num_tiles)
    for bh in range(3):
        covered = torch.zeros(200, dtype=torch.long)
        works = []
        for c, r in zip(cluster[bh].tolist(), rows[bh].tolist()):
            if c == 9:
                continue
            end = int(q_off[bh, c + 1])
            assert int(q_off[bh, c]) <= r < end
            covered[r : min(r + block_m, end)] += 1
            works.append(int(total[bh, c]))
        assert (covered == 1).all()
        assert works == sorted(works, reverse=True)


# ------------------------------------------------------------------------------------------------
# Triton kernel under the interpreter (TRITON_INTERPRET must be set before triton's import)
# ------------------------------------------------------------------------------------------------


def test_interpreter_tests_in_subprocess():
    """Run this file's ``interp_`` tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted(__file__, "interp_")


def run_triton_poisoned(q, k, v, layout, config, scale=0.3):
    b, h, s_q, d = q.shape
    out = torch.full((b, h, s_q, d), float("nan"), dtype=q.dtype)
    lse = torch.full((b, h, s_q), float("nan"))
    got = vb.varlen_block_sparse_attention_triton(q, k, v, *layout, scale=scale, config=config, out=out, lse_out=lse)
    assert got[0] is out and got[1] is lse
    assert not out.isnan().any() and not lse.isnan().any()
    return out, lse


def assert_matches_reference(q, k, v, layout, got, scale=0.3, tol=None):
    want_out, want_lse = varlen_block_sparse_attention_reference(q, k, v, *layout, scale=scale, return_lse=True)
    tol = tol or (1e-5 if q.dtype == torch.float32 else 2e-3)
    assert rel_l2(got[0], want_out) < tol
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(got[1][finite], want_lse[finite], atol=1e-4)
    assert (got[0][~finite] == 0).all()


INTERP_CASES = [
    # (b, h, s_q, s_k, d, nqc, nkc, density, config): tiny kv clusters packed into one tile, q
    # clusters spanning several tiles, empty clusters, padding garbage past the counts
    (1, 2, 100, 90, 32, 4, 30, 0.4, vb.VarlenConfig(16, 16, 4, 1)),
    (2, 1, 130, 200, 16, 3, 60, 0.3, vb.VarlenConfig(32, 16, 4, 1)),
    (1, 1, 64, 64, 64, 6, 5, 0.6, vb.VarlenConfig(16, 64, 4, 1)),
    (1, 2, 40, 256, 16, 9, 80, 0.5, vb.VarlenConfig(16, 32, 4, 1)),
]


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", INTERP_CASES, ids=range(len(INTERP_CASES)))
def test_interp_matches_reference(case, dtype):
    b, h, s_q, s_k, d, nqc, nkc, density, config = case
    q, k, v, layout = random_problem(b, h, s_q, s_k, d, nqc, nkc, density, seed=s_q + s_k, dtype=dtype, padding=-7)
    assert_matches_reference(q, k, v, layout, run_triton_poisoned(q, k, v, layout, config))


@interp
def test_interp_empty_clusters_nothing_kept_and_broadcast_layout():
    q, k, v, _ = random_problem(2, 2, 48, 40, 16, 1, 1, 1.0, seed=8, dtype=torch.float16)
    q_off = torch.tensor([[[0, 0, 20, 20, 48]]], dtype=torch.int32)  # shared by every (b, h)
    kv_off = torch.tensor([[[0, 3, 3, 4, 40]]], dtype=torch.int32)
    counts = torch.tensor([[[2, 0, 3, 0]], [[0, 4, 1, 4]]], dtype=torch.int32)  # (B, 1, NQC)
    indices = torch.tensor([[[[1, 3, 99, 99], [0, 0, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]],
                            [[[5, 5, 5, 5], [0, 1, 2, 3], [2, 0, 0, 0], [0, 1, 2, 3]]]], dtype=torch.int32)  # fmt: skip
    layout = (q_off, kv_off, counts, indices)
    got = run_triton_poisoned(q, k, v, layout, vb.VarlenConfig(16, 16, 4, 1))
    assert torch.isneginf(got[1][0, :, 20:]).all() and (got[0][0, :, 20:] == 0).all()
    assert_matches_reference(q, k, v, layout, got)


@interp
def test_interp_non_contiguous_inputs_and_density_one():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 64, 2, 32, generator=g).half().transpose(1, 2) for _ in range(3))  # (B, S, H, D) storage
    q_off = random_offsets(1, 2, 5, 64, g)
    kv_off = random_offsets(1, 2, 7, 64, g)
    counts = torch.full((1, 2, 5), 7, dtype=torch.int32)
    indices = torch.arange(7, dtype=torch.int32).expand(1, 2, 5, 7)
    out, _ = run_triton_poisoned(q, k, v, (q_off, kv_off, counts, indices), vb.VarlenConfig(16, 32, 4, 1), scale=None)
    assert rel_l2(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) < 2e-3


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


def wan_problem(h, density, seed, nqc=300, nkc=1000):
    """Wan 480p-sized problem (S = 32760, D = 128, bf16) with random clusters on the GPU."""
    return random_problem(1, h, 32760, 32760, 128, nqc, nkc, density, seed, torch.bfloat16, "cuda", padding=0)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, vb.VarlenConfig(128, 64, 8, 3), vb.VarlenConfig(64, 128, 4, 2)])
def test_gpu_matches_reference_bf16(config):
    q, k, v, layout = wan_problem(2, 0.2, seed=1)
    b, h, s, d = q.shape
    out = torch.full((b, h, s, d), float("nan"), dtype=q.dtype, device="cuda")
    lse = torch.full((b, h, s), float("nan"), device="cuda")
    vb.varlen_block_sparse_attention_triton(q, k, v, *layout, config=config, out=out, lse_out=lse)
    assert not out.isnan().any() and not lse.isnan().any()
    want_out, want_lse = varlen_block_sparse_attention_reference(q, k, v, *layout, return_lse=True)
    assert rel_l2(out, want_out) < 1e-2
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - want_lse[finite]).abs().max() < 1e-2


@pytest.mark.gpu
def test_gpu_fixed_size_clusters_equal_block_sparse_kernel():
    from sparse_compile.kernels.block_sparse import block_sparse_attention

    g = torch.Generator().manual_seed(2)
    s, block = 32760, 128
    q, k, v = (torch.randn(1, 4, s, 128, generator=g).to("cuda", torch.bfloat16) for _ in range(3))
    n = math.ceil(s / block)
    counts, indices = random_selection(1, 4, n, n, 0.25, g, device="cuda")
    fixed = block_sparse_attention(q, k, v, counts, indices, block_q=block, block_k=block, return_lse=True)
    off = torch.tensor([min(i * block, s) for i in range(n + 1)], dtype=torch.int32, device="cuda").view(1, 1, -1)
    varlen = vb.varlen_block_sparse_attention(q, k, v, off, off, counts, indices, return_lse=True)
    assert rel_l2(varlen[0], fixed[0]) < 1e-2
    assert (varlen[1] - fixed[1]).abs().max() < 1e-2
