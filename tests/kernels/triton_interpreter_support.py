"""Kernel tests under Triton's interpreter, which must be chosen before triton is first imported.

A test file marks its interpreter cases with ``interp`` and calls :func:`run_interpreted` from one
ordinary test: that runs the marked cases in a child process started with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interp = pytest.mark.skipif(not INTERPRETED, reason="runs in a child process with TRITON_INTERPRET=1")
REPO_ROOT = Path(__file__).resolve().parents[2]


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error ``|a - b| / |b|`` in fp64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def run_interpreted(test_file: str, selector: str) -> None:
    """Run ``test_file``'s tests matching ``selector`` under the interpreter; all must pass, none skip."""
    if INTERPRETED:
        pytest.skip("this process already interprets Triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selector]
    res = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, res.stdout[-3000:]
