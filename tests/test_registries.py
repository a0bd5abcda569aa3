"""Site and graph records, per-model state and per-site caches stay bounded in a long-running process."""

from __future__ import annotations

import gc
import weakref

import torch
import torch._dynamo
import torch._dynamo.utils

import tiny_models
from sparse_compile.runtime import sites
from sparse_compile.runtime.session import find_session

OPTIONS = {"method": "svg2", "min_seq_len": 16, "q_clusters": 4, "k_clusters": 6, "kmeans_iters_init": 2}
GRIDS = [(3, 8, 10), (2, 8, 8), (4, 6, 8)]  # latent (frames, height, width): 60, 32 and 48 tokens


def _cycle(compiled) -> None:
    """Each resolution in turn, one step of CFG as two calls."""
    with torch.no_grad():
        for frames, height, width in GRIDS:
            _, inputs, _ = tiny_models.wan(frames, height, width, layers=1)
            for _ in range(2):
                compiled(**{**inputs, "timestep": torch.tensor([900])})


def _sizes(model) -> tuple[int, int, int, int]:
    gc.collect()
    states = find_session(model).site_states.values()
    return len(sites.SITES), len(sites.GRAPHS), len(states), sum(len(s.cache) for s in states)


def test_records_states_and_caches_stay_bounded_across_resolutions_and_models():
    gc.collect()
    baseline = (len(sites.SITES), len(sites.GRAPHS))
    torch._dynamo.utils.counters.clear()
    model, inputs, _ = tiny_models.wan(layers=1)
    compiled = torch.compile(model, backend="sparse_video", options=OPTIONS)
    _cycle(compiled)

    other, other_inputs, _ = tiny_models.wan(layers=1)  # a second model of the class: compiled, run, deleted
    other_compiled = torch.compile(other, backend="sparse_video", options=OPTIONS)
    with torch.no_grad():
        other_compiled(**other_inputs)
    other_session = weakref.ref(find_session(other))
    del other, other_compiled
    gc.collect()
    assert other_session() is None, "a deleted model's session must be released"

    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    after_first = _sizes(model)
    for _ in range(2):
        _cycle(compiled)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "no recompiles after the first cycle"
        assert _sizes(model) == after_first
    site_states, cache_entries = after_first[2:]
    assert site_states == 1  # the model's one rewritten site (its cross-attention stays SDPA)
    assert cache_entries == 2  # svg2 centroids of the two CFG branches of the one sparse site

    torch._dynamo.reset()
    gc.collect()
    assert (len(sites.SITES), len(sites.GRAPHS)) == baseline, "records are released with their graphs"
