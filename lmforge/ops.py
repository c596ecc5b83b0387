"""Fused operations the model calls where plain PyTorch wastes time or memory.

linear_cross_entropy: the lm_head matmul and the mean cross-entropy in one pass over chunks
of rows, computing the gradients during the forward pass (the idea of Liger-Kernel's fused
linear cross-entropy, in plain PyTorch). The (N, V) logits, their log-softmax and its gradient
never exist in full: with V = 8192 and N = 4096 rows that is three 134 MB fp32 tensors, and on a
2-core CPU `log_softmax` and its backward over them took 20% of a training step.

rotary: rotary position embedding as one autograd op. The backward pass of a rotation is the
rotation by the opposite angle, so nothing but the angle tables is saved, and each direction
makes four passes over half the tensor into one output instead of autograd's chunk/neg/cat/mul/
mul/add (and their backward). On the default preset that made a training step 5-7% faster.
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        # hidden (N, D), weight (V, D), targets (N,) with -1 = ignore. Returns the mean loss over valid rows.
        valid = targets >= 0
        num_valid = valid.sum().clamp(min=1)
        need_grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_grads else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grads else None
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        for start in range(0, hidden.size(0), chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            keep = valid[start:start + chunk_rows]
            t_safe = t.clamp(min=0).unsqueeze(1)  # (c, 1)
            logits = (h @ weight.T).float()  # (c, V); softmax maths in fp32 under any autocast
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
            g = g.to(weight.dtype)  # under autocast the two matmuls below still run in its dtype
            grad_hidden[start:start + chunk_rows] = g @ weight
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


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int) -> torch.Tensor:
    # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for sign 1; sign -1 turns the other way.
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x)
    out1, out2 = out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out2).addcmul_(x1, sin, value=sign)
    return out


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_out, cos, sin, -1), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn each pair (x_i, x_{i+Hd/2}) of x (..., T, Hd) by the angle whose cos/sin are (T, Hd/2)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # as Hugging Face: the tables take the activations' dtype
    if not (torch.is_grad_enabled() and x.requires_grad):  # decoding: skip the autograd node's ~10 us a call
        return _rotate(x, cos, sin, 1)
    return _Rotary.apply(x, cos, sin)
