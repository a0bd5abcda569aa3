"""The backend name ``sparse_video`` resolves with and without installation metadata."""

from __future__ import annotations

import subprocess
import sys

_HIDE_ENTRY_POINTS = (
    "import importlib.metadata as md\n"
    "_entry_points = md.entry_points\n"
    "def entry_points(**kw):\n"
    "    found = _entry_points(**kw)\n"
    "    if kw.get('group') == 'torch_dynamo_backends':\n"
    "        return md.EntryPoints(ep for ep in found if ep.name != 'sparse_video')\n"
    "    return found\n"
    "md.entry_points = entry_points\n"
)
_COMPILES_AND_RUNS = "f = torch.compile(lambda x: x * 2, backend='sparse_video')\nassert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))\n"
_RESOLVES = (
    "from torch._dynamo.backends.registry import lookup_backend\n"
    "import sparse_compile.backend\n"
    "assert lookup_backend('sparse_video') is sparse_compile.backend.sparse_video\n"
)


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_registers_the_backend_when_no_entry_point_is_installed():
    _run(
        _HIDE_ENTRY_POINTS
        + "import torch, torch._dynamo\n"
        "from torch._dynamo.exc import InvalidBackend\n"
        "try:\n"
        "    torch.compile(lambda x: x, backend='sparse_video')\n"
        "    raise SystemExit('the name resolved before the package was imported')\n"
        "except InvalidBackend:\n"
        "    pass\n"
        "import sparse_compile\n" + _COMPILES_AND_RUNS
    )


def test_entry_point_lookup_then_import_and_repeated_registration_coexist():
    _run(
        "import sys, torch\n"
        "torch.compile(lambda x: x, backend='sparse_video')\n"  # the name resolves through the entry point
        "assert 'sparse_compile' in sys.modules\n"
        "import sparse_compile\n"
        "from sparse_compile.backend import register_with_dynamo\n"
        "register_with_dynamo()\n"
        "register_with_dynamo()\n" + _RESOLVES
    )


def test_import_then_entry_point_discovery_keeps_one_registration():
    _run(
        "import torch, sparse_compile\n"
        "from torch._dynamo.backends.registry import list_backends, lookup_backend\n"
        "assert 'sparse_video' in list_backends()\n"  # discovers the entry points after the import registered the name
        + _RESOLVES
    )
