"""Query tile tables of the cluster kernel: which q cluster, and which of its rows, each program runs.

The cluster kernel (:mod:`sparse_compile.kernels.varlen_block_sparse`) runs ``block_m``-row tiles
of each q cluster, and optionally a second launch of smaller ``tail_block_m``-row tiles for a
cluster's last ``size % block_m`` rows when they are at most ``tail_block_m`` (so a 130-row cluster
computes 128 + 32 rows, not 256). Its grids are upper bounds known without a host sync:
``cdiv(S_q, block_m) + NQC`` main slots and ``NQC`` tail slots per (batch, head). A *tile table*
gives, per slot, the q cluster id and the tile's first (cluster-order) row; slots past the real
tiles hold cluster id ``NQC`` (the program exits at once). Within each (batch, head) the tiles are
ordered heaviest first (most kept keys, ties by cluster id, then by row), so the longest programs
start first and the launch's last wave is short.

:func:`tile_tables_reference` (torch ops) is the specification; :func:`tile_tables` computes the same
tables with one Triton program per (batch, head): a sort of the clusters by kept keys (the tiles of a
cluster share its work, so sorting clusters sorts tiles), a cumsum of their tile counts, then stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from sparse_compile.kernels.common import cdiv
from sparse_compile.kernels.tile_configs import TILE_TABLE_FILL, tile_table_warps

MAX_TRITON_Q_CLUSTERS = 8192
"""Most q clusters the Triton tables sort in one program (one int64 key per cluster in registers);
more take the torch tables, which give the same result."""


def main_slots(s_q: int, num_q_clusters: int, block_m: int) -> int:
    """Slots of the main launch per (batch, head): ``cdiv(S_q, block_m) + NQC``, a bound on its tiles."""
    return cdiv(s_q, block_m) + num_q_clusters


def split_rows(q_offsets: Tensor, block_m: int, tail_block_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each q cluster's first row, main-launch rows and tail-launch rows, int32 ``(BH, NQC)`` each.

    ``q_offsets`` int32 ``(BH, NQC + 1)``. The tail is ``size % block_m`` when that is in
    ``(0, tail_block_m]`` (never with ``tail_block_m = 0``), else 0: every main tile is then full but
    a cluster's last one, which ends at the cluster's end.
    """
    first, sizes = q_offsets[:, :-1], q_offsets[:, 1:] - q_offsets[:, :-1]
    remainder = sizes % block_m
    tail = torch.where((remainder > 0) & (remainder <= tail_block_m), remainder, 0)
    return first, sizes - tail, tail


def _table_reference(first_row: Tensor, rows: Tensor, total: Tensor, block_m: int, num_slots: int) -> tuple[Tensor, Tensor]:
    """One table: cluster ``c`` covers ``rows[g, c]`` rows from ``first_row[g, c]`` in ``ceil(rows / block_m)``
    tiles; slot ``t`` holds the t-th heaviest tile (stable), slots past the last tile cluster id ``NQC``."""
    nqc = rows.shape[-1]
    tiles = (rows + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, dim=1)
    slots = torch.arange(num_slots, device=rows.device).expand(rows.shape[0], num_slots).contiguous()
    cluster = torch.searchsorted(tile_end, slots, right=True)  # (G, T), NQC past the last tile
    real = cluster < nqc
    safe = cluster.clamp_max(max(nqc - 1, 0))
    first_slot = (tile_end - tiles).gather(1, safe)
    tile_rows = first_row.gather(1, safe) + (slots - first_slot) * block_m
    work = torch.where(real, total.gather(1, safe), -1)
    order = torch.argsort(work, dim=1, descending=True, stable=True)
    return cluster.gather(1, order).int(), tile_rows.gather(1, order).int()


def tile_tables_reference(
    q_offsets: Tensor, total: Tensor, s_q: int, block_m: int, tail_block_m: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """The tile tables of the main and (``tail_block_m > 0``) tail launch, torch ops (the specification).

    ``q_offsets`` int32 ``(G, NQC + 1)`` and ``total`` int32 ``(G, NQC)`` (kept keys per q cluster, the
    tile's work) of G (batch, head) pairs. Returns ``(cluster, first_row)`` int32 ``(G, T)`` per table,
    ``T`` = :func:`main_slots` for the main table and ``NQC`` for the tail table (``None`` without one).
    """
    nqc = total.shape[-1]
    first, main_rows, tail_rows = split_rows(q_offsets, block_m, tail_block_m)
    main = _table_reference(first, main_rows, total, block_m, main_slots(s_q, nqc, block_m))
    if not tail_block_m:
        return main, None
    return main, _table_reference(first + main_rows, tail_rows, total, tail_block_m, nqc)


@triton.jit
def _fill_empty(cluster_ptr, start, num_slots, num_q_clusters, FILL: tl.constexpr):
    """Cluster id ``num_q_clusters`` (exit at once) into slots ``[start, num_slots)``."""
    for s0 in range(start, num_slots, FILL):
        slots = s0 + tl.arange(0, FILL)
        tl.store(cluster_ptr + slots, tl.full([FILL], 0, tl.int32) + num_q_clusters, mask=slots < num_slots)


@triton.jit
def _tile_tables_kernel(
    q_off_ptr, total_ptr, main_cluster_ptr, main_row_ptr, tail_cluster_ptr, tail_row_ptr,
    bh_start, num_q_clusters, num_main_slots,
    BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, NQC_PAD: tl.constexpr, FILL: tl.constexpr,
):
    """One program per (batch, head) ``g`` of the group (offsets row ``bh_start + g``): both tables.

    Clusters sorted by (kept keys descending, id ascending) as one int64 key per cluster; padding
    lanes (work -1) sort last. Tiles are then stored in that order at the exclusive cumsum of the
    clusters' tile counts; the tail table (TAIL_M > 0) holds one tile per cluster with a tail.
    """
    g = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, NQC_PAD)
    work = tl.load(total_ptr + g * num_q_clusters + lanes, mask=lanes < num_q_clusters, other=-1)
    key = tl.sort((work.to(tl.int64) << 32) | (NQC_PAD - 1 - lanes), descending=True)
    cluster = (NQC_PAD - 1 - (key & 0xFFFFFFFF)).to(tl.int32)
    real = cluster < num_q_clusters
    offsets = q_off_ptr + (g + bh_start) * (num_q_clusters + 1)
    first = tl.load(offsets + cluster, mask=real, other=0)
    size = tl.load(offsets + cluster + 1, mask=real, other=0) - first
    if TAIL_M > 0:
        remainder = size % BLOCK_M
        tail = tl.where((remainder > 0) & (remainder <= TAIL_M), remainder, 0)
    else:
        tail = size * 0
    tiles = (size - tail + BLOCK_M - 1) // BLOCK_M
    slot = tl.cumsum(tiles, 0) - tiles
    main_cluster = main_cluster_ptr + g * num_main_slots
    main_row = main_row_ptr + g * num_main_slots
    for j in range(0, tl.max(tiles, 0)):
        ok = j < tiles
        tl.store(main_cluster + slot + j, cluster, mask=ok)
        tl.store(main_row + slot + j, first + j * BLOCK_M, mask=ok)
    _fill_empty(main_cluster, tl.sum(tiles, 0), num_main_slots, num_q_clusters, FILL)
    if TAIL_M > 0:
        has_tail = (tail > 0).to(tl.int32)
        tail_slot = tl.cumsum(has_tail, 0) - has_tail
        tail_cluster = tail_cluster_ptr + g * num_q_clusters
        tl.store(tail_cluster + tail_slot, cluster, mask=has_tail > 0)
        tl.store(tail_row_ptr + g * num_q_clusters + tail_slot, first + size - tail, mask=has_tail > 0)
        _fill_empty(tail_cluster, tl.sum(has_tail, 0), num_q_clusters, num_q_clusters, FILL)


def tile_tables(
    q_offsets: Tensor, total: Tensor, bh_start: int, s_q: int, block_m: int, tail_block_m: int
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor] | None]:
    """:func:`tile_tables_reference` for pairs ``bh_start .. bh_start + G - 1`` in one Triton launch.

    ``q_offsets`` contiguous int32 ``(BH, NQC + 1)`` of every pair (rows from ``bh_start`` are read),
    ``total`` contiguous int32 ``(G, NQC)``. CUDA, or CPU tensors under ``TRITON_INTERPRET=1``; kept
    keys per cluster ``< 2**31``. Rows of empty slots are left unwritten. Above
    :data:`MAX_TRITON_Q_CLUSTERS` q clusters this is :func:`tile_tables_reference` on the same device.
    """
    group, nqc = total.shape
    if nqc > MAX_TRITON_Q_CLUSTERS:
        return tile_tables_reference(q_offsets[bh_start : bh_start + group], total, s_q, block_m, tail_block_m)
    slots = main_slots(s_q, nqc, block_m)
    device = total.device
    main = (torch.empty((group, slots), dtype=torch.int32, device=device),
            torch.empty((group, slots), dtype=torch.int32, device=device))  # fmt: skip
    tail = None
    if tail_block_m:
        tail = (torch.empty((group, nqc), dtype=torch.int32, device=device),
                torch.empty((group, nqc), dtype=torch.int32, device=device))  # fmt: skip
    if group == 0:
        return main, tail
    nqc_pad = max(triton.next_power_of_2(nqc), 16)
    _tile_tables_kernel[(group,)](
        q_offsets, total, *main, *(tail or main), bh_start, nqc, slots,
        BLOCK_M=block_m, TAIL_M=tail_block_m, NQC_PAD=nqc_pad, FILL=TILE_TABLE_FILL, num_warps=tile_table_warps(nqc_pad),
    )  # fmt: skip
    return main, tail
