"""Hostile values straight into the Triton kernels: NaN and Inf, identical, zero and extreme fp16 rows.

The methods run calls with NaN or Inf dense (``tests/test_hostile_inputs.py``); here the kernels
themselves take such values, on valid layouts, and must neither fault nor hand a later kernel an
invalid layout:

- k-means and the cluster permutation: labels in ``[0, K)``, sizes that count them, a permutation;
- the top-p cluster selection on non-finite centroids: counts in ``[min_blocks, NK]``, kept ids in
  range and strictly ascending (what the cluster kernel reads);
- the cluster and block-sparse attention kernels: O and LSE non-finite exactly where their
  references' are, NaN wherever those are NaN (an Inf in q or k may give NaN for the reference's
  +/-Inf), finite values within tolerance of the references.

Each runs under Triton's interpreter (a child process, ``TRITON_INTERPRET=1``) and on a CUDA GPU
(``benchmarks/sanitize_kernels.py`` runs these under ``compute-sanitizer``).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triton_interpreter_support import interp, run_interpreted
from sparse_compile.kernels import block_select, kmeans
from sparse_compile.kernels.block_sparse import block_sparse_attention_triton
from sparse_compile.kernels.block_sparse_reference import block_sparse_attention_reference
from sparse_compile.kernels.varlen_block_sparse import varlen_block_sparse_attention_triton
from sparse_compile.kernels.varlen_block_sparse_reference import varlen_block_sparse_attention_reference

DEVICES = [pytest.param("cpu", id="cpu", marks=interp), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
HOSTILE = settings(  # two examples per test and kind: the interpreter is slow
    max_examples=2, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
KINDS = ("nan", "inf", "identical", "zero", "extreme_fp16")
HEAD_DIM = 16


def hostile(kind: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A ``shape`` tensor of ``kind``: NaN or +/-Inf at a few entries, one row repeated, all zero, or
    fp16 entries ``+/-2**e`` with ``e`` in [-24, 15]; otherwise standard normal fp32."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    flat = x.view(-1)
    picks = torch.randint(0, flat.numel(), (3,), generator=gen)
    if kind == "nan":
        flat[picks] = float("nan")
    elif kind == "inf":
        flat[picks] = torch.tensor([float("inf"), float("-inf"), float("inf")])
    elif kind == "identical":
        x = x[..., :1, :].expand(shape).clone()
    elif kind == "zero":
        x = torch.zeros(shape)
    elif kind == "extreme_fp16":
        exponents = torch.randint(-24, 16, shape, generator=gen).float()
        x = (torch.sign(x) * torch.exp2(exponents)).half()
    return x


def _qkv(kind: str, target: str, shape: tuple[int, ...], seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """q, k, v of ``shape``: ``target`` ("q", "k" or "v") of ``kind``, the others normal, in its dtype."""
    tensors = {name: torch.randn(shape, generator=torch.Generator().manual_seed(seed + i))
               for i, name in enumerate("qkv")}  # fmt: skip
    tensors[target] = hostile(kind, shape, seed)
    dtype = tensors[target].dtype
    return tuple(tensors[name].to(device=device, dtype=dtype) for name in "qkv")


def kept_layout(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts int32 ``(1, 2, n)`` and ascending indices int32 ``(1, 2, n, n)`` keeping each of ``n x n``
    (query, key) blocks or clusters with probability 0.6 (rows may keep none)."""
    keep = torch.rand(1, 2, n, n, generator=torch.Generator().manual_seed(seed)) < 0.6
    indices = torch.where(keep, torch.arange(n), n).sort(-1).values.clamp_max(n - 1).int()
    return keep.sum(-1).int(), indices


def assert_output_and_lse_match(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """A kernel's (O, LSE) against its reference's: each NaN where the reference's is, non-finite
    exactly where the reference's is (an Inf in q or k may give NaN where the reference has +/-Inf),
    finite values within tolerance of the reference's largest finite magnitude."""
    tol = 1e-4 if got[0].dtype == torch.float32 else 1e-2
    for got_t, want_t in zip(got, want):
        got_t, want_t = got_t.float().cpu(), want_t.float().cpu()
        assert bool(got_t.isnan()[want_t.isnan()].all()), "a number where the reference has NaN"
        finite = want_t.isfinite()
        assert torch.equal(got_t.isfinite(), finite), "non-finite where the reference is finite, or the reverse"
        scale = want_t[finite].abs().amax() if finite.any() else torch.tensor(1.0)
        assert bool(((got_t - want_t).abs()[finite] <= tol * scale.clamp_min(1e-30)).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
@HOSTILE
@given(seed=st.integers(0, 999), clusters=st.integers(1, 9), iters=st.integers(0, 3))
def test_kmeans_and_permutation_give_a_valid_clustering_of_any_values(device, kind, seed, clusters, iters):
    x = hostile(kind, (1, 2, 40, HEAD_DIM), seed).to(device)
    result = kmeans.kmeans_triton(x, clusters, iters)
    labels, sizes = result.labels.long().cpu(), result.sizes.cpu()
    assert bool(((labels >= 0) & (labels < clusters)).all())
    counted = torch.zeros_like(sizes).scatter_add_(2, labels, torch.ones_like(labels, dtype=sizes.dtype))
    assert torch.equal(counted, sizes)
    perm, offsets = kmeans.cluster_permutation_triton(result.labels, result.sizes, result.ranks)
    assert torch.equal(perm.cpu().sort(-1).values, torch.arange(40).expand(1, 2, 40))
    assert torch.equal(torch.gather(labels, 2, perm.cpu()), labels.sort(-1).values)
    if kind not in ("nan", "inf"):
        assert bool(result.centroids.isfinite().all())


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("device", DEVICES)
@HOSTILE
@given(seed=st.integers(0, 999), min_blocks=st.integers(1, 7), top_p=st.sampled_from([0.5, 0.9, 1.0]))
def test_top_p_cluster_selection_on_non_finite_centroids_gives_a_valid_layout(device, kind, seed, min_blocks, top_p):
    nq, nk = 5, 7
    q_centroids = hostile(kind, (1, 2, nq, HEAD_DIM), seed).to(device)
    k_centroids = hostile(kind, (1, 2, nk, HEAD_DIM), seed + 1).to(device)
    sizes = torch.randint(0, 9, (1, 2, nk), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
    selection = block_select.select_top_p_clusters_triton(q_centroids, k_centroids, sizes.to(device), 0.25, top_p,
                                                          min_blocks)  # fmt: skip
    counts, indices = selection.counts.cpu(), selection.indices.cpu()
    assert bool(((counts >= min_blocks) & (counts <= nk)).all())
    kept = torch.arange(indices.shape[-1]) < counts.unsqueeze(-1)
    assert bool(((indices >= 0) & (indices < nk))[kept].all())
    assert bool((indices[..., 1:] > indices[..., :-1])[kept[..., 1:]].all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
@HOSTILE
@given(target=st.sampled_from("qkv"), seed=st.integers(0, 999))
def test_cluster_kernel_gives_its_references_result_on_any_values(device, kind, target, seed):
    q, k, v = _qkv(kind, target, (1, 2, 40, HEAD_DIM), seed, device)
    q_off = torch.tensor([0, 7, 7, 25, 40], dtype=torch.int32).view(1, 1, -1)  # an empty cluster too
    kv_off = torch.tensor([0, 10, 10, 31, 40], dtype=torch.int32).view(1, 1, -1)
    counts, indices = kept_layout(4, seed)
    gen = torch.Generator().manual_seed(seed)
    q_perm, kv_perm = (torch.rand(1, 2, 40, generator=gen).argsort(-1) for _ in range(2))
    layout = [t.to(device) for t in (q_off, kv_off, counts, indices)]
    got = varlen_block_sparse_attention_triton(q, k, v, *layout, q_perm=q_perm.to(device), kv_perm=kv_perm.to(device))
    want = varlen_block_sparse_attention_reference(*(t.cpu() for t in (q, k, v)), q_off, kv_off, counts, indices,
                                                   q_perm=q_perm, kv_perm=kv_perm, return_lse=True)  # fmt: skip
    assert_output_and_lse_match(got, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
@HOSTILE
@given(target=st.sampled_from("qkv"), seed=st.integers(0, 999))
def test_block_sparse_kernel_gives_its_references_result_on_any_values(device, kind, target, seed):
    q, k, v = _qkv(kind, target, (1, 2, 48, HEAD_DIM), seed, device)
    counts, indices = kept_layout(3, seed)
    got = block_sparse_attention_triton(q, k, v, counts.to(device), indices.to(device), block_q=16, block_k=16,
                                        return_lse=True)  # fmt: skip
    want = block_sparse_attention_reference(*(t.cpu() for t in (q, k, v)), counts, indices, block_q=16, block_k=16,
                                            return_lse=True)  # fmt: skip
    assert_output_and_lse_match(got, want)


def test_hostile_kernel_inputs_under_the_interpreter():
    run_interpreted("tests/kernels/test_hostile_kernel_inputs.py", "cpu")
