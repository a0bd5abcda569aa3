"""Where the host spends a steady method call: the Python functions that take its time, and its waits.

A method call is host-bound when its Python and kernel launches take longer than its GPU work
(``bench_methods.py``'s host-exposed share). Per method setting of ``bench_methods.py`` (``common.METHOD_SETTINGS``) at one shape
(structured inputs, steady state), ``cProfile`` over ``--calls`` calls: the host milliseconds per call
(under the profiler, which slows Python), the part spent waiting in host reads (``tolist``, ``item``,
event and stream synchronisation), the functions with the most time of their own, and the kernel launches a call
issues (``torch.profiler``'s launch API events, counted outside cProfile). One run prints a
markdown table and writes it to ``$OUT/host_profile.md`` when ``OUT`` is set.

    python benchmarks/profile_host.py [--shape NAME] [--calls N] [--top K]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch
from common import METHOD_SETTINGS, SHAPES, device_header, method_call, print_and_save, structured_qkv

from sparse_compile.methods import METHODS
from sparse_compile.methods.base import SiteCache
from sparse_compile.options import validate_options

WAITS = ("tolist", "item", "synchronize")
"""Names of the functions whose own time is a host read's wait for the GPU."""
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
"""``torch.profiler`` CPU events that each launch one kernel (PyTorch's ops, cuBLAS, Triton and Gluon kernels)."""


def own_times(profile: cProfile.Profile) -> dict[str, float]:
    """Seconds of own time per function, named ``file:line(name)`` (builtins by their name)."""
    stats = pstats.Stats(profile).stats
    return {f"{file.rsplit('/', 1)[-1]}:{line}({name})" if line else name: tottime
            for (file, line, name), (_, _, tottime, _, _) in stats.items()}  # fmt: skip


def launches_per_call(call, calls: int) -> float:
    """Kernel launches per call of ``call`` over ``calls`` calls (:data:`LAUNCH_EVENTS`)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return sum(event.name in LAUNCH_EVENTS for event in prof.events()) / calls


def profile_setting(q, k, v, grid, setting: dict, calls: int) -> tuple[dict[str, float], float]:
    """Own seconds per function over ``calls`` steady calls of the method ``setting`` names, and its launches per
    call."""
    method = METHODS[setting["method"]](validate_options(setting))
    cache = SiteCache()

    def call() -> None:
        method.attend(method_call(q, k, v, grid, cache))

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(calls):
        call()
    profile.disable()
    torch.cuda.synchronize()
    return own_times(profile), launches_per_call(call, calls)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="Wan 480p (H=12, S=32760)")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=6)
    args = parser.parse_args(argv)
    print(device_header())
    heads, grid = SHAPES[args.shape]
    q, k, v = structured_qkv(heads, grid[0] * grid[1] * grid[2])
    rows = [f"{args.shape}, {args.calls} steady calls per setting under cProfile; ms per call.", "",
            "| method | launches | host ms | waiting in reads ms | most own time (ms) |", "|---|---|---|---|---|"]
    for setting in METHOD_SETTINGS:
        times, launches = profile_setting(q, k, v, grid, setting, args.calls)
        per_call = {name: seconds * 1e3 / args.calls for name, seconds in times.items()}
        waits = sum(ms for name, ms in per_call.items() if any(w in name for w in WAITS))
        busy = sorted(((ms, name) for name, ms in per_call.items() if not any(w in name for w in WAITS)), reverse=True)
        top = "; ".join(f"{name} {ms:.3f}" for ms, name in busy[: args.top])
        label = ", ".join(f"{key}={value}" for key, value in setting.items())
        rows.append(f"| {label} | {launches:g} | {sum(per_call.values()):.2f} | {waits:.2f} | {top} |")
        print(rows[-1], flush=True)
    print_and_save("\n".join(rows), "host_profile.md")


if __name__ == "__main__":
    main()
