"""Tests of the row permutation kernel (:mod:`sparse_compile.kernels.permute_rows`).

Moving rows is a copy, so every case compares bit for bit with ``torch.gather`` along S, into
NaN-poisoned outputs (every element must be written): token-major and strided inputs, batch/head-broadcast
permutations, k and v in one launch, masked row lengths (rows of one element included). Under Triton's
interpreter (``test_interp_*``, run in a child process by ``test_interpreter_suite``; the PyTorch path is
switched off there, so every case runs the kernel) and on CUDA at Wan 480p's size (``@pytest.mark.gpu``).
On CPU: the PyTorch path, the input checks, and an ahead-of-time compile for sm_90a (16-byte loads and
stores along D, every load before a store, no spills).
"""

from __future__ import annotations

import re

import pytest
import torch
from gluon_compile import compile_sm90a, resource_usage
from row_order import to_kernel_order
from triton_interpreter_support import interp, run_interpreted

from sparse_compile.kernels import permute_rows
from sparse_compile.kernels.common import attention_output_like, interpreter_active
from sparse_compile.kernels.permute_rows import MAX_ROW, gather_rows, tile_shape

IN_INTERPRETER = interpreter_active()
B, H, S = 2, 3, 300
"""Interpreter size: S is no multiple of a program's rows."""
BITS = {2: torch.int16, 4: torch.int32}
"""Integer dtype of each element size, to compare floats bit for bit."""


@pytest.fixture(autouse=True)
def kernel_only(monkeypatch):
    """Under the interpreter a call that reached the PyTorch path fails: the interpreted cases test the kernel."""

    def torch_path_is_off(*args) -> None:
        raise AssertionError("the PyTorch path ran instead of the kernel")

    if IN_INTERPRETER:
        monkeypatch.setattr(permute_rows, "_move_rows_torch", torch_path_is_off)


def random_perms(b: int, h: int, s: int, gen: torch.Generator, dtype=torch.int32, device="cpu") -> torch.Tensor:
    """A random permutation of ``[0, s)`` per (b, h): ``(b, h, s)``."""
    return torch.rand(b, h, s, generator=gen).argsort(dim=-1).to(device, dtype)


def random_rows(b: int, h: int, s: int, d: int, dtype, gen: torch.Generator, token_major=False, device="cpu"):
    """Random ``(b, h, s, d)`` values; ``token_major``: a ``(b, s, h, d)`` tensor transposed."""
    shape = (b, s, h, d) if token_major else (b, h, s, d)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    return x.transpose(1, 2) if token_major else x


def poisoned(x: torch.Tensor, token_major=False) -> torch.Tensor:
    """A NaN-filled tensor of x's shape, dtype and device; ``token_major``: laid out as ``(B, S, H, D)``."""
    out = attention_output_like(x, x) if token_major else torch.empty_like(x, memory_format=torch.contiguous_format)
    return out.fill_(float("nan"))


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal shapes and dtypes and the same bits in every element (a NaN poison left unwritten fails)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    bits = BITS[got.element_size()]
    assert torch.equal(got.view(bits), want.view(bits)), "rows differ from torch's, or poison was left unwritten"


def gathered_as_torch(x: torch.Tensor, perm: torch.Tensor) -> None:
    """Gather x into a poisoned contiguous buffer, returned as the output: bit for bit torch's."""
    gathered = poisoned(x)
    assert gather_rows((x,), perm, (gathered,))[0] is gathered
    assert_same_bits(gathered, to_kernel_order(x, perm))


# ---------------------------------------------------------------- Triton interpreter (child process)


def test_interpreter_suite() -> None:
    """Run the ``test_interp_*`` cases in a fresh process with TRITON_INTERPRET=1 set before triton loads."""
    run_interpreted(__file__, "test_interp_")


@interp
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_interp_token_major_rows_gather_as_torch(d: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(d)
    x = random_rows(B, H, S, d, dtype, gen, token_major=True)
    gathered_as_torch(x, random_perms(B, H, S, gen))


@interp
def test_interp_k_and_v_move_in_one_launch(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(1)
    k, v = (random_rows(B, H, S, 128, torch.bfloat16, gen, token_major=True) for _ in range(2))
    perm = random_perms(B, H, S, gen, torch.int64)
    launches = []
    launch = permute_rows._launch
    monkeypatch.setattr(permute_rows, "_launch", lambda *args: launches.append(args) or launch(*args))
    outs = (poisoned(k), poisoned(v))
    k_rows, v_rows = gather_rows((k, v), perm, outs)
    assert k_rows is outs[0] and v_rows is outs[1]
    assert_same_bits(outs[0], to_kernel_order(k, perm))
    assert_same_bits(outs[1], to_kernel_order(v, perm))
    assert len(launches) == 1


@interp
def test_interp_gather_returns_new_contiguous_buffers() -> None:
    gen = torch.Generator().manual_seed(2)
    k, v = (random_rows(B, H, S, 64, torch.float16, gen, token_major=True) for _ in range(2))
    perm = random_perms(B, H, S, gen)
    k_rows, v_rows = gather_rows((k, v), perm)
    assert k_rows.is_contiguous() and v_rows.is_contiguous()
    assert_same_bits(k_rows, to_kernel_order(k, perm))
    assert_same_bits(v_rows, to_kernel_order(v, perm))


@interp
@pytest.mark.parametrize("perm_shape", [(1, H, S), (B, 1, S), (1, 1, S)])
def test_interp_broadcast_perms(perm_shape: tuple[int, int, int]) -> None:
    gen = torch.Generator().manual_seed(3)
    x = random_rows(B, H, S, 64, torch.bfloat16, gen, token_major=True)
    gathered_as_torch(x, random_perms(*perm_shape, gen))


@interp
def test_interp_a_perm_expanded_with_stride_zero() -> None:
    gen = torch.Generator().manual_seed(4)
    x = random_rows(B, H, S, 128, torch.float16, gen, token_major=True)
    perm = random_perms(1, 1, S, gen, torch.int64).expand(B, H, S)
    gathered_as_torch(x, perm)


@interp
@pytest.mark.parametrize("d", [1, 48, 80, MAX_ROW])
def test_interp_masked_row_lengths(d: int) -> None:
    gen = torch.Generator().manual_seed(d)
    x = random_rows(B, H, S, d, torch.float32, gen, token_major=True)
    gathered_as_torch(x, random_perms(B, H, S, gen))


@interp
def test_interp_rows_with_strided_elements() -> None:
    """Rows whose elements are not contiguous: every other column of a wider tensor."""
    gen = torch.Generator().manual_seed(6)
    x = random_rows(B, H, S, 128, torch.bfloat16, gen, token_major=True)[..., ::2]
    gathered_as_torch(x, random_perms(B, H, S, gen))


@interp
def test_interp_sequences_of_one_row() -> None:
    x = torch.randn(B, H, 1, 64)
    gathered_as_torch(x, torch.zeros(1, 1, 1, dtype=torch.int32))


# ---------------------------------------------------------------- PyTorch path and input checks (CPU)


@pytest.mark.skipif(IN_INTERPRETER, reason="the PyTorch path runs without the interpreter")
def test_cpu_tensors_take_the_pytorch_path(monkeypatch) -> None:
    monkeypatch.setattr(permute_rows, "_launch", lambda *args: pytest.fail("launched the kernel on CPU"))
    gen = torch.Generator().manual_seed(7)
    k, v = (random_rows(B, H, S, 64, torch.bfloat16, gen, token_major=True) for _ in range(2))
    perm = random_perms(1, H, S, gen)
    k_rows, v_rows = gather_rows((k, v), perm)
    assert_same_bits(k_rows, to_kernel_order(k, perm))
    assert_same_bits(v_rows, to_kernel_order(v, perm))


@pytest.mark.parametrize("perm", [torch.empty(B, H, 0, dtype=torch.int64), torch.empty(1, 1, 0, dtype=torch.int32)])
def test_empty_sequences_move_nothing(perm: torch.Tensor) -> None:
    x = torch.empty(B, H, 0, 64)
    (gathered,) = gather_rows((x,), perm)
    assert gathered.shape == x.shape


def _bad_call(case: str) -> None:
    """One call with the bad input ``case`` names."""
    x = torch.zeros(B, H, S, 64)
    perm = torch.zeros(B, H, S, dtype=torch.int32)
    calls = {
        "no tensors": lambda: gather_rows((), perm),
        "three tensors": lambda: gather_rows((x, x, x), perm),
        "3-D x": lambda: gather_rows((x[..., 0],), perm),
        "rows too long": lambda: gather_rows((torch.zeros(B, H, S, MAX_ROW + 1),), perm),
        "v shaped unlike k": lambda: gather_rows((x, x[:, :, :-1]), perm),
        "v typed unlike k": lambda: gather_rows((x, x.half()), perm),
        "v on another device": lambda: gather_rows((x, x.to("meta")), perm),
        "float perm": lambda: gather_rows((x,), perm.float()),
        "perm of another length": lambda: gather_rows((x,), perm[..., :-1]),
        "perm of another batch": lambda: gather_rows((x,), torch.zeros(3, H, S, dtype=torch.int32)),
        "perm on another device": lambda: gather_rows((x,), perm.to("meta")),
        "outs short of xs": lambda: gather_rows((x, x), perm, (x.clone(),)),
        "strided gather out": lambda: gather_rows((x,), perm, (poisoned(x, token_major=True),)),
        "gather out of another dtype": lambda: gather_rows((x,), perm, (x.half(),)),
        "gather out of another shape": lambda: gather_rows((x,), perm, (x[:, :, :-1].contiguous(),)),
    }
    calls[case]()


@pytest.mark.parametrize(
    "case, message",
    [
        ("no tensors", r"xs must hold 1 or 2 tensors, got 0"),
        ("three tensors", r"xs must hold 1 or 2 tensors, got 3"),
        ("3-D x", r"xs\[0\] must be 4-D"),
        ("rows too long", rf"xs\[0\] rows must have 1 to {MAX_ROW} elements \(D\), got {MAX_ROW + 1}"),
        ("v shaped unlike k", r"xs\[1\] must match xs\[0\]"),
        ("v typed unlike k", r"xs\[1\] must match xs\[0\]"),
        ("v on another device", r"xs\[1\] must match xs\[0\]"),
        ("float perm", r"perm must be int32 or int64"),
        ("perm of another length", r"perm must have shape"),
        ("perm of another batch", r"perm must have shape"),
        ("perm on another device", r"perm must be on xs' device"),
        ("outs short of xs", r"outs must hold one buffer per tensor of xs \(2\), got 1"),
        ("strided gather out", r"outs\[0\] must be a contiguous"),
        ("gather out of another dtype", r"outs\[0\] must be a contiguous torch.float32"),
        ("gather out of another shape", r"outs\[0\] must be a contiguous .* of shape \(2, 3, 300, 64\)"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(case: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _bad_call(case)


# ---------------------------------------------------------------- sm_90a code (CPU, ahead of time)

_POINTERS = ("perm", "x0", "out0", "x1", "out1")


def _compile_sm90a(d: int, two: bool):
    """The kernel compiled for sm_90a as a launch at Wan 480p specialises it: bf16 rows of D = ``d``, x and
    out token-major or contiguous (unit last stride, other strides divisible by 16), perm int32 contiguous."""
    names = permute_rows._permute_rows_kernel.arg_names
    block_rows, block_d = tile_shape(d)
    constants = dict(p_s=1, x0_d=1, o0_d=1, x1_d=1, o1_d=1, D=d, TWO=two, BLOCK_ROWS=block_rows, BLOCK_D=block_d)
    plain = ("p_b", "p_h", "num_heads", "seq_len")
    signature = {n: "constexpr" if n in constants else "i32" for n in names}
    signature.update(perm="*i32", x0="*bf16", out0="*bf16", x1="*bf16", out1="*bf16")
    aligned = tuple(n for n in names if n not in constants and n not in plain)
    return compile_sm90a(permute_rows._permute_rows_kernel, signature, constants, dict(num_warps=4), aligned)


@pytest.mark.parametrize("two", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_rows_move_in_16_byte_accesses_on_sm90a(tmp_path, d: int, two: bool) -> None:
    """Rows are read and written 16 bytes per thread (``v4.b32``), every row load issued before the first
    store (k's and v's loads in flight together), without spills. The only other accesses read the perm."""
    compiled = _compile_sm90a(d, two)
    accesses = re.findall(r"(ld|st)\.global((?:\.\w+)*)", compiled.asm["ptx"])
    row_accesses = [op for op, kind in accesses if kind.endswith(".v4.b32")]
    block_rows, block_d = tile_shape(d)
    per_thread = (1 + two) * block_rows * block_d * 2 // (4 * 32 * 16)  # bf16 bytes / (4 warps' threads * 16 B)
    assert row_accesses == ["ld"] * per_thread + ["st"] * per_thread
    assert all(op == "ld" and kind == ".b32" for op, kind in accesses if not kind.endswith(".v4.b32"))
    assert resource_usage(compiled, tmp_path)["LOCAL"] == 0


# ---------------------------------------------------------------- GPU

gpu = pytest.mark.gpu
WAN_SEQ = 32760
"""Wan 2.1 480p: 21 x 30 x 52 video tokens."""


@gpu
@pytest.mark.parametrize("d, dtype", [(128, torch.bfloat16), (64, torch.float16)])
def test_gpu_wan_480p_kv_copies_gather_k_and_v_as_torch(d: int, dtype: torch.dtype) -> None:
    """k and v gathered together from token-major storage by per-head permutations, at B = 1, H = 12,
    S = 32760."""
    gen = torch.Generator().manual_seed(8)
    k, v = (random_rows(1, 12, WAN_SEQ, d, dtype, gen, token_major=True, device="cuda") for _ in range(2))
    perm = random_perms(1, 12, WAN_SEQ, gen, device="cuda")
    k_rows, v_rows = gather_rows((k, v), perm)
    assert_same_bits(k_rows, to_kernel_order(k, perm))
    assert_same_bits(v_rows, to_kernel_order(v, perm))


@gpu
@pytest.mark.parametrize("d", [1, 80, MAX_ROW])
def test_gpu_broadcast_perm_and_masked_row_lengths(d: int) -> None:
    gen = torch.Generator().manual_seed(9)
    k, v = (random_rows(2, 12, WAN_SEQ, d, torch.float32, gen, token_major=True, device="cuda") for _ in range(2))
    perm = random_perms(1, 1, WAN_SEQ, gen, torch.int64, device="cuda")
    k_rows, v_rows = gather_rows((k, v), perm)
    assert_same_bits(k_rows, to_kernel_order(k, perm))
    assert_same_bits(v_rows, to_kernel_order(v, perm))
