"""Rewrite a Dynamo graph: video attention sites become ``sparse_compile::attention`` calls.

Sites the analysis cannot prove safe keep their SDPA call; every site, rewritten or not,
gets a :class:`~sparse_compile.runtime.sites.SiteRecord` with its status and is logged once.
The graph module owns its records (``gm.meta["sparse_compile_graph"]``): they live as long as
the compiled graph does.
"""

from __future__ import annotations

import logging
import math
import operator

import torch
import torch.fx as fx

from sparse_compile.methods.base import AttentionMethod
from sparse_compile.options import SparseOptions
from sparse_compile.passes.graph_inputs import find_anchor_input, find_timestep_input, parameter_path
from sparse_compile.passes.grid_reasons import several_segments_reason
from sparse_compile.passes.sdpa_sites import find_sdpa_calls
from sparse_compile.passes.site_plan import SitePlan, plan_site, split_video_text
from sparse_compile.passes.token_layout import Segment, TokenLayoutAnalysis, example_value
from sparse_compile.passes.video_window import output_nodes, returned_clip_grid
from sparse_compile.runtime import ops  # noqa: F401  (registers the ops the rewrite inserts)
from sparse_compile.runtime.session import Session, call_of
from sparse_compile.registry import METHODS
from sparse_compile.runtime.sites import SiteRecord, register_graph, register_site

logger = logging.getLogger("sparse_compile")

def _insert_step_marker(gm: fx.GraphModule, timestep: fx.Node | None, graph_id: int, grid: list[int | fx.Node]) -> fx.Node:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1] if placeholders else None):
        return gm.graph.call_function(
            torch.ops.sparse_compile.step_marker.default, (timestep, find_anchor_input(gm), graph_id, grid)
        )


def _output_tokens(gm: fx.GraphModule, analysis: TokenLayoutAnalysis) -> tuple[list[int | fx.Node], str | None]:
    """The clip grid of the ``(B, S, C)`` tokens the graph returns, as sizes the step marker can take
    (ints, or the graph's SymInt inputs), else ``[]`` and why those tokens have no single grid."""
    symbols = {example_value(n).node.expr: n for n in gm.graph.nodes
               if n.op == "placeholder" and isinstance(example_value(n), torch.SymInt)}  # fmt: skip
    reason = None
    for node in output_nodes(gm):
        layouts = analysis.layouts(node)
        if layouts is None or len(layouts) != 3:
            continue
        found = split_video_text(layouts[1])
        if found is not None and not found[1]:
            sizes = [int(f.size) if f.size.is_Integer else symbols.get(f.size) for f in found[0]]
            if all(size is not None for size in sizes):
                return sizes, None
        reason = reason or several_segments_reason(layouts[1])
    return [], reason


def _size_arg(graph: fx.Graph, segments: tuple[Segment, ...]) -> int | fx.Node:
    """The number of tokens in ``segments`` (sum of their factor products): an int when static,
    else a SymInt node read off the graph."""
    factors = [f for seg in segments for f in seg]
    if all(f.size.is_Integer for f in factors):
        return sum(math.prod(int(f.size) for f in seg) for seg in segments)
    total: int | fx.Node = 0
    for seg in segments:
        product: int | fx.Node = 1
        for f in seg:
            if f.size.is_Integer:
                term: int | fx.Node = int(f.size)
            else:
                node, dim = f.source
                term = graph.call_function(torch.ops.aten.sym_size.int, (node, dim))
            product = term if product == 1 else graph.call_function(operator.mul, (product, term))
        total = product if total == 0 else graph.call_function(operator.add, (total, product))
    return total


def _replace_with_op(gm: fx.GraphModule, plan: SitePlan, token: fx.Node, site_id: int) -> None:
    call = plan.call
    graph = gm.graph
    with graph.inserting_before(call.node):
        frames, height, width = (_size_arg(graph, ((f,),)) for f in plan.grid)
        text, context = _size_arg(graph, plan.text), _size_arg(graph, plan.context)
        facts = plan.facts
        new = graph.call_function(
            torch.ops.sparse_compile.attention.default,
            (
                call.query,
                call.key,
                call.value,
                call.attn_mask if plan.key_padding is None else plan.key_padding,
                token,
                call.scale,
                frames,
                height,
                width,
                text,
                facts.text_position == "prefix",
                context,
                site_id,
            ),
        )
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in call.node.meta:
            new.meta[key] = call.node.meta[key]
    if plan.key_padding is not None:
        with graph.inserting_after(new):
            rows = graph.call_function(torch.transpose, (plan.key_padding, -1, -2))
        with graph.inserting_after(rows):
            new = graph.call_function(torch.mul, (new, rows))
    call.node.replace_all_uses_with(new)
    graph.erase_node(call.node)


def _status(plan: SitePlan, attention: AttentionMethod | None, layer_index: int | None) -> str:
    reason = plan.facts.dense_reason
    if reason is None and attention is not None:
        reason = attention.layer_dense_reason(layer_index)
    return "sparse" if reason is None else f"dense: {reason}"


def _site_keys(plans: list[SitePlan]) -> list[str]:
    """Each site's key within the model: its module path, ``#n`` added for the n-th repeat in the graph."""
    seen: dict[str, int] = {}
    keys = []
    for plan in plans:
        path = plan.facts.module_path
        repeat = seen.get(path, 0)
        seen[path] = repeat + 1
        keys.append(path if repeat == 0 else f"{path}#{repeat}")
    return keys


def rewrite_attention(gm: fx.GraphModule, opts: SparseOptions, session: Session) -> list[SiteRecord]:
    """Rewrite the graph in place; returns one record per SDPA site, in graph order.

    Args:
        session: the session of the model being compiled (the one whose parameters are the
            example inputs); it orders the layers and serves graphs without parameters.

    Raises:
        ValueError: the ``grid`` option does not match a video self-attention site.
    """
    analysis = TokenLayoutAnalysis(gm)
    timestep = find_timestep_input(gm)
    scoped = timestep is None
    clip = returned_clip_grid(gm, analysis)
    plans = [plan_site(call, analysis, opts, call_of(session), clip) for call in find_sdpa_calls(gm)]
    records = []
    for plan, key in zip(plans, _site_keys(plans)):
        rewritten = plan.facts.dense_reason is None
        layer_index = session.layer_index(key) if rewritten and not scoped else None
        attention = METHODS[opts.method](opts) if rewritten else None
        status = _status(plan, attention, layer_index)
        records.append(register_site(key, plan.facts, opts.method, status, layer_index, attention))
    grid, grid_reason = _output_tokens(gm, analysis)
    anchor = find_anchor_input(gm)
    graph = register_graph(session, records, scoped, anchor and parameter_path(anchor), grid_reason)
    gm.meta["sparse_compile_graph"] = graph
    if records or not scoped:
        if scoped and call_of(session) is None:
            logger.warning(
                "sparse_compile: no timestep input found in the graph; every forward call counts as one "
                "denoising step (use sparse_compile.set_step(model, step) in a custom loop)"
            )
        token = _insert_step_marker(gm, timestep, graph.graph_id, grid)
        for plan, record in zip(plans, records):
            if record.rewritten:
                _replace_with_op(gm, plan, token, record.site_id)
    for record in records:
        _log_site(record)
    gm.graph.lint()
    gm.recompile()
    return records


def _log_site(record: SiteRecord) -> None:
    facts = record.facts
    where = f"sparse_compile: {facts.module_path} q{list(facts.q_shape)} k{list(facts.k_shape)} {facts.kind}"
    if record.rewritten:
        text = f", {facts.text_tokens} text tokens ({facts.text_position})" if facts.text_tokens else ""
        text += f", {facts.context_tokens} context tokens on the other side" if facts.context_tokens else ""
        logger.info("%s grid=%s%s -> method %s, %s", where, facts.grid, text, record.method, record.status)
    else:
        logger.info("%s stays SDPA (%s)", where, record.status)
