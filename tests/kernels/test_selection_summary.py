"""Tests of SVG2's read summary (:mod:`sparse_compile.kernels.selection_summary`).

The reference is checked on a hand-computed selection; the Triton kernel must equal it exactly on random
selections with several batch elements, more q clusters than one program sums at a time and 0 to 4 flags, its
buffers poisoned first: under Triton's interpreter (``test_interp_*``, in a child process) and on CUDA
(``@pytest.mark.gpu``). Off both, the reference runs. Compiled for sm_90a on any machine, the kernel does not spill.
"""

from __future__ import annotations

import pytest
import torch
from gluon_compile import compile_sm90a, resource_usage
from triton_interpreter_support import interp, run_interpreted

from sparse_compile.kernels import selection_summary as summary_module
from sparse_compile.kernels.common import interpreter_active
from sparse_compile.kernels.selection_summary import BLOCK, selection_summary, selection_summary_reference


def random_selection(b: int, h: int, nqc: int, seq: int, seed: int, device="cpu"):
    """int32 ``(B, H, Kq)`` q cluster sizes and kept key tokens (each at most ``seq``)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 40, (b, h, nqc), generator=g, dtype=torch.int32)
    kept = torch.randint(0, seq + 1, (b, h, nqc), generator=g, dtype=torch.int32)
    return sizes.to(device), kept.to(device)


def reference_is_off(*args) -> None:
    raise AssertionError("the reference ran instead of the kernel")


def assert_kernel_matches_reference(monkeypatch, sizes, kept, seq: int, break_even: float, flags) -> None:
    """The kernel (the reference unreachable from :func:`selection_summary`) gives the reference's summary."""
    want = selection_summary_reference(sizes, kept, seq, break_even, flags)
    monkeypatch.setattr(summary_module, "selection_summary_reference", reference_is_off)
    got = selection_summary(sizes, kept, seq, break_even, flags)
    assert got.dtype == torch.int64 and torch.equal(got.cpu(), want.cpu())


def threshold_between_heads(sizes, kept, seq: int) -> float:
    """A break-even halfway between two of the selection's kept fractions: some heads pass it, others not."""
    fractions = (kept.long() * sizes).sum(-1).double() / (seq * seq)
    distinct = fractions.flatten().unique().tolist()
    middle = len(distinct) // 2
    return (distinct[middle - 1] + distinct[middle]) / 2


# ---------------------------------------------------------------- the specification


def test_reference_on_a_hand_computed_selection() -> None:
    """B=2, H=2, Kq=2, S=10: per (b, h) the kept pairs are sum(size * kept) (14, 30, 17, 42 of 100); head 1 passes
    0.3 in batch element 1."""
    sizes = torch.tensor([[[4, 6], [5, 5]], [[3, 7], [2, 8]]], dtype=torch.int32)
    kept = torch.tensor([[[2, 1], [3, 3]], [[1, 2], [5, 4]]], dtype=torch.int32)
    flags = torch.tensor([1, 0, 1], dtype=torch.int64)
    values = selection_summary_reference(sizes, kept, 10, 0.3, flags)
    assert values.tolist() == [1, 0, 1] + [0, 1] + [2, 5] + [3, 6, 3, 9] + [14, 30, 17, 42]


def test_shapes_and_dtypes_are_checked_naming_the_argument() -> None:
    sizes, kept = random_selection(1, 2, 3, 10, 0)
    flags = torch.ones(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="kept_tokens must be int32"):
        selection_summary(sizes, kept.long(), 10, 0.5, flags)
    with pytest.raises(ValueError, match=r"q_sizes and kept_tokens must both be \(B, H, Kq\)"):
        selection_summary(sizes, kept[:, :, :2], 10, 0.5, flags)
    with pytest.raises(ValueError, match="flags must be a 1-D int64"):
        selection_summary(sizes, kept, 10, 0.5, flags.int())


def test_no_heads_leave_the_flags_alone() -> None:
    empty = torch.zeros((2, 0, 3), dtype=torch.int32)
    assert selection_summary(empty, empty, 10, 0.5, torch.tensor([1, 0], dtype=torch.int64)).tolist() == [1, 0]


def test_cpu_tensors_take_the_reference(monkeypatch) -> None:
    if interpreter_active():
        pytest.skip("the interpreter runs the kernel on CPU tensors")

    def kernel_is_off(*args, **kwargs) -> None:
        raise AssertionError("the kernel ran on CPU tensors")

    monkeypatch.setattr(summary_module, "_summary_kernel", kernel_is_off)
    sizes, kept = random_selection(2, 3, 5, 20, 1)
    flags = torch.ones(2, dtype=torch.int64)
    assert torch.equal(selection_summary(sizes, kept, 20, 0.25, flags),
                       selection_summary_reference(sizes, kept, 20, 0.25, flags))  # fmt: skip


# ---------------------------------------------------------------- Triton interpreter (child process)


def test_interpreter_suite() -> None:
    """Run the ``test_interp_*`` cases in a fresh process with TRITON_INTERPRET=1 set before triton loads."""
    run_interpreted(__file__, "test_interp_")


@interp
@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize(("b", "h", "nqc", "num_flags"), [(1, 3, 7, 4), (3, 2, BLOCK + 37, 0), (2, 5, 200, 3)])
def test_interp_the_kernel_matches_the_reference(monkeypatch, b: int, h: int, nqc: int, num_flags: int) -> None:
    sizes, kept = random_selection(b, h, nqc, 50, seed=b * 100 + nqc)
    flags = torch.tensor([1, 0, 1, 1][:num_flags], dtype=torch.int64)
    assert_kernel_matches_reference(monkeypatch, sizes, kept, 50, threshold_between_heads(sizes, kept, 50), flags)


# ---------------------------------------------------------------- sm_90a code (CPU, ahead of time)


def test_the_kernel_compiles_for_sm90a_without_spilling(tmp_path) -> None:
    signature = dict(sizes_ptr="*i32", kept_ptr="*i32", flags_ptr="*i64", values_ptr="*i64", batch="i32",
                     num_heads="i32", num_q_clusters="i32", num_flags="i32", all_pairs="fp32", break_even="fp32",
                     BLOCK="constexpr")  # fmt: skip
    compiled = compile_sm90a(summary_module._summary_kernel, signature, dict(BLOCK=BLOCK), dict(num_warps=4),
                             ("sizes_ptr", "kept_ptr", "flags_ptr", "values_ptr"))  # fmt: skip
    assert resource_usage(compiled, tmp_path)["LOCAL"] == 0


# ---------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.usefixtures("poisoned_empty")
def test_gpu_the_kernel_matches_the_reference_at_wan_480p(monkeypatch) -> None:
    """SVG2's defaults at Wan 480p: 200 q clusters, 12 heads, 32760 video tokens, CFG's batch of 2."""
    sizes, kept = random_selection(2, 12, 200, 32760, seed=3, device="cuda")
    flags = torch.tensor([1, 1, 0], dtype=torch.int64, device="cuda")
    assert_kernel_matches_reference(monkeypatch, sizes, kept, 32760, threshold_between_heads(sizes, kept, 32760), flags)
