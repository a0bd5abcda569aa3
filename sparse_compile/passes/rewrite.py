"""Rewrite a Dynamo graph: video attention sites become ``sparse_compile::attention`` calls.

Sites the analysis cannot prove safe keep their SDPA call; every site, rewritten or not,
gets a :class:`~sparse_compile.runtime.sites.SiteRecord` with its status and is logged once.
"""

from __future__ import annotations

import logging
import math
import operator

import torch
import torch.fx as fx

from sparse_compile.methods import METHODS
from sparse_compile.options import SparseOptions
from sparse_compile.passes.graph_inputs import find_anchor_input, find_timestep_input
from sparse_compile.passes.sdpa_sites import find_sdpa_calls
from sparse_compile.passes.site_plan import SitePlan, plan_site
from sparse_compile.passes.token_layout import Factor, TokenLayoutAnalysis
from sparse_compile.runtime import ops  # noqa: F401  (registers the ops the rewrite inserts)
from sparse_compile.runtime.session import Session
from sparse_compile.runtime.sites import SiteRecord, register_graph, register_site

logger = logging.getLogger("sparse_compile")

def _insert_step_marker(gm: fx.GraphModule, session: Session, graph_id: int) -> fx.Node:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    timestep = find_timestep_input(gm)
    if timestep is None:
        logger.warning(
            "sparse_compile: no timestep input found in the graph; every forward call counts as one "
            "denoising step (use sparse_compile.set_step(model, step) in a custom loop)"
        )
    with gm.graph.inserting_after(placeholders[-1] if placeholders else None):
        return gm.graph.call_function(
            torch.ops.sparse_compile.step_marker.default, (timestep, find_anchor_input(gm), graph_id)
        )


def _size_arg(graph: fx.Graph, factors: tuple[Factor, ...]) -> int | fx.Node:
    """The product of factor sizes: an int when static, else a SymInt node read off the graph."""
    if all(f.size.is_Integer for f in factors):
        return math.prod(int(f.size) for f in factors)
    result: int | fx.Node = 1
    for f in factors:
        if f.size.is_Integer:
            term: int | fx.Node = int(f.size)
        else:
            node, dim = f.source
            term = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
        result = term if result == 1 else graph.call_function(operator.mul, (result, term))
    return result


def _replace_with_op(gm: fx.GraphModule, plan: SitePlan, token: fx.Node, site_id: int) -> None:
    call = plan.call
    graph = gm.graph
    with graph.inserting_before(call.node):
        frames, height, width = (_size_arg(graph, (f,)) for f in plan.grid)
        text = _size_arg(graph, plan.text) if plan.text else 0
        new = graph.call_function(
            torch.ops.sparse_compile.attention.default,
            (
                call.query,
                call.key,
                call.value,
                call.attn_mask,
                token,
                call.scale,
                frames,
                height,
                width,
                text,
                plan.text_position == "prefix",
                site_id,
            ),
        )
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in call.node.meta:
            new.meta[key] = call.node.meta[key]
    call.node.replace_all_uses_with(new)
    graph.erase_node(call.node)


def _status(plan: SitePlan, layer_index: int | None, opts: SparseOptions) -> str:
    if plan.dense_reason is not None:
        return f"dense: {plan.dense_reason}"
    if not METHODS[opts.method].is_sparse:
        return f"dense: method={opts.method!r}"
    if layer_index is not None and layer_index < opts.dense_layers:
        return f"dense: dense_layers={opts.dense_layers}"
    return "sparse"


def rewrite_attention(gm: fx.GraphModule, opts: SparseOptions, session: Session) -> list[SiteRecord]:
    """Rewrite the graph in place; returns one record per SDPA site, in graph order.

    Args:
        session: the session of the model being compiled (the one whose parameters are the
            example inputs); it orders the layers and serves graphs without parameters.

    Raises:
        ValueError: the ``grid`` option does not match a video self-attention site.
    """
    analysis = TokenLayoutAnalysis(gm)
    plans = [plan_site(call, analysis, opts) for call in find_sdpa_calls(gm)]
    records = []
    for plan in plans:
        rewritten = plan.dense_reason is None
        layer_index = session.layer_index(plan.call.module_path) if rewritten else None
        records.append(
            register_site(
                module_path=plan.call.module_path,
                q_shape=plan.q_shape,
                k_shape=plan.k_shape,
                kind=plan.kind,
                grid=plan.grid_hint,
                text_tokens=plan.text_hint,
                text_position=plan.text_position,
                method=opts.method,
                status=_status(plan, layer_index, opts),
                layer_index=layer_index,
                options=opts,
                attention=METHODS[opts.method](opts) if rewritten else None,
            )
        )
    graph = register_graph(session, records)
    if any(r.rewritten for r in records):
        token = _insert_step_marker(gm, session, graph.graph_id)
        for plan, record in zip(plans, records):
            if record.rewritten:
                _replace_with_op(gm, plan, token, record.site_id)
    for record in records:
        _log_site(record)
    gm.graph.lint()
    gm.recompile()
    return records


def _log_site(record: SiteRecord) -> None:
    where = f"sparse_compile: {record.module_path} q{list(record.q_shape)} k{list(record.k_shape)} {record.kind}"
    if record.rewritten:
        text = f", {record.text_tokens} text tokens ({record.text_position})" if record.text_tokens else ""
        logger.info("%s grid=%s%s -> method %s, %s", where, record.grid, text, record.method, record.status)
    else:
        logger.info("%s stays SDPA (%s)", where, record.status)
