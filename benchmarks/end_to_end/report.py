"""The results file: every measurement as JSON, and the markdown report made from it."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch

from .timing import ATTENTION_KERNEL
from .variants import INDUCTOR

SCHEMA = "bench_end_to_end/1"


def _git(args: list[str], env: dict[str, str] | None = None) -> str | None:
    """``git args`` run in this file's repository: its stripped output, or ``None`` where git fails."""
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30, env=env,
                              cwd=Path(__file__).parent)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_tree() -> str | None:
    """The git tree hash of the working tree as it is (uncommitted changes and untracked, not ignored, files
    included), written from a scratch index; ``git log --format='%h %T'`` finds the commit with that tree.
    ``None`` outside a git checkout."""
    root = _git(["rev-parse", "--show-toplevel"])
    if not root:
        return None
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": os.path.join(scratch, "index")}
        if _git(["-C", root, "add", "-A"], env) is None:
            return None
        return _git(["-C", root, "write-tree"], env) or None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions, device and command line of this run."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "triton": triton_version,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "git_commit": _git(["rev-parse", "HEAD"]) or None,
        "git_tree": source_tree(),
    }


@dataclass
class Results:
    """Everything measured, written as JSON and markdown after each variant."""

    out: Path
    runs: list[dict[str, Any]] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: list[dict[str, Any]] = field(default_factory=list)
    in_progress: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: Path, out: Path) -> "Results":
        data = json.loads(path.read_text())
        if data.get("schema") != SCHEMA:
            raise SystemExit(f"{path}: not a {SCHEMA} file")
        return cls(out, data["runs"], data["models"], data["variants"])

    def previous(self, model: str, method: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        """A successful earlier record of this variant with the same settings."""
        return next((v for v in self.variants if v["model"] == model and v["method"] == method
                     and v["status"] == "ok" and v["settings"] == settings), None)

    def put(self, record: dict[str, Any]) -> None:
        """Add a variant's record, replacing an earlier one of the same (model, method)."""
        self.variants = [v for v in self.variants
                         if (v["model"], v["method"]) != (record["model"], record["method"])] + [record]

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"schema": SCHEMA, "runs": self.runs, "models": self.models, "variants": self.variants,
                "in_progress": self.in_progress}
        tmp = self.out / "end_to_end.json.tmp"
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.out / "end_to_end.json")
        (self.out / "end_to_end.md").write_text(markdown(data))


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _sites(variant: dict[str, Any]) -> str:
    """``rewritten / all`` attention sites of a backend variant (``-`` for Inductor or older records)."""
    if variant.get("rewritten_sites") is None:
        return "-"
    return f"{variant['rewritten_sites']} / {variant['sites']}"


def model_table(model: str, info: dict[str, Any], variants: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of one model: a row per variant, the baseline's attention share, notes."""
    ok = [v for v in variants if v["status"] == "ok"]
    base = next((v for v in ok if v["method"] == INDUCTOR), None)
    base_call = base["summary"]["dense_call_ms"] if base else None
    base_total = base["extrapolated"]["total_s"] if base else None
    lines = [f"### {model}: {info['description']}, {info['blocks']} blocks benchmarked", "",
             f"{info['video_tokens']} video tokens (latent {'x'.join(map(str, info['latent']))}), "
             f"{info['calls_per_step']} call(s) per step, {info['parameters']:,} parameters.", "",
             "| method | compile + 1st call s | dense-phase ms/call | first sparse step ms | sparse ms/call "
             "| kept density | rewritten sites | sparse call speedup vs Inductor | extrapolated total s "
             "| total speedup vs Inductor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in ok:
        s, total = v["summary"], v["extrapolated"]["total_s"]
        call = s["sparse_call_ms"] if s["sparse_call_ms"] is not None else s["dense_call_ms"]
        speed = base_call / call if base_call and v is not base else None
        lines.append(f"| {v['method']} | {v['compile_s']:.1f} | {fmt(s['dense_call_ms'], '.1f')} "
                     f"| {fmt(s['first_sparse_step_ms'], '.1f')} | {fmt(s['sparse_call_ms'], '.1f')} "
                     f"| {fmt(v.get('kept_density'), '.3f')} | {_sites(v)} | {fmt(speed, '.2f')} | {total:.1f} "
                     f"| {fmt(base_total / total if base_total and v is not base else None, '.2f')} |")
    if base and base.get("attention", {}).get("share") is not None:
        att = base["attention"]
        lines += ["", f"Attention share of one Inductor dense call: {att['share']:.1%} "
                      f"({att['attention_ms']:.1f} of {att['total_ms']:.1f} ms, {att['measured_on']}; kernels named "
                      f"like `{ATTENTION_KERNEL.pattern}`, self- and cross-attention)."]
    for v in variants:
        if v["status"] != "ok":
            lines += ["", f"- {v['method']}: **{v['status']}**: {v.get('reason') or v.get('error', '')}"]
    lines += ["", "Extrapolations:"] + [f"- {v['method']}: {v['extrapolated']['formula']}" for v in ok]
    return lines + [""]


def markdown(data: dict[str, Any]) -> str:
    """The ``end_to_end.md`` report."""
    lines = ["# End-to-end transformer time: Inductor dense vs sparse methods", "",
             "Totals are EXTRAPOLATED to a whole generation from timed calls at chosen steps "
             "(benchmarks/bench_end_to_end.py says how); random weights.", ""]
    for run in data["runs"]:
        lines.append(f"- run {run['started']}: {run['device']}, torch {run['torch']}, triton {run['triton']}, "
                     f"diffusers {run['diffusers']}, commit {run['git_commit']}, source tree "
                     f"{run.get('git_tree')}: `{run['command']}`")
    lines.append("")
    for model, info in data["models"].items():
        lines += model_table(model, info, [v for v in data["variants"] if v["model"] == model])
    if data.get("in_progress"):
        ip = data["in_progress"]
        lines.append(f"**Stopped during {ip['model']} / {ip['method']}** "
                     f"(started {ip['started_s']:.0f} s into the run).")
    return "\n".join(lines) + "\n"


def describe(record: dict[str, Any]) -> str:
    """One progress line for a finished variant."""
    if record["status"] != "ok":
        return f"ERROR {record['error']}"
    s = record["summary"]
    parts = [f"dense call {fmt(s['dense_call_ms'], '.1f')} ms"]
    if s["sparse_call_ms"] is not None:
        parts += [f"first sparse step {fmt(s['first_sparse_step_ms'], '.1f')} ms",
                  f"sparse call {s['sparse_call_ms']:.1f} ms", f"kept density {fmt(record.get('kept_density'), '.3f')}"]
    if "attention" in record:
        parts.append(f"attention share {fmt(record['attention']['share'], '.1%')}")
    parts.append(f"extrapolated total {record['extrapolated']['total_s']:.1f} s")
    return "; ".join([", ".join(parts), *record.get("break_even", [])])
