"""Attention kernels (Triton) and their pure-PyTorch references.

Each kernel module pairs a Triton implementation with a reference that is the
specification and the CPU path.
"""
