"""TopK SAEs: at most k latents fire; training recovers a planted sparse dictionary; dead latents are
revived by the auxiliary loss; the metrics match their definitions on hand-made cases; the SAELens
folder round-trips exactly and bad folders are one-line errors."""

import json

import pytest
import torch

from lmforge.common import LmforgeError
from lmforge.interp.hooks import HookedModel
from lmforge.interp.sae import SAETrainConfig, TopKSAE, activation_batches, aux_loss, evaluate_sae, shuffled, train_sae
from lmforge.model import ModelConfig, Transformer


def _planted(num=60_000, d_in=32, num_atoms=64, active=3, seed=0):
    """x = sum of `active` random unit atoms with positive weights: the dictionary an SAE should find."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(num_atoms, d_in, generator=g), dim=1)
    idx = torch.stack([torch.randperm(num_atoms, generator=g)[:active] for _ in range(num)])
    weights = torch.rand(num, active, generator=g) + 0.5
    return (weights[..., None] * atoms[idx]).sum(1), atoms


def test_topk_encode_keeps_at_most_k_nonnegative_latents():
    sae = TopKSAE(16, 64, k=5)
    sae.init_weights(seed=1)
    f = sae.encode(torch.randn(10, 16))
    assert ((f > 0).sum(-1) <= 5).all() and (f >= 0).all()


def test_training_recovers_a_planted_dictionary():
    torch.manual_seed(0)
    x, atoms = _planted()
    sae = TopKSAE(32, 128, k=4)
    sae.init_weights(seed=0)
    batches = (x[i:i + 512] for i in range(0, x.size(0), 512))
    stats = train_sae(sae, batches, SAETrainConfig(lr=3e-3, dead_after_tokens=5_000), max_tokens=x.size(0),
                      progress=False)
    held, _ = _planted(num=4_000, seed=0)
    x_hat = sae(held)
    ev = 1 - (x_hat - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum()
    assert ev > 0.9 and stats["explained_variance"] > 0.85
    # each planted atom has a decoder row pointing the same way
    cos = atoms @ torch.nn.functional.normalize(sae.W_dec.detach(), dim=1).T  # (atoms, d_sae)
    assert (cos.max(1).values > 0.9).float().mean() > 0.8
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))


def test_aux_loss_gives_dead_latents_a_gradient_and_vanishes_without_them():
    sae = TopKSAE(8, 32, k=2)
    sae.init_weights(seed=0)
    x = torch.randn(64, 8)
    pre = sae.pre_acts(x)
    x_hat = sae(x)
    assert aux_loss(sae, x, x_hat, pre, torch.zeros(32, dtype=torch.bool), 4) == 0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:10] = True
    loss = aux_loss(sae, x, x_hat, pre, dead, 4)
    loss.backward()
    grads = sae.W_enc.grad.abs().sum(0)
    assert (grads[:10] > 0).any() and (grads[10:] == 0).all()


def test_save_load_round_trip_in_saelens_layout_and_bad_folders(tmp_path):
    sae = TopKSAE(16, 40, k=3, hook_name="blocks.1.hook_resid_post", model_name="tiny")
    sae.init_weights(seed=2)
    folder = sae.save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"
    back = TopKSAE.load(folder)
    x = torch.randn(5, 16)
    assert torch.equal(back(x), sae(x)) and back.k == 3 and back.hook_name == sae.hook_name
    with pytest.raises(LmforgeError, match="not an SAE folder"):
        TopKSAE.load(tmp_path)
    cfg["d_sae"] = 41
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(LmforgeError, match="W_enc"):
        TopKSAE.load(folder)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(LmforgeError, match="not a readable SAE config"):
        TopKSAE.load(folder)


def test_streamed_activations_and_evaluation_on_a_model():
    config = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)
    model = Transformer(config)
    model.init_weights(seed=0)
    hooked = HookedModel(model.eval())
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 50, (100,), generator=g).tolist() for _ in range(12)]
    name = "blocks.0.hook_resid_post"
    batches = list(activation_batches(hooked, docs, name, context=16, batch_docs=4))
    assert sum(b.size(0) for b in batches) == 12 * 6 * 15  # 6 windows of 16 per 100-token doc, first positions out
    mixed = list(shuffled(iter(batches), buffer_tokens=256, batch_tokens=64))
    assert all(b.shape == (64, 32) for b in mixed) and len(mixed) == 12 * 6 * 15 // 64
    kept = torch.cat(mixed)  # 1,080 tokens, 16 whole batches: 1,024 handed out, the remainder dropped
    assert all(any(torch.equal(row, b[j]) for b in batches for j in range(b.size(0))) for row in kept[:5])
    # an SAE with all latents (k = d_sae) and W_dec = W_enc^T = identity reconstructs x exactly
    exact = TopKSAE(32, 32, k=32, hook_name=name)
    with torch.no_grad():
        exact.W_enc.copy_(torch.eye(32))
        exact.W_dec.copy_(torch.eye(32))
        exact.b_dec.copy_(torch.full((32,), -50.0))  # x - b_dec > 0, so ReLU keeps every coordinate
    # text the model itself finds likely (sampled from it), so the clean loss is below the ablated one
    with torch.no_grad():
        ids = torch.randint(0, 50, (6, 1), generator=g)
        for _ in range(15):
            probs = torch.softmax(model(ids)[:, -1] * 4, dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
    windows = ids.tolist()
    stats = evaluate_sae(exact, hooked, windows)
    assert stats["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert stats["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert stats["l0"] == pytest.approx(32) and stats["dead_fraction"] == 0
    assert stats["ce_zero_ablation"] > stats["ce_clean"]
