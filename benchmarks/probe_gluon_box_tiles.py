"""Can a K tile of SVG's temporal heads be a 5-D TMA box (``Tb`` frames x ``Pb`` positions of one head) that
Gluon reshapes into a ``[Tb * Pb, D]`` wgmma operand? Then temporal heads need no token permutation.

``--compile-only`` (any machine) compiles the probe for sm_90a with the ptxas in Triton's wheel and
reports the 5-D TMA copy and the wgmma; on an sm_90 GPU it runs ``S = Q K_box^T`` for boxes of a
(B, S, H, D) tensor at Wan 480p's grid (21 x 1560), one of them past the last frame (TMA zero fill),
compares with torch (rel. L2 <= 1e-2, output NaN-poisoned) and exits non-zero on a mismatch.

    python benchmarks/probe_gluon_box_tiles.py [--compile-only]
"""
from __future__ import annotations

import argparse
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


@gluon.jit
def _box_probe(q_desc, k_desc, out_ptr, t0, p0, T_B: gl.constexpr, P_B: gl.constexpr):
    """``out`` fp32 ``(64, T_B * P_B)`` = the first 64 query rows of head (0, 0) times the K box at frame
    ``t0``, position ``p0`` of head (0, 0), both loaded by TMA, the box reshaped to a wgmma operand."""
    ROWS: gl.constexpr = q_desc.block_type.shape[2]
    D: gl.constexpr = q_desc.block_type.shape[3]
    N: gl.constexpr = T_B * P_B
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, k_desc.block_type.shape, k_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    fence_async_shared()
    mbarrier.expect(bar, q_desc.block_type.nbytes + k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [0, 0, 0, 0], bar, q_smem)
    tma.async_copy_global_to_shared(k_desc, [0, 0, t0, p0, 0], bar, k_smem)
    mbarrier.wait(bar, 0)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N, 16])
    q_tile = q_smem.reshape([ROWS, D])
    k_tile = k_smem.reshape([N, D])
    s = warpgroup_mma(q_tile, k_tile.permute((1, 0)), gl.zeros([ROWS, N], gl.float32, layout=s_layout), use_acc=False)
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
    cols = gl.arange(0, N, layout=gl.SliceLayout(0, s_layout))
    gl.store(out_ptr + gl.expand_dims(rows, 1) * N + gl.expand_dims(cols, 0), s)


def descriptor_type(block: list[int], dtype) -> str:
    """The compile signature's type of a bf16 TMA descriptor with ``block`` and the default shared layout."""
    name = {gl.bfloat16: "bf16"}[dtype]
    return f"tensordesc<{name}[{', '.join(map(str, block))}],{gl.NVMMASharedLayout.get_default_for(block, dtype)!r}>"


def compile_only(t_b: int, p_b: int, d: int) -> None:
    """Compile the probe for sm_90a with a ``t_b x p_b`` box and head dim ``d``; print what the PTX holds."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = {"q_desc": descriptor_type([1, 1, 64, d], gl.bfloat16),
                 "k_desc": descriptor_type([1, 1, t_b, p_b, d], gl.bfloat16),
                 "out_ptr": "*fp32", "t0": "i32", "p0": "i32", "T_B": "constexpr", "P_B": "constexpr"}
    kernel = triton.compile(GluonASTSource(_box_probe, signature, {"T_B": t_b, "P_B": p_b}),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = kernel.asm["ptx"]
    print(f"box {t_b}x{p_b}, D={d}: compiled; 5-D TMA: {'cp.async.bulk.tensor.5d' in ptx}; wgmma: {'wgmma.mma_async' in ptx}; "
          f"shared {kernel.metadata.shared} B")


def run(t_b: int, p_b: int, d: int, frames: int, positions: int, heads: int, t0: int, p0: int) -> bool:
    """Run the probe on random (B, S, H, D) bf16 tensors of a ``frames x positions`` grid; print and
    return whether it matches torch (rows past the grid count as zeros)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    seq = frames * positions
    storage = torch.randn(1, seq, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen)  # (B, S, H, D)
    q = storage.transpose(1, 2)  # (B, H, S, D) view, as diffusers passes it
    k = torch.randn(1, seq, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(1, 2)
    k5 = k.unflatten(2, (frames, positions))  # (B, H, T, P, D) view
    q_block, k_block = [1, 1, 64, d], [1, 1, t_b, p_b, d]
    q_desc = TensorDescriptor(q, list(q.shape), list(q.stride()), q_block,
                              gl.NVMMASharedLayout.get_default_for(q_block, gl.bfloat16))
    k_desc = TensorDescriptor(k5, list(k5.shape), list(k5.stride()), k_block,
                              gl.NVMMASharedLayout.get_default_for(k_block, gl.bfloat16))
    out = torch.full((64, t_b * p_b), float("nan"), device="cuda")
    _box_probe[(1,)](q_desc, k_desc, out, t0, p0, T_B=t_b, P_B=p_b, num_warps=4)
    box = torch.zeros(t_b, p_b, d, device="cuda", dtype=torch.bfloat16)
    tt, pp = min(t_b, frames - t0), min(p_b, positions - p0)
    box[:tt, :pp] = k5[0, 0, t0:t0 + tt, p0:p0 + pp]
    expected = q[0, 0, :64].float() @ box.reshape(-1, d).float().T
    err = ((out - expected).norm() / expected.norm()).item()
    print(f"box {t_b}x{p_b} at frame {t0}, position {p0} of {frames}x{positions}: rel. L2 {err:.2e}, NaN {out.isnan().any().item()}")
    return err < 1e-2 and not out.isnan().any().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="compile for sm_90a and report, no GPU needed")
    args = parser.parse_args(argv)
    shapes = [(8, 16, 128), (4, 32, 128), (16, 8, 64)]
    if args.compile_only:
        for shape in shapes:
            try:
                compile_only(*shape)
            except Exception as error:  # report every shape
                print(f"box {shape}: {type(error).__name__}: {str(error)[:400]}")
        return 0
    ok = [run(8, 16, 128, 21, 1560, 12, 0, 0), run(8, 16, 128, 21, 1560, 12, 16, 1552), run(4, 32, 128, 21, 1560, 12, 3, 64)]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
