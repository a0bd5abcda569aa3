"""Symbolic sizes get a hint on every torch the backend supports (2.11 on the GPU machines, 2.13 here)."""

from __future__ import annotations

import builtins

import torch

from sparse_compile.passes import token_layout


def _symbolic_sizes(fn, *args) -> list:
    """The SymInt sizes of the tensor inputs a dynamic-shape trace of ``fn`` sees."""
    seen = []

    def backend(gm, example_inputs):
        values = [token_layout.example_value(n) for n in gm.graph.find_nodes(op="placeholder")]
        seen.extend(s for v in values if isinstance(v, torch.Tensor) for s in v.shape if isinstance(s, torch.SymInt))
        return gm.forward

    torch.compile(fn, backend=backend, dynamic=True)(*args)
    return seen


def test_a_backed_size_is_hinted_with_its_value_without_optimization_hint(monkeypatch):
    sizes = _symbolic_sizes(lambda x: x * 2, torch.ones(5, 7))
    assert sizes and [token_layout.size_expr(s)[1] for s in sizes] == [5, 7]
    real_import = builtins.__import__

    def torch_2_11_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "torch.fx.experimental.symbolic_shapes" and fromlist and "optimization_hint" in fromlist:
            raise ImportError("cannot import name 'optimization_hint'")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.setattr(builtins, "__import__", torch_2_11_import)
    assert [token_layout.size_expr(s)[1] for s in sizes] == [5, 7]
