"""The toy model's benchmark scripts: the settings they run and the helpers they share with nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparse_compile.methods.radial_pattern import kept_pair_density, radial_block_mask

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def task_score(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_task_score

    return bench_task_score


def test_radial_gets_the_largest_decay_that_keeps_at_most_the_density(task_score):
    grid, block = (16, 32, 48), 128
    decay = task_score.radial_decay_for(grid, block, 0.5)
    density = lambda d: kept_pair_density(radial_block_mask(*grid, block, d, True), 16 * 32 * 48, block)  # noqa: E731
    assert density(decay) <= 0.5 < density(decay * 1.01)
    assert task_score.radial_decay_for(grid, block, 0.6) == 1.0
    assert task_score.radial_decay_for(grid, block, 0.25) is None  # near frames and the narrowest bands keep more


def test_every_method_runs_at_its_defaults_and_at_each_density_it_can_be_set_to(task_score):
    grid = (16, 32, 48)
    settings = {m: task_score.method_settings(m, grid, tiny=False) for m in ("svg", "adaspa", "svg2", "radial")}
    names = {m: [name for name, _ in rows] for m, (rows, _) in settings.items()}
    assert names["svg"] == ["svg (defaults)", "svg density 0.125"]  # its default density is 0.25
    assert names["adaspa"] == ["adaspa (defaults)", "adaspa density 0.25", "adaspa density 0.125"]
    assert names["svg2"] == ["svg2 (defaults)", "svg2 top_p 0.75", "svg2 top_p 0.5"]  # no density option
    assert names["radial"] == ["radial (defaults)"] and len(settings["radial"][1]) == 2
    tiny = dict(task_score.method_settings("svg2", grid, tiny=True)[0])
    assert tiny["svg2 (defaults)"]["q_clusters"] == 8 and tiny["svg2 top_p 0.5"] == {**tiny["svg2 (defaults)"], "top_p": 0.5}
    assert task_score.method_settings("adaspa", grid, False, defaults_only=True) == ([("adaspa (defaults)", {})], [])


def test_a_density_the_method_cannot_keep_at_the_grid_is_a_note_not_a_row(task_score):
    """At 6 frames a query's own frame and the first frame are a third of the keys: svg stops there."""
    rows, notes = task_score.method_settings("svg", (6, 16, 24), tiny=False)
    assert [name for name, _ in rows] == ["svg (defaults)"]
    assert notes == ["svg cannot keep 0.25 of this grid: its narrowest patterns keep 0.333",
                     "svg cannot keep 0.125 of this grid: its narrowest patterns keep 0.333"]  # fmt: skip
    table = task_score.markdown([{"setting": "dense", "accuracy": 1.0, "correct": [True], "psnr_db": None, "found": 1.0,
                                  "density": None, "sites": 1, "sparse_sites": 0, "seconds": 1.0}], "header", notes)
    assert table.endswith("- svg cannot keep 0.125 of this grid: its narrowest patterns keep 0.333")


def test_the_task_score_table_gives_each_setting_its_clips_gained_and_lost_against_dense(task_score):
    facts = {"found": 1.0, "density": None, "sites": 16, "sparse_sites": 8, "seconds": 1.0}
    rows = [{"setting": "dense", "accuracy": 0.75, "correct": [True, True, True, False], "psnr_db": None, **facts},
            {"setting": "svg (defaults)", "accuracy": 0.75, "correct": [False, True, True, True], "psnr_db": 30.0, **facts},
            {"setting": "radial (defaults)", "accuracy": 0.5, "correct": [True, True, False, False], "psnr_db": 40.0,
             **facts}]  # fmt: skip
    table = task_score.markdown(rows, "header")
    assert "| svg (defaults) | 0.750 | +0.0 | 1 / 1 |" in table and "| radial (defaults) | 0.500 | -25.0 | 0 / 1 |" in table
    assert "within 3 points of dense: no: radial (defaults)" in table and "(target >= 0.9): NOT met" in table


def test_the_task_score_hands_over_the_rows_so_far_after_every_setting(task_score, monkeypatch):
    """A run cut short still leaves the settings it finished (``on_row`` after each one)."""
    from argparse import Namespace

    from sparse_compile.toy.evaluate import balanced_labels
    from sparse_compile.toy.videos import make_videos

    clips = make_videos(3, balanced_labels(8), 4, 32, 48)
    facts = {"sites": 16, "sparse_sites": 8, "density": 0.5, "seconds": 1.0}
    monkeypatch.setattr(task_score, "run_setting", lambda model, options, args: (clips, facts))
    args = Namespace(frames=4, height=32, width=48, steps=2, dense_steps=1, tiny=True, defaults_only=True,
                     methods=["svg", "radial"])  # fmt: skip
    seen = []
    rows = task_score.score_rows(None, args, lambda so_far: seen.append([r["setting"] for r in so_far]))
    assert seen == [["dense"], ["dense", "svg (defaults)"], ["dense", "svg (defaults)", "radial (defaults)"]]
    assert [r["accuracy"] for r in rows] == [1.0, 1.0, 1.0] and rows[1]["psnr_db"] == 100.0


def test_the_guidance_sweep_scores_every_scale_on_the_same_clips(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_guidance

    bench_guidance.main(["--guidance", "1", "2", "--clips", "2", "--tiny", "--strips", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "guidance.json").read_text())["rows"]
    assert [(r["guidance"], r["clips"], r["frames"]) for r in rows] == [(1.0, 2, 2), (2.0, 2, 2)]
    assert all(0.0 <= r["accuracy"] <= r["found"] <= 1.0 for r in rows)
    assert "| 2 (default) |" in (tmp_path / "guidance.md").read_text()
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["guidance_1_2x16x16.png", "guidance_2_2x16x16.png"]


def test_the_guidance_sweep_takes_sizes_with_steps_and_schedule_shifts(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_guidance

    args = bench_guidance.parse_args(["--sizes", "16x64x96:6", "6x32x48:20", "--shift", "1", "3"])
    assert args.sizes == [(16, 64, 96, 6), (6, 32, 48, 20)] and args.shift == [1.0, 3.0]
    with pytest.raises(SystemExit):
        bench_guidance.parse_args(["--sizes", "16x64x96"])
    assert "FRAMESxHEIGHTxWIDTH:STEPS" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_guidance.parse_args(["--shift", "0.5"])
    assert "--shift values must be at least 1" in capsys.readouterr().err


def test_the_guidance_rows_sample_each_size_at_each_schedule_shift(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_guidance
    from sparse_compile.toy.model import build_toy_wan

    model = build_toy_wan(torch.device("cpu"), torch.float32)
    shifts = []
    real_generate = bench_guidance.generate_clips
    monkeypatch.setattr(bench_guidance, "generate_clips",
                        lambda *args, **kwargs: shifts.append(kwargs["shift"]) or real_generate(*args, **kwargs))
    rows = bench_guidance.score_rows(model, [2.0], ((2, 16, 16, 2),), clips=1, shifts=(1.0, 3.0))
    assert shifts == [1.0, 3.0] and [r["shift"] for r in rows] == [1.0, 3.0]
    assert "| 2 (default) | 3 | 2×16×16, 2 |" in bench_guidance.markdown(rows, "header")


def test_the_guidance_sweep_refuses_scales_below_one(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_guidance

    with pytest.raises(SystemExit):
        bench_guidance.parse_args(["--guidance", "0.5"])
    assert "--guidance scales must be at least 1" in capsys.readouterr().err


def test_attention_statistics_are_captured_at_the_first_step_past_the_default_warm_up(monkeypatch, default_timestep_warmup):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_attention_stats

    # the toy's linear schedule: sigma 1, 0.95 are above (1 - 0.07) of the first; 0.90 is not
    assert bench_attention_stats.parse_args([]).dense_steps == 2
    assert bench_attention_stats.parse_args(["--steps", "50"]).dense_steps == 4  # 1, .98, .96, .94 > .93
    assert bench_attention_stats.parse_args(["--steps", "1"]).dense_steps == 0
    assert bench_attention_stats.parse_args(["--dense-steps", "5"]).dense_steps == 5
