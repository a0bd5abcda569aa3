"""Tests of the FP8 (e4m3) quantisation of attention inputs (:mod:`sparse_compile.kernels.fp8_quant`).

- The specification's scale: ``amax * SCALE_PER_AMAX`` rounded to fp32, the same on every device.
- The Triton kernels (:func:`quantize_row_blocks_triton`, :func:`quantize_channels_triton`) equal the
  PyTorch specification bit for bit (e4m3 bytes and fp32 scales, written into NaN-poisoned buffers):
  fp16, bf16 and fp32, D 64 and 128 (and a padded 80), partial last runs, (B, S, H, D) storage seen
  as (B, H, S, D), all-zero runs and channels, K smoothing, V stored channels first with its keys padded
  (the Gluon FP8 kernel's TMA layout: the same bytes); and the e4m3 rounding itself (ties to
  even, carries into the exponent, subnormals, signs); the row-block kernel's row dots (Q's pass writes
  the LSE shift of K's smoothing) equal fp32 matmul to rounding. Under Triton's interpreter (``test_interp_*``,
  run in a child process by ``test_interpreter_suite``) and on the GPU (``@pytest.mark.gpu``).
- :func:`quantize_attention_inputs` takes the kernels on CUDA and under the interpreter, PyTorch otherwise.
- The kernels compile for sm_90a (ahead of time, on the CPU) with correctly rounded divisions, the
  division torch does, and without register spills at Wan's tiles.
- Arguments the kernels cannot take raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import pytest
import torch

from gluon_compile import TRITON_BIN, compile_sm90a, resource_usage
from triton_interpreter_support import interp, run_interpreted
from sparse_compile.kernels import fp8_quant
from sparse_compile.kernels.common import cdiv, interpreter_active
from sparse_compile.kernels.fp8_quant import (
    FP8_DTYPE,
    FP8_MAX,
    SCALE_PER_AMAX,
    key_mean,
    quantize_attention_inputs,
    quantize_channels,
    quantize_channels_triton,
    quantize_row_blocks,
    quantize_row_blocks_triton,
    smoothing_lse_shift,
)
from sparse_compile.kernels.tile_configs import FP8_CHANNEL_TOKENS, fp8_quant_warps

IN_INTERPRETER = interpreter_active()
FP8_NAN_BYTE = 0x7F
"""An e4m3 NaN: the poison of the fp8 buffers (the specification never writes it for finite inputs)."""


def quantisation_input(
    b: int, h: int, s: int, d: int, dtype: torch.dtype, token_major: bool, seed: int, device: str = "cpu"
) -> torch.Tensor:
    """``(B, H, S, D)`` normal values around per-channel offsets (what smoothing takes off), the channels
    spread over five decades (so e4m3 subnormals occur), with negative zeros, an all-zero run of 32 rows
    and an all-zero channel (batch 0, head 0) and an all-zero head (the last: all-zero runs after
    smoothing too); with ``token_major`` stored as a contiguous ``(B, S, H, D)`` (diffusers' layout)."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, h, s, d, generator=gen) + 2 * torch.randn(1, h, 1, d, generator=gen)) * torch.logspace(-3, 2, d)
    x.view(-1)[::97] = -0.0
    x[0, 0, 32:64] = 0.0
    x[0, 0, :, 5] = 0.0
    x[-1, -1] = 0.0
    x = x.to(dtype)
    if token_major:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(device)


def poisoned_fp8(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A contiguous e4m3 buffer of NaNs."""
    return torch.full(shape, FP8_NAN_BYTE, dtype=torch.uint8, device=device).view(FP8_DTYPE)


def poisoned_scales(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A contiguous fp32 buffer of NaNs."""
    return torch.full(shape, float("nan"), dtype=torch.float32, device=device)


def assert_same_quantisation(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> None:
    """The same e4m3 bytes (NaN poison, -0 against +0 and layouts told apart) and the same fp32 scales."""
    (got_fp8, got_scale), (want_fp8, want_scale) = got, want
    assert got_fp8.shape == want_fp8.shape and got_fp8.stride() == want_fp8.stride()
    assert torch.equal(got_fp8.view(torch.uint8), want_fp8.view(torch.uint8))
    assert torch.equal(got_scale, want_scale)  # NaN never equals


def assert_row_blocks_match(x: torch.Tensor, block: int, mean: torch.Tensor | None, row_dot: bool = False) -> None:
    """The row-block kernel into poisoned buffers equals :func:`quantize_row_blocks`; with ``row_dot`` the
    same launch also writes each row's dot with a vector (taken before ``mean``) as fp32 matmul gives it."""
    b, h, s, d = x.shape
    out, scale_out = poisoned_fp8((b, h, s, d), x.device), poisoned_scales((b, h, cdiv(s, block)), x.device)
    vector = torch.randn(b, h, d, generator=torch.Generator().manual_seed(s)).to(x.device) if row_dot else None
    dot_out = poisoned_scales((b, h, s), x.device) if row_dot else None
    got = quantize_row_blocks_triton(x, block, mean, out=out, scale_out=scale_out, dot_with=vector, dot_out=dot_out)
    assert got[0] is out and got[1] is scale_out
    assert_same_quantisation(got, quantize_row_blocks(x, block, mean))
    if row_dot:
        assert_dots_close(dot_out, x, vector)


def assert_dots_close(got: torch.Tensor, x: torch.Tensor, vector: torch.Tensor) -> None:
    """``got`` ``(B, H, S)`` is fp32 ``x . vector`` per row to fp32 rounding (1e-5 of the sum of the
    terms' magnitudes, so cancelling terms do not decide it); no NaN."""
    want = torch.matmul(x.float(), vector.unsqueeze(-1)).squeeze(-1)
    bound = 1e-5 * torch.matmul(x.float().abs(), vector.abs().unsqueeze(-1)).squeeze(-1)
    assert not got.isnan().any() and ((got - want).abs() <= bound).all()


def assert_channels_match(x: torch.Tensor) -> None:
    """The channel kernels into poisoned buffers (fp8 stored as a contiguous (B, H, D, S)) equal
    :func:`quantize_channels`."""
    b, h, s, d = x.shape
    out = poisoned_fp8((b, h, d, s), x.device).transpose(-1, -2)
    scale_out = poisoned_scales((b, h, d), x.device)
    got = quantize_channels_triton(x, out=out, scale_out=scale_out)
    assert got[0] is out and got[1] is scale_out
    assert_same_quantisation(got, quantize_channels(x))


def assert_same_inputs(got: fp8_quant.Fp8Inputs, want: fp8_quant.Fp8Inputs, q: torch.Tensor) -> None:
    """Every tensor of ``got`` the same as ``want``'s (fp8 bytes and layouts, scales, K's mean), the same
    blocks; the LSE shift ``scale * q . k_mean`` to fp32 rounding (:func:`assert_dots_close`)."""
    for name in ("q", "k", "v"):
        assert_same_quantisation((getattr(got, name), getattr(got, f"{name}_scale")),
                                 (getattr(want, name), getattr(want, f"{name}_scale")))  # fmt: skip
    assert torch.equal(got.k_mean, want.k_mean) and (got.block_q, got.block_k) == (want.block_q, want.block_k)
    assert_dots_close(got.lse_shift, q, want.k_mean * q.shape[-1] ** -0.5)


def specified_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_q: int, block_k: int
) -> fp8_quant.Fp8Inputs:
    """:class:`Fp8Inputs` from the PyTorch functions (what :func:`quantize_attention_inputs` specifies)."""
    k_mean = key_mean(k)
    q_fp8, q_scale = quantize_row_blocks(q, block_q)
    k_fp8, k_scale = quantize_row_blocks(k, block_k, k_mean)
    v_fp8, v_scale = quantize_channels(v)
    lse_shift = smoothing_lse_shift(q, k_mean, q.shape[-1] ** -0.5)
    return fp8_quant.Fp8Inputs(q_fp8, k_fp8, v_fp8, q_scale, k_scale, v_scale, k_mean, lse_shift, block_q, block_k)


def e4m3_rounding_cases() -> torch.Tensor:
    """fp32 values in ``[-448, 448]`` at and around every rounding decision of e4m3: each e4m3 value,
    the midpoints between neighbours (ties, to even) and the fp32 values either side of them (carries
    into the next binade among them, 0.49 -> 0.5), in the subnormal range too; both signs, and 448."""
    grid = torch.arange(0, 127, dtype=torch.uint8).view(FP8_DTYPE).float()  # +0 ... 448
    mid = (grid[:-1] + grid[1:]) / 2
    near = torch.cat([mid, torch.nextafter(mid, torch.zeros(())), torch.nextafter(mid, torch.full((), 448.0))])
    values = torch.cat([grid, near, torch.tensor([0.49, 2.0**-10, 2.0**-11])])
    return torch.cat([values, -values, torch.tensor([FP8_MAX])])


# ---------------------------------------------------------------- specification (CPU, in process)


def test_scale_is_amax_times_the_fp32_reciprocal_of_448() -> None:
    """A multiply by fl32(1 / 448), not a division by 448 (which differs by an ulp for about half the
    amaxes): torch multiplies the same on CPU and CUDA, so the specification does not depend on the device."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 256, 64, generator=gen) * torch.logspace(-3, 3, 256).unsqueeze(-1)
    reciprocal = torch.tensor(SCALE_PER_AMAX, dtype=torch.float32)
    _, scale = quantize_row_blocks(x, 32)
    amax = x.abs().view(2, 3, 8, 32 * 64).amax(-1)
    assert torch.equal(scale, amax * reciprocal) and not torch.equal(scale, amax / FP8_MAX)
    _, v_scale = quantize_channels(x)
    assert torch.equal(v_scale, x.abs().amax(dim=2) * reciprocal)


def test_the_specification_leaves_its_fp32_input_unchanged() -> None:
    x = quantisation_input(1, 2, 100, 64, torch.float32, False, seed=5)
    before = x.clone()
    quantize_row_blocks(x, 32, key_mean(x))
    quantize_channels(x)
    assert torch.equal(x, before)


@pytest.mark.skipif(IN_INTERPRETER, reason="only meaningful without the interpreter")
def test_quantize_attention_inputs_takes_pytorch_for_cpu_tensors_without_the_interpreter(monkeypatch) -> None:
    q, k, v = (quantisation_input(1, 2, 100, 64, torch.bfloat16, True, seed) for seed in range(3))
    want = specified_inputs(q, k, v, 64, 32)

    def no_kernels(*args, **kwargs):
        raise AssertionError("a Triton kernel ran for CPU tensors")

    monkeypatch.setattr(fp8_quant, "quantize_row_blocks_triton", no_kernels)
    monkeypatch.setattr(fp8_quant, "quantize_channels_triton", no_kernels)
    assert_same_inputs(quantize_attention_inputs(q, k, v, 64, 32), want, q)


# ---------------------------------------------------------------- argument checks (CPU, in process)


def _bad_arguments() -> list[tuple[str, object, dict]]:
    """(error pattern, kernel function, keyword arguments) of calls the kernels refuse."""
    x = torch.zeros(1, 2, 100, 64, dtype=torch.float16)
    mean = torch.zeros(1, 2, 64)
    rows, channels = quantize_row_blocks_triton, quantize_channels_triton
    return [
        ("x must have 4 dims", rows, dict(x=x[0], block=32)),
        ("x must be float16, bfloat16 or float32", rows, dict(x=x.double(), block=32)),
        ("x must be float16, bfloat16 or float32", channels, dict(x=x.to(FP8_DTYPE))),
        ("block must be a positive int", rows, dict(x=x, block=0)),
        ("dot_with and dot_out must be given together", rows, dict(x=x, block=32, dot_with=mean)),
        ("dot_with must be a float32 tensor of shape \\(1, 2, 64\\)", rows,
         dict(x=x, block=32, dot_with=mean[..., :32], dot_out=torch.empty(1, 2, 100))),
        ("dot_out must be a contiguous torch.float32 tensor of shape \\(1, 2, 100\\)", rows,
         dict(x=x, block=32, dot_with=mean, dot_out=torch.empty(1, 2, 99))),
        ("mean must be a float32 tensor of shape \\(1, 2, 64\\)", rows, dict(x=x, block=32, mean=mean.half())),
        ("mean must be a float32 tensor of shape \\(1, 2, 64\\)", rows, dict(x=x, block=32, mean=mean[..., :32])),
        ("out must be a torch.float8_e4m3fn tensor of shape", rows, dict(x=x, block=32, out=torch.empty_like(x))),
        ("out must be .* non-overlapping strides", channels,
         dict(x=x, out=torch.empty(1, 2, 1, 64, dtype=FP8_DTYPE).expand(1, 2, 100, 64))),
        ("key_multiple must be a positive int", channels, dict(x=x, key_multiple=0)),
        ("scale_out must be a contiguous torch.float32 tensor of shape \\(1, 2, 4\\)", rows,
         dict(x=x, block=32, scale_out=torch.empty(1, 2, 3))),
        ("scale_out must be a contiguous torch.float32 tensor of shape \\(1, 2, 64\\)", channels,
         dict(x=x, scale_out=torch.empty(1, 64, 2).transpose(1, 2))),
    ]  # fmt: skip


@pytest.mark.parametrize("match,kernel,kwargs", _bad_arguments(), ids=lambda a: a if isinstance(a, str) else "")
def test_kernels_raise_value_error_naming_the_argument(match: str, kernel, kwargs: dict) -> None:
    with pytest.raises(ValueError, match=match):
        kernel(**kwargs)


@pytest.mark.skipif(IN_INTERPRETER, reason="only meaningful without the interpreter")
def test_kernels_need_cuda_tensors_or_the_interpreter() -> None:
    x = torch.zeros(1, 1, 64, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="x must be a CUDA tensor, or TRITON_INTERPRET=1"):
        quantize_row_blocks_triton(x, 64)
    with pytest.raises(ValueError, match="x must be a CUDA tensor, or TRITON_INTERPRET=1"):
        quantize_channels_triton(x)


# ---------------------------------------------------------------- sm_90a compiles (CPU, ahead of time)


def _ptx_sm90a(kernel, constants: dict, tile_elements: int, aligned: tuple[str, ...] = ()):
    """``kernel`` compiled for sm_90a on bf16 input and e4m3 output, as its launch's warps choose; ``aligned``:
    the arguments a launch would find divisible by 16 (constants given by name in ``constants`` are fixed)."""
    pointers = {"X": "*bf16", "X_FP8": "*fp8e4nv", "MEAN": "*fp32", "SCALE": "*fp32", "AMAX": "*fp32",
                "DOT_WITH": "*fp32", "DOT_OUT": "*fp32"}
    signature = {p.name: "constexpr" if p.is_constexpr or p.name in constants else pointers.get(p.name, "i32")
                 for p in kernel.params}  # fmt: skip
    return compile_sm90a(kernel, signature, constants, {"num_warps": fp8_quant_warps(tile_elements)}, aligned)


@pytest.mark.skipif(IN_INTERPRETER, reason="compiles for the GPU")
def test_kernels_compile_for_sm90a_with_correctly_rounded_division_and_no_spills(tmp_path) -> None:
    """Triton's fp32 ``/`` is ``div.full.f32`` on the GPU (approximate); the kernels divide with
    ``div.rn.f32`` (IEEE, as torch's CUDA ``x / scale``) and cast with ``cvt.rn.satfinite`` (nearest
    even). Wan's tiles (128 x 128 runs of Q/K, 64 tokens x 128 channels of V) keep everything in registers."""
    tokens = FP8_CHANNEL_TOKENS
    run = dict(HEAD_DIM=128, BLOCK=128, ROWS=128, COLUMNS=128, SMOOTH=True, ROW_DOT=True, EXACT_CAST=False)
    rows = _ptx_sm90a(fp8_quant._quantize_row_blocks_kernel, run, 128 * 128)
    amax = _ptx_sm90a(fp8_quant._channel_amax_kernel, dict(HEAD_DIM=128, TOKENS=tokens, COLUMNS=128), tokens * 128)
    channel_tile = dict(HEAD_DIM=128, TOKENS=tokens, COLUMNS=128, EXACT_CAST=False)
    channels = _ptx_sm90a(fp8_quant._quantize_channels_kernel, channel_tile, tokens * 128)
    for kernel in (rows, channels):
        ptx = kernel.asm["ptx"]
        assert "div.rn.f32" in ptx and "div.full.f32" not in ptx and "div.approx" not in ptx
        assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert "atom.global.gpu.relaxed.max" in amax.asm["ptx"]
    # V stored channels first with its keys padded to 16 (V_KEY_MULTIPLE): whole 16-byte stores along the keys
    padded = _ptx_sm90a(fp8_quant._quantize_channels_kernel, {**channel_tile, "stride_xd": 1, "stride_os": 1},
                        tokens * 128, aligned=("X", "X_FP8", "stride_xs", "stride_ob", "stride_oh", "stride_od",
                                               "S_STORE"))  # fmt: skip
    assert "st.global.v4.b32" in padded.asm["ptx"] and "st.global.b8" not in padded.asm["ptx"]
    if (TRITON_BIN / "cuobjdump").exists():
        for kernel in (rows, amax, channels):
            usage = resource_usage(kernel, tmp_path)
            assert usage["STACK"] == 0 and usage["LOCAL"] == 0, usage


# ---------------------------------------------------------------- Triton interpreter (child process)


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the child process")
def test_interpreter_suite() -> None:
    """Run the ``test_interp_*`` cases in a fresh process with TRITON_INTERPRET=1 set before triton loads."""
    run_interpreted(__file__, "test_interp_")


ROW_CASES = [
    (200, 64, 64, torch.float16, False, True),  # partial last run, token-major
    (130, 128, 32, torch.bfloat16, True, True),  # smoothed K, 5 runs (last of 2 rows)
    (256, 64, 128, torch.bfloat16, True, False),  # whole runs
    (100, 128, 64, torch.float16, False, False),
    (90, 80, 48, torch.float32, True, False),  # run and head dim padded to powers of two
]
"""(S, D, block, dtype, smooth, token_major)."""


@interp
@pytest.mark.parametrize("s,d,block,dtype,smooth,token_major", ROW_CASES)
def test_interp_row_blocks_match_the_specification(s, d, block, dtype, smooth, token_major) -> None:
    x = quantisation_input(2, 3, s, d, dtype, token_major, seed=s + d)
    assert_row_blocks_match(x, block, key_mean(x) if smooth else None, row_dot=True)


@interp
@pytest.mark.parametrize(
    "s,d,dtype,token_major",
    [
        (200, 64, torch.float16, True),  # 4 programs per head, the last partial
        (130, 128, torch.bfloat16, True),
        (64, 128, torch.bfloat16, False),  # one whole program per head
        (70, 80, torch.float32, False),  # head dim padded to a power of two
    ],
)
def test_interp_channels_match_the_specification(s, d, dtype, token_major) -> None:
    assert_channels_match(quantisation_input(2, 3, s, d, dtype, token_major, seed=s + d + 1))


def assert_padded_channels_match(x: torch.Tensor, key_multiple: int) -> None:
    """The channel kernels' default output with keys padded to ``key_multiple`` (what the Gluon FP8 kernel
    reads by TMA): the bytes of the unpadded output, stored as ``(B, H, D, S)`` rows ``S_pad`` apart."""
    b, h, s, d = x.shape
    got_fp8, got_scale = quantize_channels_triton(x, key_multiple=key_multiple)
    want_fp8, want_scale = quantize_channels(x)
    s_pad = cdiv(s, key_multiple) * key_multiple
    v_t = got_fp8.transpose(-1, -2)  # the (B, H, D, S) view the kernel's descriptor takes
    assert v_t.shape == (b, h, d, s) and v_t.stride() == (h * d * s_pad, d * s_pad, s_pad, 1)
    assert torch.equal(v_t.view(torch.uint8), want_fp8.transpose(-1, -2).view(torch.uint8))
    padding = torch.as_strided(v_t, (b, h, d, s_pad), v_t.stride())[..., s:]
    assert (padding.view(torch.uint8) == 0).all()  # written as zeros: whole 16-byte stores
    assert torch.equal(got_scale, want_scale)
    spec_fp8, spec_scale = quantize_channels(x, key_multiple=key_multiple)  # the specification pads alike
    assert spec_fp8.stride() == got_fp8.stride() and torch.equal(spec_fp8.view(torch.uint8), want_fp8.view(torch.uint8))


@interp
@pytest.mark.parametrize("s,d,key_multiple", [(200, 64, 16), (130, 128, 16), (64, 128, 16), (70, 64, 128)])
def test_interp_channels_padded_keys_equal_the_unpadded_output(monkeypatch, s, d, key_multiple) -> None:
    allocate = fp8_quant.channels_first_fp8

    def poisoned(*args, **kwargs) -> torch.Tensor:  # padding included: the kernel must write it
        buffer = allocate(*args, **kwargs)
        torch.empty(0, dtype=torch.uint8).set_(buffer.untyped_storage()).fill_(FP8_NAN_BYTE)
        return buffer

    monkeypatch.setattr(fp8_quant, "channels_first_fp8", poisoned)
    assert_padded_channels_match(quantisation_input(2, 3, s, d, torch.bfloat16, True, seed=s + d + 2), key_multiple)


@interp
def test_interp_quantize_attention_inputs_pads_v_keys() -> None:
    q, k, v = (quantisation_input(1, 2, 150, 64, torch.float16, True, seed=seed) for seed in range(3))
    want = quantize_attention_inputs(q, k, v, 64, 32)
    got = quantize_attention_inputs(q, k, v, 64, 32, v_key_multiple=16)
    assert got.v.stride() == (2 * 64 * 160, 64 * 160, 1, 160)
    assert torch.equal(got.v.view(torch.uint8), want.v.view(torch.uint8)) and torch.equal(got.v_scale, want.v_scale)


def test_quantize_channels_pads_keys_on_cpu() -> None:
    """The PyTorch specification stores V channels first with padded keys too, the same bytes."""
    x = quantisation_input(1, 2, 100, 64, torch.bfloat16, True, seed=4)
    got, want = quantize_channels(x, key_multiple=16), quantize_channels(x)
    assert got[0].stride() == (2 * 64 * 112, 64 * 112, 1, 112)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])


@interp
def test_interp_e4m3_cast_rounds_like_torch_in_every_case() -> None:
    """With amax 448 a run's scale is exactly 1, so the kernel casts these values as they are: the bytes of
    torch's cast, which rounds to nearest even (the interpreter's own cast does not when the rounding
    carries into the exponent; the kernels round onto the e4m3 grid first)."""
    values = e4m3_rounding_cases()
    x = torch.nn.functional.pad(values, (0, 64 - values.numel() % 64)).view(1, 1, -1, 64)
    x_fp8, scale = quantize_row_blocks_triton(x, x.shape[2])
    assert torch.equal(scale, torch.ones(1, 1, 1))
    assert torch.equal(x_fp8.view(torch.uint8), x.to(FP8_DTYPE).view(torch.uint8))
    assert_row_blocks_match(x, x.shape[2], None)


@interp
def test_interp_quantize_attention_inputs_takes_the_kernels(monkeypatch) -> None:
    """Under the interpreter :func:`quantize_attention_inputs` runs the kernels (the PyTorch functions
    raise here), with the specification's results: token-major fp16, q and k of different lengths."""
    q = quantisation_input(1, 2, 150, 64, torch.float16, True, seed=1)
    k, v = (quantisation_input(1, 2, 170, 64, torch.float16, True, seed=seed) for seed in (2, 3))
    want = specified_inputs(q, k, v, 64, 32)

    def no_pytorch(*args, **kwargs):
        raise AssertionError("the PyTorch quantisation ran under the interpreter")

    monkeypatch.setattr(fp8_quant, "quantize_row_blocks", no_pytorch)
    monkeypatch.setattr(fp8_quant, "quantize_channels", no_pytorch)
    assert_same_inputs(quantize_attention_inputs(q, k, v, 64, 32), want, q)


# ---------------------------------------------------------------- GPU (compiled kernels)

gpu = pytest.mark.gpu
GPU_SEQ = 4096 - 37
"""Wan-like (H=12) at a length the tests run quickly, with partial last runs."""


@gpu
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.float16)])
@pytest.mark.parametrize("block", [128, 64])
def test_gpu_kernels_match_the_specification(d: int, dtype: torch.dtype, block: int) -> None:
    x = quantisation_input(1, 12, GPU_SEQ, d, dtype, True, seed=block + d, device="cuda")
    assert_row_blocks_match(x, block, None, row_dot=True)
    assert_row_blocks_match(x, block, key_mean(x), row_dot=True)
    assert_channels_match(x)


@gpu
def test_gpu_quantize_attention_inputs_matches_the_specification() -> None:
    q, k, v = (quantisation_input(2, 12, GPU_SEQ, 128, torch.bfloat16, True, seed, "cuda") for seed in range(3))
    assert_same_inputs(quantize_attention_inputs(q, k, v, 128, 64), specified_inputs(q, k, v, 128, 64), q)
