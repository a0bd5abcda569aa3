"""Tests of block-sparse attention: reference vs SDPA, Triton kernel vs reference, custom op.

Triton's interpreter must be chosen before triton is first imported (``TRITON_INTERPRET=1``), which
other test files do first, so the interpreter cases (``test_interp_*``) run in a child pytest process
started by ``test_interpreter_suite`` with that variable set; in the parent they are skipped.
GPU cases (``@pytest.mark.gpu``) run the compiled kernel at real sizes.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from triton_interpreter_support import run_interpreted
from sparse_compile.kernels.block_sparse import (
    TileConfig,
    block_sparse_attention,
    block_sparse_attention_triton,
    interpreter_active,
    tma_eligible,
)
from sparse_compile.kernels.block_sparse_reference import (
    block_sparse_attention_reference,
    cdiv,
    dense_block_layout,
    layout_to_dense_mask,
)

IN_INTERPRETER = interpreter_active()
interp_only = pytest.mark.skipif(
    not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child process of test_interpreter_suite"
)
# Junk written past each row's count: kernels and reference must never use it.
JUNK_INDEX = -12345


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def random_layout(
    b: int, h: int, nq: int, nk: int, density: float, gen: torch.Generator, device: str = "cpu",
    empty_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Random layout: each (b, h, q block) keeps a random subset of kv blocks (varying counts).

    Slots past the count hold JUNK_INDEX; a fraction of rows keeps nothing.
    """
    keep = torch.rand(b, h, nq, nk, generator=gen) < density
    keep &= torch.rand(b, h, nq, 1, generator=gen) >= empty_fraction
    counts = keep.sum(-1).to(torch.int32)
    order = torch.where(keep, torch.arange(nk), nk + torch.arange(nk))  # kept ids first, ascending
    indices = torch.sort(order, dim=-1).values
    indices = torch.where(torch.arange(nk) < counts.unsqueeze(-1), indices, JUNK_INDEX).to(torch.int32)
    return counts.to(device), indices.to(device)


def masked_sdpa_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense fp64 attention with a boolean mask; rows with nothing kept give 0 and -inf."""
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    has_key = mask.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=scale)
    return torch.where(has_key, out, 0.0), lse


def make_qkv(
    b: int, h: int, s_q: int, s_k: int, d: int, dtype: torch.dtype, gen: torch.Generator, device: str = "cpu",
    bshd: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Random q, k, v (B, H, S, D); with ``bshd`` they are (B, S, H, D) tensors transposed (non-contiguous)."""

    def one(s: int) -> torch.Tensor:
        shape = (b, s, h, d) if bshd else (b, h, s, d)
        t = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        return t.transpose(1, 2) if bshd else t

    return one(s_q), one(s_k), one(s_k)


# ---------------------------------------------------------------- reference (CPU, in process)


@pytest.mark.parametrize(
    "s_q,s_k,block_q,block_k,d",
    [(200, 200, 64, 64, 32), (256, 190, 64, 32, 64), (130, 300, 32, 128, 16), (96, 96, 16, 16, 32)],
)
def test_reference_matches_masked_sdpa(s_q: int, s_k: int, block_q: int, block_k: int, d: int) -> None:
    gen = torch.Generator().manual_seed(s_q * 7 + s_k)
    b, h = 2, 3
    q, k, v = make_qkv(b, h, s_q, s_k, d, torch.float32, gen)
    counts, indices = random_layout(b, h, cdiv(s_q, block_q), cdiv(s_k, block_k), 0.4, gen, empty_fraction=0.1)
    scale = 0.37
    out, lse = block_sparse_attention_reference(
        q, k, v, counts, indices, block_q=block_q, block_k=block_k, scale=scale, return_lse=True
    )
    mask = layout_to_dense_mask(counts, indices, s_q, s_k, block_q, block_k)
    ref_out, ref_lse = masked_sdpa_reference(q, k, v, mask, scale)
    assert out.shape == (b, h, s_q, d) and out.is_contiguous() and out.dtype == torch.float32
    assert lse.shape == (b, h, s_q) and lse.dtype == torch.float32
    assert not out.isnan().any()
    assert rel_l2(out, ref_out) <= 1e-4
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], rtol=0, atol=1e-4)


def test_reference_dense_layout_equals_sdpa() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = make_qkv(1, 2, 200, 170, 64, torch.float32, gen)
    counts, indices = dense_block_layout(1, 2, 200, 170, 64, 64)
    out, lse = block_sparse_attention_reference(q, k, v, counts, indices, block_q=64, block_k=64, return_lse=True)
    assert rel_l2(out, F.scaled_dot_product_attention(q, k, v)) <= 1e-4
    dense_lse = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(64), dim=-1)
    assert torch.allclose(lse, dense_lse, atol=1e-4, rtol=0)


def test_reference_empty_rows_are_zero() -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, v = make_qkv(1, 2, 128, 128, 32, torch.float32, gen)
    counts, indices = random_layout(1, 2, 2, 2, 1.0, gen)
    counts[0, 1, 0] = 0
    out, lse = block_sparse_attention_reference(q, k, v, counts, indices, block_q=64, block_k=64, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[0, 1, :64], torch.zeros(64, 32))
    assert torch.isneginf(lse[0, 1, :64]).all() and torch.isfinite(lse[0, 1, 64:]).all()


def test_layout_to_dense_mask_small_example() -> None:
    counts = torch.tensor([[[1, 2]]], dtype=torch.int32)
    indices = torch.tensor([[[[1, 7], [0, 1]]]], dtype=torch.int32)  # 7 is junk past the count
    mask = layout_to_dense_mask(counts, indices, 3, 3, 2, 2)
    expected = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


def test_dense_block_layout_values() -> None:
    counts, indices = dense_block_layout(2, 3, 200, 130, 64, 32)
    assert counts.shape == (2, 3, 4) and indices.shape == (2, 3, 4, 5)
    assert (counts == 5).all() and torch.equal(indices[1, 2, 3], torch.arange(5, dtype=torch.int32))


def _bad_inputs() -> list[tuple[str, dict]]:
    q = torch.randn(1, 2, 100, 32)
    kv = torch.randn(1, 2, 80, 32)
    counts, indices = dense_block_layout(1, 2, 100, 80, 64, 64)
    base = dict(q=q, k=kv, v=kv, kv_block_counts=counts, kv_block_indices=indices, block_q=64, block_k=64)
    return [
        ("block_q must be a power of two", dict(base, block_q=48)),
        ("block_k must be a power of two", dict(base, block_k=8)),
        ("q must be 4-D", dict(base, q=q[0])),
        ("must share a dtype", dict(base, k=kv.half())),
        ("dtype must be one of", dict(base, q=q.double(), k=kv.double(), v=kv.double())),
        ("k and v must have shape", dict(base, v=torch.randn(1, 2, 81, 32))),
        ("head dim D must be one of", dict(base, q=q[..., :24], k=kv[..., :24], v=kv[..., :24])),
        ("kv_block_counts must be int32", dict(base, kv_block_counts=counts.long())),
        ("kv_block_counts must have shape", dict(base, kv_block_counts=counts[..., :1])),
        ("kv_block_indices must be 4-D", dict(base, kv_block_indices=indices[0])),
        ("kv_block_indices must have shape", dict(base, kv_block_indices=torch.zeros(1, 3, 2, 2, dtype=torch.int32))),
    ]


@pytest.mark.parametrize("match,kwargs", _bad_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_invalid_inputs_raise_value_error(match: str, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=match):
        block_sparse_attention_reference(**kwargs)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(**kwargs)


@pytest.mark.parametrize(
    "match,row", [("strictly ascending", [1, 0]), ("must lie in \\[0, NK", [0, 2]), ("must lie in \\[0, NK", [-1, 0])]
)
def test_reference_rejects_bad_layout_values(match: str, row: list[int]) -> None:
    q = torch.randn(1, 1, 64, 16)
    counts = torch.full((1, 1, 1), 2, dtype=torch.int32)
    indices = torch.tensor(row, dtype=torch.int32).view(1, 1, 1, 2)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention_reference(q, q, q, counts, indices, block_q=64, block_k=32)


# ---------------------------------------------------------------- custom op (CPU, in process)


def _op_inputs(gen: torch.Generator) -> tuple:
    q, k, v = make_qkv(1, 2, 100, 90, 32, torch.float32, gen, bshd=True)
    counts, indices = random_layout(1, 1, 2, 3, 0.6, gen)  # one pattern for both heads (broadcast)
    return q, k, v, counts, indices


def test_custom_op_opcheck() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v, counts, indices = _op_inputs(gen)
    op = torch.ops.sparse_compile.block_sparse_attention.default
    torch.library.opcheck(op, (q, k, v, counts, indices, 64, 32, 0.25))
    torch.library.opcheck(op, (q, k, v, counts, indices, 64, 32, None))


def test_custom_op_in_compiled_graph() -> None:
    gen = torch.Generator().manual_seed(4)
    q, k, v, counts, indices = _op_inputs(gen)

    def attend(q, k, v, counts, indices):
        out, lse = block_sparse_attention(q * 2.0, k, v, counts, indices, block_q=64, block_k=32, return_lse=True)
        return out + 1.0, lse

    compiled = torch.compile(attend, fullgraph=True, backend="inductor")
    out, lse = compiled(q, k, v, counts, indices)
    ref_out, ref_lse = block_sparse_attention_reference(
        q * 2.0, k, v, counts, indices, block_q=64, block_k=32, return_lse=True
    )
    assert rel_l2(out, ref_out + 1.0) <= 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


def test_fake_output_strides_match_real() -> None:
    gen = torch.Generator().manual_seed(5)
    q, k, v, counts, indices = _op_inputs(gen)
    real = torch.ops.sparse_compile.block_sparse_attention(q, k, v, counts, indices, 64, 32, None)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.sparse_compile.block_sparse_attention(
            *(mode.from_tensor(t) for t in (q, k, v, counts, indices)), 64, 32, None
        )
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.stride() == f.stride() and r.dtype == f.dtype


@pytest.mark.skipif(IN_INTERPRETER, reason="only meaningful without the interpreter")
def test_triton_entry_needs_cuda_or_interpreter() -> None:
    q = torch.randn(1, 1, 64, 16)
    counts, indices = dense_block_layout(1, 1, 64, 64, 64, 64)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        block_sparse_attention_triton(q, q, q, counts, indices, block_q=64, block_k=64)


# ---------------------------------------------------------------- Triton interpreter (child process)


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the child process")
def test_interpreter_suite() -> None:
    """Run the ``test_interp_*`` cases in a fresh process with TRITON_INTERPRET=1 set before triton loads."""
    run_interpreted(__file__, "test_interp_")


def _run_kernel_poisoned(q, k, v, counts, indices, block_q, block_k, scale=None, **kw):
    """Kernel into NaN-poisoned output buffers; returns (out, lse)."""
    b, h, s_q, d = q.shape
    out = torch.full((b, h, s_q, d), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((b, h, s_q), float("nan"), dtype=torch.float32, device=q.device)
    block_sparse_attention_triton(
        q, k, v, counts, indices, block_q=block_q, block_k=block_k, scale=scale, out=out, lse_out=lse, **kw
    )
    return out, lse


def _check_against_reference(q, k, v, counts, indices, block_q, block_k, tol, scale=None, **kw) -> None:
    out, lse = _run_kernel_poisoned(q, k, v, counts, indices, block_q, block_k, scale, **kw)
    ref_out, ref_lse = block_sparse_attention_reference(
        q, k, v, counts, indices, block_q=block_q, block_k=block_k, scale=scale, return_lse=True
    )
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten (NaN-poisoned) or NaN outputs"
    assert rel_l2(out, ref_out) <= tol
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], rtol=0, atol=1e-3 if tol > 1e-3 else 1e-4)
    empty = torch.isneginf(ref_lse)
    assert (out[empty] == 0).all()


@interp_only
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
@pytest.mark.parametrize(
    "s_q,s_k,block_q,block_k,tile",
    [
        (200, 200, 64, 64, None),  # odd lengths, one tile per layout block
        (256, 200, 64, 64, TileConfig(32, 32)),  # 2x2 sub-tiles, partial last kv block
        (130, 256, 32, 128, TileConfig(32, 64)),  # wide kv blocks, even S_k
        (64, 100, 64, 16, TileConfig(16, 16)),  # small blocks
    ],
)
def test_interp_kernel_matches_reference(s_q, s_k, block_q, block_k, tile, dtype, tol) -> None:
    gen = torch.Generator().manual_seed(s_q + s_k + block_k)
    q, k, v = make_qkv(1, 2, s_q, s_k, 32, dtype, gen)
    counts, indices = random_layout(1, 2, cdiv(s_q, block_q), cdiv(s_k, block_k), 0.5, gen, empty_fraction=0.15)
    _check_against_reference(q, k, v, counts, indices, block_q, block_k, tol, tile=tile)


@interp_only
def test_interp_dense_layout_equals_sdpa() -> None:
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(1, 2, 200, 150, 64, torch.float32, gen)
    counts, indices = dense_block_layout(1, 2, 200, 150, 64, 64)
    out, _ = _run_kernel_poisoned(q, k, v, counts, indices, 64, 64)
    assert rel_l2(out, F.scaled_dot_product_attention(q, k, v)) <= 1e-4


@interp_only
def test_interp_noncontiguous_inputs_and_broadcast_layout() -> None:
    gen = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(2, 3, 150, 170, 32, torch.float16, gen, bshd=True)
    assert not q.is_contiguous()
    counts, indices = random_layout(1, 1, cdiv(150, 64), cdiv(170, 32), 0.5, gen, empty_fraction=0.2)
    counts, indices = counts.expand(2, 3, -1), indices.expand(2, 3, -1, -1)  # stride-0 batch/head
    _check_against_reference(q, k, v, counts, indices, 64, 32, 1e-2, scale=0.2)


@interp_only
def test_interp_all_rows_empty() -> None:
    gen = torch.Generator().manual_seed(13)
    q, k, v = make_qkv(1, 1, 100, 100, 16, torch.float32, gen)
    counts = torch.zeros(1, 1, 2, dtype=torch.int32)
    indices = torch.full((1, 1, 2, 0), 0, dtype=torch.int32)  # MAXK = 0
    out, lse = _run_kernel_poisoned(q, k, v, counts, indices, 64, 64)
    assert (out == 0).all() and torch.isneginf(lse).all()


@interp_only
def test_interp_custom_op_uses_kernel() -> None:
    gen = torch.Generator().manual_seed(14)
    q, k, v = make_qkv(1, 2, 128, 128, 32, torch.float16, gen)
    counts, indices = random_layout(1, 2, 2, 2, 0.7, gen)
    out = block_sparse_attention(q, k, v, counts, indices, block_q=64, block_k=64)
    kernel = block_sparse_attention_triton(q, k, v, counts, indices, block_q=64, block_k=64)
    assert torch.equal(out, kernel)


# ---------------------------------------------------------------- GPU (compiled kernel)

gpu = pytest.mark.gpu


def _sdpa_sampled_check(q, k, v, counts, indices, out, lse, block_q, block_k, q_blocks, tol) -> None:
    """Compare rows of the sampled q blocks with masked fp64 SDPA over the whole key range."""
    s_q, s_k = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    for qb in q_blocks:
        rows = slice(qb * block_q, min((qb + 1) * block_q, s_q))
        mask = layout_to_dense_mask(counts[:, :, qb : qb + 1], indices[:, :, qb : qb + 1], block_q, s_k, block_q, block_k)
        mask = mask[:, :, : rows.stop - rows.start]
        ref_out, ref_lse = masked_sdpa_reference(q[:, :, rows], k, v, mask, scale)
        assert rel_l2(out[:, :, rows], ref_out) <= tol
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isinf(lse[:, :, rows]), ~finite)
        assert torch.allclose(lse[:, :, rows][finite].double(), ref_lse[finite], rtol=0, atol=2e-3)


@gpu
@pytest.mark.parametrize(
    "block_q,block_k,use_tma", [(128, 128, False), (128, 128, True), (64, 128, None), (128, 64, None), (64, 64, None)]
)
def test_gpu_bf16_real_size(block_q: int, block_k: int, use_tma: bool | None) -> None:
    gen = torch.Generator().manual_seed(block_q + 3 * block_k + (use_tma is True))
    s_q = s_k = 4096 - 37
    q, k, v = make_qkv(1, 4, s_q, s_k, 128, torch.bfloat16, gen, "cuda")
    counts, indices = random_layout(1, 4, cdiv(s_q, block_q), cdiv(s_k, block_k), 0.3, gen, "cuda", 0.05)
    out, lse = _run_kernel_poisoned(q, k, v, counts, indices, block_q, block_k, use_tma=use_tma)
    assert not out.isnan().any() and not lse.isnan().any()
    nq = cdiv(s_q, block_q)
    _sdpa_sampled_check(q, k, v, counts, indices, out, lse, block_q, block_k, [0, nq // 2, nq - 1], 1e-2)


@gpu
@pytest.mark.parametrize(
    "dtype,tol,tile",
    [(torch.float16, 1e-2, None), (torch.bfloat16, 1e-2, None), (torch.float32, 1e-4, TileConfig(64, 64, 4, 2))],
)
def test_gpu_noncontiguous_broadcast_empty_rows(dtype: torch.dtype, tol: float, tile: TileConfig | None) -> None:
    """fp32 uses input_precision='ieee' in tl.dot, so it meets the fp32 tolerance (no tf32)."""
    gen = torch.Generator().manual_seed(21)
    q, k, v = make_qkv(2, 3, 1000, 777, 64, dtype, gen, "cuda", bshd=True)
    counts, indices = random_layout(1, 3, cdiv(1000, 128), cdiv(777, 64), 0.4, gen, "cuda", 0.2)
    counts, indices = counts.expand(2, -1, -1), indices.expand(2, -1, -1, -1)
    _check_against_reference(q, k, v, counts, indices, 128, 64, tol, tile=tile)


@gpu
def test_gpu_dense_layout_equals_sdpa() -> None:
    gen = torch.Generator().manual_seed(22)
    q, k, v = make_qkv(1, 4, 4096, 4096, 128, torch.bfloat16, gen, "cuda")
    counts, indices = dense_block_layout(1, 4, 4096, 4096, 128, 128, "cuda")
    out, _ = _run_kernel_poisoned(q, k, v, counts, indices, 128, 128)
    assert rel_l2(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) <= 1e-2


@gpu
def test_gpu_custom_op_compiled() -> None:
    gen = torch.Generator().manual_seed(23)
    q, k, v = make_qkv(1, 2, 1024, 1024, 128, torch.bfloat16, gen, "cuda", bshd=True)
    counts, indices = random_layout(1, 2, 8, 8, 0.5, gen, "cuda")

    def attend(q, k, v, counts, indices):
        return block_sparse_attention(q, k, v, counts, indices, block_q=128, block_k=128) * 2.0

    out = torch.compile(attend, fullgraph=True)(q, k, v, counts, indices)
    ref = block_sparse_attention_reference(q, k, v, counts, indices, block_q=128, block_k=128) * 2.0
    assert rel_l2(out, ref) <= 1e-2
    assert tma_eligible(k, v) == (torch.cuda.get_device_capability()[0] >= 9)
