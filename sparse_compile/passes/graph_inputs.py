"""Find the graph inputs the runtime needs: the diffusion timestep and a parameter of the model."""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from sparse_compile.passes.token_layout import example_value

_SINUSOID_OPS = (torch.sin, torch.cos, "sin", "cos")


def find_timestep_input(gm: fx.GraphModule) -> fx.Node | None:
    """The graph input holding the diffusion timestep, or ``None``.

    Preferred: a placeholder named like ``timestep``. Otherwise the first non-parameter
    tensor input of rank <= 1 that feeds a sinusoidal embedding (``sin``/``cos``) within a
    few ops.
    """
    candidates = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = example_value(node)
        if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            candidates.append(node)
    named = [n for n in candidates if re.search(r"timestep", n.name, re.IGNORECASE)]
    if named:
        return named[0]
    for node in candidates:
        if example_value(node).dim() <= 1 and _reaches_sinusoid(node, hops=8):
            return node
    return None


def _reaches_sinusoid(node: fx.Node, hops: int) -> bool:
    frontier = {node}
    for _ in range(hops):
        frontier = {user for n in frontier for user in n.users}
        if any(n.target in _SINUSOID_OPS for n in frontier):
            return True
    return False


def find_anchor_input(gm: fx.GraphModule) -> fx.Node | None:
    """The first graph input that is a parameter: at run time it tells which model is calling."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and isinstance(example_value(node), torch.nn.Parameter):
            return node
    return None


_PARAMETER_SOURCE = re.compile(r"L\['\w+'\]((?:\._(?:modules|parameters)\['[^']+'\])+)")


def parameter_path(node: fx.Node) -> str | None:
    """Dotted name of a parameter input relative to the module whose frame the graph was traced from
    (``L['self']._modules['norm1']._modules['linear']._parameters['weight']`` -> ``norm1.linear.weight``),
    from Dynamo's record of where the input came from; ``None`` when it came from elsewhere."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", None)
    name = name() if callable(name) else name
    match = _PARAMETER_SOURCE.fullmatch(name) if isinstance(name, str) else None
    return ".".join(re.findall(r"\['([^']+)'\]", match.group(1))) if match else None
