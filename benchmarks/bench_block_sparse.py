"""Block-sparse attention on the GPU: correctness on the benchmark shapes, then timings.

One run: for each video-DiT shape (bf16, D=128) and kept density, one random layout of 128x128 blocks
(random blocks per (head, q block) plus the diagonal) shared by every kernel:

- checks the kernel (NaN-poisoned outputs, sampled q blocks vs the fp32 reference, LSE too, and the
  whole output vs flex_attention at the same mask);
- times with ``triton.testing.do_bench`` (median): dense SDPA cuDNN and flash, ``torch.compile``d
  flex_attention with the same BlockMask (``BlockMask.from_kv_blocks``, kept blocks as full blocks),
  the Triton kernel (autotuned; TMA and plain-pointer K/V loads; q/k/v also as transposed (B,S,H,D)),
  and on sm_90 the Gluon kernel (q/k/v contiguous and as transposed (B,S,H,D)), which the op runs there;
- the cost of folded token permutations (``q_perm`` = ``kv_perm``, the same mask, q/k/v as
  (B,S,H,D).T, O token-major): identity permutations (the gathered-load code path alone), SVG's
  temporal order of the shape's grid on every head, and random permutations (no locality left);
  each checked first against the kernel on gathered inputs, scattered back, for the Triton kernel and
  on sm_90 the Gluon way (``PERMUTED_KERNELS``: copies of K/V only, Q gathered and O/LSE scattered in the TMA
  kernel). Compare with the "(B,S,H,D).T" rows, the same inputs without
  permutations;
- the FP8 (e4m3) kernels (``FP8_KERNELS``: the Triton kernel :func:`block_sparse_attention_fp8_triton` and the
  sm_90 Gluon kernel :func:`block_sparse_attention_fp8_gluon`, quantisation included in their times, and
  the quantisation alone, ``QUANTISATION_ROW``) in a
  second table: ms, the time over the bf16 Triton kernel's (the faster of TMA and pointer K/V loads) and
  over the bf16 Gluon kernel's at the same layout, and the rel L2 against the bf16 result at the same mask
  (flex; dense SDPA at density 1). The inputs are zero-mean Gaussian, fp8's worst case (about 5e-2; see
  ``tests/kernels/test_block_sparse_fp8.py``); the check only catches a broken kernel (NaN poison,
  rel L2 <= 0.1). A kernel that fails its check or timing gets a row with the error.

Prints versions, the GPU and a markdown table; writes it to ``$OUT/block_sparse.md`` when OUT is set.

    python benchmarks/bench_block_sparse.py [--shapes wan,hunyuan] [--densities 1,0.25,0.125,0.05] [--sweep]

``--profile-one KERNEL`` runs only one call of ``KERNEL`` (``PROFILED_KERNELS``) at the first shape and
density, inside ``torch.cuda.profiler`` start/stop, for Nsight Compute::

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section WarpStateStats \
        python benchmarks/bench_block_sparse.py --shapes wan --densities 0.05 --profile-one gluon_fp8

(from the repository root; ``--sweep`` also times every autotune candidate at the first shape, plain and
permuted).
"""

import argparse
import inspect
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from common import bench_ms, profile_once, rel_l2
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from sparse_compile.kernels.block_sparse import (
    block_sparse_attention_gluon,
    block_sparse_attention_gluon_on_kv_copies,
    block_sparse_attention_triton,
    kernel_choice,
    tma_eligible,
)
from sparse_compile.kernels.block_sparse_fp8 import block_sparse_attention_fp8_gluon, block_sparse_attention_fp8_triton
from sparse_compile.kernels.block_sparse_reference import reference_q_blocks
from sparse_compile.kernels.common import cdiv
from sparse_compile.kernels.fp8_quant import quantize_attention_inputs
from sparse_compile.kernels.gluon_block_sparse_fp8 import V_KEY_MULTIPLE
from sparse_compile.kernels.tile_configs import AUTOTUNE_TILES
from sparse_compile.methods.svg_patterns import temporal_permutation

BLOCK = 128


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    heads: int
    grid: tuple[int, int, int]  # frames x height x width of the video tokens
    head_dim: int = 128

    @property
    def seq(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


SHAPES = {
    "wan": Shape("Wan2.1-1.3B 480p (H=12, S=32760)", 1, 12, (21, 30, 52)),
    "hunyuan": Shape("HunyuanVideo 720p (H=24, S=118800)", 1, 24, (33, 45, 80)),
}


@dataclass
class Row:
    shape: str
    density: float
    kernel: str
    ms: float | None
    dense_flops: float
    cudnn_ms: float | None = None
    flex_ms: float | None = None
    error: str | None = None

    def cells(self) -> list[str]:
        if self.error is not None or self.ms is None:
            return [self.shape, f"{self.density:.4f}", self.kernel, "-", "-", "-", f"failed: {self.error}"]
        tflops = self.dense_flops / (self.ms * 1e-3) / 1e12
        vs_cudnn = f"{self.ms / (self.cudnn_ms * self.density):.2f}" if self.cudnn_ms else "-"
        vs_flex = f"{self.flex_ms / self.ms:.2f}x" if self.flex_ms else "-"
        return [self.shape, f"{self.density:.4f}", self.kernel, f"{self.ms:.3f}", f"{tflops:.0f}", vs_cudnn, vs_flex]


HEADER = ["shape", "kept density", "kernel", "ms", "dense-equiv TFLOP/s", "t / (cuDNN-dense x density)", "flex / t"]


def markdown(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


FP8_KERNELS = {"FP8": block_sparse_attention_fp8_triton, "FP8 Gluon": block_sparse_attention_fp8_gluon}
"""The FP8 entries the second table times, by row name (each quantises its inputs inside the call)."""
QUANTISATION_ROW = "quantisation alone"
"""The second table's row timing :func:`quantize_attention_inputs` by itself (the Gluon kernel's V padding)."""


@dataclass
class Fp8Row:
    shape: str
    density: float
    kernel: str
    ms: float | None
    triton_ms: float | None
    gluon_ms: float | None
    rel_l2_bf16: float | None
    error: str | None = None

    def cells(self) -> list[str]:
        head = [self.shape, f"{self.density:.4f}", self.kernel]
        if self.error is not None or self.ms is None:
            return head + ["-", "-", "-", f"failed: {self.error}"]
        ratio = lambda ref: f"{self.ms / ref:.2f}" if ref else "-"  # noqa: E731
        err = "-" if self.rel_l2_bf16 is None else f"{self.rel_l2_bf16:.1e}"
        return head + [f"{self.ms:.3f}", ratio(self.triton_ms), ratio(self.gluon_ms), err]


FP8_HEADER = ["shape", "kept density", "kernel", "ms", "/ bf16 Triton", "/ bf16 Gluon", "rel L2 vs bf16 (same mask)"]


def markdown_fp8(rows: list[Fp8Row]) -> str:
    lines = ["| " + " | ".join(FP8_HEADER) + " |", "|" + "---|" * len(FP8_HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines)


def random_layout(
    heads: int, nq: int, nk: int, density: float, gen: torch.Generator, device: str = "cuda"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (head, q block): the diagonal block plus random others, ``round(density * NK)`` in all.

    Returns counts int32 (1, H, NQ) and indices int32 (1, H, NQ, NK): kept ids ascending first, then
    the dropped ids (valid block ids, so flex's BlockMask accepts the same tensor).
    """
    keep_n = max(1, round(density * nk))
    scores = torch.rand(heads, nq, nk, generator=gen, device=device)
    diag = torch.arange(nq, device=device) * nk // nq
    scores[:, torch.arange(nq, device=device), diag] = 2.0
    kept = torch.zeros(heads, nq, nk, dtype=torch.bool, device=device)
    kept.scatter_(-1, scores.topk(keep_n, dim=-1).indices, True)
    ids = torch.arange(nk, device=device)
    indices = (torch.sort(torch.where(kept, ids, nk + ids), dim=-1).values % nk).to(torch.int32)
    counts = torch.full((1, heads, nq), keep_n, dtype=torch.int32, device=device)
    return counts, indices.unsqueeze(0)


def flex_block_mask(counts: torch.Tensor, indices: torch.Tensor, seq: int) -> BlockMask:
    """The same layout as a flex BlockMask: every kept block a full block, so the compiled kernel never
    evaluates the mask_mod; the mask_mod (a block-table lookup) keeps the mask honest for eager flex."""
    nk = indices.shape[-1]
    valid = torch.arange(nk, device=indices.device) < counts.unsqueeze(-1)
    table = torch.zeros(indices.shape, dtype=torch.bool, device=indices.device)
    table.scatter_(-1, indices.long(), valid)  # (1, H, NQ, NK) kept blocks

    def keep(b, h, q_idx, kv_idx):
        return table[0, h, q_idx // BLOCK, kv_idx // BLOCK]

    kwargs = dict(full_kv_num_blocks=counts, full_kv_indices=indices, BLOCK_SIZE=BLOCK, mask_mod=keep)
    kwargs["seq_lengths"] = (seq, seq)
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # forward only: skip the transposed (backward) index
    return BlockMask.from_kv_blocks(torch.zeros_like(counts), indices, **kwargs)


def check_kernel(q, k, v, counts, indices, kernel=block_sparse_attention_triton, **kw) -> torch.Tensor:
    """Run ``kernel`` (the Triton or Gluon entry, ``kw`` passed on) into NaN-poisoned buffers; compare
    sampled q blocks (first, middle, last) with the reference."""
    b, h, s, d = q.shape
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    lse = torch.full((b, h, s), float("nan"), dtype=torch.float32, device=q.device)
    kernel(q, k, v, counts, indices, block_q=BLOCK, block_k=BLOCK, out=out, lse_out=lse, **kw)
    assert not out.isnan().any() and not lse.isnan().any(), "outputs left unwritten (NaN poison) or NaN"
    nq = cdiv(s, BLOCK)
    picks = [0, nq // 2, nq - 1]
    ref_out, ref_lse = reference_q_blocks(q, k, v, counts, indices, picks, block_q=BLOCK, block_k=BLOCK)
    rows = torch.cat([torch.arange(p * BLOCK, min((p + 1) * BLOCK, s), device=q.device) for p in picks])
    err = rel_l2(out[:, :, rows], ref_out)
    lse_err = (lse[:, :, rows] - ref_lse).abs().max().item()
    assert err <= 1e-2 and lse_err <= 2e-3, f"kernel mismatch: rel-L2 {err:.2e}, LSE max err {lse_err:.2e}"
    return out


def permutations(shape: Shape, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """int32 ``(1, H, S)`` token permutations to fold into the kernel: identity, SVG's temporal order, random."""
    h, s = shape.heads, shape.seq
    identity = torch.arange(s, dtype=torch.int32, device="cuda")
    temporal = temporal_permutation(*shape.grid, torch.device("cuda"))
    random = torch.rand(h, s, generator=gen, device="cuda").argsort(-1).to(torch.int32)
    return {
        "identity": identity.expand(1, h, s),
        "SVG temporal order": temporal.expand(1, h, s),
        "random": random.unsqueeze(0),
    }


PERMUTED_KERNELS = {
    "triton": block_sparse_attention_triton,
    "Gluon on K/V copies": block_sparse_attention_gluon_on_kv_copies,
}
"""The ways to run a permuted call: Triton's folded gathers, and K/V gathered into kernel-order copies for the
TMA Gluon kernel, which gathers Q and scatters O/LSE itself (the op's way on sm_90)."""


def check_permuted(q, k, v, counts, indices, perm: torch.Tensor, kernel: str = "triton") -> None:
    """A permuted call of ``PERMUTED_KERNELS[kernel]`` into NaN-poisoned token-major buffers == the Triton kernel
    on gathered inputs, scattered back."""
    b, h, s, d = q.shape
    out = torch.full((b, s, h, d), float("nan"), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.full((b, h, s), float("nan"), dtype=torch.float32, device=q.device)
    PERMUTED_KERNELS[kernel](q, k, v, counts, indices, q_perm=perm, kv_perm=perm, block_q=BLOCK, block_k=BLOCK,
                             out=out, lse_out=lse)  # fmt: skip
    assert not out.isnan().any() and not lse.isnan().any(), "outputs left unwritten (NaN poison) or NaN"
    index = perm.long().expand(b, h, s)
    rows = index.unsqueeze(-1).expand(b, h, s, d)
    gathered_out, gathered_lse = block_sparse_attention_triton(
        *(torch.gather(t, 2, rows) for t in (q, k, v)), counts, indices, block_q=BLOCK, block_k=BLOCK,
        return_lse=True,
    )  # fmt: skip
    err = rel_l2(out.gather(2, rows), gathered_out)
    lse_err = (lse.gather(2, index) - gathered_lse).abs().max().item()
    # the two calls may run different tiles (another summation order): the bf16 bound, not bit equality
    assert err <= 1e-2 and lse_err <= 1e-3, f"folded != gathered: rel-L2 {err:.2e}, LSE max err {lse_err:.2e}"


def run_shape(
    shape: Shape, densities: list[float], sweep: bool, rows: list[Row], fp8_rows: list[Fp8Row], log
) -> None:
    b, h, s, d = shape.batch, shape.heads, shape.seq, shape.head_dim
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    bshd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]  # diffusers' layout
    flops = 4.0 * s * s * d * h * b
    nq = nk = cdiv(s, BLOCK)
    budget = 300.0 if s < 60000 else 1500.0
    flex = torch.compile(flex_attention, dynamic=False)
    perms = permutations(shape, gen)
    gluon = kernel_choice(q, k, v, BLOCK, BLOCK, False) == "gluon"
    log(f"== {shape.name}: TMA eligible {tma_eligible(k, v)}; the op runs the {'Gluon' if gluon else 'Triton'} kernel")

    def timed(kernel: str, density: float, fn, error: str | None = None, **ref) -> float | None:
        """Time ``fn`` into a row; a failure (or a given ``error``, ``fn`` then unused) gets a row with the error."""
        if error is not None:
            rows.append(Row(shape.name, density, kernel, None, flops, error=error, **ref))
            return None
        try:
            ms = bench_ms(fn, rep_ms=budget, warmup_ms=max(25.0, budget / 8))
        except Exception as e:  # one failing kernel must not lose the rest of the run
            log(f"   {kernel}: FAILED\n{traceback.format_exc(limit=3)}")
            rows.append(Row(shape.name, density, kernel, None, flops, error=short_error(e), **ref))
            return None
        rows.append(Row(shape.name, density, kernel, ms, flops, **ref))
        log(f"   {kernel:34s} density {density:.4f}: {ms:9.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s")
        return ms

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_ms = timed("SDPA cuDNN (dense)", 1.0, lambda: F.scaled_dot_product_attention(q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        timed("SDPA flash (dense)", 1.0, lambda: F.scaled_dot_product_attention(q, k, v), cudnn_ms=cudnn_ms)

    for density in densities:
        counts, indices = random_layout(h, nq, nk, density, gen)
        real_density = counts[0, 0, 0].item() / nk
        t0 = time.time()
        mask = flex_block_mask(counts, indices, s)
        flex_out = flex(q, k, v, block_mask=mask)
        log(f"-- density {real_density:.4f}: flex mask + first call {time.time() - t0:.1f} s")
        flex_ms = timed("flex_attention (compiled)", real_density, lambda: flex(q, k, v, block_mask=mask), cudnn_ms=cudnn_ms)
        ref = dict(cudnn_ms=cudnn_ms, flex_ms=flex_ms)
        gluon_ms = time_gluon(q, k, v, bshd, counts, indices, flex_out, real_density, timed, ref, log) if gluon else None
        triton_ms: list[float] = []
        for use_tma in (True, False):
            name = f"block_sparse ({'TMA' if use_tma else 'pointer'} K/V, autotuned)"
            try:
                out = check_kernel(q, k, v, counts, indices, use_tma=use_tma)
                flex_err = rel_l2(out, flex_out)
                assert flex_err <= 1e-2, f"kernel and flex disagree at the same mask: rel-L2 {flex_err:.2e}"
            except Exception:  # report, skip timing this variant, keep the run going
                log(f"   CHECK FAILED ({name}):\n{traceback.format_exc(limit=4)}")
                continue
            log(f"   check ok ({name}); rel-L2 vs flex {flex_err:.1e}")
            fn = lambda: block_sparse_attention_triton(q, k, v, counts, indices, block_q=BLOCK, block_k=BLOCK, use_tma=use_tma)
            ms = timed(name, real_density, fn, **ref)
            triton_ms += [] if ms is None else [ms]
        for fp8_kernel in FP8_KERNELS:
            fp8_ms, fp8_err, error = time_fp8(fp8_kernel, q, k, v, counts, indices, flex_out, real_density, timed, ref, log)
            fp8_rows.append(Fp8Row(shape.name, real_density, fp8_kernel, fp8_ms, min(triton_ms, default=None),
                                   gluon_ms, fp8_err, error))  # fmt: skip
        quantise = lambda: quantize_attention_inputs(q, k, v, BLOCK, BLOCK, v_key_multiple=V_KEY_MULTIPLE)  # noqa: E731
        quant_ms = timed("FP8 quantisation alone (Q, K, V, LSE shift)", real_density, quantise, **ref)
        fp8_rows.append(Fp8Row(shape.name, real_density, QUANTISATION_ROW, quant_ms, min(triton_ms, default=None),
                               gluon_ms, None, None if quant_ms is not None else "timing failed (see the log)"))
        fn_bshd = lambda: block_sparse_attention_triton(*bshd, counts, indices, block_q=BLOCK, block_k=BLOCK)
        timed("block_sparse (q/k/v as (B,S,H,D).T)", real_density, fn_bshd, **ref)
        for perm_name, perm in perms.items():
            name = f"block_sparse ((B,S,H,D).T, {perm_name} perms)"
            try:
                check_permuted(*bshd, counts, indices, perm)
            except Exception:  # report, skip timing this variant, keep the run going
                log(f"   CHECK FAILED ({name}):\n{traceback.format_exc(limit=4)}")
                continue
            fn_perm = lambda: block_sparse_attention_triton(
                *bshd, counts, indices, block_q=BLOCK, block_k=BLOCK, q_perm=perm, kv_perm=perm
            )
            timed(name, real_density, fn_perm, **ref)
            if gluon:
                for kernel in (name for name in PERMUTED_KERNELS if name != "triton"):
                    time_gluon_permuted(kernel, bshd, counts, indices, perm, perm_name, real_density, timed, ref, log)
        if sweep and density == densities[min(1, len(densities) - 1)]:
            sweep_tiles(q, k, v, counts, indices, real_density, timed, ref)
            sweep_tiles_permuted(bshd, counts, indices, perms["SVG temporal order"], real_density, timed, ref)


def time_fp8(
    kernel: str, q, k, v, counts, indices, flex_out, density, timed, ref, log
) -> tuple[float | None, float | None, str | None]:
    """Check the FP8 entry ``FP8_KERNELS[kernel]`` (NaN-poisoned buffers, rel L2 vs the bf16 flex output
    <= 0.1), then time it; ``(ms, rel L2, None)``, or with the check's or timing's error last."""
    fn = FP8_KERNELS[kernel]
    name = f"block_sparse {kernel} e4m3 (quantisation included)"
    b, h, s, _ = q.shape
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    lse = torch.full((b, h, s), float("nan"), dtype=torch.float32, device=q.device)
    try:
        fn(q, k, v, counts, indices, block_q=BLOCK, block_k=BLOCK, out=out, lse_out=lse)
        assert not out.isnan().any() and not lse.isnan().any(), "outputs left unwritten (NaN poison) or NaN"
        err = rel_l2(out, flex_out)
        assert err <= 0.1, f"FP8 kernel far from bf16 at the same mask: rel-L2 {err:.2e}"
    except Exception as e:  # report, skip timing it, keep the run going
        log(f"   CHECK FAILED ({name}):\n{traceback.format_exc(limit=4)}")
        return None, None, short_error(e)
    log(f"   check ok ({name}); rel-L2 vs bf16 flex {err:.1e}")
    ms = timed(name, density, lambda: fn(q, k, v, counts, indices, block_q=BLOCK, block_k=BLOCK), **ref)
    return ms, err, None if ms is not None else "timing failed (see the log)"


def short_error(e: BaseException, limit: int = 160) -> str:
    """``e``'s type and the first line of its message, at most ``limit`` characters, fit for a table cell."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}".replace("|", "/")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def time_gluon(q, k, v, bshd, counts, indices, flex_out, density, timed, ref, log) -> float | None:
    """Check the Gluon kernel (poisoned buffers vs the reference, and vs flex), then time it on contiguous
    and on (B,S,H,D).T inputs; the ms on contiguous inputs, or ``None`` when the check or timing failed."""
    name = "block_sparse Gluon (sm_90)"
    try:
        out = check_kernel(q, k, v, counts, indices, kernel=block_sparse_attention_gluon)
        flex_err = rel_l2(out, flex_out)
        assert flex_err <= 1e-2, f"kernel and flex disagree at the same mask: rel-L2 {flex_err:.2e}"
    except Exception:  # report, skip timing it, keep the run going
        log(f"   CHECK FAILED ({name}):\n{traceback.format_exc(limit=4)}")
        return None
    log(f"   check ok ({name}); rel-L2 vs flex {flex_err:.1e}")
    times = []
    for label, inputs in ((name, (q, k, v)), (f"{name}, (B,S,H,D).T", bshd)):
        fn = lambda: block_sparse_attention_gluon(*inputs, counts, indices, block_q=BLOCK, block_k=BLOCK)
        times.append(timed(label, density, fn, **ref))
    return times[0]


def time_gluon_permuted(kernel, bshd, counts, indices, perm, perm_name, density, timed, ref, log) -> None:
    """Check a Gluon way of ``PERMUTED_KERNELS`` on one permutation (poisoned buffers vs gather + Triton), then time it;
    a failed check gets a row with its error."""
    name = f"block_sparse {kernel} ((B,S,H,D).T, {perm_name} perms)"
    try:
        check_permuted(*bshd, counts, indices, perm, kernel)
    except Exception as e:  # report it in the row, skip timing it, keep the run going
        log(f"   CHECK FAILED ({name}):\n{traceback.format_exc(limit=4)}")
        timed(name, density, None, error=f"check: {short_error(e)}", **ref)
        return
    fn = lambda: PERMUTED_KERNELS[kernel](*bshd, counts, indices, q_perm=perm, kv_perm=perm, block_q=BLOCK,
                                          block_k=BLOCK)  # fmt: skip
    timed(name, density, fn, **ref)


def sweep_tiles(q, k, v, counts, indices, density, timed, ref) -> None:
    """Time every autotune candidate with TMA on and off (what the autotuner chooses between)."""
    for tile in AUTOTUNE_TILES:
        for use_tma in (True, False):
            name = f"  tile {tile.block_m}x{tile.block_n} w{tile.num_warps} s{tile.num_stages} {'TMA' if use_tma else 'ptr'}"
            fn = lambda: block_sparse_attention_triton(
                q, k, v, counts, indices, block_q=BLOCK, block_k=BLOCK, tile=tile, use_tma=use_tma
            )
            timed(name, density, fn, **ref)


def sweep_tiles_permuted(bshd, counts, indices, perm, density, timed, ref) -> None:
    """Time every autotune candidate of the permuted variant (pointer gathers; 128x128 spills 8 bytes a tile)."""
    for tile in AUTOTUNE_TILES:
        name = f"  tile {tile.block_m}x{tile.block_n} w{tile.num_warps} s{tile.num_stages} permuted"
        fn = lambda: block_sparse_attention_triton(
            *bshd, counts, indices, block_q=BLOCK, block_k=BLOCK, q_perm=perm, kv_perm=perm, tile=tile
        )
        timed(name, density, fn, **ref)


PROFILED_KERNELS = ("gluon", "gluon_fp8", "gluon_kv_copies", "triton")


def profiled_call(kernel: str, shape: Shape, density: float) -> Callable[[], object]:
    """One of ``PROFILED_KERNELS`` on this script's inputs at ``shape`` and ``density`` (q/k/v as (B,S,H,D).T;
    ``gluon_kv_copies`` with SVG's temporal order on q and k/v)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(shape.batch, shape.seq, shape.heads, shape.head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=gen).transpose(1, 2) for _ in range(3))  # fmt: skip
    n = cdiv(shape.seq, BLOCK)
    counts, indices = random_layout(shape.heads, n, n, density, gen)
    blocks = dict(block_q=BLOCK, block_k=BLOCK)
    if kernel == "gluon_kv_copies":
        perm = permutations(shape, gen)["SVG temporal order"]
        return lambda: block_sparse_attention_gluon_on_kv_copies(q, k, v, counts, indices, q_perm=perm, kv_perm=perm,
                                                                 **blocks)  # fmt: skip
    entry = {"gluon": block_sparse_attention_gluon, "gluon_fp8": block_sparse_attention_fp8_gluon,
             "triton": block_sparse_attention_triton}[kernel]  # fmt: skip
    return lambda: entry(q, k, v, counts, indices, **blocks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="wan,hunyuan")
    parser.add_argument("--densities", default="1.0,0.25,0.125,0.05")
    parser.add_argument("--sweep", action="store_true", help="also time each autotune candidate (first shape)")
    parser.add_argument("--profile-one", choices=PROFILED_KERNELS,
                        help="instead of the benchmark, one call of this kernel at the first shape and density, "
                             "for ncu --profile-from-start off")
    args = parser.parse_args(argv)
    densities = [float(x) for x in args.densities.split(",")]
    if args.profile_one:
        shape = SHAPES[args.shapes.split(",")[0]]
        profile_once(profiled_call(args.profile_one, shape, densities[0]),
                     f"{args.profile_one}, {shape.name}, kept density {densities[0]}")
        return
    out_dir = os.environ.get("OUT")
    log_lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_lines.append(msg)

    header = (
        f"torch {torch.__version__}, triton {triton.__version__}, GPU {torch.cuda.get_device_name()}, "
        f"python {sys.version.split()[0]}"
    )
    log(header)
    rows: list[Row] = []
    fp8_rows: list[Fp8Row] = []
    for i, key in enumerate(args.shapes.split(",")):
        run_shape(SHAPES[key], densities, args.sweep and i == 0, rows, fp8_rows, log)
        table = f"{markdown(rows)}\n\n{markdown_fp8(fp8_rows)}"
        if out_dir:
            with open(os.path.join(out_dir, "block_sparse.md"), "w") as f:
                f.write(f"{header}\n\n`{' '.join(sys.argv)}`\n\n{table}\n")
            with open(os.path.join(out_dir, "block_sparse.log"), "w") as f:
                f.write("\n".join(log_lines) + "\n")
    print()
    print(header)
    print(markdown(rows))
    print()
    print(markdown_fp8(fp8_rows))


if __name__ == "__main__":
    main()
