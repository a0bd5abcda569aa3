"""Helpers shared by the benchmark scripts: timing, error, inputs, driving a method, table output.

Every script in this folder imports from here (never from another script). Importing this module
puts the repository root on ``sys.path``, so ``python benchmarks/<script>.py`` runs from a checkout
without an install.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402

from sparse_compile.methods.base import AttentionCall, SiteCache, StepInfo, TokenLayout  # noqa: E402

# Attention shapes of the method benchmarks: name -> (heads, (frames, height, width) of the video tokens).
SHAPES = {
    "Wan 480p (H=12, S=32760)": (12, (21, 30, 52)),
    "HunyuanVideo 720p (H=24, S=118800)": (24, (33, 45, 80)),
}

METHOD_SETTINGS = [
    {"method": "svg2", "top_p": 0.8},
    {"method": "svg2", "top_p": 0.9},
    {"method": "svg2", "top_p": 0.95},
    {"method": "svg", "density": 0.25},
    {"method": "svg", "density": 0.125},
    {"method": "radial"},
    {"method": "adaspa", "density": 0.25},
    {"method": "adaspa", "density": 0.125},
    {"method": "auto"},
]
"""The method settings the method benchmarks run, each the options of one ``validate_options`` call."""


# --------------------------------------------------------------------------------------------
# Timing (GPU)


def bench_ms(fn: Callable[[], object], rep_ms: float = 100.0, warmup_ms: float = 25.0) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (L2 flushed between reps)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def graph_replay_ms(fn: Callable[[], object]) -> float:
    """GPU time of ``fn`` without its Python launch cost: median ms (``do_bench``) of a CUDA-graph replay
    of one call, captured after one eager warm-up call. Raises if the call cannot be captured (a host sync)."""
    import triton.testing

    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, return_mode="median")


def warm_call_kernels(call: Callable[[], object], reps: int = 10) -> list:
    """The GPU kernels (``torch.profiler`` device events) of ``reps`` calls of ``call`` after 3 warm-up calls."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_ms(call: Callable[[], object], reps: int = 10) -> float:
    """Milliseconds of GPU kernels per warm call of ``call``, summed: its GPU time on one stream without the
    gaps where the GPU waits for the host (a call's time minus this is the host cost it exposes)."""
    return sum(e.device_time for e in warm_call_kernels(call, reps)) / reps / 1000


def profile_once(call: Callable[[], object], label: str, warmup: int = 3) -> None:
    """``warmup`` calls of ``call``, then one between ``torch.cuda.profiler.start()`` and ``stop()``: what
    Nsight Compute reads with ``--profile-from-start off``."""
    for _ in range(warmup):
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled one call: {label}")


def device_header() -> str:
    """``torch X, triton Y, GPU NAME``: the versions and device a table was measured with."""
    import triton

    return f"torch {torch.__version__}, triton {triton.__version__}, GPU {torch.cuda.get_device_name()}"


# --------------------------------------------------------------------------------------------
# Error


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error ``|got - want| / |want|`` over all elements, computed in float64."""
    return float((got.double() - want.double()).norm() / want.double().norm())


# --------------------------------------------------------------------------------------------
# Inputs


def token_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, S, D)`` copied into ``(B, S, H, D)`` storage, viewed back as ``(B, H, S, D)``
    (the layout diffusers hands to attention)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def structured_qkv(heads: int, seq: int, dim: int = 128, centres: int = 48, seed: int = 0):
    """q, k, v ``(1, heads, seq, dim)`` bf16 on CUDA with queries and keys near shared per-head centres
    (semantic clusters without spatial or temporal locality; v is plain noise)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    basis = torch.randn(1, heads, centres, dim, device="cuda", generator=g) * 1.5
    q_assign = torch.randint(0, centres, (1, heads, seq), device="cuda", generator=g)
    k_assign = torch.randint(0, centres, (1, heads, seq), device="cuda", generator=g)

    def near_centres(assign: torch.Tensor) -> torch.Tensor:
        return torch.gather(basis, 2, assign.unsqueeze(-1).expand(-1, -1, -1, dim))

    q = near_centres(q_assign) + 0.5 * torch.randn(1, heads, seq, dim, device="cuda", generator=g)
    k = near_centres(k_assign) + 0.5 * torch.randn(1, heads, seq, dim, device="cuda", generator=g)
    v = torch.randn(1, heads, seq, dim, device="cuda", generator=g)
    return q.bfloat16(), k.bfloat16(), v.bfloat16()


# --------------------------------------------------------------------------------------------
# Driving a method directly


def method_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int, int],
    cache: SiteCache,
    *,
    step: int = 1,
    scale: float | None = None,
    module_path: str = "bench",
    layer: int = 0,
) -> AttentionCall:
    """The :class:`AttentionCall` a method receives for text-free ``(B, H, S, D)`` q/k/v over the
    video token ``grid`` ``(frames, height, width)``, at ``step`` (branch 0), with ``cache`` as the
    site's cache. The one place the benchmarks build a call."""
    layout = TokenLayout(*grid, text_tokens=0, text_first=False)
    return AttentionCall(query=q, key=k, value=v, attn_mask=None, scale=scale, layout=layout,
                         step=StepInfo(step=step, branch=0, generation=0), site_name=module_path, layer=layer,
                         cache=cache)


# --------------------------------------------------------------------------------------------
# Output


def print_and_save(text: str, filename: str) -> None:
    """Print a result table and, when the ``OUT`` environment variable names a folder, write it to
    ``$OUT/filename`` (ending in one newline)."""
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], filename), "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")


# --------------------------------------------------------------------------------------------
# The toy model's benchmarks

TOY_PATCH = 2  # pixels per token along height and width of the toy model


def add_toy_io_arguments(parser, outputs: str) -> None:
    """``--weights`` (toy model weights) and ``--out`` (a folder for ``outputs``) of a toy-model benchmark."""
    from pathlib import Path

    from sparse_compile.toy.model import WEIGHTS

    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="toy model weights (.safetensors)")
    parser.add_argument("--out", type=Path, help=f"folder for {outputs}")


def check_toy_io_arguments(parser, args) -> None:
    """Exit through ``parser.error`` when ``--weights`` is missing or ``--out`` is not a folder."""
    if not args.weights.exists():
        parser.error(f"--weights: no such file {args.weights}")
    if args.out is not None and not args.out.is_dir():
        parser.error(f"--out: folder {args.out} does not exist")


def add_toy_arguments(parser, outputs: str) -> None:
    """:func:`add_toy_io_arguments`, the clip size (default: the largest grid, 16 frames of 64x96 px),
    ``--seed`` and ``--tiny`` of a toy-model benchmark."""
    add_toy_io_arguments(parser, outputs)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--height", type=int, default=64, help=f"pixels, a multiple of {TOY_PATCH}")
    parser.add_argument("--width", type=int, default=96, help=f"pixels, a multiple of {TOY_PATCH}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="small blocks and cluster counts (CPU smoke sizes)")


def check_toy_arguments(parser, args) -> None:
    """Exit through ``parser.error`` naming the option when an :func:`add_toy_arguments` value is unusable."""
    if args.height % TOY_PATCH or args.width % TOY_PATCH:
        parser.error(f"--height and --width must be multiples of {TOY_PATCH}, got {args.height}x{args.width}")
    if args.frames < 1:
        parser.error(f"--frames must be at least 1, got {args.frames}")
    check_toy_io_arguments(parser, args)


def write_toy_table(out, name: str, text: str, header: str, weights, rows: list[dict]) -> None:
    """Print ``text`` (a markdown table under ``header``) and :func:`save_toy_table` it."""
    print(text)
    save_toy_table(out, name, text, header, weights, rows)


def save_toy_table(out, name: str, text: str, header: str, weights, rows: list[dict]) -> None:
    """When ``out`` is a folder, write ``text`` as ``name.md`` and ``{header, weights, rows}`` as ``name.json``
    there (replacing what an earlier call wrote)."""
    import json

    if out is not None:
        (out / f"{name}.md").write_text(text + "\n")
        (out / f"{name}.json").write_text(json.dumps({"header": header, "weights": str(weights), "rows": rows}, indent=1))
