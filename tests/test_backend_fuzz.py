"""Property test of the whole backend: random Wan configs, methods, options and step schedules."""

from __future__ import annotations

import torch
import torch._dynamo.utils
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_compile

# Per method: small-size parameters, and the parameters that keep every (query, key) pair.
SMALL = {
    "svg2": {"q_clusters": 3, "k_clusters": 5, "kmeans_iters_init": 2},
    "svg": {"block": 16},
    "radial": {"block": 16},
    "adaspa": {"block": 16},
    "dense": {},
}
KEEP_ALL = {
    "svg2": {"top_p": 1.0, "min_kc_ratio": 1.0},
    "svg": {"density": 1.0},
    "radial": {"decay": 1.0, "first_frame_sink": True},
    "adaspa": {"density": 1.0},
    "dense": {},
}


def _wan(layers, heads, head_dim, frames, height, width, batch):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers, cross_attn_norm=True,
        rope_max_seq_len=32,
    ).eval()
    inputs = dict(hidden_states=torch.randn(batch, 4, frames, 2 * height, 2 * width),
                  encoder_hidden_states=torch.randn(batch, 5, 16))
    return model, inputs


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.integers(1, 2),
    heads=st.integers(1, 2),
    head_dim=st.sampled_from([16, 32]),
    frames=st.integers(1, 3),
    height=st.integers(1, 4),
    width=st.integers(2, 5),
    batch=st.integers(1, 2),
    method=st.sampled_from(list(SMALL)),
    keep_all=st.booleans(),
    dense_steps=st.integers(0, 2),
    steps=st.integers(2, 4),
    cfg_calls=st.sampled_from([1, 2]),
)
def test_random_models_options_and_schedules(layers, heads, head_dim, frames, height, width, batch, method,
                                             keep_all, dense_steps, steps, cfg_calls):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model, inputs = _wan(layers, heads, head_dim, frames, height, width, batch)
    options = {"method": method, "min_seq_len": 1, "dense_steps": dense_steps, **SMALL[method]}
    if keep_all:
        options.update(KEEP_ALL[method])
    compiled = torch.compile(model, backend="sparse_video", options=options)
    with torch.no_grad():
        for step in range(steps):
            t = torch.full((batch,), 900 - 100 * step)
            for _ in range(cfg_calls):
                out = compiled(**inputs, timestep=t).sample
                assert torch.isfinite(out).all()
                if keep_all:
                    eager = model(**inputs, timestep=t).sample
                    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1, "no recompile across steps"
    rep = sparse_compile.report(compiled)
    video = rep.rewritten
    assert len(video) == layers
    assert all(s.grid == (frames, height, width) for s in video)
    for site in video:
        assert sorted(site.density_by_step) == list(range(steps))
        assert all(0.0 < d <= 1.0 for d in site.density_by_step.values())
        assert all(site.density_by_step[s] == 1.0 for s in range(min(dense_steps, steps)))
