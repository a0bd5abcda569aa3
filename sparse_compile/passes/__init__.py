"""FX passes: find SDPA sites, infer the token grid and text placement, rewrite."""

from sparse_compile.passes.rewrite import rewrite_attention

__all__ = ["rewrite_attention"]
