"""``precision``: "fp8" sends the fixed-block methods' video attention to the e4m3 kernel where it takes
the call, and everything else to the kernel in q/k/v's dtype."""

from __future__ import annotations

import pytest
import torch

from method_calls import method_call
from sparse_compile.kernels.block_sparse_reference import block_sparse_attention_reference
from sparse_compile.methods import block_kernel
from sparse_compile.methods.base import TokenLayout
from sparse_compile.options import validate_options
from sparse_compile.registry import METHODS

LAYOUT = TokenLayout(16, 8, 8, 0, False)
SEQ, DIM = 1024, 64


def _recorded(monkeypatch) -> list[str]:
    """Which kernel each fixed-block call ran: the fp8 entry is replaced by the bf16 reference (the CPU has
    no e4m3 tensor cores), and the CPU counts as a GPU that has them."""
    seen: list[str] = []

    def fp8(q, k, v, counts, indices, **kwargs):
        seen.append("fp8")
        return block_sparse_attention_reference(q, k, v, counts, indices, **kwargs)

    def native(q, k, v, counts, indices, **kwargs):
        seen.append("native")
        return block_sparse_attention_reference(q, k, v, counts, indices, **kwargs)

    monkeypatch.setattr(block_kernel, "block_sparse_attention_fp8", fp8)
    monkeypatch.setattr(block_kernel, "block_sparse_attention", native)
    monkeypatch.setattr(block_kernel, "fp8_problem",
                        lambda q, bq, bk: None if q.dtype != torch.float32 else "q, k, v dtype must be float16 or bfloat16")
    return seen


def _qkv(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, SEQ, DIM, generator=gen).to(dtype) for _ in range(3))


@pytest.mark.parametrize("method_name, options", [("radial", {"block": 32}), ("adaspa", {"density": 0.5, "block": 32})])
@pytest.mark.parametrize("precision, dtype, expected", [
    ("fp8", torch.bfloat16, "fp8"), ("native", torch.bfloat16, "native"), ("fp8", torch.float32, "native"),
])  # fmt: skip
def test_fp8_runs_the_e4m3_kernel_only_where_it_takes_the_call(monkeypatch, method_name, options, precision, dtype,
                                                               expected):  # fmt: skip
    seen = _recorded(monkeypatch)
    validated = validate_options({"method": method_name, "precision": precision, "break_even_guard": False,
                                  **options})  # fmt: skip
    result = METHODS[method_name](validated).attend(method_call(*_qkv(dtype), LAYOUT))
    assert seen == [expected] and result.fallback_reason is None


def test_without_a_gpu_fp8_runs_the_native_kernel():
    q, k, v = _qkv(torch.bfloat16)
    counts = torch.ones(1, 2, SEQ // 32, dtype=torch.int32)
    indices = torch.arange(SEQ // 32, dtype=torch.int32).view(1, 1, -1, 1).expand(1, 2, -1, 1).contiguous()
    out, lse = block_kernel.fixed_block_attention(q, k, v, counts, indices, 32, DIM**-0.5, "fp8")
    want = block_sparse_attention_reference(q, k, v, counts, indices, block_q=32, block_k=32, return_lse=True)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("method_name, options", [("radial", {"block": 128}), ("adaspa", {"density": 0.25, "block": 128})])
def test_gpu_fp8_output_is_within_the_e4m3_error_of_native_on_the_same_layout(method_name, options):
    """On the GPU the fp8 path runs the real e4m3 kernel (Gluon on sm_90): finite, and within e4m3's error
    of the native kernel's output (rel. L2 about 5e-2 on Gaussian inputs)."""
    gen = torch.Generator().manual_seed(1)
    layout = TokenLayout(16, 16, 24, 0, False)
    q, k, v = (torch.randn(1, 4, layout.video_tokens, 128, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    outputs = {}
    for precision in ("native", "fp8"):
        validated = validate_options({"method": method_name, "precision": precision, "break_even_guard": False,
                                      **options})  # fmt: skip
        outputs[precision] = METHODS[method_name](validated).attend(method_call(q, k, v, layout)).output.float()
    assert torch.isfinite(outputs["fp8"]).all()
    assert (outputs["fp8"] - outputs["native"]).norm() / outputs["native"].norm() <= 8e-2
