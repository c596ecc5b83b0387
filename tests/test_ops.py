"""The fused head + cross-entropy against plain PyTorch: value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.ops import linear_cross_entropy


@pytest.mark.parametrize("chunk_rows", [3, 7, 64])
def test_linear_cross_entropy_matches_pytorch(chunk_rows):
    torch.manual_seed(0)
    N, D, V = 20, 8, 37
    hidden = torch.randn(N, D, requires_grad=True, dtype=torch.float64)
    weight = torch.randn(V, D, requires_grad=True, dtype=torch.float64)
    targets = torch.randint(0, V, (N,))
    targets[[2, 11]] = -1  # ignored positions
    ref = F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1)
    ref_gh, ref_gw = torch.autograd.grad(3.0 * ref, (hidden, weight))
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    gh, gw = torch.autograd.grad(3.0 * loss, (hidden, weight))  # a non-unit upstream gradient
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-6)  # softmax runs in fp32
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_without_grad_gives_the_loss_only():
    hidden, weight = torch.randn(5, 4), torch.randn(9, 4)
    targets = torch.tensor([1, 2, -1, 4, 0])
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=2)
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.T, targets, ignore_index=-1))
