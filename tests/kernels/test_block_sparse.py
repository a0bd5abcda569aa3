"""Tests of block-sparse attention: reference vs SDPA, Triton kernel vs reference, custom op,
strided (token-major) inputs and output, folded token permutations.

Triton's interpreter must be chosen before triton is first imported (``TRITON_INTERPRET=1``), which
other test files do first, so the interpreter cases (``test_interp_*``) run in a child pytest process
started by ``test_interpreter_suite`` with that variable set; in the parent they are skipped. The
interpreter computes ``tl.dot`` on bf16 wrongly (Triton 3.6), so its cases use fp32 and fp16.
GPU cases (``@pytest.mark.gpu``) run the compiled kernel at real sizes.
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from row_order import to_kernel_order, to_token_order
from triton_interpreter_support import interp, rel_l2, run_interpreted
from sparse_compile.kernels.block_sparse import (
    block_sparse_attention,
    block_sparse_attention_triton,
    tma_eligible,
    validate_inputs,
)
from sparse_compile.kernels.block_sparse_reference import (
    block_sparse_attention_reference,
    layout_to_dense_mask,
    reference_q_blocks,
)
from sparse_compile.kernels.common import attention_output_like, cdiv, check_permutation_values, interpreter_active
from sparse_compile.kernels.tile_configs import TileConfig

IN_INTERPRETER = interpreter_active()
# Junk written past each row's count: kernels and reference must never use it.
JUNK_INDEX = -12345


def dense_block_layout(
    batch: int, heads: int, s_q: int, s_k: int, block_q: int, block_k: int, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layout keeping every kv block: counts ``(B, H, NQ)`` = NK, indices ``(B, H, NQ, NK)`` = 0..NK-1 (stride 0)."""
    nq, nk = cdiv(s_q, block_q), cdiv(s_k, block_k)
    counts = torch.full((1, 1, 1), nk, dtype=torch.int32, device=device).expand(batch, heads, nq)
    indices = torch.arange(nk, dtype=torch.int32, device=device).view(1, 1, 1, nk).expand(batch, heads, nq, nk)
    return counts, indices


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


def random_permutation(
    b: int, h: int, seq: int, gen: torch.Generator, dtype: torch.dtype = torch.int64, device: str = "cpu"
) -> torch.Tensor:
    """``(b, h, seq)`` random permutations of ``[0, seq)``, one per (batch, head)."""
    return torch.rand(b, h, seq, generator=gen).argsort(-1).to(device=device, dtype=dtype)


def token_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, S, D)`` copied into ``(B, S, H, D)`` storage and viewed back as ``(B, H, S, D)``."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def assert_matches_reference(q, k, v, counts, indices, block_q, block_k, got, tol, scale=None, **perms) -> None:
    """``got`` = (O, LSE) vs the reference: nothing NaN (poisoned buffers fully written), rel-L2 of O
    within ``tol``, the same empty rows (O 0, LSE -inf), finite LSEs within 1e-4 (1e-3 beyond fp32)."""
    out, lse = got
    ref_out, ref_lse = block_sparse_attention_reference(
        q, k, v, counts, indices, block_q=block_q, block_k=block_k, scale=scale, return_lse=True, **perms
    )
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten (NaN-poisoned) or NaN outputs"
    assert rel_l2(out, ref_out) <= tol
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], rtol=0, atol=1e-3 if tol > 1e-3 else 1e-4)
    assert (out[~finite] == 0).all()


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
    assert out.shape == (b, h, s_q, d) and out.stride() == attention_output_like(q, v).stride() and out.dtype == torch.float32
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
        block_sparse_attention(**kwargs)


@pytest.mark.parametrize(
    "match,row", [("strictly ascending", [1, 0]), ("must lie in \\[0, NK", [0, 2]), ("must lie in \\[0, NK", [-1, 0])]
)
def test_op_on_cpu_rejects_bad_layout_values(match: str, row: list[int]) -> None:
    q = torch.randn(1, 1, 64, 16)
    counts = torch.full((1, 1, 1), 2, dtype=torch.int32)
    indices = torch.tensor(row, dtype=torch.int32).view(1, 1, 1, 2)
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, q, q, counts, indices, block_q=64, block_k=32)


def _permutation_problem(seed: int, b: int = 2, h: int = 2, s_q: int = 150, s_k: int = 170, d: int = 16):
    """Random q, k, v, a layout with empty q blocks and junk past the counts, and random permutations
    (q_perm int64 per (batch, head); kv_perm int32 shared by the batch)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(b, h, s_q, s_k, d, torch.float32, gen)
    counts, indices = random_layout(b, h, cdiv(s_q, 32), cdiv(s_k, 16), 0.4, gen, empty_fraction=0.1)
    counts[-1, -1, 1] = 0  # at least one q block keeps nothing
    perms = dict(q_perm=random_permutation(b, h, s_q, gen), kv_perm=random_permutation(1, h, s_k, gen, torch.int32))
    return q, k, v, counts, indices, perms


@pytest.mark.parametrize("which", ["both", "q_perm", "kv_perm"])
@pytest.mark.parametrize("seed", range(3))
def test_reference_with_permutations_equals_reference_on_gathered_inputs(seed: int, which: str) -> None:
    """Folding the permutations in == gathering q/k/v into kernel order, attending, scattering O/LSE back."""
    q, k, v, counts, indices, perms = _permutation_problem(seed)
    perms = perms if which == "both" else {which: perms[which]}
    got = block_sparse_attention_reference(q, k, v, counts, indices, block_q=32, block_k=16, scale=0.3,
                                           return_lse=True, **perms)  # fmt: skip
    q_perm, kv_perm = perms.get("q_perm"), perms.get("kv_perm")
    q_in = q if q_perm is None else to_kernel_order(q, q_perm)
    k_in, v_in = (k, v) if kv_perm is None else (to_kernel_order(k, kv_perm), to_kernel_order(v, kv_perm))
    want = block_sparse_attention_reference(q_in, k_in, v_in, counts, indices, block_q=32, block_k=16, scale=0.3,
                                            return_lse=True)  # fmt: skip
    if q_perm is not None:
        want = to_token_order(want[0], q_perm), to_token_order(want[1], q_perm)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert got[0].stride() == attention_output_like(q, v).stride() and got[1].is_contiguous()
    assert torch.isneginf(got[1]).any() and torch.isfinite(got[1]).any()  # the case has empty and kept rows


def test_reference_identity_permutations_change_nothing() -> None:
    q, k, v, counts, indices, _ = _permutation_problem(7)
    identity = lambda s: torch.arange(s).expand(1, 1, s)  # noqa: E731
    got = block_sparse_attention_reference(q, k, v, counts, indices, block_q=32, block_k=16, q_perm=identity(150),
                                           kv_perm=identity(170), return_lse=True)  # fmt: skip
    want = block_sparse_attention_reference(q, k, v, counts, indices, block_q=32, block_k=16, return_lse=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_reference_q_blocks_with_permutations_are_the_kernel_order_rows() -> None:
    """Row r of q block i is token q_perm[i * block_q + r]: the full result's rows at those tokens."""
    q, k, v, counts, indices, perms = _permutation_problem(8)
    full_out, full_lse = block_sparse_attention_reference(q, k, v, counts, indices, block_q=32, block_k=16,
                                                          return_lse=True, **perms)  # fmt: skip
    out, lse = reference_q_blocks(q, k, v, counts, indices, [4, 1], block_q=32, block_k=16, **perms)
    tokens = torch.cat([perms["q_perm"][:, :, 128:150], perms["q_perm"][:, :, 32:64]], dim=2)
    assert torch.equal(out, to_kernel_order(full_out, tokens)) and torch.equal(lse, to_kernel_order(full_lse, tokens))


def test_op_rejects_bad_permutations() -> None:
    q, k, v, counts, indices, perms = _permutation_problem(9)
    run = functools.partial(block_sparse_attention, q, k, v, counts, indices, block_q=32, block_k=16)
    with pytest.raises(ValueError, match="q_perm must be int32 or int64"):
        run(q_perm=perms["q_perm"].float())
    with pytest.raises(ValueError, match="kv_perm must have shape \\(2 or 1, 2 or 1, 170\\)"):
        run(kv_perm=perms["kv_perm"][..., :-1])
    with pytest.raises(ValueError, match="q_perm must have shape"):
        run(q_perm=perms["q_perm"].expand(2, 2, -1).repeat(2, 1, 1))
    repeated = perms["q_perm"].clone()
    repeated[1, 0, 5] = repeated[1, 0, 6]
    with pytest.raises(ValueError, match="q_perm must be a permutation"):
        run(q_perm=repeated)
    shifted = validate_inputs(q, k, v, counts, indices, 32, 16, kv_perm=perms["kv_perm"] + 1).kv_perm
    with pytest.raises(ValueError, match="kv_perm must be a permutation"):
        check_permutation_values("kv_perm", shifted)
    with pytest.raises(ValueError, match="kv_perm must have shape"):
        run(kv_perm=perms["q_perm"])


@pytest.mark.parametrize("defect", ["nan", "unwritten", "wrong_row", "lse"])
def test_reference_check_fails_on_nan_unwritten_or_wrong_outputs(defect: str) -> None:
    """The check the kernel tests rely on rejects one NaN, one poisoned row, one wrong row or LSE."""
    q, k, v, counts, indices, perms = _permutation_problem(10)
    out, lse = block_sparse_attention_reference(q, k, v, counts, indices, block_q=32, block_k=16, return_lse=True,
                                                **perms)  # fmt: skip
    row = int(torch.isfinite(lse[0, 0]).nonzero()[0])
    if defect == "nan":
        out[0, 0, row, 3] = float("nan")
    elif defect == "unwritten":
        out[1, 1, row] = float("nan")
        lse[1, 1, row] = float("nan")
    elif defect == "wrong_row":
        out[0, 1, row] += 10.0
    else:
        lse[0, 0, row] += 0.01
    with pytest.raises(AssertionError):
        assert_matches_reference(q, k, v, counts, indices, 32, 16, (out, lse), 1e-4, **perms)


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


def test_custom_op_with_permutations_opcheck_and_fake_strides() -> None:
    gen = torch.Generator().manual_seed(6)
    q, k, v, counts, indices = _op_inputs(gen)
    perms = (random_permutation(1, 2, 100, gen), random_permutation(1, 1, 90, gen, torch.int32))
    op = torch.ops.sparse_compile.block_sparse_attention.default
    torch.library.opcheck(op, (q, k, v, counts, indices, 64, 32, 0.25, *perms))
    real = op(q, k, v, counts, indices, 64, 32, None, *perms)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(t) for t in (q, k, v, counts, indices)), 64, 32, None,
                  *(mode.from_tensor(p) for p in perms))  # fmt: skip
    assert [f.stride() for f in fake] == [r.stride() for r in real]
    assert real[0].stride() == attention_output_like(q, v).stride()
    want = block_sparse_attention_reference(q, k, v, counts, indices, block_q=64, block_k=32, q_perm=perms[0],
                                            kv_perm=perms[1], return_lse=True)  # fmt: skip
    assert torch.equal(real[0], want[0]) and torch.equal(real[1], want[1])


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


def run_poisoned(q, k, v, counts, indices, block_q, block_k, kernel=block_sparse_attention_triton, out=None, **kw):
    """``kernel`` (a fixed-block entry: Triton, Gluon, FP8) into NaN-poisoned output buffers (``out``
    token-major, the op's layout, unless given); returns (out, lse), which must be the buffers themselves."""
    b, h, s_q, _ = q.shape
    out = (attention_output_like(q, v) if out is None else out).fill_(float("nan"))
    lse = torch.full((b, h, s_q), float("nan"), dtype=torch.float32, device=q.device)
    got = kernel(q, k, v, counts, indices, block_q=block_q, block_k=block_k, out=out, lse_out=lse, return_lse=True,
                 **kw)  # fmt: skip
    assert got[0] is out and got[1] is lse
    return out, lse


def _check_against_reference(q, k, v, counts, indices, block_q, block_k, tol, scale=None, out=None, **kw) -> None:
    """The kernel (poisoned outputs, ``kw`` passed on: tile, use_tma, q_perm, kv_perm) vs the reference."""
    got = run_poisoned(q, k, v, counts, indices, block_q, block_k, scale=scale, out=out, **kw)
    perms = {name: kw[name] for name in ("q_perm", "kv_perm") if name in kw}
    assert_matches_reference(q, k, v, counts, indices, block_q, block_k, got, tol, scale, **perms)


DTYPE_TOLERANCES = [(torch.float32, 1e-4), (torch.float16, 1e-2)]


@interp
@pytest.mark.parametrize("dtype,tol", DTYPE_TOLERANCES)
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


@interp
def test_interp_dense_layout_equals_sdpa() -> None:
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(1, 2, 200, 150, 64, torch.float32, gen)
    counts, indices = dense_block_layout(1, 2, 200, 150, 64, 64)
    out, _ = run_poisoned(q, k, v, counts, indices, 64, 64)
    assert rel_l2(out, F.scaled_dot_product_attention(q, k, v)) <= 1e-4


@interp
def test_interp_noncontiguous_inputs_and_broadcast_layout() -> None:
    gen = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(2, 3, 150, 170, 32, torch.float16, gen, bshd=True)
    assert not q.is_contiguous()
    counts, indices = random_layout(1, 1, cdiv(150, 64), cdiv(170, 32), 0.5, gen, empty_fraction=0.2)
    counts, indices = counts.expand(2, 3, -1), indices.expand(2, 3, -1, -1)  # stride-0 batch/head
    _check_against_reference(q, k, v, counts, indices, 64, 32, 1e-2, scale=0.2)


@interp
@pytest.mark.parametrize("dtype,tol", DTYPE_TOLERANCES)
def test_interp_token_major_inputs_give_the_op_layout_without_copies(dtype, tol) -> None:
    """q, k, v as (B, S, H, D) storage: read in place; O comes back token-major (the op's layout),
    into a new tensor by default or into any non-overlapping buffer (here a contiguous one)."""
    gen = torch.Generator().manual_seed(15)
    q, k, v = make_qkv(2, 3, 150, 170, 32, dtype, gen, bshd=True)
    counts, indices = random_layout(2, 3, cdiv(150, 32), cdiv(170, 32), 0.5, gen, empty_fraction=0.1)
    out, lse = block_sparse_attention_triton(q, k, v, counts, indices, block_q=32, block_k=32, return_lse=True)
    assert out.stride() == (150 * 3 * 32, 32, 3 * 32, 1) and lse.is_contiguous()
    assert_matches_reference(q, k, v, counts, indices, 32, 32, (out, lse), tol)
    contiguous = torch.empty(2, 3, 150, 32, dtype=dtype)
    _check_against_reference(q, k, v, counts, indices, 32, 32, tol, out=contiguous)


@interp
def test_interp_strided_head_dim_inputs() -> None:
    """Any strides: a head dim with stride 2 (k) and views into a wider tensor (q, v) are read as they are."""
    gen = torch.Generator().manual_seed(16)
    q, k, v = make_qkv(1, 2, 100, 90, 32, torch.float32, gen)
    k = k[..., ::2]
    q, v = q[..., :16], v[..., 16:]
    counts, indices = random_layout(1, 2, cdiv(100, 32), cdiv(90, 16), 0.5, gen)
    _check_against_reference(q, k, v, counts, indices, 32, 16, 1e-4)


PERMUTATION_CASES = [
    # (b, h, s_q, s_k, d, block_q, block_k, tile)
    (1, 2, 200, 200, 32, 64, 64, None),  # one tile per layout block, partial last blocks
    (2, 1, 256, 200, 16, 64, 64, TileConfig(32, 32)),  # 2x2 sub-tiles, partial last kv block (masked loop)
    (1, 2, 130, 256, 32, 32, 128, TileConfig(32, 64)),  # wide kv blocks, even S_k
]


@interp
@pytest.mark.parametrize("which", ["both", "q_perm", "kv_perm"])
@pytest.mark.parametrize("dtype,tol", DTYPE_TOLERANCES)
@pytest.mark.parametrize("case", PERMUTATION_CASES, ids=range(len(PERMUTATION_CASES)))
def test_interp_folded_permutations_on_token_major_inputs_match_reference(case, dtype, tol, which) -> None:
    """q, k, v in (B, S, H, D) storage and token order; the kernel gathers rows through the
    permutations and writes O (token-major) and LSE in token order, as the reference does."""
    b, h, s_q, s_k, d, block_q, block_k, tile = case
    gen = torch.Generator().manual_seed(s_q * s_k + d)
    q, k, v = make_qkv(b, h, s_q, s_k, d, dtype, gen, bshd=True)
    counts, indices = random_layout(b, h, cdiv(s_q, block_q), cdiv(s_k, block_k), 0.5, gen, empty_fraction=0.15)
    perms = dict(q_perm=random_permutation(b, h, s_q, gen),  # int64 per (batch, head)
                 kv_perm=random_permutation(1, h, s_k, gen, torch.int32))  # int32, shared by the batch  # fmt: skip
    perms = perms if which == "both" else {which: perms[which]}
    _check_against_reference(q, k, v, counts, indices, block_q, block_k, tol, tile=tile, **perms)


@interp
def test_interp_folded_permutations_equal_the_kernel_on_gathered_inputs() -> None:
    """The fold changes where rows are read and written, not what is computed."""
    gen = torch.Generator().manual_seed(17)
    q, k, v = make_qkv(2, 2, 150, 170, 32, torch.float16, gen)
    counts, indices = random_layout(2, 2, cdiv(150, 32), cdiv(170, 32), 0.5, gen, empty_fraction=0.1)
    q_perm, kv_perm = random_permutation(2, 2, 150, gen), random_permutation(2, 2, 170, gen)
    tile = TileConfig(32, 32)
    folded = run_poisoned(q, k, v, counts, indices, 32, 32, q_perm=q_perm, kv_perm=kv_perm, tile=tile)
    gathered = run_poisoned(to_kernel_order(q, q_perm), to_kernel_order(k, kv_perm), to_kernel_order(v, kv_perm), counts,
                                    indices, 32, 32, tile=tile)  # fmt: skip
    assert torch.equal(folded[0], to_token_order(gathered[0], q_perm))
    assert torch.equal(folded[1], to_token_order(gathered[1], q_perm))


@interp
def test_interp_all_rows_empty() -> None:
    gen = torch.Generator().manual_seed(13)
    q, k, v = make_qkv(1, 1, 100, 100, 16, torch.float32, gen)
    counts = torch.zeros(1, 1, 2, dtype=torch.int32)
    indices = torch.full((1, 1, 2, 0), 0, dtype=torch.int32)  # MAXK = 0
    out, lse = run_poisoned(q, k, v, counts, indices, 64, 64, q_perm=random_permutation(1, 1, 100, gen))
    assert (out == 0).all() and torch.isneginf(lse).all()


@interp
def test_interp_custom_op_uses_kernel() -> None:
    gen = torch.Generator().manual_seed(14)
    q, k, v = make_qkv(1, 2, 128, 128, 32, torch.float16, gen)
    counts, indices = random_layout(1, 2, 2, 2, 0.7, gen)
    perms = dict(q_perm=random_permutation(1, 2, 128, gen), kv_perm=random_permutation(1, 1, 128, gen, torch.int32))
    out = block_sparse_attention(q, k, v, counts, indices, block_q=64, block_k=64, **perms)
    kernel = block_sparse_attention_triton(q, k, v, counts, indices, block_q=64, block_k=64, **perms)
    assert torch.equal(out, kernel) and out.stride() == kernel.stride() == attention_output_like(q, v).stride()


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
    out, lse = run_poisoned(q, k, v, counts, indices, block_q, block_k, use_tma=use_tma)
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
    out, _ = run_poisoned(q, k, v, counts, indices, 128, 128)
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


WAN_SEQ = 32760
"""Wan 2.1 480p: 21 x 30 x 52 video tokens."""


def _wan_problem(seed: int, block: int) -> tuple:
    """bf16 q, k, v ``(1, 12, 32760, 128)`` as views of ``(1, S, H, D)`` storage and a 25% layout with empty rows."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = make_qkv(1, 12, WAN_SEQ, WAN_SEQ, 128, torch.bfloat16, gen, "cuda", bshd=True)
    n = cdiv(WAN_SEQ, block)
    counts, indices = random_layout(1, 12, n, n, 0.25, gen, "cuda", empty_fraction=0.02)
    return q, k, v, counts, indices


def _svg_like_permutation(device: str) -> torch.Tensor:
    """int32 ``(1, 12, S)``: SVG's temporal order of the Wan 480p grid for even heads, the identity for odd ones."""
    from sparse_compile.methods.svg_patterns import temporal_permutation

    temporal = temporal_permutation(21, 30, 52, torch.device(device))
    identity = torch.arange(WAN_SEQ, dtype=torch.int32, device=device)
    return torch.stack([temporal if h % 2 == 0 else identity for h in range(12)]).unsqueeze(0)


@gpu
@pytest.mark.parametrize("use_tma", [True, False, None], ids=["tma", "pointer", "auto"])
def test_gpu_token_major_inputs_and_output_wan_480p(use_tma: bool | None) -> None:
    """q, k, v in (B, S, H, D) storage are read in place (TMA still eligible on Hopper) and O is written
    token-major into a poisoned buffer: every element written, sampled rows equal masked fp64 SDPA,
    and the whole output equals the kernel's on contiguous copies of the inputs."""
    if use_tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90+")
    q, k, v, counts, indices = _wan_problem(31, 128)
    assert tma_eligible(k, v) == (torch.cuda.get_device_capability()[0] >= 9)
    out, lse = run_poisoned(q, k, v, counts, indices, 128, 128, use_tma=use_tma)
    assert out.stride() == attention_output_like(q, v).stride()
    assert not out.isnan().any() and not lse.isnan().any()
    nq = cdiv(WAN_SEQ, 128)
    _sdpa_sampled_check(q, k, v, counts, indices, out, lse, 128, 128, [0, nq // 2, nq - 1], 1e-2)
    contiguous = [x.contiguous() for x in (q, k, v)]
    want_out, want_lse = block_sparse_attention_triton(*contiguous, counts, indices, block_q=128, block_k=128,
                                                       use_tma=use_tma, return_lse=True)  # fmt: skip
    assert rel_l2(out, want_out) <= 1e-3
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[finite] - want_lse[finite]).abs().max() <= 1e-3


@gpu
@pytest.mark.parametrize("kind", ["random", "svg_temporal"])
@pytest.mark.parametrize("block", [128, 64])
def test_gpu_folded_permutations_wan_480p(kind: str, block: int) -> None:
    """Token-order q, k, v ((B, S, H, D) storage) with q_perm / kv_perm: the same result as the kernel on
    inputs gathered into kernel order and scattered back, and as the reference on sampled q blocks."""
    q, k, v, counts, indices = _wan_problem(32 + block, block)
    gen = torch.Generator().manual_seed(33)
    if kind == "random":
        q_perm = random_permutation(1, 12, WAN_SEQ, gen, device="cuda")  # int64
        kv_perm = random_permutation(1, 12, WAN_SEQ, gen, torch.int32, "cuda")
    else:
        q_perm = kv_perm = _svg_like_permutation("cuda")
    out, lse = run_poisoned(q, k, v, counts, indices, block, block, q_perm=q_perm, kv_perm=kv_perm)
    assert not out.isnan().any() and not lse.isnan().any()
    gathered_out, gathered_lse = block_sparse_attention_triton(
        to_kernel_order(q, q_perm), to_kernel_order(k, kv_perm), to_kernel_order(v, kv_perm), counts, indices, block_q=block,
        block_k=block, return_lse=True,
    )  # fmt: skip
    gathered_lse = to_token_order(gathered_lse, q_perm)
    assert rel_l2(out, to_token_order(gathered_out, q_perm)) <= 1e-3
    finite = torch.isfinite(gathered_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[finite] - gathered_lse[finite]).abs().max() <= 1e-3
    nq = cdiv(WAN_SEQ, block)
    picks = [0, nq // 2, nq - 1]
    ref_out, ref_lse = reference_q_blocks(q, k, v, counts, indices, picks, block_q=block, block_k=block,
                                          q_perm=q_perm, kv_perm=kv_perm)  # fmt: skip
    tokens = torch.cat([q_perm[:, :, p * block : (p + 1) * block] for p in picks], dim=2)
    assert rel_l2(to_kernel_order(out, tokens), ref_out) <= 1e-2
    finite = torch.isfinite(ref_lse)
    got_lse = to_kernel_order(lse, tokens)
    assert torch.equal(finite, torch.isfinite(got_lse)) and (got_lse[finite] - ref_lse[finite]).abs().max() <= 2e-3


@gpu
def test_gpu_tma_cannot_read_permuted_kv() -> None:
    q, k, v, counts, indices = _wan_problem(34, 128)
    kv_perm = _svg_like_permutation("cuda")
    with pytest.raises(ValueError, match="no kv_perm"):
        block_sparse_attention_triton(q, k, v, counts, indices, block_q=128, block_k=128, kv_perm=kv_perm, use_tma=True)
