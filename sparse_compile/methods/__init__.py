"""Attention methods selectable with the ``method`` option."""

from sparse_compile.methods.base import AttentionMethod
from sparse_compile.methods.dense import DenseMethod

METHODS: dict[str, type[AttentionMethod]] = {
    DenseMethod.name: DenseMethod,
}
