"""Benchmark variants: a method name with optional ``@key=value`` overrides, and its backend options."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

import sparse_compile
from sparse_compile.methods import METHODS

from .models import ModelSpec

INDUCTOR = "dense"  # torch.compile's default backend
BACKEND_DENSE = "backend-dense"  # the sparse_video backend with method="dense" (its own overhead)
SPARSE_METHODS = tuple(m for m in METHODS if m != "dense")
ALL_METHODS = (INDUCTOR, BACKEND_DENSE, *SPARSE_METHODS)
DEFAULT_METHODS = (INDUCTOR, *SPARSE_METHODS)

# --tiny: sequences are a few hundred tokens, so sites must count as video from 64 tokens and the
# methods' blocks and cluster counts shrink with them.
TINY_MIN_SEQ_LEN = 64
TINY_METHOD_OPTIONS = {
    "svg2": {"q_clusters": 8, "k_clusters": 16},
    "svg": {"block": 32, "profile_rows": 16},
    "radial": {"block": 32},
    "adaspa": {"block": 32},
}


def split_variant(variant: str) -> tuple[str, dict[str, Any]]:
    """``"svg2@top_p=0.3@k_clusters=500"`` -> ``("svg2", {"top_p": 0.3, "k_clusters": 500})`` (values parsed as JSON).

    Raises ``ValueError`` for an override that is not ``key=value`` or whose value is not JSON.
    """
    base, *pairs = variant.split("@")
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method variant {variant!r}: override {pair!r} is not key=value")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"method variant {variant!r}: value of {key!r} is not JSON ({error})") from None
    return base, overrides


def backend_options(method: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """``torch.compile`` options of a variant (``None``: Inductor), validated up front.

    ``method`` is a name of :data:`ALL_METHODS`, optionally with ``@key=value`` overrides (:func:`split_variant`),
    which apply last."""
    base, overrides = split_variant(method)
    if base == INDUCTOR:
        return None
    options: dict[str, Any] = {"method": "dense" if base == BACKEND_DENSE else base, "dense_steps": args.dense_steps}
    if args.tiny:
        options["min_seq_len"] = TINY_MIN_SEQ_LEN
        options.update(TINY_METHOD_OPTIONS.get(base, {}))
    options.update(args.method_options.get(base, {}))
    options.update(overrides)
    sparse_compile.validate_options(options)
    return options


def variant_settings(spec: ModelSpec, method: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """What a measurement depends on; a resumed record is reused only when these are equal."""
    return {"config": json.loads(json.dumps(spec.config)), "latent": list(spec.latent), "text_tokens": spec.text_tokens,
            "calls_per_step": spec.calls_per_step, "options": backend_options(method, args), "steps": args.steps,
            "dense_steps": args.dense_steps, "calls": args.calls, "device": str(device)}
