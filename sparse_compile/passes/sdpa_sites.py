"""Find ``scaled_dot_product_attention`` calls in a Dynamo graph and normalise their arguments.

diffusers calls SDPA with keyword arguments only, CogVideoX positionally; both are bound
to the one signature ``(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)``.

Attention ops that also return the log-sum-exp (``aten._scaled_dot_product_flash_attention``
and kin, which diffusers' flash/cuDNN backends call, and through which ring attention merges
partial results over KV shards) are found too, so that the report lists them; they are never
rewritten (``returns_lse``).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

SDPA_TARGETS = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_LSE_OPS = (
    torch.ops.aten._scaled_dot_product_flash_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,
    torch.ops.aten._scaled_dot_product_efficient_attention,
    torch.ops.aten._scaled_dot_product_cudnn_attention,
)
LSE_TARGETS = _LSE_OPS + tuple(op.default for op in _LSE_OPS)

_SDPA_SIGNATURE = inspect.Signature(
    [
        inspect.Parameter("query", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("key", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("value", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("attn_mask", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
        inspect.Parameter("dropout_p", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=0.0),
        inspect.Parameter("is_causal", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=False),
        inspect.Parameter("scale", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("enable_gqa", inspect.Parameter.KEYWORD_ONLY, default=False),
    ]
)


@dataclass(frozen=True)
class SdpaCall:
    """One SDPA node with its arguments bound by name.

    ``query``/``key``/``value`` are graph nodes of shape ``(..., S, D)``; the scalar
    arguments are Python values or graph nodes when they are not constants. For an op that
    also returns the log-sum-exp (``returns_lse``) only ``query``/``key``/``value`` are bound.
    """

    node: fx.Node
    query: fx.Node
    key: fx.Node
    value: fx.Node
    attn_mask: Any
    dropout_p: Any
    is_causal: Any
    scale: Any
    enable_gqa: Any
    module_path: str
    returns_lse: bool = False


def module_path_of(node: fx.Node, fallback: str) -> str:
    """Dotted path of the module that made the call, e.g. ``blocks.3.attn1``.

    Dynamo's ``nn_module_stack`` keys look like ``L['self'].__dict__['_modules']['blocks'].3.attn1``;
    under a diffusers hook (context parallelism) the module is reached through its wrapped
    forward, ``...blocks.0.forward.func.__closure__[0].cell_contents.forward.__self__.attn1``,
    which names ``blocks.0.attn1``.
    """
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return fallback
    raw = list(stack.values())[-1][0]
    path = re.sub(r"^L\[['\"]\w+['\"]\]", "", raw)
    path = re.sub(r"\.__dict__\[['\"]_modules['\"]\]\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\.forward\b.*?\.__self__\b", "", path)
    return path.strip(".") or fallback


def find_sdpa_calls(gm: fx.GraphModule) -> list[SdpaCall]:
    """All SDPA calls (and log-sum-exp attention ops) of the graph, in graph order."""
    calls = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in LSE_TARGETS:
            calls.append(_lse_call(node, fallback=f"sdpa_{len(calls)}"))
            continue
        if node.target not in SDPA_TARGETS:
            continue
        bound = _SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        a = bound.arguments
        calls.append(
            SdpaCall(
                node=node,
                query=a["query"],
                key=a["key"],
                value=a["value"],
                attn_mask=a["attn_mask"],
                dropout_p=a["dropout_p"],
                is_causal=a["is_causal"],
                scale=a["scale"],
                enable_gqa=a["enable_gqa"],
                module_path=module_path_of(node, fallback=f"sdpa_{len(calls)}"),
            )
        )
    return calls


def _lse_call(node: fx.Node, fallback: str) -> SdpaCall:
    query, key, value = node.args[:3]
    return SdpaCall(
        node=node,
        query=query,
        key=key,
        value=value,
        attn_mask=None,
        dropout_p=0.0,
        is_causal=False,
        scale=None,
        enable_gqa=False,
        module_path=module_path_of(node, fallback),
        returns_lse=True,
    )
