"""The ``sparse_video`` torch.compile backend.

Found by name two ways: the ``torch_dynamo_backends`` entry point of an installed package
(``torch.compile(model, backend="sparse_video", options={...})`` needs no import), and
:func:`register_with_dynamo`, run when :mod:`sparse_compile` is imported, for a copy without
installation metadata (vendored, or on ``PYTHONPATH``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from sparse_compile.options import validate_options
from sparse_compile.passes import rewrite_attention
from sparse_compile.passes.graph_inputs import find_timestep_input
from sparse_compile.runtime.session import current_call, session_for_parameters

logger = logging.getLogger("sparse_compile")


def inductor_config_for_mode(mode: str | None) -> dict[str, Any]:
    """Inductor config patches of a ``torch.compile`` mode (``None``/"default" -> none).

    Raises:
        ValueError: an unknown mode.
    """
    if mode is None or mode == "default":
        return {}
    from torch._inductor import list_mode_options

    allowed = list(list_mode_options())
    if mode not in allowed:
        raise ValueError(f"sparse_video: unknown mode {mode!r}; allowed: {allowed}")
    return dict(list_mode_options(mode))


def sparse_video(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Mapping[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Rewrite video attention sites of a Dynamo graph, then compile it with Inductor.

    Args:
        gm: the graph Dynamo captured.
        example_inputs: its example inputs (the model's parameters among them).
        options: see :class:`sparse_compile.options.SparseOptions`.
        mode: a ``torch.compile`` mode, passed on to Inductor.
    """
    config_patches = inductor_config_for_mode(mode)
    rewrite_graph(gm, example_inputs, options)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=config_patches)


def rewrite_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None) -> fx.GraphModule:
    """The backend's rewrite alone: ``gm`` with its video attention sites rewritten, in place,
    registered with the session of the model whose parameters are among ``example_inputs`` (a graph
    without a timestep compiled during a model's call is a fragment of that model).
    Running the result as is (no Inductor) checks the rewrite quickly."""
    opts = validate_options(options)
    call = current_call()
    joining = call.session() if call is not None and find_timestep_input(gm) is None else None
    session = session_for_parameters((t for t in example_inputs if isinstance(t, torch.Tensor)), joining)
    rewrite_attention(gm, opts, session)
    return gm


BACKEND_NAME = "sparse_video"


def register_with_dynamo() -> None:
    """Register :func:`sparse_video` under :data:`BACKEND_NAME` unless Dynamo will load it itself.

    Dynamo registers an entry-point backend when it first looks the name up, and refuses a name
    registered twice; so when the name is already registered, or Dynamo has discovered the entry
    point (it may be loading it right now, which is what imports this module), nothing is done.
    Safe to call any number of times.
    """
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS or isinstance(registry._BACKENDS.get(BACKEND_NAME), EntryPoint):
        return
    registry.register_backend(sparse_video, name=BACKEND_NAME)


register_with_dynamo()
