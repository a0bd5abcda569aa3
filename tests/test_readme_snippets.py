"""The README works as written: its probe snippet runs on a (tiny) Wan pipeline, its tested-settings
table is the one on the results page, and CI installs and tests the way it tells users to."""

from __future__ import annotations

import importlib.util
import re
import types
from pathlib import Path

import torch

import sparse_compile
import tiny_models

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_snippet(name: str) -> str:
    """The code block that follows ``<!-- snippet: name -->`` in the README."""
    match = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", README, re.S)
    assert match, f"README has no snippet {name!r}"
    return match.group(1)


class TinyWanPipeline:
    """A stand-in for a diffusers video pipeline: ``pipe(prompt, num_inference_steps=...)`` denoises
    with ``pipe.transformer`` (a tiny Wan model over 8 x 8 x 16 = 1024 video tokens) and returns an
    object with ``.frames``."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.transformer, self.inputs, _ = tiny_models.wan(frames=8, height=16, width=32, layers=2)

    def __call__(self, prompt: str, num_inference_steps: int = 3):
        latents = self.inputs["hidden_states"]
        with torch.no_grad():
            for t in torch.linspace(900, 100, num_inference_steps):
                noise = self.transformer(hidden_states=latents, timestep=t.expand(1),
                                         encoder_hidden_states=self.inputs["encoder_hidden_states"],
                                         return_dict=False)[0]
                latents = latents - 0.1 * noise
        return types.SimpleNamespace(frames=[latents])


def test_readme_probe_snippet_runs_as_written_and_measures_every_layer(capsys):
    namespace = {"torch": torch, "sparse_compile": sparse_compile, "pipe": TinyWanPipeline(),
                 "prompt": "a red circle moving right"}
    exec(readme_snippet("attention_probe"), namespace)  # noqa: S102 - the README's own code
    by_layer = namespace["probe"].by_layer()
    assert sorted(by_layer) == [0, 1]
    for error, recall, density in by_layer.values():
        assert error >= 0 and 0 < recall <= 1 and 0 < density <= 1
    assert str(by_layer[0][0]) in capsys.readouterr().out


def test_readme_tested_settings_table_is_the_results_pages_table():
    spec = importlib.util.spec_from_file_location("sync_readme", ROOT / "benchmarks" / "sync_readme.py")
    sync_readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync_readme)
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert "tested-settings" in sync_readme.marked_tables(README)
    assert sync_readme.synced(README, results) == README


def test_ci_installs_and_tests_with_the_readmes_commands():
    ci = (ROOT / ".ci" / "run").read_text()
    command = "-m pytest -q -n auto --maxprocesses 4 tests"
    assert f'pip install torch==2.13.0 ".[test]" && python {command}' in README
    assert 'torch==2.13.0 ".[test]"' in ci
    assert command in ci
