"""The backend under diffusers' context parallelism, on CPUs: 2 processes over gloo.

With Ulysses attention each rank holds half of the video tokens between attentions; before
attention an all-to-all gives it all tokens for half of the heads. The backend must still find
every video self-attention, over the whole grid, and run the method on the rank's heads: each
step's result then equals the single-process run of the same method. That holds for methods that
treat heads independently: radial and svg, and svg2, whose k-means seeding is the same for every
head (tests/kernels/test_kmeans.py); adaspa's head-adaptive budget is shared between a call's
heads, so its result depends on the heads a rank holds. Radial runs here (one method: one compile
per rank). One compile
covers a dense step (``dense_steps=1``: the computation of ``method="dense"``) and a sparse one.
Attention through an op that returns the log-sum-exp (ring attention merges partial results over
KV shards with it) must stay dense, and the report must say why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

import sparse_compile
from context_parallel_worker import build_wan, run_steps
from sparse_compile.passes.collectives import AllToAll, Piece, PieceAxis, RankAxis, exchange
from sparse_compile.report import SiteReport

WORLD = 2
LATENT = (8, 8, 8)  # frames, height, width of the latent; Wan's (1, 2, 2) patches give the grid
GRID = (8, 4, 4)
TOKENS = 128
HEADS, HEAD_DIM = 2, 16  # tiny_models.wan
OPTIONS = {"method": "radial", "block": 16, "min_seq_len": 16, "dense_steps": 1}
STEPS = {"dense step": 900, "radial step": 800}  # timesteps of denoising steps 0 and 1
RANKS_TIMEOUT_S = 300  # a rank that hangs fails the test instead of blocking it
TESTS = Path(__file__).parent


@dataclasses.dataclass(frozen=True)
class Run:
    """One process's ``sample`` per step and report sites."""

    samples: list[torch.Tensor]
    sites: list[SiteReport]

    @property
    def video_sites(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]


@dataclasses.dataclass(frozen=True)
class Runs:
    single: Run
    ranks: list[Run]


def skip_inductor() -> contextlib.AbstractContextManager:
    """The backend's rewritten graph runs as is instead of through Inductor.

    Inductor only changes the float rounding of the other ops; its compile would double the time
    of these tests (the ranks compile with it).
    """
    return mock.patch("torch._inductor.compile_fx.compile_fx", lambda gm, example_inputs, **_: gm.forward)


def _single_process_run() -> Run:
    """The same seeded model and steps in this process, without context parallelism."""
    model, inputs = build_wan(*LATENT)
    with skip_inductor():
        return Run(**run_steps(model, inputs, OPTIONS, list(STEPS.values())))


def _start_ranks(out: Path) -> list[subprocess.Popen]:
    """``context_parallel_worker.py`` for every rank, logging to ``out/rank{r}.log``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    args = [json.dumps(OPTIONS), json.dumps(LATENT), json.dumps(list(STEPS.values()))]
    procs = []
    for rank in range(WORLD):
        command = [sys.executable, str(TESTS / "context_parallel_worker.py"), str(rank), str(WORLD),
                   str(out / "store"), str(out / f"rank{rank}.pt"), *args]
        with open(out / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _wait(procs: list[subprocess.Popen], timeout_s: float) -> list[int | None]:
    """Exit codes once all ranks exited, one failed (its peers would wait on it) or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        codes = [p.poll() for p in procs]
        if None not in codes or any(c not in (None, 0) for c in codes):
            return codes
        time.sleep(0.2)
    return [p.poll() for p in procs]


def _finish_ranks(procs: list[subprocess.Popen], out: Path) -> list[Run]:
    """Each rank's run, once all exited 0 within ``RANKS_TIMEOUT_S`` (else the test fails with their logs)."""
    try:
        codes = _wait(procs, RANKS_TIMEOUT_S)
    finally:
        _stop(procs)
    logs = "\n".join(f"--- rank {r} ---\n" + (out / f"rank{r}.log").read_text()[-3000:] for r in range(WORLD))
    assert codes == [0] * WORLD, f"rank exit codes {codes} (None: still running after {RANKS_TIMEOUT_S} s)\n{logs}"
    return [Run(**torch.load(out / f"rank{r}.pt", weights_only=False)) for r in range(WORLD)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """The single-process run and the run of each rank with Ulysses attention over 2 ranks."""
    out = tmp_path_factory.mktemp("context_parallel")
    procs = _start_ranks(out)
    try:
        single = _single_process_run()
    except BaseException:
        _stop(procs)
        raise
    return Runs(single, _finish_ranks(procs, out))


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_each_rank_runs_the_method_on_its_heads_over_the_whole_video(runs):
    for rank in runs.ranks:
        assert [s.module_path for s in rank.video_sites] == ["blocks.0.attn1", "blocks.1.attn1"]
        for site, reference in zip(rank.video_sites, runs.single.video_sites, strict=True):
            assert site.status == reference.status == "sparse"
            assert site.grid == reference.grid == GRID
            assert site.q_shape == (1, HEADS // WORLD, TOKENS, HEAD_DIM)
            assert site.density_by_step == reference.density_by_step


def test_the_sparse_step_keeps_part_of_the_attention(runs):
    """Guards the other tests against a grid where radial keeps every block (it would run dense)."""
    for site in runs.single.video_sites:
        assert site.density_by_step[0] == 1.0
        assert site.density_by_step[1] < 0.8


def test_cross_attention_stays_dense_over_the_ranks_own_queries(runs):
    for rank in runs.ranks:
        cross = [s for s in rank.sites if s.kind == "cross-attention"]
        assert [s.module_path for s in cross] == ["blocks.0.attn2", "blocks.1.attn2"]
        assert all(s.q_shape[2] == TOKENS // WORLD and s.status.startswith("dense: cross-attention") for s in cross)


@pytest.mark.parametrize("step", range(len(STEPS)), ids=list(STEPS))
def test_each_step_matches_the_single_process_run(runs, step):
    for rank in runs.ranks:
        assert _rel_l2(rank.samples[step], runs.single.samples[step]) <= 1e-4


class _RingAttention(torch.nn.Module):
    """A query projection, then attention over two KV shards merged by their log-sum-exp, as
    diffusers' ring attention does (with torch's CPU flash op in place of the GPU flash/cuDNN ops)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.to_q = torch.nn.Linear(head_dim, head_dim)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``x``, ``k``, ``v``: ``(B, H, S, D)``; returns ``(B, H, S, D)``."""
        q = self.to_q(x)
        partial = [
            torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k_shard, v_shard)
            for k_shard, v_shard in zip(k.chunk(2, dim=2), v.chunk(2, dim=2))
        ]
        (out_a, lse_a), (out_b, lse_b) = partial
        weight_a = torch.sigmoid(lse_a - lse_b).unsqueeze(-1)
        return out_b + weight_a * (out_a - out_b)


def test_attention_through_a_log_sum_exp_op_stays_dense_and_the_report_says_why():
    model = _RingAttention(HEAD_DIM)
    x, k, v = (torch.randn(1, HEADS, 64, HEAD_DIM) for _ in range(3))
    compiled = torch.compile(model, backend="sparse_video", options={"method": "radial", "min_seq_len": 16})
    with skip_inductor(), torch.no_grad():
        out = compiled(x, k, v)
        expected = torch.nn.functional.scaled_dot_product_attention(model.to_q(x), k, v)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    sites = sparse_compile.report(compiled).sites
    assert len(sites) == 2 and not any(s.rewritten for s in sites)
    assert all(
        s.status.startswith("dense: aten._scaled_dot_product_flash_attention_for_cpu also returns the log-sum-exp")
        for s in sites
    )


WHOLE = ("frames", "height", "width")  # stands for the factors of the whole sequence


def test_an_all_to_all_of_each_ranks_own_piece_gathers_the_pieces():
    axis, received = exchange(None, [Piece(WHOLE, 2, 1), None], AllToAll(parts=2, rank=1))
    assert axis == RankAxis(2, gathers=Piece(WHOLE, 2, 1))
    assert received(Piece(WHOLE, 2, 1)) == Piece(WHOLE, 2, 1)


def test_a_piece_whose_index_is_not_the_rank_is_not_gathered():
    axis, _ = exchange(None, [Piece(WHOLE, 2, 0)], AllToAll(parts=2, rank=1))
    assert axis.gathers is None
    axis, _ = exchange(None, [Piece(WHOLE, 4, 1)], AllToAll(parts=2, rank=1))  # split 4-way, exchanged 2-way
    assert axis.gathers is None


def test_scattering_the_piece_axis_leaves_this_rank_its_piece():
    axis, received = exchange(PieceAxis(WHOLE, 2), [Piece(WHOLE, 2, None)], AllToAll(parts=2, rank=1))
    assert received(Piece(WHOLE, 2, None)) == Piece(WHOLE, 2, 1)
    assert axis.gathers is None, "every block holds piece 1: the rank axis gathers nothing"
