"""Ahead-of-time compiles of Gluon and Triton kernels for sm_90a on any machine (the ptxas in Triton's wheel),
and their resource usage (cuobjdump), for the kernels' CPU tests."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import triton

TRITON_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
HOPPER_SHARED_BYTES = 232448  # 227 KiB per block


def compile_sm90a(kernel, signature: dict, constants: dict, options: dict, aligned: tuple[str, ...] = ()):
    """``kernel`` (Gluon or Triton) compiled for sm_90a: Triton's compiled-kernel object. ``aligned`` names the
    arguments promised divisible by 16 (pointers and strides, as a launch specialises them)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction

    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source_type = GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource
    source = source_type(kernel, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(compiled, tmp_path: Path) -> dict[str, int]:
    """``REG``, ``STACK`` and ``LOCAL`` of a compiled kernel's cubin (``cuobjdump --dump-resource-usage``)."""
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([str(TRITON_BIN / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout  # fmt: skip
    return {key: int(value) for key, value in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
