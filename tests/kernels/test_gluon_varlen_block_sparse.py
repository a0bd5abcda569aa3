"""Tests of the Gluon cluster (varlen) kernel on sm_90: SVG2's layouts through both permutations.

On CPU: an ahead-of-time compile for sm_90a (``cp.async`` row copies of the packed kept keys, ``wgmma``,
register hand-over, no spills, shared memory within Hopper's limit, two programs per multiprocessor at
the default tile). GPU cases (``@pytest.mark.gpu``, sm_90) compare it, into NaN-poisoned outputs, with the
reference and with the Triton cluster kernel: random clusters (some empty, some keeping nothing), both
tiles, token-major inputs at Wan 480p.
"""

from __future__ import annotations

import pytest
import torch
from gluon_compile import HOPPER_SHARED_BYTES, TRITON_BIN, compile_sm90a, resource_usage
from test_varlen_block_sparse import random_permutations, random_problem, token_major, wan_problem
from triton_interpreter_support import rel_l2

from sparse_compile.kernels import varlen_block_sparse as vb
from sparse_compile.kernels.common import attention_output_like
from sparse_compile.kernels.gluon_gather_block_sparse import GATHER_CHUNK_ROWS, GATHER_REGS
from sparse_compile.kernels.gluon_varlen_block_sparse import GLUON_VARLEN_TILE, _varlen_fwd_gluon
from sparse_compile.kernels.tile_configs import TileConfig
from sparse_compile.kernels.varlen_block_sparse_reference import varlen_block_sparse_attention_reference, varlen_kept_keys

HOPPER = (9, 0)
ALIGNED = ("Q", "K", "V", "O", "LSE", "Q_PERM", "TILE_CLUSTER", "TILE_ROW", "Q_OFF", "TOTAL", "STARTS", "ROWS",
           "stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_ks", "stride_vb", "stride_vh",
           "stride_vs", "stride_ob", "stride_oh", "stride_os")  # fmt: skip


def _compile_sm90a(tile: TileConfig, head_dim: int, dtype_name: str):
    from triton.experimental.gluon import language as gl

    dtype = getattr(gl, dtype_name)
    name = {"bfloat16": "bf16", "float16": "fp16"}[dtype_name]
    consumers = tile.block_m // 64
    consumer_regs, producer_regs = GATHER_REGS[consumers]
    constants = dict(
        HEAD_DIM=head_dim, BLOCK_N=tile.block_n, CONSUMERS=consumers, STAGES=tile.num_stages,
        CONSUMER_REGS=consumer_regs, PRODUCER_REGS=producer_regs, CHUNK=GATHER_CHUNK_ROWS,
        q_layout=gl.NVMMASharedLayout.get_default_for([1, 1, 64, head_dim], dtype),
        kv_layout=gl.NVMMASharedLayout.get_default_for([1, 1, tile.block_n, head_dim], dtype),
    )  # fmt: skip
    pointers = {"Q": f"*{name}", "K": f"*{name}", "V": f"*{name}", "O": f"*{name}", "LSE": "*fp32", "Q_PERM": "*i64",
                "TILE_CLUSTER": "*i32", "TILE_ROW": "*i32", "Q_OFF": "*i32", "TOTAL": "*i32", "STARTS": "*i64",
                "ROWS": "*i32"}  # fmt: skip
    ints = ALIGNED[len(pointers):] + ("stride_qpb", "stride_qph", "stride_qps", "bh_start", "H", "NQC", "num_tiles", "S_Q")
    signature = {**pointers, **{n: "i32" for n in ints}, "qk_scale": "fp32", **{n: "constexpr" for n in constants}}
    maxnreg = (consumer_regs * consumers + producer_regs) // (consumers + 1) // 8 * 8
    return compile_sm90a(_varlen_fwd_gluon, signature, constants, {"num_warps": 4, "maxnreg": maxnreg}, ALIGNED)


# ---------------------------------------------------------------- CPU


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
@pytest.mark.parametrize(
    "tile,head_dim,dtype_name",
    [(GLUON_VARLEN_TILE, 128, "bfloat16"), (TileConfig(128, 128, 4, 2), 128, "bfloat16"),
     (GLUON_VARLEN_TILE, 64, "float16")],
)  # fmt: skip
def test_kernel_compiles_for_sm90a_with_async_row_copies_and_no_spills(tmp_path, tile, head_dim, dtype_name) -> None:
    kernel = _compile_sm90a(tile, head_dim, dtype_name)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "setmaxnreg" in ptx
    assert "cp.async.cg.shared.global" in ptx and "cp.async.bulk.tensor" not in ptx
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES
    if tile == GLUON_VARLEN_TILE:
        assert 2 * kernel.metadata.shared <= HOPPER_SHARED_BYTES  # two programs per multiprocessor
    usage = resource_usage(kernel, tmp_path)
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, usage


def test_the_gluon_cluster_kernel_refuses_a_call_it_cannot_take_with_the_reason() -> None:
    q, k, v, layout = random_problem(1, 2, 200, 200, 32, 5, 7, 0.5, seed=0)
    perms = random_permutations(1, 2, 200, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="sm_90"):
        vb.varlen_block_sparse_attention_gluon(q, k, v, *layout, q_perm=perms, kv_perm=perms)


def _bf16_problem():
    q, k, v, layout = random_problem(1, 2, 200, 200, 128, 5, 7, 0.5, seed=0, dtype=torch.bfloat16)
    return token_major(q), token_major(k), token_major(v), layout


def test_the_op_takes_the_gluon_cluster_kernel_on_sm90_with_both_permutations() -> None:
    q, k, v, _ = _bf16_problem()
    assert vb.varlen_kernel_choice(q, k, v, True, capability=HOPPER) == "gluon"


@pytest.mark.parametrize(
    "case,capability,has_permutations",
    [("another GPU", (8, 0), True), ("Blackwell", (10, 0), True), ("no permutations", HOPPER, False),
     ("fp32", HOPPER, True)],
)  # fmt: skip
def test_the_op_takes_the_triton_cluster_kernel_where_gluon_cannot(case, capability, has_permutations) -> None:
    q, k, v, _ = _bf16_problem()
    if case == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    assert vb.varlen_kernel_choice(q, k, v, has_permutations, capability=capability) == "triton"


def test_the_op_off_cuda_runs_the_reference() -> None:
    q, k, v, layout = _bf16_problem()
    perms = random_permutations(1, 2, 200, torch.Generator().manual_seed(0))
    assert vb.varlen_kernel_choice(q, k, v, True) == "reference"
    got = vb.varlen_block_sparse_attention(q, k, v, *layout, q_perm=perms, kv_perm=perms, return_lse=True)
    want = varlen_block_sparse_attention_reference(q, k, v, *layout, q_perm=perms, kv_perm=perms, return_lse=True)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------- GPU (sm_90)

gpu = pytest.mark.gpu


def _require_hopper() -> None:
    if torch.cuda.get_device_capability() != HOPPER:
        pytest.skip("the Gluon kernels run on sm_90 only")


def _run_poisoned(q, k, v, layout, q_perm, kv_perm, **kwargs):
    out = attention_output_like(q, v).fill_(float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    got = vb.varlen_block_sparse_attention_gluon(q, k, v, *layout, q_perm=q_perm, kv_perm=kv_perm, out=out, lse_out=lse,
                                              **kwargs)  # fmt: skip
    assert got[0] is out and got[1] is lse and not out.isnan().any() and not lse.isnan().any()
    return out, lse


@gpu
@pytest.mark.parametrize("tile", [GLUON_VARLEN_TILE, TileConfig(128, 128, 4, 2)])
@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 128), (torch.float16, 64)])
def test_gpu_matches_reference_with_empty_clusters_and_clusters_keeping_nothing(tile, dtype, head_dim) -> None:
    _require_hopper()
    q, k, v, layout = random_problem(2, 3, 900, 1100, head_dim, 11, 37, 0.3, seed=5, dtype=dtype, device="cuda")
    layout[2][0, 0, 0] = 0  # a q cluster that keeps nothing
    g = torch.Generator().manual_seed(5)
    q, k, v = token_major(q), token_major(k), token_major(v)
    q_perm = random_permutations(2, 3, 900, g, device="cuda")
    kv_perm = random_permutations(2, 3, 1100, g, dtype=torch.int32, device="cuda")
    out, lse = _run_poisoned(q, k, v, layout, q_perm, kv_perm, scale=0.3, tile=tile)
    want_out, want_lse = varlen_block_sparse_attention_reference(q, k, v, *layout, q_perm=q_perm, kv_perm=kv_perm,
                                                                 scale=0.3, return_lse=True)  # fmt: skip
    assert rel_l2(out, want_out) <= 1e-2
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[finite] - want_lse[finite]).abs().max() <= 1e-3
    assert (out[~finite] == 0).all()


@gpu
def test_gpu_wan_480p_token_major_equals_the_triton_cluster_kernel_with_ragged_rows() -> None:
    _require_hopper()
    q, k, v, layout = wan_problem(12, 0.2, seed=3)
    q, k, v = token_major(q), token_major(k), token_major(v)
    g = torch.Generator().manual_seed(3)
    q_perm = random_permutations(1, 12, q.shape[2], g, device="cuda")
    kv_perm = random_permutations(1, 12, k.shape[2], g, dtype=torch.int32, device="cuda")
    kept = varlen_kept_keys(vb.validate_varlen_inputs(q, k, v, *layout, q_perm, kv_perm))
    bounds = dict(kept_keys=kept, kept_rows_total=int(kept.sum()), max_kept_keys=int(kept.max()))
    out, lse = _run_poisoned(q, k, v, layout, q_perm, kv_perm, **bounds)
    want_out, want_lse = vb.varlen_block_sparse_attention_triton(q, k, v, *layout, q_perm=q_perm, kv_perm=kv_perm,
                                                                 **bounds)  # fmt: skip
    assert rel_l2(out, want_out) <= 1e-2
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[finite] - want_lse[finite]).abs().max() <= 1e-3


@gpu
def test_gpu_op_dispatches_permuted_calls_to_the_gluon_cluster_kernel() -> None:
    """The public op (eager and compiled) equals the Gluon entry on sm_90 when both permutations are given."""
    _require_hopper()
    q, k, v, layout = random_problem(1, 4, 3000, 3000, 128, 40, 90, 0.3, seed=9, dtype=torch.bfloat16, device="cuda")
    q, k, v = token_major(q), token_major(k), token_major(v)
    g = torch.Generator().manual_seed(9)
    q_perm, kv_perm = (random_permutations(1, 4, 3000, g, device="cuda") for _ in range(2))
    assert vb.varlen_kernel_choice(q, k, v, True) == "gluon"
    gluon = vb.varlen_block_sparse_attention_gluon(q, k, v, *layout, q_perm=q_perm, kv_perm=kv_perm)
    eager = vb.varlen_block_sparse_attention(q, k, v, *layout, q_perm=q_perm, kv_perm=kv_perm, return_lse=True)
    assert torch.equal(eager[0], gluon[0]) and torch.equal(eager[1], gluon[1])
    compiled = torch.compile(lambda *a: vb.varlen_block_sparse_attention(*a, q_perm=q_perm, kv_perm=kv_perm),
                             fullgraph=True)(q, k, v, *layout)  # fmt: skip
    assert torch.equal(compiled, gluon[0])
