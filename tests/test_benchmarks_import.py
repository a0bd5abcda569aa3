"""The GPU benchmark scripts stay runnable: each imports on a CPU machine and answers ``--help``,
none imports another script, and their shared CPU-side helpers compute what they claim."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name != "common.py")


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    """``benchmarks/`` first on ``sys.path``, as it is when a script runs as ``python benchmarks/X.py``."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))


def load_script(name: str, monkeypatch):
    """The script as a module (registered in ``sys.modules`` for the test, as dataclasses need)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{Path(name).stem}", BENCHMARKS / name)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_script_is_listed():
    assert {"bench_methods.py", "bench_end_to_end.py", "bench_quality.py", "bench_block_sparse.py",
            "bench_varlen_block_sparse.py", "bench_kmeans.py", "profile_svg2_stages.py",
            "plot_end_to_end.py"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_imports_on_cpu_and_help_exits_zero(script, benchmarks_on_path, monkeypatch, capsys):
    module = load_script(script, monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_script_imports_another_script(script):
    tree = ast.parse((BENCHMARKS / script).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}
    other_scripts = {Path(s).stem for s in SCRIPTS} - {Path(script).stem}
    assert not imported & other_scripts


def test_script_runs_from_the_repository_root_without_pythonpath():
    result = subprocess.run([sys.executable, "benchmarks/bench_methods.py", "--help"], cwd=BENCHMARKS.parent,
                            capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "--shapes" in result.stdout


def test_rel_l2_is_the_relative_norm_of_the_difference(benchmarks_on_path):
    from common import rel_l2

    want = torch.tensor([3.0, 4.0])
    assert rel_l2(want, want) == 0.0
    assert rel_l2(torch.tensor([3.0, 4.5]), want) == pytest.approx(0.5 / 5.0)


def test_print_and_save_writes_the_table_to_out_when_set(benchmarks_on_path, monkeypatch, tmp_path, capsys):
    from common import print_and_save

    monkeypatch.setenv("OUT", str(tmp_path))
    print_and_save("| a |\n|---|", "table.md")
    assert (tmp_path / "table.md").read_text() == "| a |\n|---|\n"
    assert "| a |" in capsys.readouterr().out


def test_method_call_carries_the_grid_step_and_cache(benchmarks_on_path):
    from common import method_call

    from sparse_compile.methods.base import SiteCache

    q = torch.zeros(1, 2, 24, 8)
    cache = SiteCache()
    call = method_call(q, q, q, (2, 3, 4), cache, step=3, module_path="blocks.1.attn1")
    assert (call.layout.frames, call.layout.height, call.layout.width) == (2, 3, 4)
    assert call.layout.text_tokens == 0 and call.step.step == 3 and call.cache is cache
    assert call.site_name == "blocks.1.attn1"


def test_end_to_end_variant_overrides_parse_as_json(benchmarks_on_path):
    from end_to_end.variants import split_variant

    assert split_variant("svg2@top_p=0.3@kmeans_during_dense=false") == (
        "svg2", {"top_p": 0.3, "kmeans_during_dense": False})
    with pytest.raises(ValueError, match="not key=value"):
        split_variant("svg2@top_p")


def test_end_to_end_total_extrapolates_steady_calls_and_sums_special_steps(benchmarks_on_path):
    from end_to_end.schedule import Schedule, SteadyGroup, extrapolate

    schedule = Schedule(total_steps=4, dense_steps=1, calls_per_step=2, special=(0, 1),
                        groups=(SteadyGroup("sparse", (2, 3), (2,)),))
    result = extrapolate(schedule, {0: [10.0, 10.0], 1: [7.0, 5.0], 2: [4.0, 6.0]})
    assert result["total_s"] == pytest.approx((20 + 12 + 2 * 2 * 5.0) / 1e3)
    assert result["dense_phase_s"] == pytest.approx(0.020)


def test_end_to_end_times_the_steps_a_method_does_extra_work_at_one_by_one(benchmarks_on_path):
    """AdaSpa's searches; auto's timed second sparse step and its recall checks (choice at the last dense step)."""
    from end_to_end.schedule import special_steps

    assert special_steps(None, 10, 50) == ()
    assert special_steps({"method": "adaspa", "dense_steps": 10}, 10, 50) == (0, 9, 10, 30)
    assert special_steps({"method": "auto", "dense_steps": 10}, 10, 50) == (0, 9, 10, 11, 19, 29, 39, 49)
    assert special_steps({"method": "radial", "dense_steps": 10}, 10, 50) == (0, 9, 10)


def test_end_to_end_records_the_source_tree_it_ran_uncommitted_changes_included(benchmarks_on_path):
    """A run's ``git_tree`` is the working tree's tree hash: HEAD's tree when clean, another after an edit or a
    new file, and the checkout's own index is left alone."""
    from end_to_end import report

    def git(*args: str) -> str:
        return report._git(list(args))

    clean = git("diff", "--quiet", "HEAD") is not None and not git("status", "--porcelain")
    if clean:
        assert report.source_tree() == git("rev-parse", "HEAD^{tree}")
    staged_before = git("diff", "--cached", "--name-only")
    probe = BENCHMARKS / "end_to_end" / "_source_tree_probe.txt"
    probe.write_text("an untracked file changes the tree\n")
    try:
        with_probe = report.source_tree()
    finally:
        probe.unlink()
    assert with_probe is not None and with_probe != git("rev-parse", "HEAD^{tree}")
    assert with_probe != report.source_tree()
    assert git("diff", "--cached", "--name-only") == staged_before


def test_fp8_error_budget_splits_the_error_by_rounding(benchmarks_on_path):
    """Each rounding alone errs, all of the FP8 kernels' together err at least as much as the worst alone (the
    errors add, they do not cancel), and 8-bit integers (Q and K per block, V per channel, P per row and key
    block) round each closer than e4m3 does."""
    import fp8_error_budget

    table = fp8_error_budget.error_table(seq=512, heads=1, block=128)
    assert all(0 < error < 1 for errors in table.values() for error in errors)
    together = table["**Q, K, V and P e4m3 (the FP8 kernels)**"]
    singles = ("Q, K e4m3 per block (K smoothed)", "V e4m3 per channel", "P e4m3")
    for i in range(2):
        assert together[i] >= max(table[name][i] for name in singles)
        assert table["Q, K INT8 per block"][i] < table["Q, K e4m3 per block (K smoothed)"][i]
        assert table["V INT8 per channel"][i] < table["V e4m3 per channel"][i]
        assert table["P UINT8 per row and key block"][i] < table["P e4m3"][i]
        assert table["**Q, K, V INT8, P UINT8 (both GEMMs 8-bit integer)**"][i] < together[i]


def test_the_fp8_table_shows_quantisation_alone_as_a_share_of_the_bf16_kernels(benchmarks_on_path):
    import bench_block_sparse as bench

    rows = [bench.Fp8Row("wan", 0.05, "FP8 Gluon", 1.45, 0.81, 0.629, 5.3e-2),
            bench.Fp8Row("wan", 0.05, bench.QUANTISATION_ROW, 0.3, 0.81, 0.6, None)]  # fmt: skip
    table = bench.markdown_fp8(rows).splitlines()
    assert table[2] == "| wan | 0.0500 | FP8 Gluon | 1.450 | 1.79 | 2.31 | 5.3e-02 |"
    assert table[3] == "| wan | 0.0500 | quantisation alone | 0.300 | 0.37 | 0.50 | - |"
