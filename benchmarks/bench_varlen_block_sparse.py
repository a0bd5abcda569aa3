"""Varlen (cluster) block-sparse attention vs the fixed-block kernel vs cuDNN dense, Wan 480p shape.

One run: correctness checks at the benchmark shapes (sampled heads), then ``triton.testing.do_bench``
medians (L2 flushed between reps) of

- the varlen kernel on SVG2-like layouts (300 q clusters, 1000 kv clusters, log-normal sizes, a
  per-q-cluster kept fraction varying around the target density): the Triton kernel for several tile
  configs and, on sm_90, the Gluon kernel (checked against the Triton one on every head), and the public op
  (which runs the Gluon kernel there);
- the fixed-block kernel (128 x 128 blocks) at the same kept density;
- the varlen kernel on a layout of 128-token clusters equal to the fixed one (same work: isolates
  the packing/gather cost from the q-padding cost);
- cuDNN dense SDPA; the selection helpers and the exact search passes (attention_lse,
  block_mass_with_lse);
- the cost of folding SVG2's token permutations into the kernel: on one layout and inputs in
  ``(B, S, H, D)`` storage (as diffusers passes them), the default config in cluster order (no
  permutation), with the q permutation, the kv permutation and both folded in (token-order
  inputs), and the unfolded path (gather Q/K/V into cluster order, kernel, scatter O/LSE back).

The varlen op is timed as CUDA-graph replays (``graph_replay_ms``): eagerly it is a dozen small torch ops
and three Triton launches, and at 5% density its eager call is launch-bound (about 2 ms against
1 ms of kernels), which no model sees once the GPU is busy with the previous layer; the public op
is also timed eagerly beside it.

Prints a markdown table and writes it to ``$OUT/varlen.md`` when OUT is set.
Usage: ``python benchmarks/bench_varlen_block_sparse.py [--sections ...]``

``--profile-one cluster|fixed`` runs only one call of the public cluster op on the attention section's
SVG2-like layout (or the fixed-block op on a layout of the same kept density) at ``--profile-density``,
for Nsight Compute::

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        python benchmarks/bench_varlen_block_sparse.py --profile-one cluster
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
from common import bench_ms, graph_replay_ms, print_and_save, profile_once, rel_l2, token_major
from torch.nn.attention import SDPBackend, sdpa_kernel

from sparse_compile.kernels import block_select as bs
from sparse_compile.kernels import block_select_reference as bs_ref
from sparse_compile.kernels import varlen_block_sparse as vb
from sparse_compile.kernels.block_sparse import block_sparse_attention
from sparse_compile.kernels.tile_configs import GLUON_VARLEN_CONFIG, max_shared_memory, varlen_config
from sparse_compile.kernels.varlen_block_sparse import validate_varlen_inputs
from sparse_compile.kernels.varlen_block_sparse_reference import (
    varlen_block_sparse_attention_reference,
    varlen_kept_keys,
    varlen_kept_pairs,
)
from sparse_compile.kernels.varlen_tiles import split_rows, tile_tables

DEVICE = "cuda"
DTYPE = torch.bfloat16
B, H, S, D = 1, 12, 32760, 128
NQC, NKC = 300, 1000
FIXED_BLOCK = 128
DENSITIES = (0.25, 0.125, 0.05)
CONFIGS = (  # Triton tiles; 64x64 tiles were slower than 64x128 (NOTES.md)
    vb.VarlenConfig(64, 128, 4, 3),
    vb.VarlenConfig(128, 128, 8, 3, tail_block_m=64),
    vb.VarlenConfig(128, 128, 8, 5, tail_block_m=64, tail_block_n=64),
)
DENSE_FLOP = 4 * S * S * D * H * B


@dataclass
class Row:
    name: str
    layout: str
    density: float
    ms: float
    fixed_ms: float | None = None

    def markdown(self) -> str:
        tflops = DENSE_FLOP / (self.ms * 1e-3) / 1e12 if self.density > 0 else float("nan")
        ratio = f"{self.ms / self.fixed_ms:.2f}" if self.fixed_ms else ""
        return f"| {self.name} | {self.layout} | {self.density:.3f} | {self.ms:.3f} | {tflops:.0f} | {ratio} |"


def config_name(cfg: vb.VarlenConfig) -> str:
    tail_keys = f" x{cfg.tail_block_n}" if cfg.tail_block_n else ""
    tail_stages = f" s{cfg.tail_num_stages}" if cfg.tail_num_stages else ""
    tail = f" + {cfg.tail_block_m}-row tails{tail_keys} w{cfg.tail_num_warps}{tail_stages}" if cfg.tail_block_m else ""
    return f"{cfg.block_m}x{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages}{tail}"


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------


def lognormal_offsets(n: int, seq: int, sigma: float, g: torch.Generator) -> torch.Tensor:
    """(1, H, n + 1) int32 offsets of n clusters per head with log-normal sizes (some may be empty)."""
    w = torch.empty(H, n).log_normal_(0.0, sigma, generator=g)
    ends = torch.round(torch.cumsum(w, -1) / w.sum(-1, keepdim=True) * seq).long()
    ends[:, -1] = seq
    return torch.cat([torch.zeros(H, 1, dtype=torch.long), ends], -1).int().view(1, H, n + 1).to(DEVICE)


def cluster_selection(q_off: torch.Tensor, kv_off: torch.Tensor, density: float, g: torch.Generator):
    """Per q cluster, random-priority kv clusters until the kept keys reach a per-cluster target
    (``density`` x a log-normal factor of mean 1, at most 1). Returns CSR counts/indices, MAXK = NKC."""
    nqc, nkc = q_off.shape[-1] - 1, kv_off.shape[-1] - 1
    target = (density * torch.empty(1, H, nqc).log_normal_(-0.125, 0.5, generator=g)).clamp(max=1.0).to(DEVICE)
    order = torch.rand(1, H, nqc, nkc, generator=g).to(DEVICE).argsort(-1)
    kv_sizes = (kv_off[..., 1:] - kv_off[..., :-1]).unsqueeze(2).expand(1, H, nqc, nkc)
    sizes = torch.gather(kv_sizes, -1, order)
    before = torch.cumsum(sizes, -1) - sizes
    keep_sorted = before < target.unsqueeze(-1) * kv_off[..., -1:].unsqueeze(-1)
    mask = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return bs.keep_mask_to_layout(mask)


def svg2_like_layout(density: float, g: torch.Generator):
    """``(q_offsets, kv_offsets, counts, indices)``: NQC / NKC log-normal clusters per head and
    :func:`cluster_selection` at ``density``."""
    q_off, kv_off = lognormal_offsets(NQC, S, 0.6, g), lognormal_offsets(NKC, S, 0.6, g)
    return (q_off, kv_off, *cluster_selection(q_off, kv_off, density, g))


def fixed_selection(density: float, g: torch.Generator):
    """Fixed 128 x 128 block layout keeping round(density * NK) random kv blocks per q block."""
    n = math.ceil(S / FIXED_BLOCK)
    scores = torch.rand(B, H, n, n, generator=g).to(DEVICE)
    kept = scores.topk(max(1, round(density * n)), dim=-1).indices
    return bs.keep_mask_to_layout(torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, kept, True))


def fixed_as_varlen(counts: torch.Tensor, indices: torch.Tensor):
    """The fixed-block layout expressed as a varlen layout of 128-token clusters."""
    n = math.ceil(S / FIXED_BLOCK)
    off = torch.tensor([min(i * FIXED_BLOCK, S) for i in range(n + 1)], dtype=torch.int32, device=DEVICE)
    off = off.view(1, 1, -1)
    return off, off, counts, indices


def density_of(q, k, v, layout) -> float:
    return float(varlen_kept_pairs(validate_varlen_inputs(q, k, v, *layout)).sum()) / (B * H * S * S)


def q_padding_factor(q, k, v, layout, block_m: int, tail_block_m: int = 0) -> float:
    """Computed (padded) query-key pairs over kept pairs for BLOCK_M-row query tiles (and, with
    ``tail_block_m``, each cluster's remainder of at most that many rows in a tile of that size),
    with the kernel's own split of the rows between the two launches."""
    expanded = validate_varlen_inputs(q, k, v, *layout)
    _, main_rows, tail_rows = split_rows(vb._flat_offsets(expanded.q_offsets), block_m, tail_block_m)
    main_rows, tail_rows = main_rows.long(), tail_rows.long()
    kept = varlen_kept_keys(expanded).reshape(main_rows.shape)
    q_sizes = main_rows + tail_rows
    padded = (main_rows + block_m - 1) // block_m * block_m + torch.where(tail_rows > 0, tail_block_m, 0)
    return float((padded * kept).sum() / (q_sizes * kept).sum())


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------


def check_correctness(q, k, v, layout, fixed_layout) -> list[str]:
    """Kernel vs reference on sampled heads; varlen-of-fixed vs the fixed kernel on every head."""
    lines = []
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:3], float("nan"), device=DEVICE)
    vb.varlen_block_sparse_attention_triton(q, k, v, *layout, out=out, lse_out=lse)
    assert not out.isnan().any() and not lse.isnan().any(), "NaN in varlen output"
    for h in (0, H - 1):
        sl = slice(h, h + 1)
        want_out, want_lse = varlen_block_sparse_attention_reference(
            q[:, sl], k[:, sl], v[:, sl], *(t[:, sl] for t in layout), return_lse=True
        )
        finite = torch.isfinite(want_lse)
        err = rel_l2(out[:, sl], want_out)
        lse_err = float((lse[:, sl][finite] - want_lse[finite]).abs().max())
        assert err < 1e-2 and lse_err < 1e-2 and torch.equal(finite, torch.isfinite(lse[:, sl])), (err, lse_err)
        lines.append(f"varlen vs reference, head {h}: rel-L2 {err:.2e}, max |dLSE| {lse_err:.2e}")
    fixed = block_sparse_attention(q, k, v, *fixed_layout, block_q=FIXED_BLOCK, block_k=FIXED_BLOCK)
    as_varlen = vb.varlen_block_sparse_attention(q, k, v, *fixed_as_varlen(*fixed_layout))
    err = rel_l2(as_varlen, fixed)
    assert err < 1e-2, err
    lines.append(f"varlen(128-token clusters) vs fixed-block kernel, all heads: rel-L2 {err:.2e}")
    sl = slice(0, 1)
    lse_full = bs.attention_lse(q, k)
    lse_ref = bs_ref.attention_lse_reference(q[:, sl], k[:, sl], block=1024)
    lines.append(f"attention_lse vs reference, head 0: rel-L2 {rel_l2(lse_full[:, sl], lse_ref):.2e}")
    for block in (64, 128):
        mass = bs.block_mass_with_lse(q[:, sl], k[:, sl], lse_ref, block, block)
        mass_ref = bs_ref.block_mass_with_lse_reference(q[:, sl], k[:, sl], lse_ref, block, block)
        lines.append(f"block_mass_with_lse (block {block}) vs reference, head 0: rel-L2 {rel_l2(mass, mass_ref):.2e}")
    return lines


def kept_bounds(q, k, v, layout) -> dict:
    """The kept-key bounds SVG2 and ``auto`` pass the cluster op (ragged kept-rows lists, in groups over the budget)."""
    kept_keys = varlen_kept_keys(vb.validate_varlen_inputs(q, k, v, *layout, None, None))
    pair_kept_rows = kept_keys.flatten(0, 1).sum(-1).tolist()
    return dict(kept_keys=kept_keys, kept_rows_total=sum(pair_kept_rows), max_kept_keys=int(kept_keys.max()),
                pair_kept_rows=pair_kept_rows)


def time_dense(q, k, v) -> list[Row]:
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
    return [Row("SDPA cuDNN (dense)", "-", 1.0, ms)]


def time_density(q, k, v, density: float, g: torch.Generator) -> tuple[list[Row], list[str]]:
    layout = svg2_like_layout(density, g)
    kept, bounds = density_of(q, k, v, layout), kept_bounds(q, k, v, layout)
    fixed_layout = fixed_selection(kept, g)
    fixed_density = density_of(q, k, v, fixed_as_varlen(*fixed_layout))
    fixed_ms = bench_ms(lambda: block_sparse_attention(q, k, v, *fixed_layout, block_q=FIXED_BLOCK, block_k=FIXED_BLOCK))
    rows = [Row(f"fixed-block kernel {FIXED_BLOCK}x{FIXED_BLOCK} (autotuned)", "random blocks", fixed_density, fixed_ms)]
    for cfg in CONFIGS:
        ms = graph_replay_ms(lambda: vb.varlen_block_sparse_attention_triton(q, k, v, *layout, config=cfg, **bounds))
        rows.append(Row(f"varlen {config_name(cfg)}", f"{NQC}q/{NKC}kv clusters", kept, ms, fixed_ms))
    default = varlen_config(S, NQC, D, DTYPE.itemsize, max_shared_memory(torch.device(DEVICE)))
    rows.append(Row(f"varlen Triton default ({config_name(default)})", f"{NQC}q/{NKC}kv clusters", kept,
                    graph_replay_ms(lambda: vb.varlen_block_sparse_attention_triton(q, k, v, *layout, **bounds)),
                    fixed_ms))  # fmt: skip
    notes = []
    gluon = vb.varlen_kernel_choice(q, k, v) == "gluon"
    if gluon:
        notes.append(gluon_check(q, k, v, layout, bounds, f"density {density}"))
        ms = graph_replay_ms(lambda: vb.varlen_block_sparse_attention_gluon(q, k, v, *layout, **bounds))
        rows.append(Row(gluon_row(), f"{NQC}q/{NKC}kv clusters", kept, ms, fixed_ms))
    ms = graph_replay_ms(lambda: vb.varlen_block_sparse_attention(q, k, v, *layout, **bounds))
    rows.append(Row(f"varlen public op ({vb.varlen_kernel_choice(q, k, v)})", f"{NQC}q/{NKC}kv clusters",
                    kept, ms, fixed_ms))  # fmt: skip
    eager_ms = bench_ms(lambda: vb.varlen_block_sparse_attention(q, k, v, *layout, **bounds))
    rows.append(Row("varlen public op, eager (with its Python launch cost)", f"{NQC}q/{NKC}kv clusters",
                    kept, eager_ms, fixed_ms))  # fmt: skip
    same = fixed_as_varlen(*fixed_layout)
    same_bounds = kept_bounds(q, k, v, same)
    for cfg in (vb.VarlenConfig(128, 128, 8, 3), vb.VarlenConfig(128, 128, 8, 5)):
        ms = graph_replay_ms(lambda: vb.varlen_block_sparse_attention_triton(q, k, v, *same, config=cfg, **same_bounds))
        rows.append(Row(f"varlen {config_name(cfg)}",
                        f"{FIXED_BLOCK}-token clusters = fixed layout", fixed_density, ms, fixed_ms))  # fmt: skip
    if gluon:
        ms = graph_replay_ms(lambda: vb.varlen_block_sparse_attention_gluon(q, k, v, *same, **same_bounds))
        rows.append(Row(gluon_row(), f"{FIXED_BLOCK}-token clusters = fixed layout", fixed_density, ms, fixed_ms))
    notes += [
        f"density {density}: kept {kept:.4f}; q-padding factor (computed/kept pairs) "
        f"BLOCK_M=64: {q_padding_factor(q, k, v, layout, 64):.3f}, BLOCK_M=128: {q_padding_factor(q, k, v, layout, 128):.3f}, "
        f"BLOCK_M=128 with 64-row tails: {q_padding_factor(q, k, v, layout, 128, 64):.3f}; "
        f"mean kept kv clusters per q cluster {float(layout[2].float().mean()):.1f}"
    ]
    return rows, notes


def gluon_row() -> str:
    return f"varlen Gluon (sm_90, {config_name(GLUON_VARLEN_CONFIG)})"


def gluon_check(q, k, v, layout, bounds, label: str, **perms) -> str:
    """The Gluon kernel against the Triton one on the same call (every head): a note, or an AssertionError."""
    got = vb.varlen_block_sparse_attention_gluon(q, k, v, *layout, **perms, **bounds)
    want = vb.varlen_block_sparse_attention_triton(q, k, v, *layout, **perms, **bounds)
    err = rel_l2(got[0], want[0])
    finite = torch.isfinite(want[1])
    assert err < 1e-2 and torch.equal(finite, torch.isfinite(got[1])), f"Gluon vs Triton ({label}): rel-L2 {err}"
    return f"{label}: Gluon vs Triton cluster kernel, all heads: rel-L2 {err:.2e}"


def time_graphs(q, k, v, g: torch.Generator) -> list[str]:
    """Capture the whole varlen op, and its prep (kept-rows kernel + tile table) alone, in CUDA graphs.

    Capture fails if the launch path syncs with the host. Replays time the GPU work without the
    Python launch overhead; the eager time of the prep alone is launch-bound.
    """
    raw = svg2_like_layout(0.125, g)
    layout = validate_varlen_inputs(q, k, v, *raw)
    flat_q = vb._flat_offsets(layout.q_offsets)
    config = varlen_config(S, NQC, D, DTYPE.itemsize, max_shared_memory(torch.device(DEVICE)))
    rows_buffer = torch.empty(B * H * NQC * S, dtype=torch.int32, device=DEVICE)
    starts = torch.arange(B * H * NQC, device=DEVICE) * S

    def prep():
        total = vb._kept_rows(layout, vb._flat_offsets(layout.kv_offsets), starts, 0, B * H, rows_buffer)
        tile_tables(flat_q, total, 0, S, config.block_m, config.tail_block_m)

    def attend():
        return vb.varlen_block_sparse_attention(q, k, v, *raw)

    eager_out, eager_prep = attend(), bench_ms(prep)
    graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
    with torch.cuda.graph(graphs[0]):
        captured = attend()
    with torch.cuda.graph(graphs[1]):
        prep()
    graphs[0].replay()
    torch.cuda.synchronize()
    return [
        f"CUDA-graph capture of the whole varlen op (density 0.125): OK (no host sync); replay == eager: "
        f"{torch.equal(captured, eager_out)}; replay {bench_ms(graphs[0].replay):.3f} ms, eager {bench_ms(attend):.3f} ms",
        f"varlen prep (kept-rows kernel + tile tables): GPU time (graph replay) {bench_ms(graphs[1].replay):.3f} ms, "
        f"eager (launch-bound) {eager_prep:.3f} ms",
    ]


def time_selection(q, k, g: torch.Generator) -> list[Row]:
    rows = []
    centroids_q, centroids_k = torch.randn(B, H, NQC, D, device=DEVICE), torch.randn(B, H, NKC, D, device=DEVICE)
    sizes = torch.randint(1, 64, (B, H, NKC), device=DEVICE)
    ms = bench_ms(lambda: bs.select_top_p(bs.pooled_block_scores(centroids_q, centroids_k, sizes, D**-0.5), 0.9))
    rows.append(Row(f"pooled_block_scores + select_top_p(0.9), {NQC}x{NKC} centroids", "-", 1.0, ms))
    rows.append(Row("attention_lse (block 128)", "-", 1.0, bench_ms(lambda: bs.attention_lse(q, k))))
    lse = bs.attention_lse(q, k)
    for block in (64, 128):
        ms = bench_ms(lambda: bs.block_mass_with_lse(q, k, lse, block, block))
        rows.append(Row(f"block_mass_with_lse, block {block}", "-", 1.0, ms))
    return rows


def random_permutations(seq: int) -> torch.Tensor:
    """int64 ``(B, H, seq)``: a random permutation per head (what ``cluster_permutation`` returns)."""
    return torch.rand(B, H, seq, device=DEVICE).argsort(-1)


def gather_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``x[b, h, perm[b, h, i]]`` for ``x`` ``(B, H, S)`` or ``(B, H, S, D)``: SVG2's old gather."""
    index = perm if x.dim() == 3 else perm.unsqueeze(-1).expand(x.shape)
    return torch.gather(x, 2, index)


def scatter_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`gather_rows`: SVG2's old scatter back to token order."""
    index = perm if x.dim() == 3 else perm.unsqueeze(-1).expand(x.shape)
    return torch.empty_like(x).scatter_(2, index, x)


@dataclass
class PermRow:
    """One row of the permutation section: time and its ratio to the kernel without permutations."""

    name: str
    density: float
    ms: float
    base_ms: float

    def markdown(self) -> str:
        return f"| {self.name} | {self.density:.3f} | {self.ms:.3f} | {self.ms / self.base_ms:.3f} |"


def time_permutation_fold(q, k, v, density: float, g: torch.Generator) -> tuple[list[PermRow], list[str]]:
    """Default-config kernel with and without folded permutations, one layout, (B, S, H, D) storage,
    given the kept-key bounds SVG2 passes (ragged kept-rows buffer, one launch).

    "cluster order" runs on inputs already permuted (each kv cluster a contiguous run of rows);
    the folded rows read token-order inputs through the permutations. Also checks that folding
    changes no result.
    """
    layout = svg2_like_layout(density, g)
    kept = density_of(q, k, v, layout)
    q_perm, kv_perm = random_permutations(S), random_permutations(S)
    tq, tk, tv = token_major(q), token_major(k), token_major(v)
    cq, ck, cv = (token_major(gather_rows(x, perm)) for x, perm in ((tq, q_perm), (tk, kv_perm), (tv, kv_perm)))
    bounds = kept_bounds(q, k, v, layout)
    folded = vb.varlen_block_sparse_attention_triton(tq, tk, tv, *layout, q_perm=q_perm, kv_perm=kv_perm, **bounds)
    plain = vb.varlen_block_sparse_attention_triton(cq, ck, cv, *layout, **bounds)
    err = rel_l2(folded[0], scatter_rows(plain[0], q_perm))
    assert err < 1e-3, f"folded vs cluster-order kernel: rel-L2 {err}"

    def unfolded():
        out, lse = vb.varlen_block_sparse_attention_triton(
            gather_rows(tq, q_perm), gather_rows(tk, kv_perm), gather_rows(tv, kv_perm), *layout, **bounds
        )
        return scatter_rows(out, q_perm), scatter_rows(lse, q_perm)

    cases = {
        "cluster-order inputs, no permutation": lambda: vb.varlen_block_sparse_attention_triton(cq, ck, cv, *layout,
                                                                                                **bounds),
        "q permutation folded": lambda: vb.varlen_block_sparse_attention_triton(tq, ck, cv, *layout, q_perm=q_perm,
                                                                                **bounds),
        "kv permutation folded": lambda: vb.varlen_block_sparse_attention_triton(cq, tk, tv, *layout, kv_perm=kv_perm,
                                                                                 **bounds),
        "q and kv permutations folded (Triton)": lambda: vb.varlen_block_sparse_attention_triton(
            tq, tk, tv, *layout, q_perm=q_perm, kv_perm=kv_perm, **bounds),
        "gather Q/K/V + kernel + scatter O/LSE (SVG2 before)": unfolded,
    }  # fmt: skip
    notes = [f"permutation fold, density {density}: folded vs cluster-order kernel rel-L2 {err:.2e}"]
    if vb.varlen_kernel_choice(tq, tk, tv) == "gluon":
        perms = dict(q_perm=q_perm, kv_perm=kv_perm)
        notes.append(gluon_check(tq, tk, tv, layout, bounds, f"permutation fold, density {density}", **perms))
        cases["Gluon kernel, q and kv permutations folded (sm_90: the op's choice)"] = (
            lambda: vb.varlen_block_sparse_attention_gluon(tq, tk, tv, *layout, **perms, **bounds))  # fmt: skip
    times = {name: graph_replay_ms(fn) for name, fn in cases.items()}
    base = times["cluster-order inputs, no permutation"]
    rows = [PermRow(name, kept, ms, base) for name, ms in times.items()]
    return rows, notes


def guarded(name: str, fn, *args):
    """Run one section; on failure print the traceback and go on with the others."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a benchmark run should report every section it can
        print(f"## section {name} FAILED", file=sys.stderr)
        traceback.print_exc()
        return None


SECTIONS = ("correctness", "attention", "graphs", "selection", "permutation")
PROFILED_OPS = ("cluster", "fixed")


def profiled_call(op: str, q, k, v, density: float, g: torch.Generator):
    """The public cluster op on :func:`time_density`'s layout at ``density``, or (``fixed``) the fixed-block
    op on random 128-blocks of that layout's kept density."""
    layout = svg2_like_layout(density, g)
    if op == "fixed":
        fixed_layout = fixed_selection(density_of(q, k, v, layout), g)
        return lambda: block_sparse_attention(q, k, v, *fixed_layout, block_q=FIXED_BLOCK, block_k=FIXED_BLOCK)
    bounds = kept_bounds(q, k, v, layout)
    return lambda: vb.varlen_block_sparse_attention(q, k, v, *layout, **bounds)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="sections to run (default: all)")  # fmt: skip
    parser.add_argument("--perm-densities", nargs="+", type=float, default=[0.25, 0.125],
                        help="kept densities of the permutation section")  # fmt: skip
    parser.add_argument("--profile-one", choices=PROFILED_OPS,
                        help="instead of the benchmark, one call of this op, for ncu --profile-from-start off")
    parser.add_argument("--profile-density", type=float, default=0.125, help="kept density of --profile-one")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE, dtype=DTYPE) for _ in range(3))
    if args.profile_one:
        profile_once(profiled_call(args.profile_one, q, k, v, args.profile_density, g),
                     f"{args.profile_one} op, Wan 480p, kept density {args.profile_density}")
        return
    device = torch.cuda.get_device_name()
    header = [
        f"# varlen block-sparse attention, Wan 480p (B={B}, H={H}, S={S}, D={D}) {DTYPE}",
        f"device: {device}; torch {torch.__version__}; triton {triton.__version__}",
        "do_bench median ms (varlen and permutation rows: CUDA-graph replay, GPU time without Python launch cost); dense-equivalent TFLOP/s = 4*S^2*D*H / time; ratio = time / fixed-block time "
        "at the same kept density",
        "",
    ]
    checks: list[str] = []
    if "correctness" in args.sections:
        layout = svg2_like_layout(0.125, g)
        checks = guarded("correctness", check_correctness, q, k, v, layout, fixed_selection(0.125, g)) or ["FAILED"]
        print("\n".join(checks), flush=True)
    dense = guarded("dense", time_dense, q, k, v) or []
    rows: list[Row] = list(dense)
    notes: list[str] = []
    for density in DENSITIES if "attention" in args.sections else ():
        result = guarded(f"density {density}", time_density, q, k, v, density, g)
        if result:
            rows += result[0]
            notes += result[1]
        print(f"done density {density}", flush=True)
    if "graphs" in args.sections:
        notes += guarded("graphs", time_graphs, q, k, v, g) or []
    selection = (guarded("selection", time_selection, q, k, g) or []) if "selection" in args.sections else []
    perm_rows: list[PermRow] = []
    for density in args.perm_densities if "permutation" in args.sections else ():
        result = guarded(f"permutation fold {density}", time_permutation_fold, q, k, v, density, g)
        if result:
            perm_rows += result[0]
            notes += result[1]
        print(f"done permutation fold {density}", flush=True)
    table = ["| kernel | layout | kept density | ms | dense-equiv TFLOP/s | ratio to fixed |", "|---|---|---|---|---|---|"]
    table += [r.markdown() for r in rows]
    sel_table = ["| helper | ms | fraction of cuDNN dense |", "|---|---|---|"]
    dense_ms = dense[0].ms if dense else float("nan")
    sel_table += [f"| {r.name} | {r.ms:.3f} | {r.ms / dense_ms:.3f} |" for r in selection]
    perm_table = ["| varlen default config, (B, S, H, D) storage | kept density | ms | ratio to no permutation |",
                  "|---|---|---|---|"]  # fmt: skip
    perm_table += [r.markdown() for r in perm_rows]
    text = "\n".join(header + ["## Correctness at the benchmark shape", *(f"- {c}" for c in checks), "",
                               "## Attention", *table, "", *(f"- {n}" for n in notes), "",
                               "## Selection and search helpers", *sel_table, "",
                               "## Folded token permutations (SVG2)", *perm_table, ""])  # fmt: skip
    print_and_save(text, "varlen.md")


if __name__ == "__main__":
    main()
