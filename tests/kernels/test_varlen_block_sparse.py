"""Variable-block-size (cluster) sparse attention: reference vs masked dense attention, fixed-block
equivalence, folded token permutations, the Triton kernel under the interpreter (in a subprocess)
and on the GPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from row_order import to_kernel_order, to_token_order
from triton_interpreter_support import INTERPRETED, interp, rel_l2, run_interpreted
from sparse_compile.kernels import varlen_block_sparse as vb
from sparse_compile.kernels.block_sparse_reference import block_sparse_attention_reference
from sparse_compile.kernels.common import attention_output_like, cdiv, launch_group_size
from sparse_compile.kernels.tile_configs import VarlenConfig
from sparse_compile.kernels.varlen_block_sparse import check_varlen_layout_values, validate_varlen_inputs
from sparse_compile.kernels.varlen_block_sparse_reference import (
    VarlenLayout,
    expand_varlen_layout,
    varlen_block_sparse_attention_reference,
    varlen_kept_keys,
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


def random_permutations(b, h, seq, g, dtype=torch.int64, device="cpu"):
    """(b, h, seq) random permutations of [0, seq), one per (batch, head)."""
    return torch.rand(b, h, seq, generator=g).argsort(-1).to(device=device, dtype=dtype)


def token_major(x):
    """``x`` ``(B, H, S, D)`` copied into ``(B, S, H, D)`` storage and viewed back as ``(B, H, S, D)``."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


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
    assert out.stride() == attention_output_like(q, v).stride() and lse.is_contiguous() and lse.dtype == torch.float32
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


@FAST
@given(
    b=st.integers(1, 2), h=st.integers(1, 3), s_q=st.integers(1, 50), s_k=st.integers(1, 50),
    nqc=st.integers(1, 6), nkc=st.integers(1, 9), density=st.sampled_from([0.0, 0.3, 1.0]),
    shared=st.booleans(), seed=st.integers(0, 10_000),
)  # fmt: skip
def test_reference_with_permutations_equals_reference_on_gathered_inputs(
    b, h, s_q, s_k, nqc, nkc, density, shared, seed
):
    """Folding the permutations in == gathering q/k/v into cluster order, attending, scattering O/LSE back."""
    q, k, v, layout = random_problem(b, h, s_q, s_k, 8, nqc, nkc, density, seed)
    g = torch.Generator().manual_seed(seed)
    q_perm = random_permutations(b, h, s_q, g)
    kv_perm = random_permutations(1 if shared else b, h, s_k, g, dtype=torch.int32)  # int32, shared by the batch
    got = varlen_block_sparse_attention_reference(q, k, v, *layout, q_perm=q_perm, kv_perm=kv_perm, scale=0.3,
                                                  return_lse=True)  # fmt: skip
    on_gathered = varlen_block_sparse_attention_reference(
        to_kernel_order(q, q_perm), to_kernel_order(k, kv_perm), to_kernel_order(v, kv_perm), *layout, scale=0.3, return_lse=True
    )
    assert torch.equal(got[0], to_token_order(on_gathered[0], q_perm))
    assert torch.equal(got[1], to_token_order(on_gathered[1], q_perm))


def test_reference_identity_permutations_change_nothing():
    q, k, v, layout = random_problem(2, 2, 40, 30, 8, 4, 6, 0.5, seed=12)
    identity = lambda s: torch.arange(s).expand(1, 1, s)  # noqa: E731
    got = varlen_block_sparse_attention_reference(q, k, v, *layout, q_perm=identity(40), kv_perm=identity(30),
                                                  return_lse=True)  # fmt: skip
    want = varlen_block_sparse_attention_reference(q, k, v, *layout, return_lse=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_op_rejects_bad_permutations():
    q, k, v, layout = random_problem(2, 2, 20, 16, 8, 3, 4, 0.5, seed=3)
    run = vb.varlen_block_sparse_attention
    good_q, good_kv = torch.arange(20).expand(2, 2, 20), torch.arange(16).expand(1, 2, 16)
    with pytest.raises(ValueError, match="q_perm must be int32 or int64"):
        run(q, k, v, *layout, q_perm=good_q.float())
    with pytest.raises(ValueError, match="kv_perm must have shape \\(2 or 1, 2 or 1, 16\\)"):
        run(q, k, v, *layout, kv_perm=torch.arange(20).expand(1, 2, 20))
    with pytest.raises(ValueError, match="kv_perm must have shape"):
        run(q, k, v, *layout, kv_perm=good_kv.expand(3, 2, 16))
    repeated = good_q.clone()
    repeated[1, 0, 5] = 4
    with pytest.raises(ValueError, match="q_perm must be a permutation"):
        run(q, k, v, *layout, q_perm=repeated)
    with pytest.raises(ValueError, match="kv_perm must be a permutation"):
        check_varlen_layout_values(validate_varlen_inputs(q, k, v, *layout, kv_perm=good_kv + 1), 20, 16)


def test_op_rejects_bad_layouts():
    q, k, v, (q_off, kv_off, counts, indices) = random_problem(1, 2, 20, 16, 8, 3, 4, 0.5, seed=3)
    run = vb.varlen_block_sparse_attention
    with pytest.raises(ValueError, match="int32"):
        run(q, k, v, q_off.long(), kv_off, counts, indices)
    with pytest.raises(ValueError, match="share a dtype"):
        run(q, k.half(), v, q_off, kv_off, counts, indices)
    with pytest.raises(ValueError, match="k and v"):
        run(q, k[:, :, :-1], v, q_off, kv_off, counts, indices)
    with pytest.raises(ValueError, match="kv_cluster_counts"):
        run(q, k, v, q_off, kv_off, counts[..., :2], indices)
    with pytest.raises(ValueError, match="q_cluster_offsets must have shape"):
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


def test_op_rejects_kept_rows_bounds_below_the_kept_keys():
    q, k, v, layout = random_problem(1, 2, 20, 16, 8, 3, 4, 0.5, seed=3)
    kept, total = kept_keys_of(q, k, layout)
    assert total > 0
    run = vb.varlen_block_sparse_attention
    with pytest.raises(ValueError, match=f"kept_rows_total={total - 1} is below the kept keys of all q clusters, {total}"):
        run(q, k, v, *layout, kept_rows_total=total - 1)
    most = int(kept.max())
    with pytest.raises(ValueError, match=f"max_kept_keys={most - 1} is below the most keys a q cluster keeps, {most}"):
        run(q, k, v, *layout, max_kept_keys=most - 1)
    wrong = kept.clone()
    wrong[0, 1, 2] += 1
    with pytest.raises(ValueError, match="kept_keys must hold each q cluster's kept keys"):
        run(q, k, v, *layout, kept_keys=wrong, kept_rows_total=total + 1)
    want = varlen_block_sparse_attention_reference(q, k, v, *layout)
    assert torch.equal(run(q, k, v, *layout, kept_keys=kept.int(), kept_rows_total=total, max_kept_keys=most), want)


def test_op_rejects_malformed_kept_rows_arguments():
    q, k, v, layout = random_problem(1, 2, 20, 16, 8, 3, 4, 0.5, seed=3)
    run = vb.varlen_block_sparse_attention
    with pytest.raises(ValueError, match="kept_rows_total must be None or an int >= 0, got -1"):
        run(q, k, v, *layout, kept_rows_total=-1)
    with pytest.raises(ValueError, match="kept_keys must have shape \\(1 or 1, 2 or 1, 3\\)"):
        run(q, k, v, *layout, kept_keys=torch.zeros(1, 2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="kept_keys must be int32 or int64"):
        run(q, k, v, *layout, kept_keys=torch.zeros(1, 2, 3))


def test_public_op_with_kept_rows_bounds_cpu_and_fake():
    q, k, v, layout = random_problem(1, 2, 30, 20, 16, 3, 4, 0.6, seed=4)
    kept, total = kept_keys_of(q, k, layout)
    op = torch.ops.sparse_compile.varlen_block_sparse_attention
    args = (q, k, v, *layout, 0.25, None, None, int(kept.max()), kept.int(), total)
    torch.library.opcheck(op, args)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))
    assert [f.shape for f in fake] == [q.shape, q.shape[:3]]


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


def test_public_op_with_permutations_cpu_and_fake():
    q, k, v, layout = random_problem(2, 2, 30, 20, 16, 3, 4, 0.6, seed=4)
    g = torch.Generator().manual_seed(4)
    perms = dict(q_perm=random_permutations(2, 2, 30, g), kv_perm=random_permutations(1, 2, 20, g, torch.int32))
    q, k, v = token_major(q), token_major(k), token_major(v)
    out, lse = vb.varlen_block_sparse_attention(q, k, v, *layout, **perms, return_lse=True)
    want = varlen_block_sparse_attention_reference(q, k, v, *layout, **perms, return_lse=True)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    assert out.stride() == attention_output_like(q, v).stride()
    op = torch.ops.sparse_compile.varlen_block_sparse_attention
    torch.library.opcheck(op, (q, k, v, *layout, 0.25, perms["q_perm"], perms["kv_perm"]))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(t) for t in (q, k, v, *layout)), 0.25,
                  *(mode.from_tensor(p) for p in perms.values()))  # fmt: skip
    assert [f.stride() for f in fake] == [out.stride(), lse.stride()]


# ------------------------------------------------------------------------------------------------
# Triton kernel under the interpreter (TRITON_INTERPRET must be set before triton's import)
# ------------------------------------------------------------------------------------------------


def test_interpreter_tests_in_subprocess():
    """Run this file's ``interp_`` tests in a fresh process with TRITON_INTERPRET=1."""
    run_interpreted(__file__, "interp_")


def run_triton_poisoned(q, k, v, layout, config, scale=0.3, out=None, **perms):
    """The kernel into NaN-filled buffers (``out`` contiguous unless given); every element must be written."""
    b, h, s_q, d = q.shape
    out = torch.empty((b, h, s_q, d), dtype=q.dtype) if out is None else out
    out.fill_(float("nan"))
    lse = torch.full((b, h, s_q), float("nan"))
    got = vb.varlen_block_sparse_attention_triton(q, k, v, *layout, **perms, scale=scale, config=config, out=out,
                                                  lse_out=lse)  # fmt: skip
    assert got[0] is out and got[1] is lse
    assert not out.isnan().any() and not lse.isnan().any()
    return out, lse


def assert_matches_reference(q, k, v, layout, got, scale=0.3, tol=None, **perms):
    """``got`` (O, LSE) vs the reference: rel-L2 of O within ``tol``, the same empty rows, LSE within 1e-4."""
    want_out, want_lse = varlen_block_sparse_attention_reference(
        q, k, v, *layout, **perms, scale=scale, return_lse=True
    )
    tol = tol or (1e-5 if q.dtype == torch.float32 else 2e-3)
    assert rel_l2(got[0], want_out) < tol
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(want_lse))
    finite = torch.isfinite(want_lse)
    assert torch.allclose(got[1][finite], want_lse[finite], atol=1e-4)
    assert (got[0][~finite] == 0).all()


INTERP_CASES = [
    # (b, h, s_q, s_k, d, nqc, nkc, density, config): tiny kv clusters packed into one tile, q
    # clusters spanning several tiles, empty clusters, padding garbage past the counts
    (1, 2, 100, 90, 32, 4, 30, 0.4, VarlenConfig(16, 16, 4, 1)),
    (2, 1, 130, 200, 16, 3, 60, 0.3, VarlenConfig(32, 16, 4, 1)),
    (1, 1, 64, 64, 64, 6, 5, 0.6, VarlenConfig(16, 64, 4, 1)),
    (1, 2, 40, 256, 16, 9, 80, 0.5, VarlenConfig(16, 32, 4, 1)),
    (2, 2, 150, 120, 32, 5, 20, 0.5, VarlenConfig(32, 16, 4, 1, tail_block_m=16)),  # tails in a second launch
    (1, 2, 150, 120, 32, 5, 20, 0.5, VarlenConfig(32, 32, 4, 1, tail_block_m=16, tail_block_n=16)),  # own key tile
]


@interp
@pytest.mark.parametrize("ragged", [False, True], ids=["padded", "ragged"])
@pytest.mark.parametrize("slots, keys", [(32, 64), (4, 2)], ids=["default steps", "many small steps"])
def test_interp_kept_rows_are_the_kept_clusters_tokens_in_slot_order(monkeypatch, slots, keys, ragged):
    """The prep kernel lists, per q cluster, the k/v token row of every kept key from the list's start:
    the kept kv clusters' cluster-order rows in the order of the indices, mapped through ``kv_perm``;
    ``total`` counts them. Clusters of 0 to 40 keys, so one list crosses many clusters and some
    contribute nothing; with 4 slots and 2 keys per step every list takes several slot steps and most
    clusters several key steps. Padded lists start 300 apart; ragged ones right after each other, and
    the buffer holds exactly their keys (a write past a list would land in the next one)."""
    monkeypatch.setattr(vb, "KEPT_ROWS_SLOTS", slots)
    monkeypatch.setattr(vb, "KEPT_ROWS_KEYS", keys)
    g = torch.Generator().manual_seed(3)
    q, k, v, layout = random_problem(1, 2, 70, 300, 16, 3, 40, 0.7, seed=3, dtype=torch.float32, padding=-7)
    kv_perm = random_permutations(1, 2, 300, g)
    expanded_layout = validate_varlen_inputs(q, k, v, *layout, None, kv_perm)
    kv_off = vb._flat_offsets(expanded_layout.kv_offsets)
    kept_keys = varlen_kept_keys(expanded_layout).reshape(-1)
    if ragged:
        starts, size = kept_keys.cumsum(0) - kept_keys, int(kept_keys.sum())
    else:
        starts, size = torch.arange(6) * 300, 6 * 300
    buffer = torch.full((size,), -1, dtype=torch.int32)
    total = vb._kept_rows(expanded_layout, kv_off, starts, 0, 2, buffer)
    for bh in range(2):
        for c in range(3):
            count = int(expanded_layout.counts[0, bh, c])
            clusters = expanded_layout.indices[0, bh, c, :count].tolist()
            want = torch.cat([torch.arange(int(kv_off[bh, i]), int(kv_off[bh, i + 1])) for i in clusters]
                             or [torch.zeros(0, dtype=torch.long)])  # fmt: skip
            want = kv_perm[0, bh, want]
            assert int(total[bh, c]) == want.numel() == int(kept_keys[bh * 3 + c])
            start = int(starts[bh * 3 + c])
            assert torch.equal(buffer[start : start + want.numel()].long(), want)


@interp
def test_interp_kept_rows_past_the_buffer_are_dropped():
    """A buffer shorter than the lists (a staged call whose kept keys outgrew it): the prep kernel writes the
    positions that fit, as into a buffer of all of them, nothing past its end (the rest of a larger
    allocation keeps its poison), and ``total`` counts the positions written (the list cut at the end)."""
    q, k, v, layout = random_problem(1, 2, 70, 300, 16, 3, 40, 0.7, seed=3, dtype=torch.float32, padding=-7)
    expanded_layout = validate_varlen_inputs(q, k, v, *layout, None, None)
    kv_off = vb._flat_offsets(expanded_layout.kv_offsets)
    kept_keys = varlen_kept_keys(expanded_layout).reshape(-1)
    starts, size = kept_keys.cumsum(0) - kept_keys, int(kept_keys.sum())
    whole = torch.full((size,), -1, dtype=torch.int32)
    vb._kept_rows(expanded_layout, kv_off, starts, 0, 2, whole)
    backing = torch.full((size,), -5, dtype=torch.int32)
    capacity = size // 2
    total = vb._kept_rows(expanded_layout, kv_off, starts, 0, 2, backing[:capacity])
    assert torch.equal(backing[:capacity], whole[:capacity]) and bool((backing[capacity:] == -5).all())
    assert torch.equal(total.reshape(-1).long(), kept_keys.clamp(max=capacity - starts).clamp(min=0))
    assert 0 < int(total.sum()) == capacity < size


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_a_staged_call_gives_the_ops_result(dtype):
    """Staged before its kept keys are read (every pair's lists in one buffer of the budget's size, tile
    tables written), then run into poisoned buffers: exactly what the Triton entry gives, with folded
    permutations; q, k, v of another geometry are refused."""
    q, k, v, layout, perms = uneven_problem(dtype)
    kept, total = kept_keys_of(q, k, layout)
    staged = vb.stage_varlen_call(q, k, v, *layout, kept_keys=kept, scale=0.3, **perms)
    assert total <= staged.capacity == vb.rows_budget_bytes(q) // 4 and len(staged.groups) == 1
    staged.call.out.fill_(float("nan"))
    staged.call.lse.fill_(float("nan"))
    got = vb.run_staged_call(staged, q, k, v)
    assert not got[0].isnan().any() and not got[1].isnan().any()
    want = vb.varlen_block_sparse_attention_triton(q, k, v, *layout, scale=0.3, config=staged.config, **perms)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert_matches_reference(q, k, v, layout, got, **perms)
    with pytest.raises(ValueError, match="the q, k and v the call was staged with"):
        vb.run_staged_call(staged, q.contiguous(), k, v)


@interp
def test_interp_a_staged_call_whose_keys_outgrow_its_buffer_still_writes_every_row(monkeypatch):
    """Run before its caller learns that the kept keys outgrow the buffer (then it drops the result): the lists
    are cut at the buffer's end, and every output row and LSE is still written, finite."""
    q, k, v, layout, perms = uneven_problem(torch.float32)
    kept, total = kept_keys_of(q, k, layout)
    monkeypatch.setattr(vb, "rows_budget_bytes", lambda q: 4 * (total // 2))
    staged = vb.stage_varlen_call(q, k, v, *layout, kept_keys=kept, scale=0.3, **perms)
    assert staged.capacity == total // 2
    staged.call.out.fill_(float("nan"))
    staged.call.lse.fill_(float("nan"))
    out, lse = vb.run_staged_call(staged, q, k, v)
    assert not out.isnan().any() and not lse.isnan().any()


@pytest.mark.skipif(INTERPRETED, reason="the interpreter runs the Triton kernels")
def test_a_call_off_cuda_without_the_interpreter_is_not_staged():
    """Where the op runs its reference there are no prep kernels to launch early."""
    q, k, v, layout = random_problem(1, 2, 40, 50, 16, 3, 5, 0.5, seed=1)
    kept, _ = kept_keys_of(q, k, layout)
    assert vb.varlen_kernel_choice(q, k, v) == "reference"
    assert vb.stage_varlen_call(q, k, v, *layout, kept_keys=kept) is None


@interp
def test_interp_head_groups_under_a_small_rows_budget_match_reference(monkeypatch):
    """When the kept rows of all (batch, head) pairs exceed the budget the pairs run in groups that
    share one buffer; every group gives the reference's result (3 groups of 2 pairs, then 6 of 1)."""
    q, k, v, layout = random_problem(2, 3, 60, 90, 16, 4, 12, 0.5, seed=5, dtype=torch.float32)
    for per_group in (2, 1):
        monkeypatch.setattr(vb, "rows_budget_bytes", lambda q: per_group * 4 * 90 * 4)
        assert launch_group_size(6, 4 * 90 * 4, vb.rows_budget_bytes(q)) == per_group
        assert_matches_reference(q, k, v, layout, run_triton_poisoned(q, k, v, layout, VarlenConfig(16, 16, 4, 1)))


def kept_keys_of(q, k, layout):
    """Each q cluster's kept keys, int64 ``(B, H, NQC)``, and their sum."""
    kept = varlen_kept_keys(expand_varlen_layout(q, k, *layout))
    return kept, int(kept.sum())


def test_rows_plan_is_ragged_in_one_group_when_the_kept_total_fits_the_budget():
    q, k, v, layout = random_problem(2, 3, 60, 90, 16, 4, 18, 0.3, seed=9)
    expanded_layout = expanded(q, k, v, layout)
    kept, total = kept_keys_of(q, k, layout)
    flat = kept.reshape(-1)
    for kept_keys in (None, kept.int()):
        plan = vb.kept_rows_plan(expanded_layout, 90, 4 * total, kept_keys=kept_keys, kept_rows_total=total)
        assert (plan.groups, plan.size) == (((0, 6),), total)
        assert torch.equal(plan.starts, flat.cumsum(0) - flat)  # each list right after the previous one


def test_rows_plan_is_padded_in_groups_without_a_total_or_when_it_does_not_fit():
    q, k, v, layout = random_problem(2, 3, 60, 90, 16, 4, 18, 0.3, seed=9)
    expanded_layout = expanded(q, k, v, layout)
    kept, total = kept_keys_of(q, k, layout)
    budget = 4 * total - 4  # one key short of the ragged buffer
    for given_total in (None, total):  # the full row length of 90: one pair per group
        plan = vb.kept_rows_plan(expanded_layout, 90, budget, kept_rows_total=given_total)
        assert (plan.groups, plan.size) == (tuple((p, 1) for p in range(6)), 4 * 90)
        assert torch.equal(plan.group_starts(3, 1, 4), torch.arange(4) * 90)  # the same room in every group
    most = int(kept.max())
    bounded = vb.kept_rows_plan(expanded_layout, 90, budget, max_kept_keys=most, kept_rows_total=total)
    group = launch_group_size(6, 4 * most * 4, budget)
    assert group > 1 and bounded.groups[0] == (0, group) and bounded.size == group * 4 * most
    assert torch.equal(bounded.group_starts(group, group, 4), torch.arange(group * 4) * most)


def test_rows_plan_is_ragged_in_groups_given_each_pairs_bound():
    """Over the budget, each pair's bound packs consecutive pairs into groups: the lists of a pair follow the
    kept keys of the pairs before it in its group, and no group's bounds exceed the budget."""
    q, k, v, layout = random_problem(2, 3, 60, 90, 16, 4, 18, 0.3, seed=9)
    expanded_layout = expanded(q, k, v, layout)
    kept, total = kept_keys_of(q, k, layout)
    pair_rows = kept.reshape(6, 4).sum(-1).tolist()
    budget_rows = max(pair_rows) + min(pair_rows)  # below the total: more than one group, some of two pairs or more
    plan = vb.kept_rows_plan(expanded_layout, 90, 4 * budget_rows, kept_rows_total=total, pair_kept_rows=pair_rows)
    assert 1 < len(plan.groups) < 6 and sum(n for _, n in plan.groups) == 6
    assert [first for first, _ in plan.groups] == sorted(first for first, _ in plan.groups)
    assert plan.size == max(sum(pair_rows[f:f + n]) for f, n in plan.groups) <= budget_rows
    for first, count in plan.groups:
        starts = plan.group_starts(first, count, 4).view(count, 4)
        lists = kept.reshape(6, 4)[first:first + count]
        base = torch.tensor([sum(pair_rows[first:first + i]) for i in range(count)])
        assert torch.equal(starts, base[:, None] + lists.cumsum(1) - lists)


def test_ragged_groups_pack_consecutive_pairs_under_the_budget():
    assert vb.ragged_groups([4, 4, 4, 4], 8) == ((0, 2), (2, 2))
    assert vb.ragged_groups([9, 1, 1, 9], 8) == ((0, 1), (1, 2), (3, 1))  # a pair over the budget runs alone
    assert vb.ragged_groups([], 8) == ()


def test_ragged_groups_even_out_as_few_groups_as_the_budget_needs():
    """12 heads of 10 under a budget of 50: 3 groups of 4, not 5 + 5 + 2."""
    assert vb.ragged_groups([10] * 12, 50) == ((0, 4), (4, 4), (8, 4))
    assert vb.ragged_groups([6, 1, 1, 1, 1, 6], 9) == ((0, 3), (3, 3))  # packed full: 6 + 1 + 1 + 1, then 1 + 6


def test_pair_bounds_are_checked():
    q, k, v, layout = random_problem(1, 2, 60, 90, 16, 4, 18, 0.3, seed=9)
    expanded_layout = expanded(q, k, v, layout)
    with pytest.raises(ValueError, match="one bound per"):
        vb.validate_kept_rows_args(expanded_layout, None, None, None, [1, 2, 3])
    with pytest.raises(ValueError, match=r"pair_kept_rows\[1\]"):
        vb.validate_kept_rows_args(expanded_layout, None, None, None, [1, -2])
    kept, _ = kept_keys_of(q, k, layout)
    pair_rows = kept.reshape(2, 4).sum(-1).tolist()
    vb.check_kept_rows_values(expanded_layout, None, None, None, pair_rows)
    with pytest.raises(ValueError, match=r"pair_kept_rows\[0\]"):
        vb.check_kept_rows_values(expanded_layout, None, None, None, [pair_rows[0] - 1, pair_rows[1]])


@interp
def test_interp_ragged_groups_under_a_small_budget_match_reference(monkeypatch):
    """Kept rows over the budget with each pair's bound given: consecutive pairs in ragged groups (here 2 for
    3 pairs; padded rows of the largest count would need 3), the reference's result in every poisoned row."""
    q, k, v, layout, perms = uneven_problem(torch.float32)
    kept, total = kept_keys_of(q, k, layout)
    pair_rows = kept.reshape(3, -1).sum(-1).tolist()
    budget_rows = max(pair_rows[0] + pair_rows[1], pair_rows[2])
    assert budget_rows < total and len(vb.ragged_groups(pair_rows, budget_rows)) == 2
    monkeypatch.setattr(vb, "rows_budget_bytes", lambda q: 4 * budget_rows)
    out = attention_output_like(q, v).fill_(float("nan"))
    lse = torch.full(q.shape[:3], float("nan"))
    vb.varlen_block_sparse_attention_triton(q, k, v, *layout, **perms, kept_keys=kept.int(), kept_rows_total=total,
                                            pair_kept_rows=pair_rows, scale=0.3, config=VarlenConfig(16, 16, 4, 1),
                                            out=out, lse_out=lse)  # fmt: skip
    assert not out.isnan().any() and not lse.isnan().any()
    assert_matches_reference(q, k, v, layout, (out, lse), **perms)


def uneven_problem(dtype):
    """A layout whose q clusters keep very different key counts: per pair, one q cluster keeps every kv
    cluster, one a single small one, one nothing, the rest about half; permutations on token-major q, k, v."""
    b, h, s_q, s_k, nqc, nkc = 1, 3, 64, 120, 6, 15
    q, k, v, (q_off, kv_off, counts, indices) = random_problem(b, h, s_q, s_k, 32, nqc, nkc, 0.5, seed=17, dtype=dtype,
                                                               padding=-7)  # fmt: skip
    counts, indices = counts.clone(), indices.clone()
    counts[..., 0], indices[..., 0, :] = nkc, torch.arange(nkc, dtype=torch.int32)
    counts[..., 1], indices[..., 1, :1] = 1, 0
    counts[..., 2] = 0
    g = torch.Generator().manual_seed(17)
    perms = dict(q_perm=random_permutations(b, h, s_q, g), kv_perm=random_permutations(b, h, s_k, g))
    return token_major(q), token_major(k), token_major(v), (q_off, kv_off, counts, indices), perms


def test_uneven_problem_keeps_very_different_key_counts():
    q, k, v, layout, _ = uneven_problem(torch.float32)
    kept, _ = kept_keys_of(q, k, layout)
    assert (kept[..., 0] == 120).all() and (kept[..., 2] == 0).all() and (kept[..., 1] < 120).all()


def test_launch_groups_spread_items_evenly_within_the_budget():
    budget = 10 * 4  # 10 (pair, q cluster, key) rows
    assert launch_group_size(24, 4, budget) == 8  # 10 fit: 3 groups of 8, not 10 + 10 + 4
    assert launch_group_size(24, 44, budget) == 1  # not even one fits: one pair per group
    assert launch_group_size(5, 8, budget) == 5


def run_ragged_and_padded(monkeypatch, q, k, v, layout, config, budget, **perms):
    """The kernel given the kept keys, their total and their maximum (ragged where the total fits) and
    given only the maximum (padded), with ``budget`` bytes for a group's buffer, into NaN-filled buffers;
    returns both results and the number of launch groups of each."""
    kept, total = kept_keys_of(q, k, layout)
    monkeypatch.setattr(vb, "rows_budget_bytes", lambda q: budget)
    groups: list[int] = []
    real_kept_rows = vb._kept_rows

    def counting_kept_rows(*args):
        groups[-1] += 1
        return real_kept_rows(*args)

    monkeypatch.setattr(vb, "_kept_rows", counting_kept_rows)
    results = []
    most = int(kept.max())
    for bounds in (dict(kept_keys=kept.int(), kept_rows_total=total, max_kept_keys=most), dict(max_kept_keys=most)):
        groups.append(0)
        b, h, s_q, d = q.shape
        out = attention_output_like(q, v).fill_(float("nan"))
        lse = torch.full((b, h, s_q), float("nan"), device=q.device)
        vb.varlen_block_sparse_attention_triton(q, k, v, *layout, **perms, **bounds, scale=0.3, config=config, out=out,
                                                lse_out=lse)  # fmt: skip
        assert not out.isnan().any() and not lse.isnan().any()
        results.append((out, lse))
    return results, groups


@interp
@pytest.mark.parametrize(  # fp16, not bf16: the interpreter computes bf16 wrong
    "case, dtype", [(INTERP_CASES[i], dtype) for i, dtype in enumerate([torch.float32, torch.float16] * 2)], ids=range(4)
)
def test_interp_ragged_rows_equal_padded_rows_and_match_reference(monkeypatch, case, dtype):
    """Random layouts: the ragged buffer (one launch group) gives exactly the padded buffer's result (one
    or more pairs per group, as many as fit the same budget), and both the reference's."""
    b, h, s_q, s_k, d, nqc, nkc, density, config = case
    q, k, v, layout = random_problem(b, h, s_q, s_k, d, nqc, nkc, density, seed=s_q + s_k, dtype=dtype, padding=-7)
    kept, total = kept_keys_of(q, k, layout)
    budget = 4 * total
    (ragged, padded), groups = run_ragged_and_padded(monkeypatch, q, k, v, layout, config, budget)
    assert groups == [1, cdiv(b * h, launch_group_size(b * h, nqc * int(kept.max()) * 4, budget))]
    assert torch.equal(ragged[0], padded[0]) and torch.equal(ragged[1], padded[1])
    assert_matches_reference(q, k, v, layout, ragged)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interp_ragged_rows_with_very_different_kept_counts_match_reference(monkeypatch, dtype):
    """q clusters keeping every key, one small cluster's, none, and about half, with folded permutations:
    the ragged buffer of all 3 pairs in one launch group, where padded rows of the largest count need 3
    under the same budget."""
    q, k, v, layout, perms = uneven_problem(dtype)
    _, total = kept_keys_of(q, k, layout)
    (ragged, padded), groups = run_ragged_and_padded(monkeypatch, q, k, v, layout, VarlenConfig(16, 16, 4, 1),
                                                     4 * total, **perms)  # fmt: skip
    assert groups == [1, 3]
    assert torch.equal(ragged[0], padded[0]) and torch.equal(ragged[1], padded[1])
    assert_matches_reference(q, k, v, layout, ragged, **perms)


@interp
def test_interp_ragged_total_over_the_budget_runs_padded_groups(monkeypatch):
    """A kept total over the budget falls back to padded groups (here 3 of 2 pairs), with the same result."""
    q, k, v, layout = random_problem(2, 3, 60, 90, 16, 4, 12, 0.5, seed=5, dtype=torch.float32)
    kept, total = kept_keys_of(q, k, layout)
    budget = 2 * 4 * int(kept.max()) * 4
    assert 4 * total > budget
    (ragged, padded), groups = run_ragged_and_padded(monkeypatch, q, k, v, layout, VarlenConfig(16, 16, 4, 1), budget)
    assert groups == [3, 3]
    assert torch.equal(ragged[0], padded[0]) and torch.equal(ragged[1], padded[1])
    assert_matches_reference(q, k, v, layout, ragged)


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", INTERP_CASES, ids=range(len(INTERP_CASES)))
def test_interp_matches_reference(case, dtype):
    b, h, s_q, s_k, d, nqc, nkc, density, config = case
    q, k, v, layout = random_problem(b, h, s_q, s_k, d, nqc, nkc, density, seed=s_q + s_k, dtype=dtype, padding=-7)
    assert_matches_reference(q, k, v, layout, run_triton_poisoned(q, k, v, layout, config))


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", INTERP_CASES, ids=range(len(INTERP_CASES)))
def test_interp_folded_permutations_on_token_major_inputs_match_reference(case, dtype):
    """q, k, v in (B, S, H, D) storage and token order; the kernel gathers rows through the
    permutations and writes O (token-major) and LSE in token order, as the reference does."""
    b, h, s_q, s_k, d, nqc, nkc, density, config = case
    q, k, v, layout = random_problem(b, h, s_q, s_k, d, nqc, nkc, density, seed=s_q * s_k, dtype=dtype, padding=-7)
    q, k, v = token_major(q), token_major(k), token_major(v)
    g = torch.Generator().manual_seed(s_q)
    perms = dict(q_perm=random_permutations(b, h, s_q, g),  # int64, as cluster_permutation returns
                 kv_perm=random_permutations(1, h, s_k, g, torch.int32))  # int32, shared by the batch  # fmt: skip
    got = run_triton_poisoned(q, k, v, layout, config, out=attention_output_like(q, v), **perms)
    assert_matches_reference(q, k, v, layout, got, **perms)


@interp
def test_interp_folded_permutations_equal_the_kernel_on_gathered_inputs():
    """The fold changes where rows are read and written, not what is computed."""
    q, k, v, layout = random_problem(2, 2, 100, 90, 32, 4, 30, 0.4, seed=21, dtype=torch.float16)
    g = torch.Generator().manual_seed(21)
    q_perm, kv_perm = random_permutations(2, 2, 100, g), random_permutations(2, 2, 90, g)
    config = VarlenConfig(16, 16, 4, 1)
    folded = run_triton_poisoned(q, k, v, layout, config, q_perm=q_perm, kv_perm=kv_perm)
    gathered = run_triton_poisoned(to_kernel_order(q, q_perm), to_kernel_order(k, kv_perm), to_kernel_order(v, kv_perm), layout,
                                   config)  # fmt: skip
    assert torch.equal(folded[0], to_token_order(gathered[0], q_perm))
    assert torch.equal(folded[1], to_token_order(gathered[1], q_perm))


@interp
def test_interp_folded_permutations_with_empty_clusters_strided_head_dim_and_broadcast_layout():
    q, k, v, _ = random_problem(2, 2, 48, 40, 32, 1, 1, 1.0, seed=9, dtype=torch.float32)
    k = k[..., ::2]  # head-dim stride 2: read through the strides, not copied
    q, v = q[..., :16], v[..., 16:]
    q_off = torch.tensor([[[0, 0, 20, 20, 48]]], dtype=torch.int32)
    kv_off = torch.tensor([[[0, 3, 3, 4, 40]]], dtype=torch.int32)
    counts = torch.tensor([[[2, 1, 3, 0]], [[0, 1, 1, 4]]], dtype=torch.int32)  # (B, 1, NQC)
    indices = torch.tensor([[[[1, 3, 99, 99], [0, 0, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]],
                            [[[5, 5, 5, 5], [1, 0, 0, 0], [2, 0, 0, 0], [0, 1, 2, 3]]]], dtype=torch.int32)  # fmt: skip
    layout = (q_off, kv_off, counts, indices)
    g = torch.Generator().manual_seed(9)
    perms = dict(q_perm=random_permutations(1, 1, 48, g), kv_perm=random_permutations(2, 1, 40, g))
    got = run_triton_poisoned(q, k, v, layout, VarlenConfig(16, 16, 4, 1), **perms)
    empty = torch.isneginf(got[1])
    # rows that attend nothing: batch 0's q cluster 3 (keeps no kv cluster, 28 rows) and batch 1's q
    # cluster 1 (keeps only the empty kv cluster 1, 20 rows), in both heads
    assert int(empty.sum()) == 2 * 28 + 2 * 20
    assert (got[0][empty] == 0).all()
    assert_matches_reference(q, k, v, layout, got, **perms)


@interp
def test_interp_empty_clusters_nothing_kept_and_broadcast_layout():
    q, k, v, _ = random_problem(2, 2, 48, 40, 16, 1, 1, 1.0, seed=8, dtype=torch.float16)
    q_off = torch.tensor([[[0, 0, 20, 20, 48]]], dtype=torch.int32)  # shared by every (b, h)
    kv_off = torch.tensor([[[0, 3, 3, 4, 40]]], dtype=torch.int32)
    counts = torch.tensor([[[2, 0, 3, 0]], [[0, 4, 1, 4]]], dtype=torch.int32)  # (B, 1, NQC)
    indices = torch.tensor([[[[1, 3, 99, 99], [0, 0, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]],
                            [[[5, 5, 5, 5], [0, 1, 2, 3], [2, 0, 0, 0], [0, 1, 2, 3]]]], dtype=torch.int32)  # fmt: skip
    layout = (q_off, kv_off, counts, indices)
    got = run_triton_poisoned(q, k, v, layout, VarlenConfig(16, 16, 4, 1))
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
    out, _ = run_triton_poisoned(q, k, v, (q_off, kv_off, counts, indices), VarlenConfig(16, 32, 4, 1), scale=None)
    assert rel_l2(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) < 2e-3


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


def wan_problem(h, density, seed, nqc=300, nkc=1000):
    """Wan 480p-sized problem (S = 32760, D = 128, bf16) with random clusters on the GPU."""
    return random_problem(1, h, 32760, 32760, 128, nqc, nkc, density, seed, torch.bfloat16, "cuda", padding=0)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, VarlenConfig(128, 64, 8, 3), VarlenConfig(64, 128, 4, 2),
                                    VarlenConfig(128, 128, 8, 3, tail_block_m=64),
                                    VarlenConfig(128, 128, 8, 3, tail_block_m=64, tail_block_n=64)])
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
def test_gpu_ragged_rows_in_one_group_equal_padded_rows_bf16(monkeypatch):
    """Wan 480p, 12 heads, folded permutations: the ragged buffer of all heads in one launch group gives
    exactly the result of padded rows in groups, and the reference's on two heads."""
    q, k, v, layout = wan_problem(12, 0.1, seed=5)
    q, k, v = token_major(q), token_major(k), token_major(v)
    g = torch.Generator().manual_seed(5)
    perms = dict(q_perm=random_permutations(1, 12, q.shape[2], g, device="cuda"),
                 kv_perm=random_permutations(1, 12, k.shape[2], g, dtype=torch.int32, device="cuda"))  # fmt: skip
    kept, total = kept_keys_of(q, k, layout)
    (ragged, padded), groups = run_ragged_and_padded(monkeypatch, q, k, v, layout, None, 4 * total, **perms)
    assert groups[0] == 1 and groups[1] > 1
    assert torch.equal(ragged[0], padded[0]) and torch.equal(ragged[1], padded[1])
    for head in (0, 11):
        sl = slice(head, head + 1)
        want_out, want_lse = varlen_block_sparse_attention_reference(
            q[:, sl], k[:, sl], v[:, sl], *(t[:, sl] for t in layout), **{n: t[:, sl] for n, t in perms.items()},
            scale=0.3, return_lse=True,
        )  # fmt: skip
        assert rel_l2(ragged[0][:, sl], want_out) < 1e-2
        finite = torch.isfinite(want_lse)
        assert torch.equal(finite, torch.isfinite(ragged[1][:, sl]))
        assert (ragged[1][:, sl][finite] - want_lse[finite]).abs().max() < 1e-2


@pytest.mark.gpu
def test_gpu_ragged_groups_capture_in_a_cuda_graph(monkeypatch):
    """Kept rows over the budget in ragged groups (pair bounds given) build their plan on the device: the call
    captures in a CUDA graph and its replay gives the eager result."""
    q, k, v, layout = wan_problem(4, 0.2, seed=6)
    kept, total = kept_keys_of(q, k, layout)
    pair_rows = kept.reshape(4, -1).sum(-1).tolist()
    monkeypatch.setattr(vb, "rows_budget_bytes", lambda q: 4 * max(pair_rows))  # one pair's rows: 4 groups
    bounds = dict(kept_keys=kept.int(), kept_rows_total=total, pair_kept_rows=pair_rows)
    eager = vb.varlen_block_sparse_attention_triton(q, k, v, *layout, **bounds)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = vb.varlen_block_sparse_attention_triton(q, k, v, *layout, **bounds)
    graph.replay()
    assert torch.equal(captured[0], eager[0]) and torch.equal(captured[1], eager[1])


@pytest.mark.gpu
def test_gpu_fp32_with_large_q_clusters_runs_on_the_default_tile():
    """fp32 inputs whose q clusters average 1000 rows: the default tile fits the device's shared memory
    (a 128x128 tile would need 257 KiB) and matches the reference."""
    q, k, v, layout = random_problem(1, 2, 4000, 4000, 128, 4, 40, 0.3, seed=4, dtype=torch.float32, device="cuda")
    out, lse = vb.varlen_block_sparse_attention_triton(q, k, v, *layout)
    want_out, want_lse = varlen_block_sparse_attention_reference(q, k, v, *layout, return_lse=True)
    assert rel_l2(out, want_out) < 1e-4
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[finite] - want_lse[finite]).abs().max() < 1e-4


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


@pytest.mark.gpu
def test_gpu_folded_permutations_on_token_major_inputs_bf16():
    """Wan 480p, q/k/v in (B, S, H, D) storage and token order with random permutations: the same
    result as the kernel on inputs gathered into cluster order (every head), and as the reference."""
    q, k, v, layout = wan_problem(12, 0.2, seed=3)
    q, k, v = token_major(q), token_major(k), token_major(v)
    g = torch.Generator().manual_seed(3)
    q_perm = random_permutations(1, 12, q.shape[2], g, device="cuda")
    kv_perm = random_permutations(1, 12, k.shape[2], g, dtype=torch.int32, device="cuda")
    out = attention_output_like(q, v).fill_(float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device="cuda")
    vb.varlen_block_sparse_attention_triton(q, k, v, *layout, q_perm=q_perm, kv_perm=kv_perm, out=out, lse_out=lse)
    assert not out.isnan().any() and not lse.isnan().any()
    gathered_out, gathered_lse = vb.varlen_block_sparse_attention_triton(
        to_kernel_order(q, q_perm), to_kernel_order(k, kv_perm), to_kernel_order(v, kv_perm), *layout
    )
    gathered_lse = to_token_order(gathered_lse, q_perm)
    assert rel_l2(out, to_token_order(gathered_out, q_perm)) < 1e-3
    finite = torch.isfinite(gathered_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[finite] - gathered_lse[finite]).abs().max() < 1e-3
    for head in (0, 11):
        sl = slice(head, head + 1)
        want_out, want_lse = varlen_block_sparse_attention_reference(
            q[:, sl], k[:, sl], v[:, sl], *(t[:, sl] for t in layout), q_perm=q_perm[:, sl], kv_perm=kv_perm[:, sl],
            return_lse=True,
        )  # fmt: skip
        assert rel_l2(out[:, sl], want_out) < 1e-2
        finite = torch.isfinite(want_lse)
        assert torch.equal(finite, torch.isfinite(lse[:, sl]))
        assert (lse[:, sl][finite] - want_lse[finite]).abs().max() < 1e-2
