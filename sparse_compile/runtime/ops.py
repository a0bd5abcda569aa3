"""The custom ops the rewrite inserts into the graph.

``sparse_compile::step_marker`` runs once at the start of every compiled forward: it finds
the calling model's session from one of the model's parameters (the graph's *anchor*
input; models of one class share graphs), reads the timestep and returns a small CPU token
``[step, branch, generation, session id]`` that every ``sparse_compile::attention`` call of
the graph takes as input (which also orders the calls after the marker). The attention op
looks its site up by the constant ``site_id`` and runs the site's method
(:meth:`~sparse_compile.methods.base.AttentionMethod.run`: dense at the dense steps and layers)
with that session's cache for the site.

Both ops are opaque to Inductor (their bodies run in Python, so their step logic runs on
every call) and tagged ``cudagraph_unsafe`` so CUDA-graph capture never freezes them.
"""

from __future__ import annotations

import torch

from sparse_compile.kernels.common import attention_output_like
from sparse_compile.methods.call import AttentionCall, TokenLayout
from sparse_compile.runtime.session import SESSIONS, Session, session_for_anchor
from sparse_compile.runtime.sites import GRAPHS, SITES, GraphRecord, SiteRecord

_TAGS = (torch.Tag.cudagraph_unsafe,)


@torch.library.custom_op("sparse_compile::step_marker", mutates_args=(), tags=_TAGS)
def step_marker(timestep: torch.Tensor | None, anchor: torch.Tensor | None, graph_id: int) -> torch.Tensor:
    """Advance the calling model's step tracker.

    Args:
        timestep: the graph's timestep input (any shape; its first element is read), or ``None``.
        anchor: a parameter of the calling model, or ``None`` for graphs without parameters.
        graph_id: the compiled graph's record.

    Returns:
        int64 CPU token ``[step, branch, generation, session id]``.
    """
    graph: GraphRecord = _live(GRAPHS, graph_id, "graph")
    session = graph.compile_session() if anchor is None else session_for_anchor(anchor)
    if session is None:
        raise RuntimeError("sparse_compile: the model this parameterless graph was compiled for was deleted")
    session.attach_graph(graph)
    value = None if timestep is None else float(timestep.reshape(-1)[0])
    info = session.begin_forward(value, graph.attention_calls)
    return torch.tensor([info.step, info.branch, info.generation, session.id], dtype=torch.int64)


def _live(table, key: int, what: str):
    """``table[key]``, or a clear error if the record was released (its compiled graph was freed)."""
    record = table.get(key)
    if record is None:
        raise RuntimeError(f"sparse_compile: {what} record {key} was released with its compiled graph")
    return record


@step_marker.register_fake
def _step_marker_fake(timestep: torch.Tensor | None, anchor: torch.Tensor | None, graph_id: int) -> torch.Tensor:
    return torch.empty(4, dtype=torch.int64, device="cpu")


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
    site_id: int,
) -> torch.Tensor:
    """Attention over ``frames*height*width`` video tokens (+ ``text_tokens`` text tokens).

    Args:
        query, key, value: ``(B, H, S, D)``; any strides.
        attn_mask: boolean, broadcastable to ``(B, H, S, S)``, or ``None``.
        step_token: int64 CPU ``[step, branch, generation, session id]`` from the step marker.
        site_id: the site record this call belongs to.

    Returns:
        ``(B, H, S, Dv)`` with the strides of :func:`attention_output_like`.
    """
    site: SiteRecord = _live(SITES, site_id, "site")
    step, branch, generation, session_id = (int(x) for x in step_token.tolist())
    session: Session = SESSIONS[session_id]
    state = session.state_of(site.key)
    call = AttentionCall(
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        scale=scale,
        layout=TokenLayout(frames, height, width, text_tokens, text_first),
        step=session.step_info(step, branch, generation),
        site_name=site.facts.module_path,
        layer=site.layer_index,
        cache=state.cache,
    )
    result = site.attention.run(call)
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
    site_id: int,
) -> torch.Tensor:
    return attention_output_like(query, value)
