"""Tests of the Gluon cluster (variable-block) attention kernel (sm_90) and of the op's dispatch to it.

On CPU: which implementation the op picks for each device capability, dtype, head dim and stride
(:func:`varlen_kernel_choice`); the Gluon tiles and register split; and an ahead-of-time compile of the kernel
for sm_90a with the ptxas in Triton's wheel (a ``cp.async`` gathering producer arriving on the ready barriers
as its copies land, ``warpgroup_mma`` consumers, no register spills, shared memory within Hopper's limit).
GPU cases (``@pytest.mark.gpu``, on an sm_90 device) compare the kernel, into NaN-poisoned outputs, with the
reference on fresh random inputs: folded permutations on token-major inputs, empty clusters and clusters
keeping nothing, tails in a second launch, both dtypes and head dims, and a dense layout against SDPA.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from gluon_compile import (
    HOPPER_SHARED_BYTES,
    TRITON_BIN,
    attention_loop_mix,
    compile_sm90a,
    gather_loop,
    opcode_mix,
    resource_usage,
)
from test_varlen_block_sparse import (
    assert_matches_reference,
    random_permutations,
    random_problem,
    token_major,
    wan_problem,
)
from triton_interpreter_support import rel_l2

from sparse_compile.kernels import varlen_block_sparse as vb
from sparse_compile.kernels.common import attention_output_like
from sparse_compile.kernels.gluon_block_sparse import launch_registers
from sparse_compile.kernels.gluon_varlen_block_sparse import (
    GATHER_PRODUCER_REGS,
    PRODUCER_WARPS,
    consumer_registers,
    gluon_varlen_ineligibility,
    int32_row_offsets,
)
from sparse_compile.kernels.tile_configs import GLUON_VARLEN_CONFIG, VarlenConfig
from sparse_compile.kernels.varlen_block_sparse import varlen_kernel_choice

HOPPER = (9, 0)


def _inputs(dtype=torch.bfloat16, d=128):
    q, k, v, _ = random_problem(1, 2, 200, 150, d, 3, 10, 0.5, seed=0, dtype=dtype)
    return q, k, v


# ---------------------------------------------------------------- dispatch (CPU)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_choice_takes_gluon_on_sm90_for_16_bit_d64_d128(dtype, d) -> None:
    q, k, v = _inputs(dtype, d)
    assert varlen_kernel_choice(q, k, v, HOPPER) == "gluon"
    assert varlen_kernel_choice(token_major(q), token_major(k), token_major(v), HOPPER) == "gluon"


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_kernel_choice_takes_triton_on_other_gpus(capability) -> None:
    assert varlen_kernel_choice(*_inputs(), capability) == "triton"


@pytest.mark.parametrize(
    "case, reason",
    [("fp32", "fp16/bf16"), ("d32", "head dim"), ("strided_d", "unit last stride")],
)
def test_kernel_choice_takes_triton_on_sm90_for_what_gluon_cannot_take(case: str, reason: str) -> None:
    q, k, v = _inputs(torch.float32 if case == "fp32" else torch.bfloat16, 32 if case == "d32" else 128)
    if case == "strided_d":
        k = torch.randn(1, 2, 150, 256, dtype=torch.bfloat16)[..., ::2]
    assert reason in gluon_varlen_ineligibility(q, k, v, HOPPER)
    assert varlen_kernel_choice(q, k, v, HOPPER) == "triton"


def test_kernel_choice_off_cuda_is_the_reference() -> None:
    assert varlen_kernel_choice(*_inputs()) == "reference"


def test_gluon_entry_off_sm90_raises_with_the_reason() -> None:
    q, k, v, layout = random_problem(1, 1, 64, 64, 64, 2, 4, 0.5, seed=1, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="sm_90"):
        vb.varlen_block_sparse_attention_gluon(q, k, v, *layout)


def test_gluon_entry_checks_the_output_buffer_stride() -> None:
    q, k, v = _inputs()
    out = torch.empty(1, 2, 200, 256, dtype=q.dtype)[..., ::2]
    assert "unit last stride" in gluon_varlen_ineligibility(q, k, v, HOPPER, out)


# ---------------------------------------------------------------- tiles and registers (CPU)


def test_gluon_default_tile_is_128_by_128_with_two_slots_and_no_tail_launch() -> None:
    assert GLUON_VARLEN_CONFIG == VarlenConfig(128, 128, 8, 2)


@pytest.mark.parametrize("consumers", [1, 2])
def test_consumer_registers_fit_what_the_producer_frees(consumers) -> None:
    """``setmaxnreg`` moves registers within the program's launch allocation: the consumers' and the producer's
    registers must not exceed the padded warpgroups' launch cap, or ``setmaxnreg.inc`` would wait forever."""
    regs = consumer_registers(consumers)
    assert regs % 8 == 0 and regs >= 176
    assert consumers * regs + GATHER_PRODUCER_REGS <= (consumers + 1) * launch_registers(consumers)


def _compile_sm90a(block_m: int, block_n: int, stages: int, head_dim: int, dtype_name: str, perm: str = "i32",
                  wide_offsets: bool = False):  # fmt: skip
    """The kernel compiled ahead of time for sm_90a (no GPU needed): Triton's compiled-kernel object."""
    from triton.experimental.gluon import language as gl

    from sparse_compile.kernels.gluon_varlen_block_sparse import _varlen_fwd_gluon

    dtype = getattr(gl, dtype_name)
    name = {gl.bfloat16: "bf16", gl.float16: "fp16"}[dtype]
    consumers = block_m // 64
    constants = dict(
        HEAD_DIM=head_dim, BLOCK_N=block_n, CONSUMERS=consumers, STAGES=stages,
        Q_LAYOUT=gl.NVMMASharedLayout.get_default_for([1, 1, 64, head_dim], dtype),
        KV_LAYOUT=gl.NVMMASharedLayout.get_default_for([1, 1, block_n, head_dim], dtype),
        CONSUMER_REGS=consumer_registers(consumers), PRODUCER_REGS=GATHER_PRODUCER_REGS, WIDE_OFFSETS=wide_offsets,
    )  # fmt: skip
    pointers = {**{n: f"*{name}" for n in ("Q", "K", "V", "O")}, "LSE": "*fp32", "Q_PERM": f"*{perm}",
                **{n: "*i32" for n in ("TILE_CLUSTER", "TILE_ROW", "Q_OFF", "TOTAL")}, "STARTS": "*i64",
                "ROWS": "*i32"}  # fmt: skip
    strides = [f"stride_{t}{dim}" for t in "qkvo" for dim in "bhs"]
    ints = strides + ["stride_pb", "stride_ph", "stride_ps", "bh_start", "H", "NQC", "num_tiles", "S_Q"]
    signature = {**pointers, **dict.fromkeys(ints, "i32"), "qk_scale": "fp32", **dict.fromkeys(constants, "constexpr")}
    aligned = ("Q", "K", "V", "O", *strides)  # as a launch on 16-byte aligned rows specialises them
    options = {"num_warps": 4, "maxnreg": launch_registers(consumers)}
    return compile_sm90a(_varlen_fwd_gluon, signature, constants, options, aligned)


def test_row_offsets_are_int32_while_a_heads_rows_fit() -> None:
    wan = torch.empty(1, 32760, 12, 128, device="meta").transpose(1, 2)  # token-major Wan 480p
    assert int32_row_offsets(wan)
    huge_rows = torch.empty_strided((1, 1, 2**17, 128), (1, 1, 2**15, 1), device="meta")  # 2^32 elements
    assert not int32_row_offsets(huge_rows)


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
@pytest.mark.parametrize(
    "block_m,block_n,stages,head_dim,dtype_name,wide_offsets",
    [(128, 64, 3, 128, "bfloat16", False), (64, 64, 3, 128, "bfloat16", False), (128, 128, 2, 64, "float16", False),
     (128, 128, 3, 128, "bfloat16", False), (64, 64, 3, 128, "bfloat16", True)],
)  # fmt: skip
def test_kernel_compiles_for_sm90a_without_spills(tmp_path, block_m, block_n, stages, head_dim, dtype_name,
                                                  wide_offsets) -> None:  # fmt: skip
    kernel = _compile_sm90a(block_m, block_n, stages, head_dim, dtype_name, wide_offsets=wide_offsets)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "setmaxnreg" in ptx
    assert "cp.async.cg.shared.global" in ptx and "cp.async.bulk.tensor" not in ptx  # gathers, no TMA
    assert "cp.async.mbarrier.arrive.noinc" in ptx  # each producer thread arrives as its copies land
    assert "cp.async.wait_group" not in ptx  # the producer never waits on its own copies
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES
    usage = resource_usage(kernel, tmp_path)
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, usage


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
def test_default_tile_fits_one_program_per_sm(tmp_path) -> None:
    """The default tile (two consumers and the producer: 384 threads at 168 registers) needs at most an SM's
    shared memory per block (227 KiB) and its register file."""
    cfg = GLUON_VARLEN_CONFIG
    kernel = _compile_sm90a(cfg.block_m, cfg.block_n, cfg.num_stages, 128, "bfloat16")
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES
    assert (cfg.block_m // 64 + 1) * 128 * launch_registers(cfg.block_m // 64) <= 65536
    assert PRODUCER_WARPS == 4


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
def test_producer_loop_issues_unpredicated_copies_at_under_six_instructions_each(tmp_path) -> None:
    """Per 64-key tile, each of the 4 producer warps copies 64 rows of K and of V (256 bytes each) in 16-byte
    ``cp.async`` vectors: 16 per thread. A row's address is computed once for both of its vectors, in 32 bits,
    and no copy is predicated (positions past the list repeat its last row), so the loop stays near the copies."""
    loop = gather_loop(_compile_sm90a(64, 64, 3, 128, "bfloat16"), tmp_path)
    mix = opcode_mix(loop)
    assert mix["LDGSTS"] == 16, mix
    assert not [t for t in loop if re.match(r"@!?P[0-6]\s+LDGSTS", t)], loop
    assert len(loop) <= 6 * mix["LDGSTS"], mix


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
def test_main_loop_fences_each_gathered_tile_and_masks_no_keys(tmp_path) -> None:
    """Only a q cluster's last tile masks list positions, so the main loop selects no scores; each gathered slot
    is fenced for the tensor cores' async proxy before its ``warpgroup_mma``."""
    kernel = _compile_sm90a(128, 64, 3, 128, "bfloat16")
    loop = attention_loop_mix(kernel, tmp_path)
    assert loop["FSEL"] == 0 and loop["FENCE"] >= 2, loop


# ---------------------------------------------------------------- GPU


def _run_gluon_poisoned(q, k, v, layout, config=None, **perms):
    out = attention_output_like(q, v).fill_(float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=q.device)
    got = vb.varlen_block_sparse_attention_gluon(q, k, v, *layout, **perms, scale=0.3, config=config, out=out,
                                                 lse_out=lse)  # fmt: skip
    assert got[0] is out and got[1] is lse
    assert not out.isnan().any() and not lse.isnan().any()
    return out, lse


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize(
    "s_q,s_k,nqc,nkc,density",
    [(1000, 900, 5, 40, 0.3), (777, 1234, 9, 100, 0.5), (300, 300, 40, 3, 0.6), (2000, 2000, 3, 20, 1.0)],
)
def test_gpu_gluon_matches_reference_with_permutations_and_empty_clusters(s_q, s_k, nqc, nkc, density, d, dtype):
    q, k, v, layout = random_problem(2, 2, s_q, s_k, d, nqc, nkc, density, seed=s_q + nkc, dtype=dtype, device="cuda")
    q, k, v = token_major(q), token_major(k), token_major(v)
    g = torch.Generator().manual_seed(s_k)
    perms = dict(q_perm=random_permutations(2, 2, s_q, g, device="cuda"),
                 kv_perm=random_permutations(2, 2, s_k, g, dtype=torch.int32, device="cuda"))  # fmt: skip
    got = _run_gluon_poisoned(q, k, v, layout, **perms)
    assert_matches_reference(q, k, v, layout, got, tol=1e-2, **perms)


@pytest.mark.gpu
def test_gpu_gluon_with_int64_row_offsets_matches_reference(monkeypatch):
    """The producer's int64 row offsets (taken where a head's rows reach past int32) give the same result."""
    from sparse_compile.kernels import gluon_varlen_block_sparse

    monkeypatch.setattr(gluon_varlen_block_sparse, "int32_row_offsets", lambda t: False)
    q, k, v, layout = random_problem(1, 2, 1000, 900, 128, 5, 40, 0.3, seed=11, dtype=torch.bfloat16, device="cuda")
    q, k, v = token_major(q), token_major(k), token_major(v)
    got = _run_gluon_poisoned(q, k, v, layout)
    assert_matches_reference(q, k, v, layout, got, tol=1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [None, VarlenConfig(64, 64, 4, 3), VarlenConfig(128, 64, 8, 3),
                                    VarlenConfig(128, 64, 8, 4, tail_block_m=64, tail_block_n=64),
                                    VarlenConfig(128, 128, 8, 3, tail_block_m=64, tail_block_n=64,
                                                 tail_num_stages=3)])  # fmt: skip
def test_gpu_gluon_wan_480p_matches_reference_and_triton(config):
    """Wan 480p, 4 heads, cluster order (no permutation): every tile config matches the reference on two heads
    and the Triton kernel on all four."""
    q, k, v, layout = wan_problem(4, 0.2, seed=7)
    got = _run_gluon_poisoned(q, k, v, layout, config=config)
    triton_out, triton_lse = vb.varlen_block_sparse_attention_triton(q, k, v, *layout, scale=0.3)
    assert rel_l2(got[0], triton_out) < 1e-2
    assert torch.equal(torch.isfinite(got[1]), torch.isfinite(triton_lse))
    for head in (0, 3):
        sl = slice(head, head + 1)
        assert_matches_reference(q[:, sl], k[:, sl], v[:, sl], [t[:, sl] for t in layout],
                                 (got[0][:, sl], got[1][:, sl]), tol=1e-2)  # fmt: skip


@pytest.mark.gpu
def test_gpu_gluon_every_cluster_keeping_nothing_gives_zeros_and_minus_inf():
    q, k, v, layout = random_problem(1, 2, 500, 400, 128, 4, 8, 0.0, seed=9, dtype=torch.bfloat16, device="cuda")
    out, lse = _run_gluon_poisoned(q, k, v, layout)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.gpu
def test_gpu_gluon_dense_layout_equals_sdpa():
    q, k, v, layout = random_problem(1, 4, 4096, 4096, 128, 16, 30, 1.0, seed=10, dtype=torch.bfloat16, device="cuda")
    out, _ = _run_gluon_poisoned(q, k, v, layout)
    assert rel_l2(out, F.scaled_dot_product_attention(q, k, v, scale=0.3)) < 1e-2


@pytest.mark.gpu
def test_gpu_op_dispatches_to_gluon_on_sm90(monkeypatch):
    calls = []
    gluon_entry = vb.varlen_block_sparse_attention_gluon
    monkeypatch.setattr(vb, "varlen_block_sparse_attention_gluon", lambda *a, **kw: calls.append(1) or gluon_entry(*a, **kw))
    q, k, v, layout = random_problem(1, 2, 700, 700, 128, 5, 20, 0.4, seed=11, dtype=torch.bfloat16, device="cuda")
    out = vb.varlen_block_sparse_attention(q, k, v, *layout, scale=0.3)
    assert calls == [1]
    want = vb.varlen_block_sparse_attention_triton(q, k, v, *layout, scale=0.3)[0]
    assert rel_l2(out, want) < 1e-2
