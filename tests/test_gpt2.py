"""GPT-2 (lmforge/gpt2.py) against transformers' GPT2LMHeadModel: logits, greedy text, KV cache, loss, config.

Every reference model is a tiny random one built here (no downloads), its weights nudged off their
initial values so that biases and LayerNorm gains matter, run with transformers' eager attention so
the reference does not share our SDPA path.
"""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from lmforge.common import LmforgeError
from lmforge.generate import generate
from lmforge.gpt2 import GPT2, GPT2Config
from lmforge.model import KVCache

V, D, L, H, CTX = 300, 64, 2, 4, 64
TINY = dict(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=CTX)
# Older checkpoints store GPT-2's causal mask as buffers; SDPA needs neither.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")


def hf_and_ours(**overrides) -> tuple[torch.nn.Module, GPT2]:
    """A random transformers GPT-2 and lmforge's copy of it, loaded the way load_model does:
    built on the meta device, tensors assigned key for key, then init_buffers ties the head."""
    hf_config = transformers.GPT2Config(**TINY, bos_token_id=0, eos_token_id=0, **overrides)
    torch.manual_seed(0)
    theirs = transformers.GPT2LMHeadModel._from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v for k, v in theirs.state_dict().items() if not k.endswith(MASK_BUFFERS)}
    config = GPT2Config.from_dict(hf_config.to_dict())  # Hugging Face's own keys, extras ignored
    with torch.device("meta"):
        ours = GPT2(config)
    assert set(ours.state_dict()) == set(state)  # the same names: import is a copy
    ours.load_state_dict(state, assign=True)
    ours.init_buffers()
    return theirs, ours.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


VARIANTS = pytest.mark.parametrize("overrides", [
    {},  # GPT-2 as released: gelu_new, tied head
    {"activation_function": "gelu"},
    {"activation_function": "gelu_pytorch_tanh"},
    {"activation_function": "gelu_fast"},
    {"activation_function": "quick_gelu"},
    {"activation_function": "relu"},
    {"activation_function": "silu"},
    {"n_inner": 48, "tie_word_embeddings": False},
    {"scale_attn_weights": False},
    {"scale_attn_by_inverse_layer_idx": True},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "gpt2")


@VARIANTS
@torch.no_grad()
def test_logits_match_transformers(overrides):
    theirs, ours = hf_and_ours(**overrides)
    ids = random_ids(2, 20)
    # Tighter than float noise needs (~1e-6 seen): exact GELU in place of tanh GELU moves them ~4e-4.
    assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-5


@torch.no_grad()
def test_greedy_generation_matches_transformers():
    theirs, ours = hf_and_ours()
    prompt = random_ids(1, 6)[0].tolist()
    ids = torch.tensor([prompt])
    for _ in range(32):  # transformers' greedy decode, by full recompute
        ids = torch.cat([ids, theirs(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = ids[0, len(prompt):].tolist()
    assert list(generate(ours, prompt, max_tokens=32, temperature=0)) == expected


@torch.no_grad()
def test_kv_cached_decode_matches_full_recompute():
    _, ours = hf_and_ours()
    ids = random_ids(2, 20)
    full = ours(ids)  # (B, T, V)
    cache = KVCache(ours.config, 2, 20, "cpu", torch.float32)
    # a prefill, one-token steps, then a multi-token chunk after cached tokens (the masked case)
    steps = [ours(ids[:, :8], kv_cache=cache)]
    steps += [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(8, 14)]
    steps.append(ours(ids[:, 14:], kv_cache=cache))
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_loss_is_cross_entropy_of_the_logits_with_negative_targets_ignored():
    _, ours = hf_and_ours()
    ids, targets = random_ids(2, 20), random_ids(2, 20, seed=2)
    targets[0, :5] = -1
    logits = ours(ids)
    per_token = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-1, reduction="none").view(2, 20)
    torch.testing.assert_close(ours(ids, targets, loss_reduction="none"), per_token)
    torch.testing.assert_close(ours(ids, targets), per_token.sum() / (targets >= 0).sum())
    assert per_token[0, :5].eq(0).all()


def test_context_overflow_is_a_clear_error():
    _, ours = hf_and_ours()
    with pytest.raises(LmforgeError, match="exceeds the model's context of 64"):
        ours(random_ids(1, CTX + 1))


def test_counts_match_transformers_and_the_flop_formula():
    theirs, ours = hf_and_ours()
    assert ours.num_params() == sum(p.numel() for p in theirs.parameters())  # tied head counted once
    assert ours.num_params(exclude_embedding=True) == ours.num_params() - V * D - CTX * D
    # per layer: c_attn D x 3D, attn.c_proj D x D, c_fc D x 4D, mlp.c_proj 4D x D = 12 D^2; the head V x D
    assert ours.flops_per_token(32) == 6 * (12 * L * D * D + V * D) + 12 * L * D * 32


@torch.no_grad()
def test_init_weights_follows_gpt2():
    model = GPT2(GPT2Config(**{**TINY, "n_layer": 4}))
    model.init_weights(seed=0)
    block = model.transformer.h[0]
    assert model.lm_head.weight is model.transformer.wte.weight
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.05)
    assert block.attn.c_attn.bias.eq(0).all() and block.ln_1.weight.eq(1).all() and block.ln_1.bias.eq(0).all()
    again = GPT2(GPT2Config(**{**TINY, "n_layer": 4}))
    again.init_weights(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_config_round_trips_and_speaks_lmforge_names():
    config = GPT2Config(**TINY, n_inner=96, activation_function="gelu")
    d = config.to_dict()
    assert d["model_type"] == "gpt2" and GPT2Config.from_dict(d) == config
    # what KVCache, generate and evaluate read
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.max_position_embeddings, config.intermediate_size) == (D, L, H, H, D // H, CTX, 96)
    # transformers reads the same dict back as the same architecture
    hf = transformers.GPT2Config(**{k: v for k, v in d.items() if k != "model_type"})
    assert (hf.n_embd, hf.n_inner, hf.activation_function, hf.n_positions) == (D, 96, "gelu", CTX)


@pytest.mark.parametrize("fields, match", [
    ({"n_head": 5}, "n_head=5 does not divide n_embd=64"),
    ({"n_layer": 0}, "n_layer=0 must be a positive integer"),
    ({"n_inner": -1}, "n_inner=-1"),
    ({"activation_function": "gelu_10"}, "activation_function='gelu_10' is not supported"),
    ({"layer_norm_epsilon": 0}, "layer_norm_epsilon"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn=true"),
    ({"add_cross_attention": True}, "add_cross_attention=true"),
    ({"model_type": "llama"}, "model_type='llama'"),
])
def test_bad_config_names_the_field(fields, match):
    with pytest.raises(LmforgeError, match=match):
        GPT2Config.from_dict({**TINY, **fields})
    if "model_type" not in fields:
        with pytest.raises(LmforgeError, match=match):
            GPT2(GPT2Config(**{**TINY, **fields}))


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_every_parameter_trains(optimizer):
    from lmforge.optim import build_optimizers

    _, ours = hf_and_ours()
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    optimizers = build_optimizers(ours, name=optimizer, lr=1e-3, matrix_lr=0.02, weight_decay=0.0)
    ids = random_ids(2, 16)
    ours(ids[:, :-1], ids[:, 1:]).backward()
    for opt in optimizers:
        opt.step()
    unchanged = [n for n, p in ours.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged  # token and position tables, blocks, gains and biases all move
