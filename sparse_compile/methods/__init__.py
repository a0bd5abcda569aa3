"""Attention methods selectable with the ``method`` option; importing this package registers them
in :data:`sparse_compile.registry.METHODS` (in this order: the order error messages list them)."""

from sparse_compile.methods.dense import DenseMethod  # isort: skip
from sparse_compile.methods.svg2 import Svg2Method  # isort: skip
from sparse_compile.methods.radial import RadialMethod  # isort: skip
from sparse_compile.methods.svg import SvgMethod  # isort: skip
from sparse_compile.methods.adaspa import AdaSpaMethod  # isort: skip
from sparse_compile.methods.auto import AutoMethod  # isort: skip
from sparse_compile.methods.base import AttentionMethod
from sparse_compile.registry import METHODS

__all__ = ["METHODS", "AdaSpaMethod", "AttentionMethod", "AutoMethod", "DenseMethod", "RadialMethod", "SvgMethod", "Svg2Method"]
