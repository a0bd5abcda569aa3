"""SVG2 with the cluster permutation folded into the kernel: Q, K, V and O are never reordered.

CPU: the method hands the kernel the token-order tensors and the permutations and gets a
token-major output back; a model compiled with the backend calls the attention op on its
q/k/v with no gather, index or scatter in Inductor's code (and the check sees one when a gather
is put in front of the op). GPU: one warm SVG2 call at Wan 480p launches no kernel on Q/K/V/O
sized data besides k-means' and the attention kernel (profiler).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch.autograd import DeviceType

import tiny_models
from gpu_checks import structured_qkv
from method_calls import assert_kernel_read_callers_qkv, method_call, record_kernel_calls, token_major_qkv
from sparse_compile.kernels.common import attention_output_like, cdiv, launch_group_size
from sparse_compile.kernels.tile_configs import GLUON_VARLEN_CONFIG
from sparse_compile.kernels.tile_configs import varlen_config as varlen_default_config
from sparse_compile.kernels.varlen_block_sparse import rows_budget_bytes, varlen_kernel_choice
from sparse_compile.methods import svg2 as svg2_module
from sparse_compile.methods.base import TokenLayout
from sparse_compile.methods.svg2 import Svg2Method
from sparse_compile.options import validate_options
from sparse_compile.passes import rewrite as rewrite_module

ATTENTION_OP = torch.ops.sparse_compile.attention.default


def _svg2(**params) -> Svg2Method:
    return Svg2Method(validate_options({"method": "svg2", **params}))


# ------------------------------------------------------------------------------------------------
# The method hands the kernel token-order tensors and permutations
# ------------------------------------------------------------------------------------------------


def test_kernel_gets_the_token_order_tensors_and_both_permutations(monkeypatch):
    seen = record_kernel_calls(monkeypatch, svg2_module, "varlen_block_sparse_attention")
    torch.manual_seed(0)
    layout = TokenLayout(frames=2, height=4, width=5, text_tokens=0, text_first=False)
    q, k, v = token_major_qkv(1, 2, layout.video_tokens, 16)
    result = _svg2(q_clusters=4, k_clusters=6).attend(method_call(q, k, v, layout))
    [recorded] = seen
    kwargs = assert_kernel_read_callers_qkv(recorded, q, k, v)
    for name in ("q_perm", "kv_perm"):
        perm = kwargs[name]
        assert perm.shape == (1, 2, 40)
        assert torch.equal(perm.sort(-1).values, torch.arange(40).expand(1, 2, 40))
    assert result.output.stride() == attention_output_like(q, v).stride()  # the op returns it without a copy


# ------------------------------------------------------------------------------------------------
# Inductor's code for a compiled model: the op gets q/k/v with no gather in front of it
# ------------------------------------------------------------------------------------------------

_GATHER_WORDS = re.compile(r"gather|scatter|index|take")


def gather_like_ops(code: str) -> list[str]:
    """Gather-, index- or scatter-like ops in Inductor's output code.

    Looks at the generated kernels' names (``cpp_fused_<ops>_N`` / ``triton_..._fused_<ops>_N``,
    named after the ATen ops fused into them) and at every ``aten.<op>`` the code names
    (extern kernels, fallbacks and the ``Original ATen`` provenance comments).
    """
    names = re.findall(r"\b\w*fused_\w+", code) + re.findall(r"\baten\.(\w+)", code)
    return sorted({name for name in names if _GATHER_WORDS.search(name)})


def _compiled_wan_code() -> tuple[str, int]:
    """Inductor's code for one call of a tiny Wan compiled with SVG2, and its number of video sites."""
    torch.manual_seed(0)
    model, inputs, expected = tiny_models.wan(frames=3, height=8, width=10)
    options = {"method": "svg2", "min_seq_len": 16, "q_clusters": 4, "k_clusters": 8, "kmeans_iters_init": 3}
    compiled = torch.compile(model, backend="sparse_video", options=options)
    with torch.no_grad():
        _, codes = run_and_get_code(lambda: compiled(**inputs))
    return "\n".join(codes), expected.video_sites


def test_compiled_model_calls_the_attention_op_on_ungathered_qkv():
    code, video_sites = _compiled_wan_code()
    assert code.count("torch.ops.sparse_compile.attention.default(") == video_sites
    assert gather_like_ops(code) == []


def _insert_query_gather(real_replace):
    """A rewrite step that also reverses the query's tokens with ``index_select`` in front of the op."""

    def replace(gm: torch.fx.GraphModule, plan, token, site_id: int) -> None:
        real_replace(gm, plan, token, site_id)
        op = next(n for n in gm.graph.nodes if n.target is ATTENTION_OP and n.args[-1] == site_id)
        frames, height, width = op.args[6:9]
        with gm.graph.inserting_before(op):
            order = gm.graph.call_function(torch.arange, (frames * height * width - 1, -1, -1))
            op.update_arg(0, gm.graph.call_function(torch.index_select, (op.args[0], 2, order)))

    return replace


def test_the_code_check_sees_a_gather_in_front_of_the_op(monkeypatch):
    monkeypatch.setattr(rewrite_module, "_replace_with_op", _insert_query_gather(rewrite_module._replace_with_op))
    code, video_sites = _compiled_wan_code()
    assert code.count("torch.ops.sparse_compile.attention.default(") == video_sites
    assert any("index" in name for name in gather_like_ops(code)), gather_like_ops(code)


# ------------------------------------------------------------------------------------------------
# GPU: profiler over one warm SVG2 call
# ------------------------------------------------------------------------------------------------

ALLOWED_FULL_SIZE_KERNELS = (
    "_varlen_fwd_kernel", "_varlen_fwd_gluon", "_kept_rows_kernel", "_tile_tables_kernel", "_assign_kernel", "_finalize_kernel",
    "_probe_kernel", "_finite_flags_kernel",
)  # fmt: skip
"""Triton and Gluon kernels that may be launched by an op holding full-size tensors: the attention op's own
(kept rows, tile tables and attention: Triton's, or Gluon's on sm_90), k-means' (which reads Q and K once per iteration, and a
strided sample of them for the reuse rule's probe) and the finiteness check's (one read of Q, K and V)."""
FULL_SIZE_READS = ("aten::aminmax",)
"""ATen ops that may take full-size tensors: the finiteness check's PyTorch path (tensors not dense in memory)
reduces Q, K and V to their 0-d minimum and maximum: one read, nothing written at their size."""


def _numel(shape) -> int:
    """Elements of a profiler input shape; the largest member's for a tensor list (``[[...], ...]``)."""
    if shape and isinstance(shape[0], list):
        return max((_numel(s) for s in shape), default=0)
    return math.prod(shape) if shape else 0


def ops_on_full_tensors(events, full_numel: int) -> list:
    """Host-side ops (profiler ``FunctionEvent``s) with a tensor input of at least ``full_numel`` elements."""
    return [
        e for e in events if e.device_type == DeviceType.CPU and any(_numel(s) >= full_numel for s in e.input_shapes)
    ]


def full_size_launches(events, full_numel: int) -> list[tuple[str, str]]:
    """``(op, kernel)`` for every device kernel launched by an op with a tensor input of ``>= full_numel``
    elements (the profiler attributes each kernel to the innermost op active at its launch)."""
    return [(e.name, kernel.name) for e in ops_on_full_tensors(events, full_numel) for kernel in e.kernels]


def test_full_size_ops_found_in_a_cpu_profile():
    q = torch.randn(1, 2, 64, 8)
    perm = torch.randperm(64).view(1, 1, 64, 1).expand(1, 2, 64, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        torch.gather(q, 2, perm)
        torch.cat([q[:, :, :4], q[:, :, :4]])
        q[:, :, :4].clone()
    names = [e.name for e in ops_on_full_tensors(prof.events(), q.numel())]
    assert "aten::gather" in names and "aten::cat" not in names and "aten::clone" not in names
    assert full_size_launches(prof.events(), q.numel()) == []  # no device kernels on the CPU


@pytest.mark.gpu
def test_gpu_warm_svg2_call_launches_no_gather_or_scatter_over_qkvo(monkeypatch):
    """Criterion: every kernel launched by an op that takes a tensor of at least a quarter of Q's size
    is the attention op's own or k-means', or reads them for the finiteness check. A gather/index/scatter/copy of Q, K, V or O (torch.gather,
    indexing, .contiguous(), the op's relayout copy of O) is an ATen op with such an input and fails
    this; the small ops of clustering, selection and the tile table act on labels, centroids and
    cluster tables (at most ~1/20 of Q here) and pass. Names alone would not do: a torch.gather of
    small int tables is as legitimate as one of Q is not."""
    torch.manual_seed(0)
    layout = TokenLayout(frames=21, height=30, width=52, text_tokens=0, text_first=False)  # S = 32760
    # concentrated attention, so no head passes the break-even guard (whose dense heads are gathered)
    q, k, v = structured_qkv(12, layout.video_tokens, 128, torch.bfloat16, "cuda")
    method = _svg2()
    kernel_calls = record_kernel_calls(monkeypatch, svg2_module, "varlen_block_sparse_attention")
    cold = method_call(q, k, v, layout)
    method.attend(cold)  # cold start: 50 k-means iterations and the seeding gather, not profiled
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        result = method.attend(method_call(q, k, v, layout, cold.cache))
        torch.cuda.synchronize()
    launches = full_size_launches(prof.events(), q.numel() // 4)
    # every attention launch (as the op's, or the staged call's with no op around it)
    attention = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA and "_varlen_fwd_" in e.name]
    gluon = varlen_kernel_choice(q, k, v) == "gluon"
    config = GLUON_VARLEN_CONFIG if gluon else varlen_default_config(layout.video_tokens, 200, 128, 2)
    per_group = 2 if config.tail_block_m else 1
    # one launch per group of heads, and one more each for the 64-row tails: one group when the call was
    # staged before the guard's read (its kept keys fit the budget: no op call) or the op's ragged kept rows
    # of all heads fit it, else as many groups as padded rows of the most keys a q cluster keeps need
    groups = 1
    if kernel_calls:
        bounds = kernel_calls[-1][3]
        budget = rows_budget_bytes(q)
        ragged_bytes = 4 * bounds["kept_rows_total"]
        padded_pair_bytes = 200 * min(bounds["max_kept_keys"], layout.video_tokens) * 4
        groups = 1 if ragged_bytes <= budget else cdiv(12, launch_group_size(12, padded_pair_bytes, budget))
    assert len(attention) == per_group * groups, (groups, launches)
    offenders = [(op, kernel) for op, kernel in launches
                 if op not in FULL_SIZE_READS and not any(a in kernel for a in ALLOWED_FULL_SIZE_KERNELS)]
    assert offenders == [], offenders
    assert result.output.stride() == attention_output_like(q, v).stride()  # the op returns it without a copy
    assert result.guarded_heads == () and torch.isfinite(result.output).all()
