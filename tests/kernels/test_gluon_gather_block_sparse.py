"""Tests of the gathering Gluon kernel: kept-block attention through token permutations on sm_90.

On CPU: an ahead-of-time compile for sm_90a (``cp.async`` row copies in a producer warpgroup, the
tensor cores' ``wgmma``, register hand-over, no spills, shared memory within Hopper's limit), and that
its entry takes both permutations or neither. GPU cases (``@pytest.mark.gpu``, sm_90) compare it, into
NaN-poisoned outputs, with the reference through random, SVG-order and broadcast permutations, sequence
tails and empty rows; with the TMA kernel on identity permutations; and at density 1 with SDPA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gluon_compile import HOPPER_SHARED_BYTES, TRITON_BIN, compile_sm90a, resource_usage
from test_block_sparse import assert_matches_reference, dense_block_layout, make_qkv, random_layout, run_poisoned
from triton_interpreter_support import rel_l2

from sparse_compile.kernels.block_sparse import block_sparse_attention_gluon
from sparse_compile.kernels.common import cdiv
from sparse_compile.kernels.gluon_gather_block_sparse import (
    GATHER_CHUNK_ROWS,
    GATHER_REGS,
    _block_sparse_fwd_gluon_gather,
)
from sparse_compile.methods.svg_patterns import temporal_permutation

HOPPER = (9, 0)
STRIDES = ("stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh",
           "stride_vs", "stride_ob", "stride_oh", "stride_os")  # fmt: skip


def _compile_sm90a(block: int, block_n: int, head_dim: int, consumers: int, stages: int, dtype_name: str):
    from triton.experimental.gluon import language as gl

    dtype = getattr(gl, dtype_name)
    name = {"bfloat16": "bf16", "float16": "fp16"}[dtype_name]
    consumer_regs, producer_regs = GATHER_REGS[consumers]
    constants = dict(
        HEAD_DIM=head_dim, BLOCK_N=block_n, LAYOUT_BQ=block, LAYOUT_BK=block, EVEN_K=False, CONSUMERS=consumers,
        STAGES=stages, CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, CHUNK=GATHER_CHUNK_ROWS,
        q_layout=gl.NVMMASharedLayout.get_default_for([1, 1, 64, head_dim], dtype),
        kv_layout=gl.NVMMASharedLayout.get_default_for([1, 1, block_n, head_dim], dtype),
    )  # fmt: skip
    pointers = {"Q": f"*{name}", "K": f"*{name}", "V": f"*{name}", "O": f"*{name}", "LSE": "*fp32", "Q_PERM": "*i64",
                "KV_PERM": "*i64", "COUNTS": "*i32", "INDICES": "*i32"}  # fmt: skip
    perm_and_layout_strides = ("stride_qpb", "stride_qph", "stride_qps", "stride_kvpb", "stride_kvph", "stride_kvps",
                               "stride_cb", "stride_ch", "stride_cq", "stride_ib", "stride_ih", "stride_iq",
                               "stride_ik")  # fmt: skip
    signature = {
        **pointers, **{n: "i32" for n in STRIDES + perm_and_layout_strides + ("H", "S_Q", "S_K")}, "qk_scale": "fp32",
        **{n: "constexpr" for n in constants},
    }  # fmt: skip
    maxnreg = (consumer_regs * consumers + producer_regs) // (consumers + 1) // 8 * 8
    options = {"num_warps": 4, "maxnreg": maxnreg}
    return compile_sm90a(_block_sparse_fwd_gluon_gather, signature, constants, options, tuple(pointers) + STRIDES)


# ---------------------------------------------------------------- CPU


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
@pytest.mark.parametrize(
    "block,block_n,head_dim,consumers,stages,dtype_name",
    [(128, 128, 128, 2, 2, "bfloat16"), (128, 64, 128, 2, 3, "bfloat16"), (64, 64, 64, 1, 3, "float16")],
)
def test_kernel_compiles_for_sm90a_with_async_row_copies_and_no_spills(
    tmp_path, block, block_n, head_dim, consumers, stages, dtype_name
) -> None:  # fmt: skip
    kernel = _compile_sm90a(block, block_n, head_dim, consumers, stages, dtype_name)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "setmaxnreg" in ptx
    assert "cp.async.cg.shared.global" in ptx and "cp.async.mbarrier.arrive" in ptx  # 16-byte row copies
    assert "cp.async.bulk.tensor" not in ptx  # no TMA: rows are gathered
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES
    usage = resource_usage(kernel, tmp_path)
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, usage


def test_the_gluon_entry_takes_both_permutations_or_neither() -> None:
    q, k, v = make_qkv(1, 2, 300, 300, 128, torch.bfloat16, torch.Generator().manual_seed(0), bshd=True)
    counts, indices = dense_block_layout(1, 2, 300, 300, 128, 128, "cpu")
    with pytest.raises(ValueError, match="both q_perm and kv_perm or neither"):
        block_sparse_attention_gluon(q, k, v, counts, indices, block_q=128, block_k=128, q_perm=torch.arange(300))


# ---------------------------------------------------------------- GPU (sm_90)

gpu = pytest.mark.gpu


def _require_hopper() -> None:
    if torch.cuda.get_device_capability() != HOPPER:
        pytest.skip("the Gluon kernels run on sm_90 only")


def _run_poisoned(q, k, v, counts, indices, perm, block, scale=None):
    """The gathering kernel, ``perm`` on q and k/v, into NaN-poisoned token-major O and LSE buffers
    (:func:`run_poisoned`); returns those buffers."""
    return run_poisoned(q, k, v, counts, indices, block, block, kernel=block_sparse_attention_gluon, q_perm=perm,
                        kv_perm=perm, scale=scale)  # fmt: skip


def _random_perm(b: int, h: int, s: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(b, h, s, generator=gen).argsort(-1).to("cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim,block", [(128, 128), (64, 64), (128, 64)])
def test_gpu_matches_reference_through_random_permutations_with_tails_and_empty_rows(dtype, head_dim, block) -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(head_dim + block)
    s = 1000
    q, k, v = make_qkv(2, 3, s, s, head_dim, dtype, gen, "cuda", bshd=True)
    counts, indices = random_layout(2, 3, cdiv(s, block), cdiv(s, block), 0.4, gen, "cuda", 0.2)
    counts[0, 0, 0] = 0  # a q block that keeps nothing
    perm = _random_perm(2, 3, s, gen)
    got = _run_poisoned(q, k, v, counts, indices, perm, block, scale=0.3)
    assert_matches_reference(q, k, v, counts, indices, block, block, got, 1e-2, scale=0.3, q_perm=perm, kv_perm=perm)


@gpu
def test_gpu_svg_temporal_order_broadcast_over_heads_matches_reference() -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(7)
    grid = (5, 12, 20)
    s = grid[0] * grid[1] * grid[2]
    q, k, v = make_qkv(1, 4, s, s, 128, torch.bfloat16, gen, "cuda", bshd=True)
    counts, indices = random_layout(1, 4, cdiv(s, 128), cdiv(s, 128), 0.3, gen, "cuda", 0.2)
    perm = temporal_permutation(*grid, torch.device("cuda")).to(torch.int32).view(1, 1, s)
    got = _run_poisoned(q, k, v, counts, indices, perm, 128)
    assert_matches_reference(q, k, v, counts, indices, 128, 128, got, 1e-2, q_perm=perm, kv_perm=perm)


@gpu
def test_gpu_identity_permutations_give_the_tma_kernels_result() -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(8)
    s = 2000
    q, k, v = make_qkv(1, 2, s, s, 128, torch.bfloat16, gen, "cuda", bshd=True)
    counts, indices = random_layout(1, 2, cdiv(s, 128), cdiv(s, 128), 0.5, gen, "cuda", 0.1)
    identity = torch.arange(s, device="cuda").view(1, 1, s)
    gathered = _run_poisoned(q, k, v, counts, indices, identity, 128)
    tma = block_sparse_attention_gluon(q, k, v, counts, indices, block_q=128, block_k=128, return_lse=True)
    assert rel_l2(gathered[0], tma[0]) <= 1e-3
    torch.testing.assert_close(gathered[1], tma[1], atol=1e-4, rtol=0)  # empty rows: -inf in both


@gpu
def test_gpu_dense_layout_through_a_random_permutation_equals_sdpa() -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(9)
    s = 4096 - 37
    q, k, v = make_qkv(1, 4, s, s, 128, torch.bfloat16, gen, "cuda", bshd=True)
    counts, indices = dense_block_layout(1, 4, s, s, 128, 128, "cuda")
    out, lse = _run_poisoned(q, k, v, counts, indices, _random_perm(1, 4, s, gen), 128)
    assert rel_l2(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) <= 1e-2
    dense_lse = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) / 128**0.5, dim=-1)
    assert (lse - dense_lse).abs().max() <= 2e-3
