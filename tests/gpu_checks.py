"""Helpers of the GPU reliability tests (``tests/test_gpu_reliability.py``), kept device-agnostic
so that ``tests/test_gpu_reliability_cpu.py`` can check them on the CPU.

- Peak-memory accounting: :func:`peak_during` measures the largest allocation a call makes
  above a baseline through a :class:`MemoryStats` (the CUDA caching allocator's counters in the
  GPU tests, a fake in the CPU tests); :class:`PeakMemory` and :func:`peak_ratio` turn two
  measurements into the "peak within 1.2x of dense SDPA" comparison of issue 7.
- Inputs: :func:`structured_qkv`, queries and keys near shared per-head centres (as in a trained
  video DiT, so sparse methods are genuinely sparse), in the ``(B, S, H, D)``-major layout that
  diffusers hands to attention.
- Method calls as the op makes them: :func:`first_and_steady_calls` (peak memory of a method's
  first sparse call and of a steady-state one, alone and with the op's output layout,
  :func:`in_op_layout`).
- Denoising loops on a compiled model: :func:`denoise` (optionally CFG as two calls),
  :class:`StepProbe` (a Radial method recording the step logic the op ran) and :func:`run_loop`
  (a CFG loop recording what ran, recompiles and CUDA-graph captures).
- :func:`save_result`: measurements appended to ``$OUT/<name>.jsonl`` when ``OUT`` is set.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import pytest
import torch
import torch._dynamo.utils

import sparse_compile
from method_calls import method_call
from sparse_compile.methods import METHODS
from sparse_compile.methods.base import AttentionCall, AttentionResult, SiteCache, TokenLayout
from sparse_compile.methods.radial import RadialMethod
from sparse_compile.options import validate_options

GIB = float(1 << 30)


class MemoryStats(Protocol):
    """The allocator counters :func:`peak_during` reads (bytes)."""

    def synchronize(self) -> None: ...

    def allocated(self) -> int: ...

    def reset_peak(self) -> None: ...

    def peak(self) -> int: ...


class CudaMemory:
    """:class:`MemoryStats` of one CUDA device: ``memory_allocated`` / ``max_memory_allocated``."""

    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)


def peak_during(fn: Callable[[], Any], stats: MemoryStats, baseline: int | None = None) -> tuple[Any, int]:
    """Run ``fn`` and return ``(its result, peak bytes allocated during it above the baseline)``.

    The baseline defaults to what is allocated just before the call; pass an earlier reading to
    also count memory that earlier calls allocated and still hold (a method's cached state).
    The device is synchronised before and after, so asynchronous work is inside the window.
    """
    stats.synchronize()
    start = stats.allocated() if baseline is None else baseline
    stats.reset_peak()
    result = fn()
    stats.synchronize()
    return result, stats.peak() - start


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@dataclass(frozen=True)
class PeakMemory:
    """One call's memory: the inputs it was given (bytes) and its peak allocation above them.

    ``total`` is the peak a caller holding the inputs sees, what issue 7's "peak memory" means.
    """

    inputs: int
    increment: int

    @property
    def total(self) -> int:
        return self.inputs + self.increment


def peak_ratio(sparse: PeakMemory, dense: PeakMemory) -> float:
    """Total peak of a sparse call over that of dense SDPA on the same inputs."""
    return sparse.total / dense.total


def describe_peaks(label: str, sparse: PeakMemory, dense: PeakMemory) -> str:
    """One line for assertion messages: both totals and increments in GiB and their ratio."""
    return (
        f"{label}: peak {sparse.total / GIB:.3f} GiB (inputs {sparse.inputs / GIB:.3f} + "
        f"{sparse.increment / GIB:.3f}) vs dense SDPA {dense.total / GIB:.3f} GiB (inputs "
        f"{dense.inputs / GIB:.3f} + {dense.increment / GIB:.3f}): ratio {peak_ratio(sparse, dense):.3f}"
    )


def save_result(name: str, record: dict[str, Any]) -> None:
    """Append ``record`` to ``$OUT/<name>.jsonl`` when ``OUT`` is set (the device run brings it back)."""
    out = os.environ.get("OUT")
    if not out:
        return
    with open(os.path.join(out, f"{name}.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def peaks_record(method: str, phase: str, sparse: PeakMemory, dense: PeakMemory) -> dict[str, Any]:
    """What :func:`save_result` keeps of one memory comparison."""
    return {"method": method, "phase": phase, "sparse": asdict(sparse), "dense": asdict(dense),
            "ratio": peak_ratio(sparse, dense)}


def structured_qkv(
    heads: int,
    seq: int,
    dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    centres: int = 48,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(1, heads, seq, dim)`` as diffusers passes them: views of ``(1, seq, heads, dim)`` tensors.

    Per head, queries and keys are noisy copies of ``centres`` shared random directions, so
    attention concentrates on a subset of keys as in a trained video DiT (uniform random q/k make
    every top-p selection keep almost everything). Values are standard normal.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    basis = torch.randn(heads, centres, dim, device=device, generator=g) * 1.5
    head_index = torch.arange(heads, device=device)

    def near_centres() -> torch.Tensor:
        assign = torch.randint(0, centres, (seq, heads), device=device, generator=g)
        x = basis[head_index, assign]  # (seq, heads, dim)
        x += 0.5 * torch.randn(seq, heads, dim, device=device, generator=g)
        return x.to(dtype)

    q, k = near_centres(), near_centres()
    v = torch.randn(seq, heads, dim, device=device, generator=g).to(dtype)
    return tuple(t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))  # type: ignore[return-value]


def to_device(
    model: torch.nn.Module, inputs: dict[str, Any], device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``model`` and its floating-point inputs on ``device`` in ``dtype`` (integer inputs keep their dtype)."""
    model = model.to(device=device, dtype=dtype)
    moved = {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        if isinstance(value, torch.Tensor) else value
        for key, value in inputs.items()
    }
    return model, moved


def denoise(
    model: Callable[..., Any],
    inputs: dict[str, Any],
    timesteps: Sequence[float],
    *,
    uncond_text: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Call ``model`` once per timestep (twice with ``uncond_text``: CFG as two calls, conditional first).

    Returns every call's ``.sample``, cloned at once: under CUDA-graph trees a replay may reuse
    the memory of an earlier call's output.
    """
    hidden = inputs["hidden_states"]
    outputs = []
    with torch.no_grad():
        for t in timesteps:
            timestep = torch.full((hidden.shape[0],), float(t), device=hidden.device)
            texts = [inputs["encoder_hidden_states"]] + ([] if uncond_text is None else [uncond_text])
            for text in texts:
                call = {**inputs, "timestep": timestep, "encoder_hidden_states": text}
                outputs.append(model(**call).sample.clone())
    return outputs


def recorded_cuda_graphs(device_index: int) -> int:
    """Number of root graphs the CUDA-graph trees of a device recorded (0 if none, or no trees)."""
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(device_index, create_if_none_exists=False)
    if manager is None:
        return 0
    return sum(1 for _ in manager.get_roots())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# A method's first and steady-state calls


def in_op_layout(out: torch.Tensor, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out`` ``(B, H, S, Dv)`` as the backend's op must return it: laid out as a contiguous
    ``(B, S, H, Dv)`` (``sparse_compile.runtime.ops.attention_output_like``, the layout diffusers
    transposes back into), so ``out`` itself when it already is, else a copy in that layout."""
    batch, heads, seq, _ = q.shape
    dv = v.shape[-1]
    if out.stride() == (seq * heads * dv, dv, heads * dv, 1):
        return out
    return out.new_empty((batch, seq, heads, dv)).transpose(1, 2).copy_(out)


@dataclass(frozen=True)
class CallPeaks:
    """One call's peak: of the method alone, and with the op's output layout (what a graph sees)."""

    method: PeakMemory
    op: PeakMemory


@dataclass(frozen=True)
class TwoCalls:
    """Peaks and kept densities of a method's first sparse call (step 0) and a steady-state one (step 1)."""

    first: CallPeaks
    steady: CallPeaks
    densities: tuple[float, float]
    all_finite: bool
    fallback_reason: str | None


def first_and_steady_calls(
    method_name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    stats: MemoryStats,
    options: dict[str, Any] | None = None,
) -> TwoCalls:
    """Run a fresh method instance (default options unless given) on one site's state: step 0, then step 1.

    This is what the op does at a sparse step: ``method.attend`` on an ``AttentionCall``, then
    the output in the op's layout (:func:`in_op_layout`). Step 0 is the first sparse call
    (SVG2's cold k-means, AdaSpa's LSE pass and search, SVG's profile); step 1 the steady state
    (warm k-means, reused AdaSpa layout). Peaks are measured above the memory allocated before
    step 0, so what step 0 caches counts in step 1.
    """
    method = METHODS[method_name](validate_options({"method": method_name, **(options or {})}))
    state = SiteCache()
    inputs = storage_bytes((q, k, v))
    stats.synchronize()
    baseline = stats.allocated()
    densities, peaks, finite, fallback_reason = [], [], True, None

    def attend(step: int) -> AttentionResult:
        return method.attend(method_call(q, k, v, layout, state, step=step))

    with torch.no_grad():
        for step in (0, 1):
            result, method_increment = peak_during(functools.partial(attend, step), stats, baseline)
            out, layout_increment = peak_during(functools.partial(in_op_layout, result.output, q, v), stats, baseline)
            densities.append(float(result.kept_density))
            fallback_reason = result.fallback_reason
            finite = finite and bool(torch.isfinite(out).all())
            peaks.append(CallPeaks(method=PeakMemory(inputs, method_increment),
                                   op=PeakMemory(inputs, max(method_increment, layout_increment))))
            del result, out
    return TwoCalls(peaks[0], peaks[1], (densities[0], densities[1]), finite, fallback_reason)


# ---------------------------------------------------------------------------------------------
# Step logic under torch.compile modes


class StepProbe(RadialMethod):
    """Radial attention that records ``(step, branch, generation, path)`` of every call of the op.

    ``path`` is ``"dense"`` for calls in the dense warm-up steps (the op calls ``observe_dense``)
    and ``"sparse"`` otherwise. Frozen step logic would show as missing or repeated records.
    """

    name = "radial_probe"
    calls: list[tuple[int, int, int, str]] = []

    def observe_dense(self, call: AttentionCall) -> None:
        StepProbe.calls.append((call.step.step, call.step.branch, call.step.generation, "dense"))
        super().observe_dense(call)

    def attend(self, call: AttentionCall) -> AttentionResult:
        StepProbe.calls.append((call.step.step, call.step.branch, call.step.generation, "sparse"))
        return super().attend(call)


@contextlib.contextmanager
def probe_registered() -> Iterator[list[tuple[int, int, int, str]]]:
    """``method="radial_probe"`` available to the backend; yields the (fresh) list of its records."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(METHODS, StepProbe.name, StepProbe)
        StepProbe.calls = []
        yield StepProbe.calls


@dataclass(frozen=True)
class LoopRun:
    """What a CFG denoising loop on a freshly compiled copy of a model did.

    Attributes:
        calls: the :class:`StepProbe` records, in call order.
        outputs: every call's output (conditional, then unconditional, per step).
        densities: per rewritten site, the report's kept density per step.
        graphs_after_first_call / graphs_after_loop: Dynamo's ``unique_graphs`` counter.
        recorded_cuda_graphs: root graphs the CUDA-graph trees of the model's device captured.
        cudagraph_skips: Inductor's ``cudagraph_skips`` counter (graphs that skipped CUDA graphs).
    """

    calls: list[tuple[int, int, int, str]]
    outputs: list[torch.Tensor]
    densities: dict[str, dict[int, float]]
    graphs_after_first_call: int
    graphs_after_loop: int
    recorded_cuda_graphs: int
    cudagraph_skips: int


def run_loop(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    uncond_text: torch.Tensor,
    timesteps: Sequence[float],
    **compile_kwargs: Any,
) -> LoopRun:
    """``torch.compile(copy of model, **compile_kwargs)``, then ``timesteps`` with CFG as two calls.

    Resets Dynamo and its counters first; :class:`StepProbe` is registered throughout, so the
    backend options may name it.
    """
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    device = inputs["hidden_states"].device
    with probe_registered() as calls:
        compiled = torch.compile(copy.deepcopy(model), **compile_kwargs)
        outputs = denoise(compiled, inputs, timesteps[:1], uncond_text=uncond_text)
        graphs_after_first_call = counters["stats"]["unique_graphs"]
        outputs += denoise(compiled, inputs, timesteps[1:], uncond_text=uncond_text)
        densities = {s.module_path: s.density_by_step for s in sparse_compile.report(compiled).rewritten}
        captured = recorded_cuda_graphs(device.index or 0) if device.type == "cuda" else 0
        return LoopRun(
            calls=list(calls),
            outputs=outputs,
            densities=densities,
            graphs_after_first_call=graphs_after_first_call,
            graphs_after_loop=counters["stats"]["unique_graphs"],
            recorded_cuda_graphs=captured,
            cudagraph_skips=counters["inductor"]["cudagraph_skips"],
        )
