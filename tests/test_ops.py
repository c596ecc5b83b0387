"""Fused ops against plain PyTorch: value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from lmforge.ops import linear_cross_entropy, rotary


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


def test_linear_cross_entropy_under_bf16_autocast_reuses_its_scratch_across_shapes():
    # The matmuls run in bf16 like nn.Linear under autocast; the CPU scratch buffers grow and are reused.
    torch.manual_seed(0)
    for N, D, V in [(6, 8, 11), (40, 8, 29), (9, 8, 5)]:
        hidden = torch.randn(N, D, requires_grad=True)
        weight = torch.randn(V, D, requires_grad=True)
        targets = torch.randint(0, V, (N,))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref = F.cross_entropy((hidden @ weight.T).float(), targets)
            loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
        ref_gh, ref_gw = torch.autograd.grad(ref, (hidden, weight))
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
        assert gh.dtype == gw.dtype == torch.float32
        torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gh, ref_gh, rtol=2e-2, atol=2e-3)
        torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=2e-3)


def test_rotary_matches_rotate_half_and_its_gradient():
    # Reference: Hugging Face Llama's x * cos + rotate_half(x) * sin with full-width tables.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)  # (B, H, T, Hd)
    angles = torch.randn(5, 4, dtype=torch.float64)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x.chunk(2, dim=-1)
    ref = x * torch.cat([cos, cos], -1) + torch.cat([-x2, x1], -1) * torch.cat([sin, sin], -1)
    out = rotary(x, cos, sin)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0])
    # a strided input (the model's (B, T, H, Hd) -> (B, H, T, Hd) view) gives the same values
    strided = x.detach().transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(rotary(strided, cos, sin), ref.detach())
