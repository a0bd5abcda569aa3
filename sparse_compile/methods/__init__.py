"""Attention methods selectable with the ``method`` option."""

from sparse_compile.methods.adaspa import AdaSpaMethod
from sparse_compile.methods.auto import AutoMethod
from sparse_compile.methods.base import AttentionMethod
from sparse_compile.methods.dense import DenseMethod
from sparse_compile.methods.radial import RadialMethod
from sparse_compile.methods.svg import SvgMethod
from sparse_compile.methods.svg2 import Svg2Method

METHODS: dict[str, type[AttentionMethod]] = {
    DenseMethod.name: DenseMethod,
    Svg2Method.name: Svg2Method,
    RadialMethod.name: RadialMethod,
    SvgMethod.name: SvgMethod,
    AdaSpaMethod.name: AdaSpaMethod,
    AutoMethod.name: AutoMethod,
}
