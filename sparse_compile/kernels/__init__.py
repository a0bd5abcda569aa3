"""Attention kernels (Triton) and their pure-PyTorch references.

Each op module (``block_sparse``, ``varlen_block_sparse``, ``kmeans``, ``block_select``) checks its
inputs, launches its Triton kernels and dispatches CPU tensors to its ``*_reference`` module, the
specification, which assumes valid inputs. :mod:`~sparse_compile.kernels.common` holds the helpers
they share; :mod:`~sparse_compile.kernels.tile_configs` chooses every kernel's tile.
"""
