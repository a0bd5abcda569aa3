"""Ahead-of-time compiles of Gluon and Triton kernels for sm_90a on any machine (the ptxas in Triton's
wheel), their resource usage and their main loop's instruction mix (cuobjdump), for the kernels' CPU tests."""

from __future__ import annotations

import re
import subprocess
from collections import Counter
from pathlib import Path

import triton

TRITON_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
HOPPER_SHARED_BYTES = 232448  # 227 KiB per block


def compile_sm90a(kernel, signature: dict, constants: dict, options: dict, aligned: tuple[str, ...] = ()):
    """``kernel`` (a Gluon or Triton JIT function) compiled for sm_90a: Triton's compiled-kernel object.
    ``aligned`` names the arguments promised divisible by 16 (pointers and strides, as a launch
    specialises them)."""
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


def _loops(compiled, tmp_path: Path) -> list[list[str]]:
    """The instructions of each loop (a backward branch and the code it jumps back over) of a compiled kernel's
    SASS (``cuobjdump -sass``)."""
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    sass = subprocess.run([str(TRITON_BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip
    code = [(int(at, 16), text.strip()) for at, text in re.findall(r"/\*([0-9a-f]{4,6})\*/\s+([^;]*);", sass)]
    loops = []
    for at, text in code:
        branch = re.search(r"\bBRA\s+`?\(?0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < at:
            loops.append([t for a, t in code if int(branch.group(1), 16) <= a <= at])
    return loops


def opcode_mix(instructions: list[str]) -> Counter:
    """Opcode counts of SASS instructions (a predicated one under its opcode)."""
    return Counter(re.match(r"(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", t).group(1) for t in instructions)


def attention_loop(compiled, tmp_path: Path) -> list[str]:
    """The instructions of the shortest loop of a compiled attention kernel's SASS that issues both a ``wgmma``
    (HGMMA, QGMMA or IGMMA) and a tile's exponentials (at least 32 MUFU per thread, which no epilogue has): one
    trip of a consumer's main loop, i.e. its instructions per kept tile."""
    def is_attention(ops: Counter) -> bool:
        return bool(ops["HGMMA"] + ops["QGMMA"] + ops["IGMMA"]) and ops["MUFU"] >= 32

    loops = [body for body in _loops(compiled, tmp_path) if is_attention(opcode_mix(body))]
    if not loops:
        raise AssertionError("no loop issuing a wgmma and exponentials in the kernel's SASS")
    return min(loops, key=len)


def attention_loop_mix(compiled, tmp_path: Path) -> Counter:
    """Opcode counts of :func:`attention_loop`."""
    return opcode_mix(attention_loop(compiled, tmp_path))


def gather_loop(compiled, tmp_path: Path) -> list[str]:
    """The instructions of the shortest loop of a compiled kernel's SASS issuing at least 8 ``cp.async`` copies
    (LDGSTS): one trip of a gathering producer's loop, i.e. its instructions per kv tile."""
    loops = [body for body in _loops(compiled, tmp_path) if opcode_mix(body)["LDGSTS"] >= 8]
    if not loops:
        raise AssertionError("no loop issuing cp.async copies in the kernel's SASS")
    return min(loops, key=len)
