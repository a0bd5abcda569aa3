"""Tests of the Gluon fixed-block attention kernel (sm_90) and of the op's dispatch to it.

On CPU: which implementation the op picks for each device capability, dtype, head dim, layout block,
permutation and stride (:func:`kernel_choice`); the Gluon tile for each layout; and an ahead-of-time
compile of the kernel for sm_90a with the ptxas in Triton's wheel (warp-specialized with register
hand-over, no register spills, shared memory within Hopper's limit). GPU cases (``@pytest.mark.gpu``, run on an sm_90 device) compare the kernel,
into NaN-poisoned outputs, with the reference on fresh random inputs: sequence tails, empty rows,
token-major inputs, both dtypes and head dims, and a dense layout against SDPA.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from gluon_compile import HOPPER_SHARED_BYTES, TRITON_BIN, attention_loop_mix, compile_sm90a, resource_usage
from test_block_sparse import assert_matches_reference, dense_block_layout, make_qkv, random_layout, run_poisoned
from triton_interpreter_support import rel_l2

from sparse_compile.kernels import block_sparse, block_sparse_reference
from sparse_compile.kernels.block_sparse import (
    block_sparse_attention,
    block_sparse_attention_gluon,
    block_sparse_attention_triton,
    kernel_choice,
)
from sparse_compile.kernels.block_sparse_reference import reference_q_blocks
from sparse_compile.kernels.common import attention_output_like, cdiv
from sparse_compile.kernels.gluon_block_sparse import (
    CONSUMER_REGS,
    CONSUMER_ROWS,
    GLUON_LAYOUT_BLOCKS,
    PRODUCER_REGS,
    gluon_ineligibility,
    launch_gluon_block_sparse,
    launch_registers,
)
from sparse_compile.kernels.tile_configs import TileConfig, gluon_block_sparse_tile

HOPPER = (9, 0)


def _inputs(dtype=torch.bfloat16, d=128, s=300, bshd=False):
    gen = torch.Generator().manual_seed(0)
    return make_qkv(1, 2, s, s, d, dtype, gen, bshd=bshd)


# ---------------------------------------------------------------- dispatch (CPU)


def test_kernel_choice_takes_gluon_on_sm90_for_bf16_and_fp16_d64_d128() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            for block in GLUON_LAYOUT_BLOCKS:
                q, k, v = _inputs(dtype, d)
                assert kernel_choice(q, k, v, block, block, False, HOPPER) == "gluon"


def test_kernel_choice_reads_token_major_inputs_with_gluon() -> None:
    q, k, v = _inputs(bshd=True)
    assert kernel_choice(q, k, v, 128, 64, False, HOPPER) == "gluon"


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_kernel_choice_takes_triton_on_other_gpus(capability) -> None:
    q, k, v = _inputs()
    assert kernel_choice(q, k, v, 128, 128, False, capability) == "triton"
    assert "sm_90 only" in gluon_ineligibility(q, k, v, 128, 128, capability, False)


@pytest.mark.parametrize(
    "case,reason",
    [
        ("fp32", "fp16/bf16"),
        ("head dim 32", "head dim"),
        ("block 32", "layout blocks"),
        ("block_k 16", "layout blocks"),
        ("strided head dim", "unit last stride"),
        ("unaligned base", "16-byte aligned"),
    ],
)
def test_kernel_choice_takes_triton_on_sm90_for_what_gluon_cannot_take(case: str, reason: str) -> None:
    q, k, v = _inputs()
    block_q = block_k = 128
    if case == "fp32":
        q, k, v = _inputs(torch.float32)
    elif case == "head dim 32":
        q, k, v = _inputs(d=32)
    elif case == "block 32":
        block_q = 32
    elif case == "block_k 16":
        block_k = 16
    elif case == "strided head dim":
        k = torch.randn(1, 2, 300, 256, dtype=torch.bfloat16)[..., ::2]
    elif case == "unaligned base":
        v = torch.randn(1, 2, 300 * 128 + 1, dtype=torch.bfloat16)[..., 1:].view(1, 2, 300, 128)
    assert kernel_choice(q, k, v, block_q, block_k, False, HOPPER) == "triton"
    assert reason in gluon_ineligibility(q, k, v, block_q, block_k, HOPPER, False)


def test_kernel_choice_runs_permuted_calls_through_gluon_on_kv_copies_on_sm90() -> None:
    q, k, v = _inputs(bshd=True)
    assert "cannot gather" in gluon_ineligibility(q, k, v, 128, 128, HOPPER, True)
    assert kernel_choice(q, k, v, 128, 128, True, HOPPER) == "gluon_kv_copies"
    strided = torch.randn(1, 2, 300, 256, dtype=torch.bfloat16)[..., ::2]  # K/V copies are contiguous: TMA reads them
    assert kernel_choice(q, strided, v, 128, 128, True, HOPPER) == "gluon_kv_copies"
    assert kernel_choice(strided, k, v, 128, 128, True, HOPPER) == "gluon_kv_copies"  # q is read by pointer


@pytest.mark.parametrize("case", ["fp32", "head dim 32", "block 32", "sm_80"])
def test_kernel_choice_keeps_permuted_calls_the_gluon_kernel_cannot_take_on_triton(case: str) -> None:
    q, k, v = _inputs(torch.float32 if case == "fp32" else torch.bfloat16, d=32 if case == "head dim 32" else 128)
    block_q = 32 if case == "block 32" else 128
    assert kernel_choice(q, k, v, block_q, 128, True, (8, 0) if case == "sm_80" else HOPPER) == "triton"


def _permute_q_kernel_is_the_reference(monkeypatch) -> list[int]:
    """On CPU, stand the reference in for the Gluon kernel's ``PERMUTE_Q`` variant behind
    :func:`block_sparse.block_sparse_attention_gluon_on_kv_copies` (its device check passes): each launch
    asserts what the kernel needs (k and v contiguous kernel-order copies, q and O with a unit last stride)
    and writes O and LSE to the token rows ``q_perm`` names. Returns the list of each launch's head count."""
    launches: list[int] = []

    def launch(q, k, v, layout, block_q, block_k, scale, out, lse, tile=None, q_perm=None) -> None:
        assert q_perm is not None and k.is_contiguous() and v.is_contiguous()
        assert q.stride(3) == 1 and out.stride(3) == 1 and lse.stride(2) == 1
        launches.append(q.shape[1])
        got = block_sparse_reference.block_sparse_attention_reference(
            q, k, v, layout.counts, layout.indices, block_q=block_q, block_k=block_k, q_perm=q_perm, scale=scale,
            return_lse=True)  # fmt: skip
        out.copy_(got[0])
        lse.copy_(got[1])

    monkeypatch.setattr(block_sparse, "gluon_config_ineligibility", lambda *args: None)
    monkeypatch.setattr(block_sparse, "launch_gluon_block_sparse", launch)
    return launches


@pytest.mark.parametrize("given", ["both", "q_perm", "kv_perm"])
def test_op_dispatch_hands_permuted_calls_to_the_kv_copies_path(monkeypatch, given: str) -> None:
    """The op's body with the choice forced to ``gluon_kv_copies`` (CPU): the K/V copies path gets the call's
    permutations, a missing side as the identity, and its (stood-in) kernel reproduces the permuted reference."""
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(1, 2, 300, 260, 64, torch.float32, gen)
    counts, indices = random_layout(1, 2, 3, 3, 0.6, gen, empty_fraction=0.2)
    q_perm = _random_perms(1, 2, 300, gen) if given in ("both", "q_perm") else None
    kv_perm = _random_perms(1, 2, 260, gen) if given in ("both", "kv_perm") else None
    launches = _permute_q_kernel_is_the_reference(monkeypatch)
    monkeypatch.setattr(block_sparse, "kernel_choice", lambda *args, **kw: "gluon_kv_copies")
    got = block_sparse._dispatch(q, k, v, counts, indices, 128, 128, None, q_perm, kv_perm)
    assert launches == [2]
    assert_matches_reference(q, k, v, counts, indices, 128, 128, got, 1e-6, q_perm=q_perm, kv_perm=kv_perm)


def test_kernel_choice_off_cuda_is_the_reference() -> None:
    q, k, v = _inputs()
    assert kernel_choice(q, k, v, 128, 128, False) == "reference"


def test_op_on_cpu_still_runs_the_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(1, 2, 200, 200, 64, torch.bfloat16, gen)
    counts, indices = random_layout(1, 2, 2, 2, 0.6, gen, empty_fraction=0.3)
    got = block_sparse_attention(q, k, v, counts, indices, block_q=128, block_k=128, return_lse=True)
    assert_matches_reference(q, k, v, counts, indices, 128, 128, got, 1e-6)


def _random_perms(b: int, h: int, s: int, gen: torch.Generator, device: str = "cpu") -> torch.Tensor:
    return torch.stack([torch.randperm(s, generator=gen) for _ in range(b * h)]).view(b, h, s).to(device, torch.int32)


@pytest.mark.parametrize("strided", [False, True])
def test_kv_copies_path_gathers_k_and_v_in_head_groups_and_writes_o_and_lse_in_token_order(
    monkeypatch, strided: bool
) -> None:
    """The permuted call on K/V copies, the ``PERMUTE_Q`` kernel stood in for by the reference: head groups of
    one head each (the byte bound) give the reference's permuted result in every poisoned row of the caller's
    buffers; ``strided``: q and ``out`` without a unit last stride go through unit-stride copies."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(2, 3, 300, 260, 64, torch.float32, gen, bshd=True)
    counts, indices = random_layout(2, 3, 3, 3, 0.6, gen, empty_fraction=0.2)
    q_perm, kv_perm = _random_perms(2, 3, 300, gen), _random_perms(2, 3, 260, gen)
    out = attention_output_like(q, v)
    if strided:
        q = q.transpose(2, 3).contiguous().transpose(2, 3)  # (B, H, D, S) storage
        out = torch.empty(2, 3, 64, 300).transpose(2, 3)
    out.fill_(float("nan"))
    lse = torch.full((2, 3, 300), float("nan"))
    launches = _permute_q_kernel_is_the_reference(monkeypatch)
    monkeypatch.setattr(block_sparse, "COPY_GROUP_BYTES", 1)
    got = block_sparse.block_sparse_attention_gluon_on_kv_copies(
        q, k, v, counts, indices, block_q=128, block_k=128, q_perm=q_perm, kv_perm=kv_perm, out=out, lse_out=lse)
    assert launches == [1, 1, 1] and got[0] is out and got[1] is lse
    assert_matches_reference(q, k, v, counts, indices, 128, 128, got, 1e-6, q_perm=q_perm, kv_perm=kv_perm)


@pytest.mark.parametrize("given", ["both", "q_perm", "kv_perm"])
def test_kv_copies_entry_off_sm90_raises_with_the_reason(given: str) -> None:
    gen = torch.Generator().manual_seed(9)
    q, k, v = _inputs()
    counts, indices = dense_block_layout(1, 2, 300, 300, 128, 128)
    perm = _random_perms(1, 2, 300, gen)
    with pytest.raises(ValueError, match="sm_90 only"):
        block_sparse.block_sparse_attention_gluon_on_kv_copies(
            q, k, v, counts, indices, block_q=128, block_k=128, q_perm=perm if given != "kv_perm" else None,
            kv_perm=perm if given != "q_perm" else None)  # fmt: skip


def test_gluon_entry_off_sm90_raises_with_the_reason() -> None:
    q, k, v = _inputs()
    counts, indices = dense_block_layout(1, 2, 300, 300, 128, 128)
    with pytest.raises(ValueError, match="sm_90 only"):
        block_sparse_attention_gluon(q, k, v, counts, indices, block_q=128, block_k=128)


# ---------------------------------------------------------------- tile and sm_90a compile (CPU)


@pytest.mark.parametrize("block_q", GLUON_LAYOUT_BLOCKS)
@pytest.mark.parametrize("block_k", GLUON_LAYOUT_BLOCKS)
def test_gluon_tile_tiles_the_layout_blocks_with_one_consumer_warpgroup_per_64_rows(block_q, block_k) -> None:
    tile = gluon_block_sparse_tile(block_q, block_k)
    assert tile.block_m in (64, 128) and block_q % tile.block_m == 0 and block_k % tile.block_n == 0
    assert tile.block_n <= 128 and tile.num_warps == tile.block_m // 16 and tile.num_stages == 2


def test_gluon_tile_at_wan_shapes() -> None:
    assert gluon_block_sparse_tile(128, 128) == TileConfig(128, 128, 8, 2)
    assert gluon_block_sparse_tile(64, 64) == TileConfig(64, 64, 4, 2)


def test_launch_registers_share_the_register_file_among_the_padded_warpgroups() -> None:
    """Two consumer warpgroups + the producer warp run as 3 warpgroups: 384 threads x 168 <= 64K registers;
    one consumer + the producer (256 threads) take half the file, two programs per SM."""
    assert launch_registers(2) == 168 and 384 * launch_registers(2) <= 65536
    assert launch_registers(1) == 128 and 2 * 256 * launch_registers(1) <= 65536


def test_gluon_entry_rejects_a_tile_that_does_not_fit_the_consumers() -> None:
    with pytest.raises(ValueError, match="block_m 64 or 128"):
        launch_gluon_block_sparse(*_inputs(), None, 256, 256, 1.0, None, None, TileConfig(256, 128, 16, 2))


PERMUTE_Q_ARGS = ("Q", "O", "Q_PERM", "stride_qb", "stride_qh", "stride_qs", "stride_ob", "stride_oh", "stride_os",
                  "stride_pb", "stride_ph", "stride_ps", "stride_lb", "stride_lh")
"""The kernel's ``PERMUTE_Q`` arguments (``None`` without it)."""


def _compile_sm90a(block_q: int, block_k: int, head_dim: int, dtype, even_k: bool, permute_q: bool = False):
    """The kernel compiled ahead of time for sm_90a (no GPU needed): Triton's compiled-kernel object.
    ``permute_q``: the variant gathering Q rows and scattering O/LSE through an int32 permutation."""
    from triton.experimental.gluon import language as gl

    from sparse_compile.kernels.gluon_block_sparse import _block_sparse_fwd_gluon

    tile = gluon_block_sparse_tile(block_q, block_k)
    consumers = tile.block_m // CONSUMER_ROWS
    name = {gl.bfloat16: "bf16", gl.float16: "fp16"}[dtype]

    def descriptor(rows: int) -> str:
        block = [1, 1, rows, head_dim]
        return f"tensordesc<{name}[{', '.join(map(str, block))}],{gl.NVMMASharedLayout.get_default_for(block, dtype)!r}>"

    constants = dict(LAYOUT_BQ=block_q, LAYOUT_BK=block_k, EVEN_K=even_k, CONSUMERS=consumers,
                     STAGES=tile.num_stages, CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
                     PERMUTE_Q=permute_q)  # fmt: skip
    permuted = {"Q": f"*{name}", "O": f"*{name}", "Q_PERM": "*i32", **{n: "i32" for n in PERMUTE_Q_ARGS[3:]}}
    if not permute_q:
        constants.update(dict.fromkeys(PERMUTE_Q_ARGS))
    signature = {
        "q_desc": descriptor(CONSUMER_ROWS), "k_desc": descriptor(tile.block_n), "v_desc": descriptor(tile.block_n),
        "o_desc": descriptor(CONSUMER_ROWS), "LSE": "*fp32", "COUNTS": "*i32", "INDICES": "*i32",
        **{n: "i32" for n in ("stride_cb", "stride_ch", "stride_cq", "stride_ib", "stride_ih", "stride_iq",
                              "stride_ik", "H", "S_Q", "S_K")},
        "qk_scale": "fp32",
        **{n: "constexpr" for n in constants if n not in PERMUTE_Q_ARGS},
        **{n: "constexpr" if n in constants else permuted[n] for n in PERMUTE_Q_ARGS},
    }  # fmt: skip
    options = {"num_warps": 4, "maxnreg": launch_registers(consumers)}
    aligned = () if not permute_q else ("Q", "O", "stride_qb", "stride_qh", "stride_qs", "stride_ob", "stride_oh",
                                        "stride_os")  # as a launch on 16-byte aligned q/out specialises them
    return compile_sm90a(_block_sparse_fwd_gluon, signature, constants, options, aligned)


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
@pytest.mark.parametrize(
    "block_q,block_k,head_dim,dtype_name,even_k",
    [(128, 128, 128, "bfloat16", False), (64, 64, 64, "float16", True)],
)
def test_kernel_compiles_for_sm90a_without_spills(tmp_path, block_q, block_k, head_dim, dtype_name, even_k) -> None:
    from triton.experimental.gluon import language as gl

    kernel = _compile_sm90a(block_q, block_k, head_dim, getattr(gl, dtype_name), even_k)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor.4d" in ptx
    assert "setmaxnreg" in ptx  # the producer hands its registers to the consumers
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES
    usage = resource_usage(kernel, tmp_path)
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, usage


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block", GLUON_LAYOUT_BLOCKS)
def test_permute_q_kernel_compiles_for_sm90a_without_spills(tmp_path, block, head_dim) -> None:
    """``PERMUTE_Q``: the consumers gather Q (no TMA load of Q, no wait on its barrier) and store O/LSE by
    pointer (no TMA store); K/V still come by TMA; no spills."""
    from triton.experimental.gluon import language as gl

    kernel = _compile_sm90a(block, block, head_dim, gl.bfloat16, block != 64, permute_q=True)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx and "wgmma.mma_async" in ptx and "cp.async.bulk.tensor.4d" in ptx
    assert "cp.async.bulk.tensor.4d.global.shared" not in ptx  # O is not stored by TMA
    assert "setmaxnreg" in ptx
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES
    usage = resource_usage(kernel, tmp_path)
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, usage


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
def test_main_loop_masks_no_keys_when_the_keys_are_not_a_multiple_of_the_block(tmp_path) -> None:
    """Wan 480p's 32760 keys are not a multiple of 128: only the last kept block's tiles mask keys (kept blocks
    ascend), so the main loop issues about what it issues for even keys (no compare and select per score)."""
    from triton.experimental.gluon import language as gl

    uneven = attention_loop_mix(_compile_sm90a(128, 128, 128, gl.bfloat16, False), tmp_path)
    even = attention_loop_mix(_compile_sm90a(128, 128, 128, gl.bfloat16, True), tmp_path)
    assert sum(uneven.values()) <= 1.05 * sum(even.values()) and uneven["FSEL"] == 0


# ---------------------------------------------------------------- GPU (sm_90)

gpu = pytest.mark.gpu


def _require_hopper() -> None:
    if torch.cuda.get_device_capability() != HOPPER:
        pytest.skip("the Gluon kernel runs on sm_90 only")


_run_gluon_poisoned = functools.partial(run_poisoned, kernel=block_sparse_attention_gluon)
"""The Gluon kernel into NaN-poisoned token-major O and LSE buffers (:func:`run_poisoned`)."""


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize(
    "s_q,s_k,block_q,block_k",
    [(1000, 777, 128, 128), (1000, 1024, 64, 64), (777, 1000, 128, 64), (700, 900, 64, 128), (1100, 1300, 256, 256)],
)
def test_gpu_gluon_matches_reference_with_tails_and_empty_rows(s_q, s_k, block_q, block_k, head_dim, dtype) -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(s_q + s_k + block_q + head_dim)
    q, k, v = make_qkv(2, 3, s_q, s_k, head_dim, dtype, gen, "cuda")
    counts, indices = random_layout(2, 3, cdiv(s_q, block_q), cdiv(s_k, block_k), 0.5, gen, "cuda", 0.2)
    counts[0, 0, 0] = 0  # at least one q block keeps nothing
    got = _run_gluon_poisoned(q, k, v, counts, indices, block_q, block_k, scale=0.3)
    assert_matches_reference(q, k, v, counts, indices, block_q, block_k, got, 1e-2, scale=0.3)
    assert torch.isneginf(got[1][0, 0, :block_q]).all() and (got[0][0, 0, :block_q] == 0).all()


@gpu
def test_gpu_gluon_token_major_inputs_and_broadcast_layout() -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(41)
    q, k, v = make_qkv(2, 3, 1000, 1000, 128, torch.bfloat16, gen, "cuda", bshd=True)
    counts, indices = random_layout(1, 3, 8, 8, 0.4, gen, "cuda", 0.2)
    counts, indices = counts.expand(2, -1, -1), indices.expand(2, -1, -1, -1)
    got = _run_gluon_poisoned(q, k, v, counts, indices, 128, 128)
    assert_matches_reference(q, k, v, counts, indices, 128, 128, got, 1e-2)


@gpu
def test_gpu_gluon_all_rows_empty() -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(42)
    q, k, v = make_qkv(1, 2, 300, 300, 128, torch.bfloat16, gen, "cuda")
    counts = torch.zeros(1, 2, 3, dtype=torch.int32, device="cuda")
    indices = torch.zeros(1, 2, 3, 3, dtype=torch.int32, device="cuda")
    out, lse = _run_gluon_poisoned(q, k, v, counts, indices, 128, 128)
    assert (out == 0).all() and torch.isneginf(lse).all()


@gpu
@pytest.mark.parametrize("block", [128, 64])
def test_gpu_gluon_dense_layout_equals_sdpa(block: int) -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(43)
    s = 4096 - 37
    q, k, v = make_qkv(1, 4, s, s, 128, torch.bfloat16, gen, "cuda")
    counts, indices = dense_block_layout(1, 4, s, s, block, block, "cuda")
    out, lse = _run_gluon_poisoned(q, k, v, counts, indices, block, block)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_l2(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float())) <= 1e-2
    dense_lse = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) / 128**0.5, dim=-1)
    assert (lse - dense_lse).abs().max() <= 2e-3


@gpu
def test_gpu_op_dispatches_to_gluon_on_sm90() -> None:
    """The public op (eager and compiled) runs the Gluon kernel on sm_90, and on kernel-order K/V copies with
    permutations (both, or one side only)."""
    _require_hopper()
    gen = torch.Generator().manual_seed(44)
    q, k, v = make_qkv(1, 2, 1000, 1000, 128, torch.bfloat16, gen, "cuda", bshd=True)
    counts, indices = random_layout(1, 2, 8, 8, 0.5, gen, "cuda", 0.1)
    assert kernel_choice(q, k, v, 128, 128, False) == "gluon"
    gluon = block_sparse_attention_gluon(q, k, v, counts, indices, block_q=128, block_k=128, return_lse=True)
    eager = block_sparse_attention(q, k, v, counts, indices, block_q=128, block_k=128, return_lse=True)
    assert torch.equal(eager[0], gluon[0]) and torch.equal(eager[1], gluon[1])
    compiled = torch.compile(
        lambda *a: block_sparse_attention(*a, block_q=128, block_k=128), fullgraph=True
    )(q, k, v, counts, indices)  # fmt: skip
    assert torch.equal(compiled, gluon[0])
    identity = torch.arange(1000, device="cuda").expand(1, 2, 1000)
    assert kernel_choice(q, k, v, 128, 128, True) == "gluon_kv_copies"
    permuted = block_sparse_attention(q, k, v, counts, indices, block_q=128, block_k=128, q_perm=identity,
                                      kv_perm=identity)  # fmt: skip
    assert rel_l2(permuted, gluon[0]) <= 1e-6
    perm = _random_perms(1, 2, 1000, gen, "cuda")
    for q_perm, kv_perm in ((perm, perm), (perm, None), (None, perm)):
        got = block_sparse_attention(q, k, v, counts, indices, block_q=128, block_k=128, q_perm=q_perm,
                                     kv_perm=kv_perm, return_lse=True)  # fmt: skip
        assert_matches_reference(q, k, v, counts, indices, 128, 128, got, 1e-2, q_perm=q_perm, kv_perm=kv_perm)


@gpu
@pytest.mark.parametrize("given", ["both", "q_perm", "kv_perm"])
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize(
    "s_q,s_k,block_q,block_k",
    [(1000, 777, 128, 128), (1000, 1024, 64, 64), (777, 1000, 128, 64), (700, 900, 64, 128), (1100, 1300, 256, 256)],
)
def test_gpu_kv_copies_path_matches_the_permuted_reference(s_q, s_k, block_q, block_k, head_dim, given) -> None:
    """Only K/V copied (Q gathered, O/LSE scattered in the kernel): poisoned token-major out/lse, tails,
    empty q blocks, permutations on both sides or one, B=2 in head groups of one head."""
    _require_hopper()
    gen = torch.Generator().manual_seed(s_q + s_k + block_q + head_dim + len(given))
    q, k, v = make_qkv(2, 3, s_q, s_k, head_dim, torch.bfloat16, gen, "cuda", bshd=True)
    counts, indices = random_layout(2, 3, cdiv(s_q, block_q), cdiv(s_k, block_k), 0.5, gen, "cuda", 0.2)
    counts[0, 0, 0] = 0  # at least one q block keeps nothing
    q_perm = _random_perms(2, 3, s_q, gen, "cuda") if given != "kv_perm" else None
    kv_perm = _random_perms(2, 3, s_k, gen, "cuda") if given != "q_perm" else None
    out = attention_output_like(q, v).fill_(float("nan"))
    lse = torch.full((2, 3, s_q), float("nan"), device="cuda")
    got = block_sparse.block_sparse_attention_gluon_on_kv_copies(
        q, k, v, counts, indices, block_q=block_q, block_k=block_k, q_perm=q_perm, kv_perm=kv_perm, scale=0.3,
        out=out, lse_out=lse)  # fmt: skip
    assert got[0] is out and got[1] is lse
    assert_matches_reference(q, k, v, counts, indices, block_q, block_k, got, 1e-2, scale=0.3, q_perm=q_perm,
                             kv_perm=kv_perm)  # fmt: skip


@gpu
def test_gpu_kv_copies_path_in_head_groups_with_strided_q_and_int64_perms(monkeypatch) -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(46)
    q, k, v = make_qkv(2, 3, 1000, 900, 128, torch.bfloat16, gen, "cuda", bshd=True)
    q = torch.randn(2, 3, 1000, 129, generator=gen).to("cuda", torch.bfloat16)[..., 1:]  # not 16-byte aligned
    counts, indices = random_layout(2, 3, 8, 8, 0.5, gen, "cuda", 0.1)
    q_perm, kv_perm = _random_perms(2, 3, 1000, gen, "cuda").long(), _random_perms(1, 3, 900, gen, "cuda")
    monkeypatch.setattr(block_sparse, "COPY_GROUP_BYTES", 1)
    got = block_sparse.block_sparse_attention_gluon_on_kv_copies(q, k, v, counts, indices, block_q=128, block_k=128,
                                                                 q_perm=q_perm, kv_perm=kv_perm)  # fmt: skip
    assert_matches_reference(q, k, v, counts, indices, 128, 128, got, 1e-2, q_perm=q_perm, kv_perm=kv_perm)


WAN_SEQ = 32760
"""Wan 2.1 480p: 21 x 30 x 52 video tokens."""


@gpu
def test_gpu_gluon_wan_480p_matches_reference_and_triton() -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(45)
    q, k, v = make_qkv(1, 12, WAN_SEQ, WAN_SEQ, 128, torch.bfloat16, gen, "cuda", bshd=True)
    n = cdiv(WAN_SEQ, 128)
    counts, indices = random_layout(1, 12, n, n, 0.25, gen, "cuda", empty_fraction=0.02)
    out, lse = _run_gluon_poisoned(q, k, v, counts, indices, 128, 128)
    assert not out.isnan().any() and not lse.isnan().any()
    picks = [0, n // 2, n - 1]
    ref_out, ref_lse = reference_q_blocks(q, k, v, counts, indices, picks, block_q=128, block_k=128)
    rows = torch.cat([torch.arange(p * 128, min((p + 1) * 128, WAN_SEQ), device="cuda") for p in picks])
    assert rel_l2(out[:, :, rows], ref_out) <= 1e-2
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse[:, :, rows]))
    assert (lse[:, :, rows][finite] - ref_lse[finite]).abs().max() <= 2e-3
    want_out, want_lse = block_sparse_attention_triton(q, k, v, counts, indices, block_q=128, block_k=128,
                                                       return_lse=True)  # fmt: skip
    assert rel_l2(out, want_out) <= 1e-2
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse)) and (lse[finite] - want_lse[finite]).abs().max() <= 1e-3
