"""Query tile tables of the cluster kernel: the torch specification, and the Triton kernel against it."""

from __future__ import annotations

import pytest
import torch
from test_varlen_block_sparse import random_offsets
from triton_interpreter_support import interp, run_interpreted

from sparse_compile.kernels import varlen_tiles as vt


def random_group(pairs: int, nqc: int, s_q: int, max_work: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q offsets ``(pairs, nqc + 1)`` of random (possibly empty) clusters and kept keys ``(pairs, nqc)``
    with many ties (``max_work`` small)."""
    g = torch.Generator().manual_seed(seed)
    q_off = random_offsets(pairs, 1, nqc, s_q, g).view(pairs, nqc + 1)
    return q_off, torch.randint(0, max_work + 1, (pairs, nqc), generator=g, dtype=torch.int32)


@pytest.mark.parametrize("tail_block_m", [0, 16], ids=["one launch", "tail launch"])
def test_reference_tables_cover_every_row_once_heaviest_first(tail_block_m):
    """The main launch's tiles (and the tail launch's, if any) cover each row of each q cluster exactly
    once, within its cluster, heaviest first; a tail launch takes a cluster's last ``size % 32`` rows
    exactly when they are at most ``tail_block_m``, so no main tile is then cut short."""
    q_off, total = random_group(3, 9, 200, 50, seed=0)
    main, tail = vt.tile_tables_reference(q_off, total, 200, 32, tail_block_m)
    assert main[0].shape == (3, vt.main_slots(200, 9, 32)) and (tail is None) == (tail_block_m == 0)
    tables = [(main, 32)] + ([(tail, tail_block_m)] if tail is not None else [])
    sizes = q_off[:, 1:] - q_off[:, :-1]
    remainder = sizes % 32
    assert torch.equal(vt.split_rows(q_off, 32, tail_block_m)[2],
                       torch.where((remainder > 0) & (remainder <= tail_block_m), remainder, 0))  # fmt: skip
    for bh in range(3):
        covered = torch.zeros(200, dtype=torch.long)
        for (cluster, rows), block_m in tables:
            works = []
            for c, r in zip(cluster[bh].tolist(), rows[bh].tolist()):
                if c == 9:
                    continue
                end = int(q_off[bh, c + 1])
                assert int(q_off[bh, c]) <= r < end
                covered[r : min(r + block_m, end)] += 1
                works.append(int(total[bh, c]))
            assert works == sorted(works, reverse=True)
        assert (covered == 1).all()


CASES = [  # pairs, q clusters, S_q, block_m, tail_block_m, max kept keys
    (3, 9, 200, 32, 16, 4),
    (3, 9, 200, 32, 0, 4),
    (2, 40, 1000, 64, 32, 1000),
    (2, 1, 50, 16, 0, 3),
    (4, 17, 37, 16, 0, 2),  # many empty clusters
    (2, 300, 4000, 128, 64, 5),  # more clusters than one fill step, ties everywhere
]


@interp
@pytest.mark.parametrize("pairs, nqc, s_q, block_m, tail_block_m, max_work", CASES)
def test_interp_triton_tables_equal_the_reference(pairs, nqc, s_q, block_m, tail_block_m, max_work):
    """Same cluster ids in every slot (empty slots included) and the same first rows in the real ones,
    for a group that starts at pair 1 of the offsets (``bh_start``). New buffers are poisoned (torch fills
    uninitialised memory with the largest int32 in deterministic mode), so an unwritten slot fails."""
    q_off, total = random_group(pairs + 1, nqc, s_q, max_work, seed=nqc)
    total = total[1:].contiguous()
    want = vt.tile_tables_reference(q_off[1:], total, s_q, block_m, tail_block_m)
    torch.use_deterministic_algorithms(True)
    try:
        got = vt.tile_tables(q_off, total, 1, s_q, block_m, tail_block_m)
    finally:
        torch.use_deterministic_algorithms(False)
    for want_table, got_table in zip(want, got):
        if want_table is None:
            assert got_table is None
            continue
        assert torch.equal(got_table[0], want_table[0])
        real = want_table[0] < nqc
        assert torch.equal(got_table[1][real], want_table[1][real])


def test_more_q_clusters_than_one_program_sorts_take_the_torch_tables(monkeypatch):
    """Past ``MAX_TRITON_Q_CLUSTERS`` (here lowered to 4) the tables come from the specification, for the
    group's own rows of the offsets; on a CPU tensor no Triton launch is attempted."""
    monkeypatch.setattr(vt, "MAX_TRITON_Q_CLUSTERS", 4)
    q_off, total = random_group(3, 9, 200, 4, seed=1)
    got = vt.tile_tables(q_off, total[1:].contiguous(), 1, 200, 32, 16)
    want = vt.tile_tables_reference(q_off[1:], total[1:].contiguous(), 200, 32, 16)
    assert all(torch.equal(g, w) for got_table, want_table in zip(got, want) for g, w in zip(got_table, want_table))


def test_triton_tables_under_the_interpreter():
    run_interpreted(__file__, "interp_")
