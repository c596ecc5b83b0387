"""Invariants of the transformer: causality, KV-cache parity, weight tying, config checks, FLOP and loss formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.common import LmforgeError
from lmforge.model import KVCache, ModelConfig, Transformer, apply_rotary, rotary_tables

V, D, L, H, I, CTX = 64, 32, 2, 4, 64, 64  # noqa: E741  (I: intermediate_size)


def tiny_config(num_key_value_heads: int = 2, **overrides) -> ModelConfig:
    return ModelConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H,
                       num_key_value_heads=num_key_value_heads, intermediate_size=I,
                       max_position_embeddings=CTX, **overrides)


def tiny_model(num_key_value_heads: int = 2, seed: int = 0, **overrides) -> Transformer:
    model = Transformer(tiny_config(num_key_value_heads, **overrides))
    model.init_weights(seed)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


# Grouped-query (2 K/V heads for 4 query heads) and plain multi-head attention.
KV_HEADS = pytest.mark.parametrize("kv_heads", [2, H])


@KV_HEADS
@torch.no_grad()
def test_changing_future_tokens_leaves_past_logits_unchanged(kv_heads):
    model = tiny_model(kv_heads)
    ids = random_ids(2, 12)
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % V
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])  # the change is visible where it should be


@KV_HEADS
@torch.no_grad()
def test_prefill_then_one_token_steps_match_full_recompute(kv_heads):
    model = tiny_model(kv_heads)
    ids = random_ids(2, 14)
    full = model(ids)  # (B, T, V)
    cache = KVCache(model.config, 2, 14, "cpu", torch.float32)
    steps = [model(ids[:, :8], kv_cache=cache)]
    for t in range(8, 14):
        steps.append(model(ids[:, t:t + 1], kv_cache=cache))
    assert cache.pos == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@KV_HEADS
@torch.no_grad()
def test_chunked_prefill_matches_full_recompute(kv_heads):
    # The second chunk has several new tokens after cached ones: Attention's explicit-mask path.
    model = tiny_model(kv_heads)
    ids = random_ids(2, 13)
    full = model(ids)
    cache = KVCache(model.config, 2, 20, "cpu", torch.float32)
    chunks = [model(ids[:, :5], kv_cache=cache), model(ids[:, 5:13], kv_cache=cache)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_grouped_query_heads_share_kv_like_hugging_face_repeat_kv():
    # Query head h reads K/V head h // (H / K), the grouping of Hugging Face Llama's repeat_kv;
    # a different grouping would import checkpoints silently wrong.
    model = tiny_model(2)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 6, D, generator=torch.Generator().manual_seed(3))
    cos, sin = model.rope_cos[:6], model.rope_sin[:6]
    q = apply_rotary(attn.q_proj(x).view(1, 6, H, D // H).transpose(1, 2), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(1, 6, 2, D // H).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(1, 6, 2, D // H).transpose(1, 2)
    k, v = k.repeat_interleave(H // 2, dim=1), v.repeat_interleave(H // 2, dim=1)  # (1, H, 6, Hd)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D // H)
    scores = scores.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, D)
    torch.testing.assert_close(attn(x, cos, sin), attn.o_proj(y), atol=1e-6, rtol=1e-5)


def test_rotary_rotates_each_pair_by_position_times_frequency():
    # The definition (Su et al. 2021) in Hugging Face's "rotate half" layout: at position p, the pair
    # (x_i, x_{i+Hd/2}) turns by the angle p * theta^(-2i/Hd). The opposite sign would still encode
    # relative positions, but Hugging Face checkpoints would load silently wrong.
    hd, theta = 8, 10000.0
    cos, sin = rotary_tables(hd, 5, theta)
    x = torch.randn(1, 1, 5, hd, generator=torch.Generator().manual_seed(0))  # (B, H, T, Hd)
    y = apply_rotary(x, cos, sin)
    for p in range(5):
        for i in range(hd // 2):
            angle = torch.tensor(p * theta ** (-2 * i / hd))
            a, b = x[0, 0, p, i], x[0, 0, p, i + hd // 2]
            expected = torch.stack([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()])
            torch.testing.assert_close(y[0, 0, p, [i, i + hd // 2]], expected)


def test_tied_head_shares_embedding_storage_and_counts_once():
    tied, untied = tiny_model(), tiny_model(tie_word_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == V * D
    kv_dim = 2 * (D // H)
    per_layer = 2 * D * D + 2 * D * kv_dim + 3 * D * I + 2 * D  # q, o; k, v; gate, up, down; two norms
    assert tied.num_params() == V * D + L * per_layer + D


def test_validate_names_the_field_that_does_not_fit():
    with pytest.raises(LmforgeError, match="num_attention_heads=5.*hidden_size=32"):
        ModelConfig(hidden_size=32, num_attention_heads=5, num_key_value_heads=5).validate()
    with pytest.raises(LmforgeError, match="num_key_value_heads=3.*num_attention_heads=4"):
        tiny_config(num_key_value_heads=3).validate()
    with pytest.raises(LmforgeError, match="num_key_value_heads"):  # the model checks too
        Transformer(tiny_config(num_key_value_heads=3))


def test_from_depth_gives_consistent_shapes():
    c = ModelConfig.from_depth(2, vocab_size=V, max_seq_len=32, head_dim=16, kv_group=2, aspect_ratio=32)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 4, 2, 16)
    assert c.intermediate_size == 192  # 64 * 8/3 = 170.7, rounded up to a multiple of 32
    assert c.num_hidden_layers == 2 and c.max_position_embeddings == 32
    model = Transformer(c)
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, V)
    with pytest.raises(LmforgeError, match="num_key_value_heads=3"):  # overrides are validated too
        ModelConfig.from_depth(2, vocab_size=V, max_seq_len=32, head_dim=16, aspect_ratio=32,
                               num_key_value_heads=3)


def test_flops_per_token_matches_hand_count():
    kv_dim = 2 * (D // H)
    matmul_weights = L * (2 * D * D + 2 * D * kv_dim + 3 * D * I) + V * D  # layers + the (tied) head
    attention = 12 * L * H * (D // H) * 16  # QK^T and AV over T = 16, forward + backward
    assert tiny_model().flops_per_token(16) == 6 * matmul_weights + attention
    # Untied: the head is its own matrix, same matmul work, so the same count.
    assert tiny_model(tie_word_embeddings=False).flops_per_token(16) == tiny_model().flops_per_token(16)


@torch.no_grad()
def test_loss_is_cross_entropy_of_logits_and_skips_ignore_index():
    model = tiny_model()
    ids, targets = random_ids(2, 10, seed=1), random_ids(2, 10, seed=2)
    logits = model(ids)
    expected = F.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).neg()  # (B, T)
    torch.testing.assert_close(model(ids, targets), expected.mean())

    targets[0, :4] = -1
    targets[1, 7] = -1
    keep = targets >= 0
    torch.testing.assert_close(model(ids, targets), expected[keep].mean())
    per_token = model(ids, targets, loss_reduction="none")  # (B, T)
    torch.testing.assert_close(per_token[keep], expected[keep])
    assert (per_token[~keep] == 0).all()


def test_sequence_longer_than_context_raises():
    model = tiny_model()
    with pytest.raises(LmforgeError, match=f"65 tokens.*context of {CTX}"):
        model(torch.zeros(1, CTX + 1, dtype=torch.long))
    cache = KVCache(model.config, 1, CTX, "cpu", torch.float32)
    with torch.no_grad():
        model(torch.zeros(1, CTX - 2, dtype=torch.long), kv_cache=cache)
        with pytest.raises(LmforgeError, match="context"):  # cached tokens count toward the context
            model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)


def test_bf16_on_cpu_trains_close_to_fp32():
    # Under bf16 autocast, and with bf16 weights, CPU attention runs in fp32 (model.Attention.forward):
    # the loss and gradients stay within bf16 rounding of the fp32 model's.
    model = tiny_model()
    ids, targets = random_ids(2, 16, seed=1), random_ids(2, 16, seed=2)
    ref = model(ids, targets)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=0.1, atol=2e-3)
    bf16_model = tiny_model().to(torch.bfloat16)
    loss = bf16_model(ids, targets)
    loss.backward()
    torch.testing.assert_close(loss.float(), ref, rtol=2e-2, atol=2e-2)
    assert all(p.grad.dtype == torch.bfloat16 for p in bf16_model.parameters())
