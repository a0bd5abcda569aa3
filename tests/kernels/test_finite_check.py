"""Tests of the finiteness check (:mod:`sparse_compile.kernels.finite_check`).

The flags must equal the PyTorch path's (each tensor's min and max) for NaN, +Inf and -Inf at the first, an
inner and the last element (a partial last block), in each of up to three tensors of any float dtype, read in
place from diffusers' (B, S, H, D) storage; the largest finite values stay finite. Under Triton's interpreter
(``test_interp_*``, in a child process) the kernel runs; tensors not dense in memory and CPU tensors outside it
take the PyTorch path; on CUDA at Wan 480p's size (``@pytest.mark.gpu``).
"""

from __future__ import annotations

import re

import pytest
import torch
from gluon_compile import compile_sm90a, resource_usage
from triton_interpreter_support import interp, run_interpreted

from sparse_compile.kernels import finite_check
from sparse_compile.kernels.common import interpreter_active
from sparse_compile.kernels.finite_check import BLOCK, finite_flags_of, finite_flags_reference

IN_INTERPRETER = interpreter_active()
B, S, H, D = 1, 3 * BLOCK // 64 + 5, 2, 32
"""Interpreter size: three blocks and a partial one per tensor."""
POISONS = [float("nan"), float("inf"), float("-inf")]


@pytest.fixture
def kernel_only(monkeypatch):
    """The PyTorch path fails: the case must run the kernel."""

    def reference_is_off(*args) -> None:
        raise AssertionError("the PyTorch path ran instead of the kernel")

    monkeypatch.setattr(finite_check, "finite_flags_reference", reference_is_off)


def token_major(dtype: torch.dtype, seed: int, device="cpu", shape=(B, S, H, D)) -> torch.Tensor:
    """Random ``(B, H, S, D)`` values as a view of ``(B, S, H, D)`` storage."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device, dtype).transpose(1, 2)


def poison(x: torch.Tensor, flat_index: int, value: float) -> None:
    """Write ``value`` at element ``flat_index`` of x's storage order."""
    finite_check.storage_order(x).reshape(-1)[flat_index] = value  # a view: x is dense


# ---------------------------------------------------------------- Triton interpreter (child process)


def test_interpreter_suite() -> None:
    """Run the ``test_interp_*`` cases in a fresh process with TRITON_INTERPRET=1 set before triton loads."""
    run_interpreted(__file__, "test_interp_")


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_interp_one_poisoned_element_clears_its_tensors_flag_only(kernel_only, dtype: torch.dtype) -> None:
    tensors = [token_major(dtype, seed) for seed in range(3)]
    assert finite_flags_of(tensors).tolist() == [1, 1, 1]
    n = tensors[0].numel()
    for which in range(3):
        for index in (0, n // 2 + 7, n - 1):
            for value in POISONS:
                poisoned = [t.clone() for t in tensors]  # clones keep the (B, S, H, D) storage order
                poison(poisoned[which], index, value)
                want = [0 if t == which else 1 for t in range(3)]
                assert finite_flags_of(poisoned).tolist() == want, (which, index, value)


@interp
@pytest.mark.parametrize("count", [1, 2])
def test_interp_fewer_tensors_and_several_poisoned(kernel_only, count: int) -> None:
    tensors = [token_major(torch.bfloat16, seed) for seed in range(count)]
    for t in tensors:
        poison(t, 11, float("nan"))
    assert finite_flags_of(tensors).tolist() == [0] * count


@interp
def test_interp_the_largest_finite_values_are_finite(kernel_only) -> None:
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = token_major(dtype, 0)
        poison(x, 3, torch.finfo(dtype).max)
        poison(x, 4, -torch.finfo(dtype).max)
        assert finite_flags_of([x]).tolist() == [1]


@interp
def test_interp_tensors_not_dense_in_memory_take_the_pytorch_path(monkeypatch) -> None:
    packed = token_major(torch.float32, 0, shape=(B, S, H, 3 * D))
    q, k, v = packed.split(D, dim=-1)  # slices of a packed qkv
    k[0, 1, 9, 3] = float("inf")
    ran = []
    real = finite_check.finite_flags_reference
    monkeypatch.setattr(finite_check, "finite_flags_reference", lambda ts: ran.append(len(ts)) or real(ts))
    assert finite_flags_of([q, k, v]).tolist() == [1, 0, 1]
    assert ran == [3]


# ---------------------------------------------------------------- CPU


def test_cpu_tensors_take_the_pytorch_path(monkeypatch) -> None:
    if IN_INTERPRETER:
        pytest.skip("the interpreter runs the kernel on CPU tensors")

    def kernel_is_off(*args, **kwargs) -> None:
        raise AssertionError("the kernel ran on CPU tensors")

    monkeypatch.setattr(finite_check, "_finite_flags_kernel", kernel_is_off)
    x, y = token_major(torch.float32, 0), token_major(torch.bfloat16, 1)
    poison(y, 5, float("-inf"))
    assert finite_flags_of([x, y]).tolist() == [1, 0]
    assert finite_flags_reference([x, y]).tolist() == [1, 0]


@pytest.mark.parametrize("count", [0, 4])
def test_a_count_other_than_one_to_three_tensors_raises_naming_the_argument(count: int) -> None:
    with pytest.raises(ValueError, match="tensors must hold 1 to 3 tensors"):
        finite_flags_of([torch.zeros(2)] * count)


# ---------------------------------------------------------------- sm_90a code (CPU, ahead of time)


def test_bf16_tensors_are_read_in_16_byte_loads_without_spills_on_sm90a(tmp_path) -> None:
    """As a launch at Wan 480p specialises it (three bf16 tensors, sizes divisible by 16): each thread reads its
    share of a block as 16-byte vectors (``v4.b32``), and the only other global accesses store a flag."""
    names = finite_check._finite_flags_kernel.arg_names
    signature = {n: "i64" for n in names} | dict(x0="*bf16", x1="*bf16", x2="*bf16", flags="*i64", BLOCK="constexpr")
    compiled = compile_sm90a(finite_check._finite_flags_kernel, signature, dict(BLOCK=BLOCK), dict(num_warps=8),
                             ("x0", "x1", "x2", "flags", "n0", "n1", "n2"))  # fmt: skip
    accesses = re.findall(r"(ld|st)\.global((?:\.\w+)*)", compiled.asm["ptx"])
    per_thread = BLOCK * 2 // (8 * 32 * 16)  # bf16 bytes / (8 warps' threads * 16 B)
    assert [kind for op, kind in accesses if op == "ld"] == [".v4.b32"] * 3 * per_thread  # a block of one of 3 tensors
    assert {kind for op, kind in accesses if op == "st"} == {".b64"}
    assert resource_usage(compiled, tmp_path)["LOCAL"] == 0


# ---------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_gpu_wan_480p_flags_match_the_pytorch_path(kernel_only) -> None:
    tensors = [token_major(torch.bfloat16, seed, "cuda", shape=(1, 32760, 12, 128)) for seed in range(3)]
    assert finite_flags_of(tensors).tolist() == [1, 1, 1]
    n = tensors[0].numel()
    generator = torch.Generator().manual_seed(0)
    for trial in range(6):
        which = trial % 3
        index = [0, n - 1, *torch.randint(n, (4,), generator=generator).tolist()][trial]
        poison(tensors[which], index, POISONS[trial % 3])
        assert finite_flags_of(tensors).tolist() == [int(t != which) for t in range(3)], (which, index)
        poison(tensors[which], index, 0.0)
