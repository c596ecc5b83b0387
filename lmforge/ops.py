"""Fused operations the model calls where plain PyTorch wastes time or memory.

linear_cross_entropy: the lm_head matmul and the mean cross-entropy in one pass over chunks
of rows, computing the gradients during the forward pass (the idea of Liger-Kernel's fused
linear cross-entropy, in plain PyTorch). The (N, V) logits, their log-softmax and its gradient
never exist in full: with V = 8192 and N = 4096 rows that is three 134 MB fp32 tensors, and on a
2-core CPU `log_softmax` and its backward over them took 20% of a training step.

rotary: rotary position embedding as one autograd op. The backward pass of a rotation is the
rotation by the opposite angle, so nothing but the angle tables is saved, and each direction
makes four passes over half the tensor into one output instead of autograd's chunk/neg/cat/mul/
mul/add (and their backward). On the default preset that made a training step 5-7% faster. It can
write a wider dtype than it reads: bf16 in, fp32 out ran 3x faster than bf16 out on a 2-core EPYC.
"""

from __future__ import annotations

import torch

_workspace: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _scratch(name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (rows, cols) scratch tensor, on CPU kept between calls. glibc hands a freed tensor this size
    back to the kernel and the next one page-faults in anew: on a 2-core EPYC that made a 1024 x 4096
    chunk take 16-24 ms instead of 9.5. (CUDA's caching allocator already reuses memory.)"""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    buf = _workspace.get((name, dtype))
    if buf is None or buf.numel() < rows * cols:
        buf = _workspace[(name, dtype)] = torch.empty(rows * cols, dtype=dtype)
    return buf[:rows * cols].view(rows, cols)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        # hidden (N, D), weight (V, D), targets (N,) with -1 = ignore. Returns the mean loss over valid rows.
        device = hidden.device
        # The matmuls run in autocast's dtype if it is on (as nn.Linear would), the softmax maths in fp32.
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else weight.dtype
        valid = targets >= 0
        num_valid = valid.sum().clamp(min=1)
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grads else None
        loss = torch.zeros((), device=device, dtype=torch.float32)
        V = weight.size(0)
        with torch.autocast(device.type, enabled=False):
            hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
            for start in range(0, hidden.size(0), chunk_rows):
                h, t = hidden_c[start:start + chunk_rows], targets[start:start + chunk_rows]
                keep = valid[start:start + chunk_rows]
                t_safe = t.clamp(min=0).unsqueeze(1)  # (c, 1)
                c = h.size(0)
                logits = _scratch("fp32", c, V, torch.float32, device)
                if dtype == torch.float32:
                    torch.mm(h, weight_c.T, out=logits)
                else:
                    logits.copy_(torch.mm(h, weight_c.T, out=_scratch("low", c, V, dtype, device)))
                target_logit = logits.gather(1, t_safe).squeeze(1)  # (c,)
                # log-sum-exp by hand, in place: torch.logsumexp allocates and makes extra passes over (c, V)
                row_max = logits.amax(dim=-1, keepdim=True)
                probs = logits.sub_(row_max).exp_()  # unnormalised softmax, overwrites the logits
                row_sum = probs.sum(dim=-1, keepdim=True)
                lse = (row_max + row_sum.log()).squeeze(1)
                loss += ((lse - target_logit) * keep).sum()
                if not need_grads:
                    continue
                # d(mean loss)/d(logits) = (softmax - onehot(target)) * w, w = 1/num_valid (0 on ignored rows)
                w = (keep / num_valid).unsqueeze(1)  # (c, 1)
                g = probs.mul_(w / row_sum)
                g.scatter_add_(1, t_safe, -w.to(g.dtype))
                if dtype != torch.float32:
                    g = _scratch("low", c, V, dtype, device).copy_(g)
                grad_hidden[start:start + chunk_rows] = g @ weight_c
                grad_weight += (g.T @ h).float()
        if need_grads:
            ctx.save_for_backward(grad_hidden, grad_weight)
            ctx.weight_dtype = weight.dtype
        return loss / num_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, (grad_weight * grad_loss).to(ctx.weight_dtype), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = 1024) -> torch.Tensor:
    """mean over targets >= 0 of cross_entropy(hidden @ weight.T, targets); hidden (N, D), weight (V, D)."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)


def lm_head_output(x: torch.Tensor, head: torch.nn.Linear, targets: torch.Tensor | None,
                   loss_reduction: str, logits_at: torch.Tensor | None = None) -> torch.Tensor:
    """The end of every model's forward: x (B, T, D) -> logits (B, T, V), or with targets (B, T) the
    cross-entropy (targets < 0 ignored): the mean through the fused path above (training, where the
    logits are never stored), 'none' as (B, T) per-token losses in nats. logits_at (n,) keeps only
    those positions: (B, n, V) (serving needs a few rows of a long packed batch, and the head is
    the widest matmul)."""
    if logits_at is not None:
        x = x[:, logits_at]
    B, T, _ = x.shape
    if targets is not None and loss_reduction == "mean":
        return linear_cross_entropy(x.reshape(B * T, -1), head.weight, targets.reshape(B * T))
    logits = head(x)  # (B, T, V)
    if targets is None:
        return logits
    loss = torch.nn.functional.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T),
                                             ignore_index=-1, reduction=loss_reduction)
    return loss.view(B, T) if loss_reduction == "none" else loss


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for sign 1; sign -1 turns the other way.
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x, dtype=dtype or x.dtype)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1, dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, sin, -1), None, None, None  # autograd casts it to x's dtype


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Turn each pair (x_i, x_{i+Hd/2}) of x (..., T, Hd) by the angle whose cos/sin are (T, Hd/2).
    The result has x's dtype, or `dtype`."""
    dtype = dtype or x.dtype
    cos, sin = cos.to(dtype), sin.to(dtype)  # as Hugging Face: the tables take the activations' dtype
    if not (torch.is_grad_enabled() and x.requires_grad):  # decoding: skip the autograd node's ~10 us a call
        return _rotate(x, cos, sin, 1, dtype)
    return _Rotary.apply(x, cos, sin, dtype)
