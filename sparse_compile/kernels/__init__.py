"""Attention kernels (Triton; Gluon on sm_90) and their pure-PyTorch references.

Each op module (``block_sparse``, ``varlen_block_sparse``, ``kmeans``, ``block_select``) checks its
inputs, launches its Triton kernels and dispatches CPU tensors to its ``*_reference`` module, the
specification, which assumes valid inputs. On sm_90 the fixed block-sparse op runs the
warp-specialized Gluon kernel (:mod:`~sparse_compile.kernels.gluon_block_sparse`) for the calls it takes.
:mod:`~sparse_compile.kernels.permute_rows` moves rows of ``(B, H, S, D)`` tensors by a token permutation
(the kernel-order K/V copies of a permuted call on the Gluon kernel). :mod:`~sparse_compile.kernels.common`
holds the helpers they share; :mod:`~sparse_compile.kernels.tile_configs` chooses every kernel's tile.
"""
