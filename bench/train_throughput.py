"""Training throughput: lmforge's model and training step vs Hugging Face `LlamaForCausalLM`.

Both train the same configuration in the same process: identical shapes, batch, sequence
length, AdamW settings and precision; Hugging Face runs with each of its built-in attentions
(sdpa, eager) and its own loss path (`labels=`), and the faster one is the peer. Each is timed
in alternating rounds after warm-up (the median round counts), and MFU is reported against the
matmul throughput measured here.

    python bench/train_throughput.py                 # the shape of `lmforge run`'s default preset
    python bench/train_throughput.py --aspect-ratio 64 --head-dim 64 --vocab-size 8192   # a wider model
    python bench/train_throughput.py --compile       # also lmforge under torch.compile
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lmforge.common import autocast, matmul_flops_per_s, resolve_dtype
from lmforge.model import ModelConfig, Transformer

HF_ATTENTION = ("sdpa", "eager")


def hf_model(config: ModelConfig, attention: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu")
    hf_config._attn_implementation = attention
    return LlamaForCausalLM(hf_config)


def make_step(model, loss_fn, batch, device, dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    x, y = batch

    def step():
        with autocast(device, dtype):
            loss = loss_fn(model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, num_steps: int, device) -> float:
    """Seconds per step over num_steps (after the caller's warm-up)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(num_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / num_steps


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # defaults: the shape of `lmforge run`'s default preset
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=32, help="width = depth x aspect ratio")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="auto", help="auto, fp32, bf16 (default: the training default here)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also time lmforge under torch.compile")
    args = p.parse_args()

    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = ModelConfig.from_depth(args.depth, args.vocab_size, args.seq_len, aspect_ratio=args.aspect_ratio,
                                    head_dim=args.head_dim)
    torch.manual_seed(0)
    batch = (torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device),
             torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device))

    ours = Transformer(config)
    ours.init_weights(seed=0)
    ours.to(device)
    contenders = {"lmforge": make_step(ours, lambda m, x, y: m(x, y), batch, device, dtype)}
    for attention in HF_ATTENTION:  # HF's built-in attentions: the faster one here is the peer
        theirs = hf_model(config, attention)
        theirs.load_state_dict(ours.state_dict(), strict=False)  # same names, same starting weights
        contenders[f"hf ({attention})"] = make_step(theirs.to(device), lambda m, x, y: m(input_ids=x, labels=x).loss,
                                                    batch, device, dtype)
    if args.compile:
        compiled = torch.compile(Transformer(config).to(device))
        contenders["lmforge + compile"] = make_step(compiled, lambda m, x, y: m(x, y), batch, device, dtype)

    for step in contenders.values():  # warm-up: allocator, autotuning, compilation
        for _ in range(2):
            step()
    seconds = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, step in contenders.items():
            seconds[name].append(time_steps(step, args.steps, device))

    tokens_per_step = args.batch_size * args.seq_len
    flops_per_token = ours.flops_per_token(args.seq_len)
    peak = matmul_flops_per_s(device, dtype)  # in the matmuls' dtype: CPU bf16 can run ~4x fp32
    print(f"config: depth {args.depth}, width {config.hidden_size}, vocab {args.vocab_size}, batch {args.batch_size} "
          f"x {args.seq_len}, {str(dtype).removeprefix('torch.')}, {device}, {torch.get_num_threads()} threads; "
          f"{ours.num_params() / 1e6:.2f}M params, {flops_per_token / 1e6:.1f} MFLOP/token; "
          f"measured matmul peak {peak / 1e9:.0f} GFLOP/s")
    rates = {name: tokens_per_step / statistics.median(s) for name, s in seconds.items()}
    best_hf = max((n for n in rates if n.startswith("hf ")), key=rates.get)
    for name, rate in rates.items():
        print(f"{name:>18}: {rate:10,.0f} tokens/s  MFU {100 * rate * flops_per_token / peak:5.1f}%  "
              f"ratio vs {best_hf} {rate / rates[best_hf]:.2f}x")


if __name__ == "__main__":
    main()
