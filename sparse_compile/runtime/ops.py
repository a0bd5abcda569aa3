"""The custom ops the rewrite inserts into the graph.

``sparse_compile::step_marker`` runs once at the start of every compiled forward: it finds
the calling model's session from one of the model's parameters (the graph's *anchor*
input; models of one class share graphs), reads the timestep, opens or joins the model call
(graph breaks: :mod:`sparse_compile.runtime.session`) and returns a small CPU token
``[step, branch, generation, session id, scope]`` that every ``sparse_compile::attention`` call of
the graph takes as input (which also orders the calls after the marker); ``scope`` is -1 except
in fragments, which keep their sites per submodule instance. The attention op looks its site up
by the constant ``site_id`` and runs the site's method
(:meth:`~sparse_compile.methods.base.AttentionMethod.run`: dense at the dense steps and layers)
with that session's cache for the site. A site whose grid came from the model call (a fragment
of flat tokens) takes the call's grid at run time, and runs dense with the reason when the
call's clip does not have the site's number of video tokens.

Both ops are opaque to Inductor (their bodies run in Python, so their step logic runs on
every call) and tagged ``cudagraph_unsafe`` so CUDA-graph capture never freezes them.
"""

from __future__ import annotations

import torch

from sparse_compile.kernels.common import attention_output_like
from sparse_compile.methods.call import AttentionCall, AttentionResult, TokenLayout
from sparse_compile.methods.exact import dense_attention
from sparse_compile.runtime.session import (
    SESSIONS, CallSizes, Session, call_of, current_call, enter_forward, scoped_key, session_for_anchor,
)
from sparse_compile.runtime.sites import GRAPHS, SITES, GraphRecord, SiteRecord

_TAGS = (torch.Tag.cudagraph_unsafe,)


@torch.library.custom_op("sparse_compile::step_marker", mutates_args=(), tags=_TAGS)
def step_marker(timestep: torch.Tensor | None, anchor: torch.Tensor | None, graph_id: int, grid: list[int]) -> torch.Tensor:
    """Advance the calling model's step tracker.

    Args:
        timestep: the graph's timestep input (any shape; its first element is read), or ``None``.
        anchor: a parameter of the calling model, or ``None`` for graphs without parameters.
        graph_id: the compiled graph's record.
        grid: ``[frames, height, width]`` of the clip tokens the graph returns, or ``[]``.

    Returns:
        int64 CPU token ``[step, branch, generation, session id, scope]``.
    """
    graph: GraphRecord = _live(GRAPHS, graph_id, "graph")
    call = current_call() if graph.scoped else None
    joining = call.session() if call is not None else None
    session = graph.compile_session() if anchor is None else session_for_anchor(anchor, joining)
    if session is None:
        raise RuntimeError("sparse_compile: the model this parameterless graph was compiled for was deleted")
    session.attach_graph(graph)
    value = None if timestep is None else float(timestep.reshape(-1)[0])
    info = enter_forward(session, graph, value, tuple(grid) if grid else None)
    scope = session.scope_of(anchor, graph_id) if graph.scoped and anchor is not None else -1
    return torch.tensor([info.step, info.branch, info.generation, session.id, scope], dtype=torch.int64)


def _live(table, key: int, what: str):
    """``table[key]``, or a clear error if the record was released (its compiled graph was freed)."""
    record = table.get(key)
    if record is None:
        raise RuntimeError(f"sparse_compile: {what} record {key} was released with its compiled graph")
    return record


# A graph that opens a model call for its fragments may have no attention op using the token.
torch.fx.node.has_side_effect(step_marker._opoverload)


@step_marker.register_fake
def _step_marker_fake(timestep: torch.Tensor | None, anchor: torch.Tensor | None, graph_id: int, grid: list[int]) -> torch.Tensor:
    return torch.empty(5, dtype=torch.int64, device="cpu")


def _call_layout(session: Session, layout: TokenLayout, seq_len: int) -> tuple[TokenLayout, str | None]:
    """The layout of a site whose grid comes from the model call: the call's grid at run time, or
    the compile-time layout and why the call's clip does not fit (then the call runs dense)."""
    call = call_of(session)
    if call is None or call.grid is None:
        return layout, "no model call with a clip grid is open (a fragment run outside its model's call)"
    frames, height, width = call.grid
    video = seq_len - layout.dense_tokens
    if frames * height * width != video:
        return layout, (f"the call's clip grid {frames}x{height}x{width} does not have this site's {video} "
                        "video tokens")
    return TokenLayout(frames, height, width, layout.text_tokens, layout.text_first, layout.context_tokens), None


def _in_output_layout(result: torch.Tensor, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``result`` ``(B, H, S, Dv)`` with the strides of :func:`attention_output_like`; copied only if needed.

    Method outputs are fresh tensors (never views of the op's inputs), so returning one as is is safe.
    """
    batch, heads, seq, _ = query.shape
    dv = value.shape[-1]
    if result.shape == (batch, heads, seq, dv) and result.stride() == (seq * heads * dv, dv, heads * dv, 1):
        return result
    out = attention_output_like(query, value)
    out.copy_(result)
    return out


@torch.library.custom_op("sparse_compile::attention", mutates_args=(), tags=_TAGS)
def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    step_token: torch.Tensor,
    scale: float | None,
    frames: int,
    height: int,
    width: int,
    text_tokens: int,
    text_first: bool,
    context_tokens: int,
    site_id: int,
) -> torch.Tensor:
    """Attention over ``frames*height*width`` video tokens and the context tokens beside them:
    ``text_tokens`` before them (``text_first``) or after them, ``context_tokens`` on the other side
    (see :class:`~sparse_compile.methods.call.TokenLayout`).

    Args:
        query, key, value: ``(B, H, S, D)``; any strides.
        attn_mask: boolean, broadcastable to ``(B, H, S, S)``, or ``None``.
        step_token: int64 CPU ``[step, branch, generation, session id, scope]`` from the step marker.
        site_id: the site record this call belongs to.

    Returns:
        ``(B, H, S, Dv)`` with the strides of :func:`attention_output_like`.
    """
    site: SiteRecord = _live(SITES, site_id, "site")
    step, branch, generation, session_id, scope = (int(x) for x in step_token.tolist())
    session: Session = SESSIONS[session_id]
    state_key = scoped_key(site.key, scope)
    state = session.state_of(state_key, site.attention.options)
    layout, reason = TokenLayout(frames, height, width, text_tokens, text_first, context_tokens), None
    if site.facts.grid_from_call:
        layout, reason = _call_layout(session, layout, query.shape[2])
    state.last_call = CallSizes(tuple(query.shape), tuple(key.shape), layout.text_tokens, layout.context_tokens)
    call = AttentionCall(
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        scale=scale,
        layout=layout,
        step=session.step_info(step, branch, generation),
        site_name=site.facts.module_path,
        layer=site.layer_index if scope < 0 else session.layer_index(state_key),
        cache=state.cache,
    )
    if reason is None:
        result = site.attention.run(call)
    else:
        result = AttentionResult(dense_attention(query, key, value, attn_mask, scale), 1.0, fallback_reason=reason)
    state.record(call.site_name, step, result)
    if session.probe is not None and not result.scheduled_dense:
        session.probe(call, result)
    session.end_call()
    return _in_output_layout(result.output, query, value)


@sparse_attention.register_fake
def _sparse_attention_fake(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    step_token: torch.Tensor,
    scale: float | None,
    frames: int,
    height: int,
    width: int,
    text_tokens: int,
    text_first: bool,
    context_tokens: int,
    site_id: int,
) -> torch.Tensor:
    return attention_output_like(query, value)
