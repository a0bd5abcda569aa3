"""Tests of the Gluon FP8 (e4m3) fixed-block attention kernel for sm_90
(:mod:`sparse_compile.kernels.gluon_block_sparse_fp8`).

On CPU: which FP8 kernel a call would take on each device capability, dtype, head dim and layout block
(:func:`fp8_kernel_choice`) and the reasons :func:`fp8_gluon_ineligibility` gives; the entry's refusal
off sm_90; the tile for each layout and the launcher's argument checks; the V quantisation the entry
asks for (channels first, keys padded to 16: the same bytes, TMA-readable; under Triton's interpreter,
``test_interp_*`` in a child process); and an ahead-of-time compile of the kernel for sm_90a with the
ptxas in Triton's wheel (e4m3 ``wgmma``, TMA, register hand-over, no register spills, shared memory
within Hopper's limit, both GEMMs from shared memory, one fresh accumulator per GEMM, the previous tile's P V in
flight under the softmax) for D 64/128, query blocks 128/256 and key blocks 64/128/256.

GPU cases (``@pytest.mark.gpu``, run on an sm_90 device) run the kernel into NaN-poisoned O and LSE:
O within rel L2 3e-3 of :func:`block_sparse_attention_fp8_reference` (1e-2 at scale 0.3) and finite LSEs
within 1e-3 (the same empty rows) on random layouts with sequence tails and empty rows; token-major inputs, a broadcast
layout and a custom tile; a dense layout against bf16 SDPA (rel L2 <= 3e-2); and Wan 480p (H=12,
S=32760, D=128, density 0.25) against the reference, the Triton FP8 kernel and bf16 attention.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from gluon_compile import (
    HOPPER_SHARED_BYTES,
    TRITON_BIN,
    attention_loop,
    attention_loop_mix,
    compile_sm90a,
    resource_usage,
)
from test_block_sparse import dense_block_layout, random_layout, run_poisoned
from test_block_sparse_fp8 import (
    FP8_LSE_TOL,
    LARGE_SCORE_LSE_TOL,
    LARGE_SCORE_TOL,
    activation_like_qkv,
    assert_matches_fp8_reference,
)
from triton_interpreter_support import interp, rel_l2, run_interpreted

from sparse_compile.kernels.block_sparse_fp8 import (
    block_sparse_attention_fp8_gluon,
    fp8_kernel_choice,
)
from sparse_compile.kernels.block_sparse_reference import BlockLayout, block_sparse_attention_reference
from sparse_compile.kernels.common import attention_output_like, cdiv, interpreter_active
from sparse_compile.kernels.fp8_quant import quantize_attention_inputs
from sparse_compile.kernels.gluon_block_sparse import (
    CONSUMER_REGS,
    CONSUMER_ROWS,
    GLUON_LAYOUT_BLOCKS,
    PRODUCER_REGS,
    launch_registers,
    tile_shared_layout,
    tma_readable,
)
from sparse_compile.kernels.gluon_block_sparse_fp8 import (
    GLUON_FP8_QUERY_BLOCKS,
    V_KEY_MULTIPLE,
    fp8_gluon_ineligibility,
    launch_gluon_block_sparse_fp8,
)
from sparse_compile.kernels.tile_configs import TileConfig, gluon_fp8_block_sparse_tile

HOPPER = (9, 0)
IN_INTERPRETER = interpreter_active()


def _inputs(dtype=torch.bfloat16, d=128, s=300, token_major=False):
    gen = torch.Generator().manual_seed(0)
    q, k, v = activation_like_qkv(1, 2, s, s, d, dtype, gen)
    if token_major:
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    return q, k, v


# ---------------------------------------------------------------- kernel choice and eligibility (CPU)


def test_fp8_kernel_choice_takes_gluon_on_sm90_for_bf16_and_fp16_d64_d128() -> None:
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            q, k, v = _inputs(dtype, d)
            for block_q in GLUON_FP8_QUERY_BLOCKS:
                for block_k in GLUON_LAYOUT_BLOCKS:
                    assert fp8_kernel_choice(q, k, v, block_q, block_k, HOPPER) == "gluon"


def test_fp8_kernel_choice_takes_any_strides_with_gluon() -> None:
    """The kernel reads the e4m3 copies the entry makes, so q/k/v strides do not matter."""
    q, k, v = _inputs(token_major=True)
    assert fp8_kernel_choice(q, k, v, 128, 64, HOPPER) == "gluon"
    assert fp8_kernel_choice(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:], 128, 64, HOPPER) == "gluon"  # unaligned bases


@pytest.mark.parametrize("capability", [(8, 0), (8, 9), (10, 0), (12, 0), None])
def test_fp8_kernel_choice_takes_triton_on_other_devices(capability) -> None:
    q, k, v = _inputs()
    if capability is None:  # CPU tensors: no CUDA device
        assert fp8_kernel_choice(q, k, v, 128, 128) == "triton"
    assert fp8_kernel_choice(q, k, v, 128, 128, capability) == "triton"
    assert "sm_90 only" in fp8_gluon_ineligibility(q, k, v, 128, 128, capability)


@pytest.mark.parametrize(
    "case,reason",
    [
        ("fp32", "fp16/bf16"),
        ("head dim 32", "head dim"),
        ("block_q 64", "two consumer warpgroups"),
        ("block_k 512", "layout blocks"),
    ],
)
def test_fp8_kernel_choice_takes_triton_on_sm90_for_what_gluon_cannot_take(case: str, reason: str) -> None:
    q, k, v = _inputs(d=32 if case == "head dim 32" else 128)
    block_q, block_k = 128, 128
    if case == "fp32":
        q, k, v = q.float(), k.float(), v.float()
    elif case == "block_q 64":
        block_q = 64
    elif case == "block_k 512":
        block_k = 512
    assert fp8_kernel_choice(q, k, v, block_q, block_k, HOPPER) == "triton"
    assert reason in fp8_gluon_ineligibility(q, k, v, block_q, block_k, HOPPER)


@pytest.mark.parametrize("choice", ["gluon", "triton"])
def test_the_fp8_entry_runs_the_kernel_fp8_kernel_choice_picks_with_every_argument(monkeypatch, choice) -> None:
    import sparse_compile.kernels.block_sparse_fp8 as fp8

    calls = []

    def entry(name: str):
        def run(*args, **kwargs):
            calls.append((name, len(args), kwargs))
            return "result"

        return run

    monkeypatch.setattr(fp8, "fp8_kernel_choice", lambda q, k, v, block_q, block_k: choice)
    monkeypatch.setattr(fp8, "block_sparse_attention_fp8_gluon", entry("gluon"))
    monkeypatch.setattr(fp8, "block_sparse_attention_fp8_triton", entry("triton"))
    q, k, v = _inputs()
    counts, indices = dense_block_layout(1, 2, 300, 300, 128, 128)
    out, lse_out = object(), object()
    got = fp8.block_sparse_attention_fp8(q, k, v, counts, indices, block_q=128, block_k=64, scale=0.5, return_lse=True,
                                         out=out, lse_out=lse_out)  # fmt: skip
    assert got == "result"
    assert calls == [(choice, 5, dict(block_q=128, block_k=64, scale=0.5, return_lse=True, out=out, lse_out=lse_out))]


def test_gluon_fp8_entry_off_sm90_raises_with_the_reason() -> None:
    q, k, v = _inputs()
    counts, indices = dense_block_layout(1, 2, 300, 300, 128, 128)
    with pytest.raises(ValueError, match="sm_90 only"):
        block_sparse_attention_fp8_gluon(q, k, v, counts, indices, block_q=128, block_k=128)


def test_gluon_fp8_entry_checks_shapes_first() -> None:
    q, k, v = _inputs()
    counts, indices = dense_block_layout(1, 2, 300, 300, 128, 128)
    with pytest.raises(ValueError, match="k and v must have shape"):
        block_sparse_attention_fp8_gluon(q, k[..., :64], v, counts, indices, block_q=128, block_k=128)


# ---------------------------------------------------------------- tile and launcher checks (CPU)


@pytest.mark.parametrize("block_q", GLUON_FP8_QUERY_BLOCKS)
@pytest.mark.parametrize("block_k", GLUON_LAYOUT_BLOCKS)
def test_fp8_tile_tiles_the_layout_blocks_with_two_consumer_warpgroups(block_q, block_k) -> None:
    tile = gluon_fp8_block_sparse_tile(block_k)
    assert tile.block_m == 2 * CONSUMER_ROWS and block_q % tile.block_m == 0 and block_k % tile.block_n == 0
    assert tile.num_warps == tile.block_m // 16 and tile.num_stages == 3


def _quantised(s: int = 300, block: int = 128, v_key_multiple: int = V_KEY_MULTIPLE):
    q, k, v = _inputs(s=s)
    x = quantize_attention_inputs(q, k, v, block, block, v_key_multiple=v_key_multiple)
    counts, indices = dense_block_layout(1, 2, s, s, block, block)
    return x, BlockLayout(counts, indices), attention_output_like(q, v), torch.empty(1, 2, s)


def test_fp8_launcher_rejects_a_tile_that_does_not_fit_the_consumers() -> None:
    x, lay, out, lse = _quantised()
    for tile in (TileConfig(256, 128, 16, 2), TileConfig(64, 64, 4, 2), TileConfig(128, 256, 8, 2)):
        with pytest.raises(ValueError, match="block_m 128"):
            launch_gluon_block_sparse_fp8(x, lay, 1.0, out, lse, tile)


def test_fp8_launcher_rejects_v_without_padded_key_strides() -> None:
    x, lay, out, lse = _quantised(v_key_multiple=1)  # 300 keys: rows of V^T 300 bytes apart
    with pytest.raises(ValueError, match="keys padded to 16"):
        launch_gluon_block_sparse_fp8(x, lay, 1.0, out, lse)


def test_quantised_v_transposed_is_tma_readable_on_cpu() -> None:
    x, *_ = _quantised(s=300)
    v_t = x.v.transpose(-1, -2)
    assert v_t.shape == (1, 2, 128, 300) and v_t.stride() == (2 * 128 * 304, 128 * 304, 304, 1) and tma_readable(v_t)


# ---------------------------------------------------------------- Triton interpreter (child process)


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the child process")
def test_interpreter_suite() -> None:
    """Run the ``test_interp_*`` cases in a fresh process with TRITON_INTERPRET=1 set before triton loads."""
    run_interpreted(__file__, "test_interp_")


@interp
@pytest.mark.parametrize("s_k,d,block", [(300, 128, 128), (200, 64, 64), (256, 64, 128)])
def test_interp_entry_quantisation_is_the_triton_entrys_with_v_transposed_tma_readable(s_k, d, block) -> None:
    """The fused quantisers with V's keys padded (what the Gluon entry runs) give the bytes and scales of
    the unpadded quantisation (what the Triton entry and the reference use); V^T ``(B, H, D, S_k)`` has
    16-byte strides and a unit last stride (a TMA descriptor can take it)."""
    gen = torch.Generator().manual_seed(s_k + d)
    q, k, v = activation_like_qkv(2, 3, 150, s_k, d, torch.bfloat16, gen)
    want = quantize_attention_inputs(q, k, v, block, block)
    got = quantize_attention_inputs(q, k, v, block, block, v_key_multiple=V_KEY_MULTIPLE)
    for name in ("q", "k", "v"):
        assert torch.equal(getattr(got, name).view(torch.uint8), getattr(want, name).view(torch.uint8)), name
        assert torch.equal(getattr(got, f"{name}_scale"), getattr(want, f"{name}_scale")), name
    v_t = got.v.transpose(-1, -2)
    assert torch.equal(v_t.view(torch.uint8), want.v.transpose(-1, -2).view(torch.uint8))
    assert v_t.stride(3) == 1 and v_t.stride(2) == cdiv(s_k, 16) * 16 and tma_readable(v_t)


# ---------------------------------------------------------------- sm_90a compile (CPU, ahead of time)


def _compile_sm90a(block_q: int, block_k: int, head_dim: int, even_k: bool):
    """The kernel compiled ahead of time for sm_90a (no GPU needed): Triton's compiled-kernel object."""
    from triton.experimental.gluon import language as gl

    from sparse_compile.kernels.gluon_block_sparse_fp8 import _block_sparse_fp8_fwd_gluon

    tile = gluon_fp8_block_sparse_tile(block_k)

    def descriptor(rows: int, columns: int) -> str:
        block = [1, 1, rows, columns]
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)
        return f"tensordesc<fp8e4nv[{', '.join(map(str, block))}],{layout!r}>"

    constants = dict(LAYOUT_BQ=block_q, LAYOUT_BK=block_k, EVEN_K=even_k, STAGES=tile.num_stages,
                     CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS,
                     P_LAYOUT=tile_shared_layout(CONSUMER_ROWS, tile.block_n, torch.float8_e4m3fn))  # fmt: skip
    signature = {
        "q_desc": descriptor(CONSUMER_ROWS, head_dim), "k_desc": descriptor(tile.block_n, head_dim),
        "vt_desc": descriptor(head_dim, tile.block_n),
        "Q_SCALE": "*fp32", "K_SCALE": "*fp32", "V_SCALE": "*fp32", "O": "*bf16", "LSE": "*fp32",
        "COUNTS": "*i32", "INDICES": "*i32",
        **{n: "i32" for n in ("stride_ob", "stride_oh", "stride_om", "stride_od", "stride_cb", "stride_ch",
                              "stride_cq", "stride_ib", "stride_ih", "stride_iq", "stride_ik", "H", "S_Q", "S_K",
                              "NQ", "NK")},
        "qk_scale": "fp32",
        **{n: "constexpr" for n in constants},
    }  # fmt: skip
    options = {"num_warps": 4, "maxnreg": launch_registers(tile.block_m // CONSUMER_ROWS)}
    return compile_sm90a(_block_sparse_fp8_fwd_gluon, signature, constants, options)


_COMPILED_CASES = [(128, 128, 128, False), (128, 128, 64, True), (128, 64, 128, False), (256, 64, 64, True),
                   (256, 256, 128, False)]  # fmt: skip
"""(block_q, block_k, head_dim, even_k) of the ahead-of-time compile tests."""


def _gemm_sites(even_k: bool) -> int:
    """Places in one consumer's code that issue each GEMM: tile 0's ``S`` or the last tile's ``P V``, and the main
    loop's, plus the masked last block's loop when the keys are not a multiple of the block."""
    return 2 if even_k else 3


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
@pytest.mark.parametrize("block_q,block_k,head_dim,even_k", _COMPILED_CASES)
def test_kernel_compiles_for_sm90a_without_spills(tmp_path, block_q, block_k, head_dim, even_k) -> None:
    kernel = _compile_sm90a(block_q, block_k, head_dim, even_k)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx and "cp.async.bulk.tensor.4d" in ptx
    wgmmas = re.findall(r"wgmma\.mma_async[^;]*;", ptx)
    assert wgmmas and all(".f32.e4m3.e4m3" in w for w in wgmmas)
    # both GEMMs read their operands from shared memory (P is stored there), D / 32 + BLOCK_N / 32 instructions
    assert not [w for w in wgmmas if re.search(r"\},\s*\{%r", w)]
    block_n = gluon_fp8_block_sparse_tile(block_k).block_n
    assert len(wgmmas) == 2 * _gemm_sites(even_k) * (head_dim + block_n) // 32  # two consumers
    assert "setmaxnreg" in ptx  # the producer hands its registers to the consumers
    assert kernel.metadata.shared <= HOPPER_SHARED_BYTES
    usage = resource_usage(kernel, tmp_path)
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, usage


def _wgmma_scale_d(ptx: str) -> list[str]:
    """The scale-d operand (0: the accumulator starts fresh) of every wgmma in ``ptx``, in order."""
    return re.findall(r"wgmma\.mma_async[^;]*,\s*([^,\s]+),\s*1,\s*1;", ptx)


@pytest.mark.parametrize("block_q,block_k,head_dim,even_k", _COMPILED_CASES)
def test_each_e4m3_gemm_is_one_whole_tile_chain_into_a_fresh_accumulator(block_q, block_k, head_dim, even_k) -> None:
    """Every ``S`` and every ``P V`` starts a fresh accumulator (scale-d 0) once and accumulates the rest of its
    tile in the same chain; ``P V`` is added to the fp32 running output in registers."""
    scale_d = _wgmma_scale_d(_compile_sm90a(block_q, block_k, head_dim, even_k).asm["ptx"])
    assert scale_d.count("0") == 2 * 2 * _gemm_sites(even_k)  # two consumers, two GEMMs


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
def test_fp8_consumer_issues_about_as_many_instructions_per_tile_as_bf16(tmp_path) -> None:
    """Both GEMMs run at twice the bf16 rate only if the consumer's softmax and P store issue about as much as the
    bf16 kernel's: the score scale and 448 ride in the exponent's FMA, the rescale in the P V add, and P is
    converted once (two e4m3 per conversion) and stored to shared memory, never shuffled into operand order."""
    from test_gluon_block_sparse import _compile_sm90a as compile_bf16
    from triton.experimental.gluon import language as gl

    fp8 = attention_loop_mix(_compile_sm90a(128, 128, 128, False), tmp_path)
    bf16 = attention_loop_mix(compile_bf16(128, 128, 128, gl.bfloat16, False), tmp_path)
    assert sum(fp8.values()) <= 1.1 * sum(bf16.values())
    assert fp8["F2FP"] == 32 and fp8["PRMT"] == 0 and fp8["STS"] <= 32  # 64 probabilities per thread
    assert fp8["FMUL"] <= 4  # no per-score multiply left


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
def test_fp8_main_loop_runs_the_previous_tiles_p_v_under_the_softmax(tmp_path) -> None:
    """One trip issues S of its tile and P V of the previous one before any exponential, waits for S alone (one
    group left in flight), and waits for P V only once this tile's P is in shared memory."""
    trip = attention_loop(_compile_sm90a(128, 128, 128, False), tmp_path)
    gemms = [i for i, text in enumerate(trip) if text.startswith("QGMMA")]
    exps = [i for i, text in enumerate(trip) if text.startswith("MUFU.EX2")]
    p_stores = [i for i, text in enumerate(trip) if text.startswith("STS")]
    wait_s = [i for i, text in enumerate(trip) if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in text]
    wait_pv = [i for i, text in enumerate(trip) if "WARPGROUP.DEPBAR.LE gsb0, 0x0" in text]
    assert len(gemms) == 2 * 128 // 32 and max(gemms) < min(exps)
    assert len(wait_s) == 1 and max(gemms) < wait_s[0] < min(exps)
    assert len(wait_pv) == 1 and max(p_stores) < wait_pv[0]


@pytest.mark.skipif(not (TRITON_BIN / "cuobjdump").exists(), reason="Triton's wheel carries no cuobjdump")
def test_fp8_main_loop_masks_no_keys_when_the_keys_are_not_a_multiple_of_the_block(tmp_path) -> None:
    """Wan 480p's 32760 keys are not a multiple of 128: only the last kept block's tiles mask keys (kept blocks
    ascend), so the main loop issues what it issues for even keys (no compare and select per score)."""
    uneven = attention_loop_mix(_compile_sm90a(128, 128, 128, False), tmp_path)
    even = attention_loop_mix(_compile_sm90a(128, 128, 128, True), tmp_path)
    assert sum(uneven.values()) <= sum(even.values()) + 4 and uneven["FSEL"] == 0


# ---------------------------------------------------------------- GPU (sm_90)

gpu = pytest.mark.gpu


def _require_hopper() -> None:
    if torch.cuda.get_device_capability() != HOPPER:
        pytest.skip("the Gluon FP8 kernel runs on sm_90 only")


_run_gluon_fp8_poisoned = functools.partial(run_poisoned, kernel=block_sparse_attention_fp8_gluon)
"""The Gluon FP8 entry into NaN-poisoned token-major O and LSE buffers (:func:`run_poisoned`)."""


@gpu
def test_gpu_fp8_kernel_choice_is_gluon_on_the_h200() -> None:
    _require_hopper()
    q, k, v = _inputs(d=128)
    assert fp8_kernel_choice(q.cuda(), k.cuda(), v.cuda(), 128, 128) == "gluon"


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [128, 64])
@pytest.mark.parametrize(
    "s_q,s_k,block_q,block_k",
    [(1000, 777, 128, 128), (1000, 1024, 128, 64), (777, 1000, 256, 64), (700, 900, 256, 128), (1100, 1300, 256, 256)],
)
def test_gpu_gluon_fp8_matches_reference_with_tails_and_empty_rows(s_q, s_k, block_q, block_k, head_dim, dtype):
    _require_hopper()
    gen = torch.Generator().manual_seed(s_q + s_k + block_q + head_dim)
    q, k, v = activation_like_qkv(2, 3, s_q, s_k, head_dim, dtype, gen, "cuda")
    counts, indices = random_layout(2, 3, cdiv(s_q, block_q), cdiv(s_k, block_k), 0.5, gen, "cuda", 0.2)
    counts[0, 0, 0] = 0  # at least one q block keeps nothing
    got = _run_gluon_fp8_poisoned(q, k, v, counts, indices, block_q, block_k, scale=0.3)
    assert_matches_fp8_reference(q, k, v, counts, indices, block_q, block_k, got, tol=LARGE_SCORE_TOL, scale=0.3,
                                 lse_tol=LARGE_SCORE_LSE_TOL)


@gpu
def test_gpu_gluon_fp8_token_major_inputs_broadcast_layout_and_custom_tile() -> None:
    """(B, S, H, D) inputs (O token-major too), a layout broadcast over batch and heads, and 128x64 tiles on
    128-blocks with 2 ring slots (two sub-tiles per kv block)."""
    _require_hopper()
    gen = torch.Generator().manual_seed(11)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
               for t in activation_like_qkv(2, 3, 1000, 900, 128, torch.bfloat16, gen, "cuda"))  # fmt: skip
    counts, indices = random_layout(1, 1, cdiv(1000, 128), cdiv(900, 128), 0.6, gen, "cuda", 0.2)
    counts, indices = counts.expand(2, 3, -1), indices.expand(2, 3, -1, -1)
    for tile in (None, TileConfig(128, 64, 8, 2)):
        got = _run_gluon_fp8_poisoned(q, k, v, counts, indices, 128, 128, tile=tile)
        assert got[0].stride() == attention_output_like(q, v).stride()
        assert_matches_fp8_reference(q, k, v, counts, indices, 128, 128, got)


@gpu
def test_gpu_gluon_fp8_all_rows_empty() -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(12)
    q, k, v = activation_like_qkv(1, 2, 300, 300, 64, torch.bfloat16, gen, "cuda")
    counts = torch.zeros(1, 2, 3, dtype=torch.int32, device="cuda")
    indices = torch.zeros(1, 2, 3, 0, dtype=torch.int32, device="cuda")  # MAXK = 0
    out, lse = _run_gluon_fp8_poisoned(q, k, v, counts, indices, 128, 128)
    assert (out == 0).all() and torch.isneginf(lse).all()


@gpu
@pytest.mark.parametrize("block,head_dim", [(128, 128), (256, 128), (128, 64)])
def test_gpu_gluon_fp8_dense_layout_is_close_to_bf16_sdpa(block: int, head_dim: int) -> None:
    _require_hopper()
    gen = torch.Generator().manual_seed(13 + block + head_dim)
    s = 4096 - 37
    q, k, v = activation_like_qkv(1, 12, s, s, head_dim, torch.bfloat16, gen, "cuda")
    counts, indices = dense_block_layout(1, 12, s, s, block, block, "cuda")
    out, lse = _run_gluon_fp8_poisoned(q, k, v, counts, indices, block, block)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_l2(out, F.scaled_dot_product_attention(q, k, v)) <= 3e-2
    qf, kf = q.float(), k.float()
    assert (lse - torch.logsumexp(qf @ kf.transpose(-1, -2) / math.sqrt(head_dim), dim=-1)).abs().max() <= 0.1


@gpu
def test_gpu_gluon_fp8_wan_480p_matches_reference_triton_fp8_and_bf16() -> None:
    """Wan 480p (B=1, H=12, S=32760, D=128, (B, S, H, D) storage), density 0.25 in 128-blocks."""
    _require_hopper()
    from sparse_compile.kernels.block_sparse_fp8 import block_sparse_attention_fp8_triton

    gen = torch.Generator().manual_seed(14)
    s, block = 32760, 128
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2)
               for t in activation_like_qkv(1, 12, s, s, 128, torch.bfloat16, gen, "cuda"))  # fmt: skip
    n = cdiv(s, block)
    counts, indices = random_layout(1, 12, n, n, 0.25, gen, "cuda", empty_fraction=0.02)
    got = _run_gluon_fp8_poisoned(q, k, v, counts, indices, block, block)
    assert_matches_fp8_reference(q, k, v, counts, indices, block, block, got)
    triton_out, triton_lse = block_sparse_attention_fp8_triton(q, k, v, counts, indices, block_q=block, block_k=block,
                                                        return_lse=True)  # fmt: skip
    assert rel_l2(got[0], triton_out) <= 3e-3
    finite = torch.isfinite(triton_lse)
    assert torch.equal(finite, torch.isfinite(got[1])) and (got[1][finite] - triton_lse[finite]).abs().max() <= FP8_LSE_TOL
    ref_out = block_sparse_attention_reference(q, k, v, counts, indices, block_q=block, block_k=block)
    assert rel_l2(got[0], ref_out) <= 3e-2
