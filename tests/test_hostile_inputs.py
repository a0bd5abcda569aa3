"""Hostile inputs through every method's public path (``AttentionMethod.run``, what the backend's op calls).

Eight Hypothesis strategies draw small calls a real model can hand the backend: NaN or Inf in q, k
or v; all-identical tokens (every k-means cluster but one empty); zero-norm keys; fp16 values near
overflow and underflow; a single frame; grids with a dimension of 1; joint calls whose key-padding
mask pads every text key; and batches of 1-3 with a different padding mask per sample. Every
method takes each call, and each result must be what dense attention gives:

- NaN exactly where dense attention gives NaN, non-finite exactly where it is non-finite;
- where the method keeps every pair or runs dense (by its schedule, for a reported reason, or
  because its pattern keeps everything): within tolerance of dense attention;
- otherwise every finite output element inside the range of its value column (attention averages
  values): a sparse method may drop keys, never invent values.

An exception anywhere fails the test. The examples are derandomized (the same cases in every run);
``CASES_TRIED`` counts them per strategy and ``RAN_SPARSE`` per method the ones it ran sparse (NaN
or Inf inputs always run dense, with the reason); with ``OUT`` set both are appended to
``$OUT/hostile_inputs.jsonl``. On a CUDA machine the same cases also run on the GPU (the
Triton kernels), e.g. under ``compute-sanitizer`` (``benchmarks/sanitize_kernels.py``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_checks import save_result
from method_calls import method_call
from sparse_compile.methods import METHODS, auto, base, svg2
from sparse_compile.methods.base import AttentionResult, TokenLayout
from sparse_compile.methods.cost_model import NOMINAL_COSTS, nominal_cluster_costs
from sparse_compile.methods.exact import dense_attention
from sparse_compile.methods.fallback import finite_flags, nonfinite_reason
from sparse_compile.options import validate_options

SMALL = {
    "svg2": {"q_clusters": 4, "k_clusters": 6, "kmeans_iters_init": 3},
    "svg": {"block": 16},
    "radial": {"block": 16, "first_frame_sink": False},
    "adaspa": {"block": 16},
    "auto": {"block": 32, "recall": 0.6},
    "dense": {},
}
"""Per method, options that make it sparse on a few dozen video tokens."""
KEEP_ALL = {
    "svg2": {"top_p": 1.0, "min_kc_ratio": 1.0},
    "svg": {"density": 1.0},
    "adaspa": {"density": 1.0},
    "dense": {},
}
"""Per method, the options that keep every (query, key) pair (``radial`` and ``auto`` have none)."""
HEAD_DIM = 16
EXAMPLES = int(os.environ.get("SPARSE_COMPILE_HOSTILE_EXAMPLES", "8"))
"""Examples per strategy; each runs every method on CPU (and on CUDA where there is one). The
sanitizer run (``benchmarks/sanitize_kernels.py --examples``) sets fewer: memcheck is slow."""
CASES_TRIED: Counter[str] = Counter()
"""Examples run per ``strategy[device]``."""
RAN_SPARSE: Counter[tuple[str, str]] = Counter()
"""Per ``(strategy[device], method)``: the examples the method ran sparse (the rest ran dense)."""

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
HOSTILE = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip


@dataclass(frozen=True)
class HostileCall:
    """One drawn call: q, k, v ``(B, H, S, D)`` (CPU), its token layout, an optional key-padding mask
    ``(B, 1, 1, S)`` and whether the methods run with their keep-everything options."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: TokenLayout
    mask: torch.Tensor | None
    keep_all: bool

    def to(self, device: str) -> HostileCall:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return HostileCall(move(self.q), move(self.k), move(self.v), self.layout, move(self.mask), self.keep_all)


def _randn(draw, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randn(shape, generator=gen).to(dtype)


@st.composite
def layouts(draw, frames=st.integers(1, 5), height=st.integers(1, 6), width=st.integers(1, 8), text=st.just(0)):
    """A token layout: video grid and text tokens before or after it."""
    return TokenLayout(draw(frames), draw(height), draw(width), draw(text), draw(st.booleans()))


@st.composite
def calls(draw, layout=layouts(), batch=st.integers(1, 2), dtype=st.just(torch.float32)) -> HostileCall:
    """Random q, k, v over ``layout``: the base every hostile strategy alters."""
    lay = draw(layout)
    shape = (draw(batch), draw(st.integers(1, 2)), lay.video_tokens + lay.text_tokens, HEAD_DIM)
    dt = draw(dtype)
    q, k, v = (_randn(draw, shape, dt) for _ in range(3))
    return HostileCall(q, k, v, lay, None, draw(st.booleans()))


@st.composite
def nonfinite_values(draw) -> HostileCall:
    """NaN, Inf or -Inf at 1-3 entries of q, k or v."""
    call = draw(calls())
    tensors = {"q": call.q.clone(), "k": call.k.clone(), "v": call.v.clone()}
    target = tensors[draw(st.sampled_from(sorted(tensors)))]
    for _ in range(draw(st.integers(1, 3))):
        index = tuple(draw(st.integers(0, n - 1)) for n in target.shape)
        target[index] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    return HostileCall(tensors["q"], tensors["k"], tensors["v"], call.layout, None, call.keep_all)


@st.composite
def identical_tokens(draw) -> HostileCall:
    """Every query row one vector and every key row one vector: one k-means cluster takes every token."""
    call = draw(calls())
    q_row, k_row = call.q[:, :, :1], draw(st.sampled_from([call.q[:, :, :1], call.k[:, :, :1]]))
    return HostileCall(q_row.expand_as(call.q).clone(), k_row.expand_as(call.k).clone(), call.v, call.layout, None,
                       call.keep_all)  # fmt: skip


@st.composite
def zero_norm_keys(draw) -> HostileCall:
    """Some or all key rows zero (their scores are 0 for every query); sometimes the queries too."""
    call = draw(calls())
    zero = torch.rand(call.k.shape[2], generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    zero = zero < draw(st.sampled_from([0.3, 0.7, 1.0]))
    k = call.k.masked_fill(zero[:, None], 0.0)
    q = call.q.masked_fill(zero[:, None], 0.0) if draw(st.booleans()) else call.q
    return HostileCall(q, k, call.v, call.layout, None, call.keep_all)


@st.composite
def extreme_fp16(draw) -> HostileCall:
    """fp16 q, k, v whose entries are ``sign * 2**e``, ``e`` from subnormal (-24) to near overflow (15)."""
    call = draw(calls())

    def extreme(t: torch.Tensor) -> torch.Tensor:
        low, high = sorted((draw(st.integers(-24, 15)), draw(st.integers(-24, 15))))
        gen = torch.Generator().manual_seed(draw(st.integers(0, 99)))
        exponents = torch.randint(low, high + 1, t.shape, generator=gen).float()
        return (torch.sign(t) * torch.exp2(exponents)).half()

    return HostileCall(extreme(call.q), extreme(call.k), extreme(call.v), call.layout, None, call.keep_all)


def single_frame() -> st.SearchStrategy[HostileCall]:
    """A video of one frame (a picture): no temporal structure to exploit."""
    return calls(layout=layouts(frames=st.just(1), height=st.integers(1, 12), width=st.integers(1, 16)))


@st.composite
def unit_dimension_grids(draw) -> HostileCall:
    """Grids with one or two of frames, height, width equal to 1."""
    sizes = [draw(st.integers(2, 8)) for _ in range(3)]
    for axis in draw(st.lists(st.integers(0, 2), min_size=1, max_size=2, unique=True)):
        sizes[axis] = 1
    frames, height, width = (st.just(s) for s in sizes)
    return draw(calls(layout=layouts(frames=frames, height=height, width=width)))


def _text_padding_mask(call: HostileCall, padded: torch.Tensor) -> torch.Tensor:
    """Key-padding mask ``(B, 1, 1, S)``: every video key kept, text key ``j`` of sample ``b`` dropped
    where ``padded[b, j]``."""
    lay = call.layout
    keep = torch.ones(call.q.shape[0], lay.video_tokens + lay.text_tokens, dtype=torch.bool)
    text = slice(0, lay.text_tokens) if lay.text_first else slice(lay.video_tokens, None)
    keep[:, text] = ~padded
    return keep[:, None, None, :]


@st.composite
def every_text_key_padded(draw) -> HostileCall:
    """Joint video+text calls whose key-padding mask drops every text key."""
    call = draw(calls(layout=layouts(text=st.integers(1, 4))))
    padded = torch.ones(call.q.shape[0], call.layout.text_tokens, dtype=torch.bool)
    return HostileCall(call.q, call.k, call.v, call.layout, _text_padding_mask(call, padded), call.keep_all)


@st.composite
def per_sample_masks(draw) -> HostileCall:
    """Batches of 1-3 with a different text padding per sample (none, some or all text keys)."""
    call = draw(calls(layout=layouts(text=st.integers(1, 4)), batch=st.integers(1, 3)))
    n_text = call.layout.text_tokens
    padded = torch.stack([
        torch.arange(n_text) >= draw(st.integers(0, n_text)) for _ in range(call.q.shape[0])
    ])  # fmt: skip
    return HostileCall(call.q, call.k, call.v, call.layout, _text_padding_mask(call, padded), call.keep_all)


STRATEGIES = {
    "nonfinite_values": nonfinite_values(),
    "identical_tokens": identical_tokens(),
    "zero_norm_keys": zero_norm_keys(),
    "extreme_fp16": extreme_fp16(),
    "single_frame": single_frame(),
    "unit_dimension_grids": unit_dimension_grids(),
    "every_text_key_padded": every_text_key_padded(),
    "per_sample_masks": per_sample_masks(),
}


def run_method(name: str, call: HostileCall) -> AttentionResult:
    """``name`` with its small options (and keep-everything ones if the call asks) on one sparse-step call."""
    options = {"method": name, **SMALL[name], **(KEEP_ALL.get(name, {}) if call.keep_all else {})}
    method = METHODS[name](validate_options(options))
    return method.run(method_call(call.q, call.k, call.v, call.layout, mask=call.mask))


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


def assert_gives_what_dense_gives(name: str, call: HostileCall, result: AttentionResult) -> None:
    """The checks of the module doc, for method ``name``'s ``result`` on ``call``."""
    dense = dense_attention(call.q, call.k, call.v, call.mask, None).float()
    out = result.output.float()
    assert out.shape == dense.shape and result.output.dtype == call.q.dtype, name
    assert torch.equal(out.isnan(), dense.isnan()), f"{name}: NaN where dense attention has none, or the reverse"
    finite = dense.isfinite()
    assert torch.equal(out.isfinite(), finite), f"{name}: non-finite where dense attention is finite, or the reverse"
    v = call.v.float().masked_fill(~finite.all(dim=2, keepdim=True), 0.0)  # non-finite columns: checked above
    slack = _tolerance(call.q.dtype) * v.abs().amax().clamp_min(1e-30)
    ran_dense = result.video_lse is None  # a dense path: by the schedule, a fallback, or keeping every pair
    if ran_dense or (call.keep_all and name in KEEP_ALL):
        error = (out - dense).abs()[finite]
        assert error.numel() == 0 or float(error.max()) <= slack, f"{name}: differs from dense by {float(error.max())}"
        return
    low, high = v.amin(dim=2, keepdim=True) - slack, v.amax(dim=2, keepdim=True) + slack
    inside = (out >= low) & (out <= high)
    assert bool(inside[finite].all()), f"{name}: an output outside the range of its value column"


def check_every_method(strategy: str, call: HostileCall, device: str) -> None:
    """Every method on ``call`` (moved to ``device``), counted in :data:`CASES_TRIED` / :data:`RAN_SPARSE`."""
    if device == "cuda":
        call = call.to(device)
    case = f"{strategy}[{device}]"
    CASES_TRIED[case] += 1
    for name in SMALL:
        result = run_method(name, call)
        assert_gives_what_dense_gives(name, call, result)
        RAN_SPARSE[case, name] += result.video_lse is not None


@pytest.fixture(scope="module", autouse=True)
def nominal_cost_model():
    """The CPU's nominal cost model on every device: each method takes its sparse path wherever its
    pattern allows (the break-even guards have tests of their own), and no call times kernels (on CUDA
    the calibration would time each new dtype, head dim and cluster count of the drawn calls)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(base, "guard_costs", lambda *args: None)
        patch.setattr(svg2, "cluster_guard_density", lambda *args: None)
        patch.setattr(auto, "kernel_costs", lambda *args: NOMINAL_COSTS)
        patch.setattr(auto, "cluster_costs", lambda device, dtype, head_dim, *counts: nominal_cluster_costs(*counts))
        yield


@pytest.fixture(scope="module", autouse=True)
def record_cases_tried():
    """With ``OUT`` set, append per strategy and device the cases tried and, per method, how many of
    them it ran sparse to ``$OUT/hostile_inputs.jsonl`` (a failing case fails its test)."""
    yield
    for case, tried in sorted(CASES_TRIED.items()):
        save_result("hostile_inputs", {"case": case, "cases": tried,
                                       "ran_sparse": {name: RAN_SPARSE[case, name] for name in SMALL}})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@HOSTILE
@given(data=st.data())
def test_every_method_gives_what_dense_attention_gives_on_hostile_calls(strategy, device, data):
    check_every_method(strategy, data.draw(STRATEGIES[strategy], label=strategy), device)


def test_calls_with_nan_or_inf_run_dense_with_a_reason_naming_the_tensors():
    q, k, v = (torch.randn(1, 8, 2, HEAD_DIM).transpose(1, 2) for _ in range(3))  # (B, H, S, D) views
    k[0, 0, 3, 1] = float("inf")
    v[0, 1, 2, 0] = float("nan")
    call = HostileCall(q, k, v, TokenLayout(1, 2, 4, 0, False), None, keep_all=False)
    for name in ("svg2", "svg", "radial", "adaspa", "auto"):
        result = run_method(name, call)
        assert result.fallback_reason == "key, value hold NaN or Inf (dense attention defines the result)", name
        assert_gives_what_dense_gives(name, call, result)
    names, flags = finite_flags(q, k, v[:, :, :2])
    assert nonfinite_reason(names, flags.tolist()) == "key holds NaN or Inf (dense attention defines the result)"
    assert finite_flags(q[:, :, :0], k[:, :, :0], v[:, :, :0])[0] == []  # no tokens: nothing to check
