"""The kept density each method needs for a recall target, measured from one attention call."""

from __future__ import annotations

import pytest
import torch

from sparse_compile.methods.adaspa import AdaSpaConfig
from sparse_compile.methods.auto import AutoConfig
from sparse_compile.methods.radial import RadialConfig
from sparse_compile.methods.svg import SvgConfig
from sparse_compile.methods.svg2 import Svg2Config
from sparse_compile.methods.svg_profile import sample_rows
from sparse_compile.toy.method_recall import (
    METHODS,
    RECALLS,
    Curve,
    MethodConfigs,
    adaspa_curve,
    analyse_call,
    needed_density,
    oracle_density,
)

GRID = (4, 8, 8)
TOKENS = 4 * 8 * 8
SMALL = MethodConfigs(adaspa=AdaSpaConfig(block=16), svg=SvgConfig(block=16), radial=RadialConfig(block=16),
                      svg2=Svg2Config(q_clusters=8, k_clusters=16, kmeans_iters_init=3), auto=AutoConfig(block=32))


def _analyse(q, k):
    rows = sample_rows(TOKENS, 64, torch.device("cpu"))
    return analyse_call(q, k, torch.randn_like(k), GRID, rows, q.shape[-1] ** -0.5, SMALL)


def test_needed_density_is_the_least_density_reaching_the_target_and_dense_when_none_does():
    curve = Curve(density=torch.tensor([[[0.1, 0.3, 0.5]]]), recall=torch.tensor([[[0.5, 0.92, 0.97]]]))
    assert needed_density(curve, 0.9).item() == pytest.approx(0.3)
    assert needed_density(curve, 0.95).item() == pytest.approx(0.5)
    assert needed_density(curve, 0.99).item() == 1.0


def test_the_oracle_keeps_the_fewest_keys_of_each_row():
    probs = torch.tensor([[[[0.6, 0.3, 0.1, 0.0]]]])
    assert oracle_density(probs, 0.9).item() == pytest.approx(0.5)
    assert oracle_density(probs, 0.95).item() == pytest.approx(0.75)


def test_adaspa_keeping_every_block_recalls_everything():
    mass = torch.rand(1, 2, 5, 5, generator=torch.Generator().manual_seed(0))
    curve = adaspa_curve(mass / mass.sum(-1, keepdim=True), torch.full((5,), 16))
    assert torch.allclose(curve.recall[..., -1], torch.ones(1, 2)) and curve.density[..., -1].eq(1).all()
    assert (curve.recall.diff(dim=-1) >= -1e-6).all()


def test_on_position_blind_attention_every_fixed_pattern_recalls_its_density():
    """Uniform rows: a kept set's recall is its share of the keys, whatever its shape."""
    k = torch.randn(1, 2, TOKENS, 16, generator=torch.Generator().manual_seed(1))
    result = _analyse(torch.zeros_like(k), k)
    for method in ("adaspa", "svg", "radial"):
        recall, density = result.at_defaults[method]
        assert torch.allclose(recall, density, atol=0.02), method
    for target in RECALLS:
        assert torch.allclose(result.needed["oracle"][target], torch.full((1, 2), target), atol=1 / TOKENS + 1e-6)
    assert torch.allclose(result.near_mass, torch.full((1, 2), result.near_share), atol=1e-4)


def test_on_attention_to_oneself_the_oracle_keeps_one_key_and_no_method_keeps_less():
    k = torch.nn.functional.normalize(torch.randn(1, 2, TOKENS, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    result = _analyse(160 * k, 4 * k)  # scale 1/4: a query scores 160 on its own key, 160 * cosine on another
    for target in RECALLS:
        assert torch.allclose(result.needed["oracle"][target], torch.full((1, 2), 1 / TOKENS))
        for method in METHODS:
            assert (result.needed[method][target] >= result.needed["oracle"][target] - 1e-6).all(), method
    assert (result.near_mass > 0.99).all() and result.near_share < 0.5
    assert {c for row in result.svg_class for c in row} <= {"spatial", "temporal", "global"}
