"""The toy's training penalty on broad attention: normalised entropy of sampled query rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_compile.toy.attention_penalty import attention_entropy_penalty, normalised_entropy


def test_uniform_attention_has_entropy_one_and_attention_on_one_key_nearly_zero():
    k = torch.eye(50).expand(1, 2, 50, 50)  # orthonormal keys
    assert float(normalised_entropy(torch.zeros(1, 2, 3, 50), k, scale=1.0)) == pytest.approx(1.0, abs=1e-6)
    assert float(normalised_entropy(k[:, :, :3] * 100, k, scale=1.0)) < 1e-6


def test_self_attention_calls_add_one_entropy_each_and_cross_attention_none():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen, requires_grad=True) for _ in range(3))
    text = torch.randn(2, 3, 7, 16, generator=gen)
    original = F.scaled_dot_product_attention
    with attention_entropy_penalty(rows=8, generator=gen) as entropies:
        out = F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q, text, text)
    assert F.scaled_dot_product_attention is original
    assert torch.equal(out, original(q, k, v)), "the real attention still runs"
    assert len(entropies) == 1 and 0 < entropies[0].item() < 1
    entropies[0].backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0 and v.grad is None


def test_without_grad_the_entropy_is_the_same_statistic_with_no_graph():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=gen, requires_grad=True) for _ in range(3))
    results = []
    for grad in (True, False):
        with attention_entropy_penalty(rows=4, generator=torch.Generator().manual_seed(0), grad=grad) as entropies:
            F.scaled_dot_product_attention(q, k, v)
        results.append(entropies[0])
    assert results[0].requires_grad and not results[1].requires_grad
    assert torch.equal(results[0].detach(), results[1])


def test_the_sampled_rows_follow_the_generator():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 8, generator=gen) for _ in range(3))

    def entropy(seed: int) -> float:
        with attention_entropy_penalty(rows=4, generator=torch.Generator().manual_seed(seed)) as entropies:
            F.scaled_dot_product_attention(q, k, v)
        return entropies[0].item()

    assert entropy(3) == entropy(3) and entropy(3) != entropy(4)


def test_rows_must_be_positive():
    with pytest.raises(ValueError, match="rows"):
        with attention_entropy_penalty(rows=0, generator=torch.Generator()):
            pass
