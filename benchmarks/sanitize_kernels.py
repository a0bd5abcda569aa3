"""The kernels' GPU tests at small shapes under ``compute-sanitizer --tool memcheck`` (GPU).

Runs pytest under the sanitizer on :data:`SMALL_SHAPE_TESTS`: the hostile-input cases on CUDA
(every method through its Triton kernels: k-means, the cluster permutation, the top-p cluster
selection, the cluster and block-sparse attention kernels, the LSE and block-mass passes, on
identical, zero and extreme fp16 inputs, one-frame and unit-dimension grids, padded text; and
NaN/Inf straight into the kernels) and the kernel tests whose shapes stay at or below about 4k tokens (the 32k-token ones would take
minutes under memcheck). PyTorch's caching allocator is off (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``)
so every tensor is its own allocation and an out-of-bounds access cannot land in a neighbour's
block unseen. Prints the sanitizer's error count (summed over every process it followed) and
pytest's summary line, and with ``OUT`` set writes ``$OUT/sanitizer.md`` and the full log
``$OUT/sanitizer.log``. Exits non-zero on any sanitizer error or failing test. The hostile-input
strategies run ``--examples`` Hypothesis examples each (default 2, fewer than the CPU suite's: memcheck
is slow); ``--timeout`` stops the run (default 230 s). The same tests first run once without the
sanitizer, so Triton's and Inductor's caches are warm and the checked run launches kernels instead of
compiling them (``--no-warm`` skips that pass); Inductor compiles in-process
(``TORCHINDUCTOR_COMPILE_THREADS=1``), so the sanitizer follows no compile workers.

    python benchmarks/sanitize_kernels.py [--examples 2] [--timeout 500]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import REPO_ROOT, print_and_save

SMALL_SHAPE_TESTS = (
    "tests/test_hostile_inputs.py",
    "tests/kernels/test_hostile_kernel_inputs.py",
    "tests/kernels/test_block_sparse.py::test_gpu_bf16_real_size",
    "tests/kernels/test_block_sparse.py::test_gpu_noncontiguous_broadcast_empty_rows",
    "tests/kernels/test_block_sparse.py::test_gpu_dense_layout_equals_sdpa",
    "tests/kernels/test_block_select.py::test_gpu_select_top_p_keeps_the_mass_on_cuda",
    "tests/kernels/test_block_select.py::test_gpu_select_top_p_clusters_matches_torch",
    "tests/kernels/test_kmeans.py::test_gpu_small_blobs_match_reference",
    "tests/kernels/test_varlen_block_sparse.py::test_gpu_fp32_with_large_q_clusters_runs_on_the_default_tile",
)
"""Test files and node ids, of which ``-m gpu`` keeps the CUDA cases; at most 4096 tokens."""
ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) error")
PYTEST_SUMMARY = re.compile(r"\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s")


def find_sanitizer() -> str | None:
    """``compute-sanitizer`` on ``PATH``, else under ``$CUDA_HOME/bin`` or ``/usr/local/cuda*/bin``."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME", ""), *sorted(map(str, Path("/usr/local").glob("cuda*")), reverse=True)]
    for home in filter(None, homes):
        candidate = Path(home) / "bin" / "compute-sanitizer"
        if candidate.is_file():
            return str(candidate)
    return None


def sanitizer_errors(log: str) -> int | None:
    """Errors reported in a sanitizer log (summed over its ``ERROR SUMMARY`` lines), ``None`` if it has none."""
    counts = [int(n) for n in ERROR_SUMMARY.findall(log)]
    return sum(counts) if counts else None


def pytest_summary(log: str) -> str:
    """pytest's last summary line (``N passed ...``), or ``"no pytest summary"``."""
    lines = [line.strip(" =") for line in log.splitlines() if PYTEST_SUMMARY.search(line)]
    return lines[-1] if lines else "no pytest summary"


def _text(output: bytes | str | None) -> str:
    """A subprocess stream as text, whether it came back as bytes, text or nothing."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tool", default="memcheck", choices=["memcheck", "racecheck", "initcheck", "synccheck"])
    parser.add_argument("--timeout", type=float, default=230.0, help="seconds before the run is stopped")
    parser.add_argument("--examples", type=int, default=2,
                        help="Hypothesis examples per hostile-input strategy (the CPU suite runs 8)")
    parser.add_argument("--no-warm", action="store_true", help="skip the unchecked pass that fills the caches")
    parser.add_argument("tests", nargs="*", default=list(SMALL_SHAPE_TESTS), help="pytest node ids to run")
    args = parser.parse_args(argv)
    sanitizer = find_sanitizer()
    if sanitizer is None:
        print("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda*/bin)")
        return 2
    tests = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *args.tests]
    command = [sanitizer, "--tool", args.tool, "--target-processes", "all", "--print-limit", "50", *tests]
    env = {**os.environ, "SPARSE_COMPILE_HOSTILE_EXAMPLES": str(args.examples), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    started = time.monotonic()
    if not args.no_warm:
        try:
            subprocess.run(tests, cwd=REPO_ROOT, env=env, capture_output=True, timeout=args.timeout / 2)
        except subprocess.TimeoutExpired:
            pass  # the checked run still covers what the warm pass did not reach
    remaining = args.timeout - (time.monotonic() - started)
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    try:
        run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=remaining)
        log, returncode = run.stdout + run.stderr, run.returncode
    except subprocess.TimeoutExpired as stopped:
        log = "".join(_text(part) for part in (stopped.stdout, stopped.stderr))
        returncode, log = -1, log + f"\nstopped after {args.timeout:.0f} s\n"
    errors = sanitizer_errors(log)
    table = "\n".join([
        f"| compute-sanitizer --tool {args.tool} | |",
        "|---|---|",
        f"| tests | {len(args.tests)} node ids at <= 4096 tokens, {args.examples} examples per hostile strategy |",
        f"| sanitizer errors | {'no summary (run stopped?)' if errors is None else errors} |",
        f"| pytest | {pytest_summary(log)} |",
        f"| exit code | {returncode} |",
    ])  # fmt: skip
    print_and_save(table, "sanitizer.md")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "sanitizer.log").write_text(log)
    else:
        print(log[-4000:])
    return 0 if errors == 0 and returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
