"""The chunked LM-head cross-entropy equals plain cross-entropy, value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megakor.model.layers import lm_head_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_and_grads_equal_plain_cross_entropy(chunk):
    g = torch.Generator().manual_seed(0)
    N, D, V = 50, 16, 37
    hidden = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    ref = F.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100)
    ref.backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = lm_head_cross_entropy(hidden, weight, labels, V, chunk_tokens=chunk, reduction="mean")
    got.backward()
    assert abs(got.item() - ref.item()) < 1e-6
    assert (hidden.grad - gh).abs().max().item() < 1e-6
    assert (weight.grad - gw).abs().max().item() < 1e-6


def test_fp32_chunked_loss_matches_and_padding_rows_are_excluded():
    g = torch.Generator().manual_seed(1)
    N, D, V, padded = 64, 32, 100, 128
    hidden = torch.randn(N, D, generator=g)
    weight = torch.randn(padded, D, generator=g) * 0.1
    labels = torch.randint(0, V, (N,), generator=g)
    ref = F.cross_entropy(hidden @ weight[:V].t(), labels, reduction="sum")
    got = lm_head_cross_entropy(hidden, weight, labels, V, chunk_tokens=16)
    assert abs(got.item() - ref.item()) / ref.item() < 1e-6
