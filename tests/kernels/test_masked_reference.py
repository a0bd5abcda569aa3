"""The references' fast path (masked softmax over chunks of rows, :mod:`~sparse_compile.kernels.masked_reference`)
gives the definition's result (each query's kept keys gathered) on finite inputs, with permutations,
empty rows and empty clusters, whatever the chunking."""

from __future__ import annotations

import pytest
import torch
from test_block_sparse import make_qkv, random_layout
from test_varlen_block_sparse import random_problem

from sparse_compile.kernels import masked_reference
from sparse_compile.kernels import varlen_block_sparse_reference as varlen_ref
from sparse_compile.kernels.block_sparse_reference import block_sparse_attention_reference, layout_to_dense_mask
from sparse_compile.kernels.common import cdiv


@pytest.mark.parametrize("scores_budget", [masked_reference.SCORES_BUDGET_BYTES, 4 * 2 * 3 * 260 * 7])
def test_block_reference_equals_masked_softmax_over_the_dense_mask(monkeypatch, scores_budget):
    monkeypatch.setattr(masked_reference, "SCORES_BUDGET_BYTES", scores_budget)  # one chunk, or chunks of 7 rows
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 3, 300, 260, 32, torch.float32, gen, bshd=True)
    counts, indices = random_layout(2, 3, cdiv(300, 64), cdiv(260, 32), 0.4, gen, "cpu", 0.25)  # some empty rows
    out, lse = block_sparse_attention_reference(q, k, v, counts, indices, block_q=64, block_k=32, return_lse=True)
    keep = layout_to_dense_mask(counts, indices, 300, 260, 64, 32)
    scores = (q @ k.transpose(-1, -2) / 32**0.5).masked_fill(~keep, float("-inf"))
    want_lse = scores.logsumexp(-1)
    want = (scores - want_lse.nan_to_num(neginf=0.0).unsqueeze(-1)).exp() @ v
    assert keep.any(-1).logical_not().any(), "the layout has rows that keep nothing"
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)


@pytest.mark.parametrize("scores_budget", [masked_reference.SCORES_BUDGET_BYTES, 4 * 2 * 2 * 90 * 5])
def test_varlen_reference_on_finite_inputs_equals_its_gathered_definition(monkeypatch, scores_budget):
    monkeypatch.setattr(masked_reference, "SCORES_BUDGET_BYTES", scores_budget)
    q, k, v, layout = random_problem(2, 2, 60, 90, 16, 4, 12, 0.5, seed=7, padding=1)
    g = torch.Generator().manual_seed(8)
    perms = {"q_perm": torch.rand(2, 2, 60, generator=g).argsort(-1), "kv_perm": torch.rand(2, 2, 90, generator=g).argsort(-1)}
    out, lse = varlen_ref.varlen_block_sparse_attention_reference(q, k, v, *layout, **perms, scale=0.3, return_lse=True)
    expanded = varlen_ref.expand_varlen_layout(q, k, *layout, perms["q_perm"], perms["kv_perm"])
    want_out, want_lse = varlen_ref._gathered_reference(q, k, v, expanded, 0.3, return_lse=True)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-5)
