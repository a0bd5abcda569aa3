"""``method="svg2"``: the break-even guard decides per head from the selection's kept densities."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from method_calls import method_call, record_kernel_calls
from sparse_compile.methods import svg2
from sparse_compile.methods.base import SiteCache
from sparse_compile.methods.cost_model import NOMINAL_COSTS, nominal_cluster_costs
from sparse_compile.methods.svg2 import Svg2Method
from sparse_compile.options import validate_options
from sparse_compile.runtime.session import SiteState
from test_auto import LAYOUT, synthetic_heads

OPTIONS = {"method": "svg2", "q_clusters": 8, "k_clusters": 8, "top_p": 0.9}
BREAK_EVEN = nominal_cluster_costs(8, 8, 1).break_even_density(NOMINAL_COSTS.dense_pair_time)


def _run(monkeypatch, break_even, **options) -> tuple:
    """The synthetic heads (local, temporal, uniform) through svg2 with the guard's break-even density
    ``break_even`` (``None``: not measured, as off CUDA)."""
    monkeypatch.setattr(svg2, "cluster_guard_density", lambda *args: break_even)
    q, k, v = synthetic_heads()
    state = SiteState()
    result = Svg2Method(validate_options({**OPTIONS, **options})).run(method_call(q, k, v, LAYOUT, state.cache))
    state.record("blocks.0.attn1", 1, result)
    return result, state.head_runs, (q, k, v)


def test_heads_past_break_even_run_dense_sdpa_and_the_rest_stay_sparse(monkeypatch):
    guarded, runs, (q, k, v) = _run(monkeypatch, BREAK_EVEN)
    unguarded, _, _ = _run(monkeypatch, None)
    assert guarded.guarded_heads == (2,), "the uniform head's clusters keep every pair: past break-even"
    assert (runs.sparse, runs.guard, runs.warmup) == ([1, 1, 0], [0, 0, 1], [0, 0, 0])
    torch.testing.assert_close(guarded.output[:, 2], F.scaled_dot_product_attention(q, k, v)[:, 2])
    torch.testing.assert_close(guarded.output[:, :2], unguarded.output[:, :2])
    assert bool(torch.isinf(guarded.video_lse[:, 2]).all()), "the dense head reads as recall 1"
    assert float(guarded.kept_density) == pytest.approx((0.125 + 0.25 + 1) / 3), "own frame, a quarter, every pair"


def test_without_measured_costs_every_head_runs_sparse(monkeypatch):
    result, runs, _ = _run(monkeypatch, None)
    assert result.guarded_heads == () and runs.sparse == [1, 1, 1]


def test_break_even_guard_false_keeps_every_head_sparse(monkeypatch):
    result, runs, _ = _run(monkeypatch, BREAK_EVEN, break_even_guard=False)
    assert result.guarded_heads == () and runs.sparse == [1, 1, 1]


def test_when_every_head_is_past_break_even_the_call_runs_dense(monkeypatch):
    result, runs, (q, k, v) = _run(monkeypatch, 1e-3)  # break-even below any head
    assert result.guarded_heads == (0, 1, 2) and runs.guard == [1, 1, 1]
    torch.testing.assert_close(result.output, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("break_even,step_stride", [(1e-3, svg2.GUARD_RECHECK_STEPS), (None, 1)])
def test_a_site_whose_every_head_passed_break_even_runs_dense_without_clustering_until_its_recheck(
    monkeypatch, break_even, step_stride
):  # fmt: skip
    """Every head past break-even at step 1: the next GUARD_RECHECK_STEPS - 1 steps run dense SDPA and cluster
    nothing, then one clusters and decides again. Without measured costs every step clusters."""
    monkeypatch.setattr(svg2, "cluster_guard_density", lambda *args: break_even)
    clustered = []
    real_cluster = Svg2Method._cluster
    monkeypatch.setattr(Svg2Method, "_cluster",
                        lambda self, q, k, call: clustered.append(call.step.step) or real_cluster(self, q, k, call))
    q, k, v = synthetic_heads()
    method, cache = Svg2Method(validate_options(OPTIONS)), SiteCache()
    for step in range(1, 22):
        result = method.run(method_call(q, k, v, LAYOUT, cache, step=step))
        if break_even is not None:
            assert result.guarded_heads == (0, 1, 2)
            torch.testing.assert_close(result.output, F.scaled_dot_product_attention(q, k, v))
    assert clustered == list(range(1, 22, step_stride))
    method.run(method_call(q, k, v, LAYOUT, cache, step=0))  # an earlier step (a loop that restarted): decides anew
    assert clustered[-1] == 0


def test_a_call_skipped_as_all_guarded_does_not_scan_its_inputs(monkeypatch):
    """The skipped call runs dense SDPA whatever q, k and v hold, so it spends no pass over them (and no
    host read) on the non-finite check."""
    monkeypatch.setattr(svg2, "cluster_guard_density", lambda *args: 1e-3)
    q, k, v = synthetic_heads()
    method, cache = Svg2Method(validate_options(OPTIONS)), SiteCache()
    method.run(method_call(q, k, v, LAYOUT, cache, step=1))
    monkeypatch.setattr(Svg2Method, "dense_reason", lambda self, call: pytest.fail("the inputs were scanned"))
    result = method.run(method_call(q, k, v, LAYOUT, cache, step=2))
    assert result.guarded_heads == (0, 1, 2)
    torch.testing.assert_close(result.output, F.scaled_dot_product_attention(q, k, v))


def test_the_kept_rows_bounds_are_each_batch_element_and_heads_own(monkeypatch):
    """Batch elements whose heads keep different key counts: the op gets each (batch element, sparse head)'s kept
    keys as its bound, in (batch, head) order, and their sum as the total."""
    monkeypatch.setattr(svg2, "cluster_guard_density", lambda *args: BREAK_EVEN)
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return varlen_op(*args, **kwargs)

    varlen_op = svg2.varlen_block_sparse_attention
    monkeypatch.setattr(svg2, "varlen_block_sparse_attention", recording)
    q, k, v = synthetic_heads()
    swapped = [1, 0, 2]  # the local and temporal heads trade places in the second batch element
    q, k, v = (torch.cat([t, t[:, swapped]]) for t in (q, k, v))
    result = Svg2Method(validate_options(OPTIONS)).run(method_call(q, k, v, LAYOUT, SiteCache()))
    assert result.guarded_heads == (2,) and len(calls) == 1
    per_pair = calls[0]["kept_keys"].long().sum(-1)  # (B, sparse heads)
    assert per_pair[0, 0] != per_pair[0, 1] and torch.equal(per_pair[0], per_pair[1].flip(0))
    assert calls[0]["pair_kept_rows"] == per_pair.flatten().tolist()
    assert calls[0]["kept_rows_total"] == int(per_pair.sum())


def test_with_measured_costs_the_non_finite_check_rides_on_the_guards_read(monkeypatch):
    """The guard's one host read also says whether q, k and v are finite: no read of its own before the
    clustering, so the next call's k-means is launched while this call's kernel runs."""
    monkeypatch.setattr(Svg2Method, "dense_reason", lambda self, call: pytest.fail("a separate non-finite read"))
    result, runs, _ = _run(monkeypatch, BREAK_EVEN)
    assert result.fallback_reason is None and runs.sparse == [1, 1, 0]


@pytest.mark.parametrize("poisoned", ["query", "key", "value"])
def test_a_non_finite_input_runs_dense_with_its_reason_and_leaves_the_cached_clustering(monkeypatch, poisoned):
    """NaN in q, k or v with the guard on: dense SDPA, reported, and the site keeps the clustering of the last
    finite call (NaN centroids never become a warm start)."""
    monkeypatch.setattr(svg2, "cluster_guard_density", lambda *args: BREAK_EVEN)
    method, cache = Svg2Method(validate_options(OPTIONS)), SiteCache()
    q, k, v = synthetic_heads()
    method.run(method_call(q, k, v, LAYOUT, cache, step=1))
    warm_start = list(cache.entries().values())
    inputs = {"query": q.clone(), "key": k.clone(), "value": v.clone()}
    inputs[poisoned][0, 1, 5, 0] = float("nan")
    result = method.run(method_call(*inputs.values(), LAYOUT, cache, step=2))
    assert result.fallback_reason == f"{poisoned} holds NaN or Inf (dense attention defines the result)"
    torch.testing.assert_close(result.output, F.scaled_dot_product_attention(*inputs.values()), equal_nan=True)
    assert [id(entry) for entry in cache.entries().values()] == [id(entry) for entry in warm_start]


def _staging_fakes(monkeypatch, capacity: int) -> tuple[list, list, list]:
    """On the CPU (where the op runs its reference and nothing is staged): stand-ins for the staged kernel call
    whose buffer holds ``capacity`` kept keys; returns the calls staged, the staged calls run and the op's calls."""
    staged, ran = [], []

    def stage(q, k, v, *layout, kept_keys, **kwargs):
        staged.append(SimpleNamespace(capacity=capacity, layout=layout, kwargs=kwargs))
        return staged[-1]

    def run(call, q, k, v):
        ran.append(call)
        return svg2.varlen_block_sparse_attention(q, k, v, *call.layout, return_lse=True, **call.kwargs)

    monkeypatch.setattr(svg2, "stage_varlen_call", stage)
    monkeypatch.setattr(svg2, "run_staged_call", run)
    return staged, ran, record_kernel_calls(monkeypatch, svg2, "varlen_block_sparse_attention")


@pytest.mark.parametrize("break_even, capacity, staged_runs", [
    (2.0, 10**9, True),  # no head past break-even, the kept keys fit: the staged call runs, no op call
    (2.0, 0, False),  # the kept keys outgrow the staged buffer: the op, with the bounds read
    (BREAK_EVEN, 10**9, False),  # the uniform head guarded: the op on the other two
], ids=["staged", "outgrown", "a head guarded"])  # fmt: skip
def test_the_kernels_prep_staged_before_the_read_runs_only_when_no_head_is_guarded_and_its_keys_fit(
    monkeypatch, break_even, capacity, staged_runs
):  # fmt: skip
    """The prep of every head's kernel call is launched before the guard's read; after it the staged call runs
    when no head is guarded and all kept keys fit its buffer, else the op runs as without staging. Either way
    the output is the one without staging."""
    monkeypatch.setattr(svg2, "cluster_guard_density", lambda *args: break_even)
    q, k, v = synthetic_heads()

    def attend() -> torch.Tensor:
        return Svg2Method(validate_options(OPTIONS)).run(method_call(q, k, v, LAYOUT, SiteCache())).output

    unstaged = attend()
    staged, ran, op_calls = _staging_fakes(monkeypatch, capacity)
    output = attend()
    assert len(staged) == 1 and len(ran) == staged_runs and len(op_calls) == 1
    assert ("kept_rows_total" in op_calls[0][3]) != staged_runs, "the op with the read bounds only without staging"
    torch.testing.assert_close(output, unstaged, rtol=0, atol=0)


def test_after_a_staged_call_the_next_launches_its_attention_before_the_read_and_drops_it_if_unfit(monkeypatch):
    """A site whose last call ran staged launches the next call's attention kernel before the guard's read (the
    read then waits for the selection only). When that call turns out to have a guarded head, its early output is
    dropped for the op's, and the call after it waits for the read again. The outputs are those without staging."""
    break_even_of_step = {1: 2.0, 2: 2.0, 3: BREAK_EVEN, 4: BREAK_EVEN}  # no head guarded, then the uniform one

    def four_steps() -> list[torch.Tensor]:
        method, cache = Svg2Method(validate_options(OPTIONS)), SiteCache()
        q, k, v = synthetic_heads()
        outputs = []
        for step, break_even in break_even_of_step.items():
            monkeypatch.setattr(svg2, "cluster_guard_density", lambda *args: break_even)
            outputs.append(method.run(method_call(q, k, v, LAYOUT, cache, step=step)).output)
        return outputs

    unstaged = four_steps()
    _, ran, op_calls = _staging_fakes(monkeypatch, 10**9)
    launched_early = []
    real_read = svg2.read_while
    monkeypatch.setattr(svg2, "read_while",
                        lambda values, work: launched_early.append(work is not None) or real_read(values, work))
    staged = four_steps()
    assert launched_early == [False, True, True, False]
    assert len(ran) == 3, "steps 1 and 2 staged, step 3's early launch"
    assert ["kept_rows_total" in call[3] for call in op_calls] == [False, False, False, True, True], "the op: steps 3, 4"
    for got, want in zip(staged, unstaged):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
