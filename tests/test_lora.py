"""LoRA applied from outside: parameter counts, a start equal to the base, training touches only the
adapters, merging reproduces the adapted model, adapters round-trip and load in PEFT as they run here."""

import json

import pytest
import torch
import torch.nn as nn

from lmforge.checkpoint import load_model, save_model_folder
from lmforge.common import LmforgeError
from lmforge.gpt2 import GPT2, GPT2Config
from lmforge.lora import (
    DEFAULT_TARGETS,
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    num_lora_params,
    save_adapter,
)
from lmforge.model import ModelConfig, Transformer

V, D, L, H, K, I, CTX = 320, 32, 2, 4, 2, 48, 64  # noqa: E741  (I: intermediate_size; V: small_data's vocab)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    # q/k/v biases (Qwen2) so the shared bias is checked too; GQA so k/v differ in shape from q
    fields = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=K,
                  intermediate_size=I, max_position_embeddings=CTX, qkv_bias=True)
    config = ModelConfig(**{**fields, **overrides})
    model = Transformer(config)
    model.init_weights(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # biases off zero, so that sharing them matters
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return model.eval()


def random_ids(batch: int = 2, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.enable_grad()
def train_adapters(model: nn.Module, steps: int = 3) -> None:
    """A few Adam steps on random next-token targets: B leaves zero, A moves."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = random_ids(4, 16, seed=2)
    model.train()
    for _ in range(steps):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def adapted(rank: int = 4, seed: int = 0, **overrides) -> tuple[Transformer, LoraConfig]:
    model, config = tiny_model(seed, **overrides), LoraConfig(rank=rank, alpha=8.0)
    torch.manual_seed(seed)
    apply_lora(model, config)
    train_adapters(model)
    return model, config


@pytest.mark.parametrize("targets", [DEFAULT_TARGETS, ("q_proj", "v_proj"), ("down_proj",)])
def test_only_the_adapters_train_and_the_base_tensors_are_shared(targets):
    model = tiny_model()
    before = dict(model.named_parameters())
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    rank, Hd = 4, D // H
    shapes = {"q_proj": (D, H * Hd), "k_proj": (D, K * Hd), "v_proj": (D, K * Hd), "o_proj": (H * Hd, D),
              "gate_proj": (D, I), "up_proj": (D, I), "down_proj": (I, D)}  # (in, out), from the config
    names = apply_lora(model, LoraConfig(rank=rank, target_modules=targets))

    assert len(names) == L * len(targets)
    expected = L * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert num_lora_params(model) == sum(p.numel() for p in trainable.values()) == expected
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert set(lora_state_dict(model)) == set(trainable)
    # every original tensor keeps its name and is the very same object, storage included
    after = dict(model.named_parameters())
    for name, p in before.items():
        assert after[name] is p and model.state_dict()[name].data_ptr() == ptrs[name], name
    for name in names:
        m = model.get_submodule(name)
        assert isinstance(m, LoraLinear) and m.lora_A.weight.shape == (rank, m.in_features)
        assert m.lora_B.weight.shape == (m.out_features, rank)


@torch.no_grad()
def test_fresh_adapters_leave_logits_unchanged_and_training_moves_only_them():
    model = tiny_model()
    ids = random_ids()
    base_logits = model(ids)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(rank=4, dropout=0.1))
    assert torch.equal(model(ids), base_logits)  # B = 0 (dropout is off in eval)
    train_adapters(model)
    assert (model(ids) - base_logits).abs().max() > 1e-3
    state = model.state_dict()
    for name, tensor in base.items():
        assert torch.equal(state[name], tensor), name


@torch.no_grad()
def test_merge_reproduces_the_adapted_model_as_a_plain_one(tmp_path):
    model, _ = adapted()
    keys = set(tiny_model().state_dict())
    ids = random_ids()
    logits = model(ids)
    merge_lora(model)
    assert (model(ids) - logits).abs().max() <= 1e-5
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert all(type(model.get_submodule(f"model.layers.{i}.mlp.up_proj")) is nn.Linear for i in range(L))
    assert set(model.state_dict()) == keys
    assert all(p.requires_grad for p in model.parameters())
    back = load_model(save_model_folder(tmp_path / "merged", model))  # an ordinary model folder again
    assert torch.equal(back(ids), model(ids))
    with pytest.raises(LmforgeError, match="no LoRA adapters"):
        merge_lora(model)


@torch.no_grad()
def test_adapter_round_trips_onto_a_fresh_base_model(tmp_path):
    model, config = adapted()
    folder = save_adapter(model, tmp_path / "adapter", config, base_model="models/tiny")
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["r"], saved["lora_alpha"], saved["base_model_name_or_path"]) == (
        "LORA", 4, 8.0, "models/tiny")
    fresh = tiny_model()
    assert load_adapter(fresh, folder) == LoraConfig(rank=4, alpha=8.0, target_modules=tuple(sorted(DEFAULT_TARGETS)))
    ids = random_ids()
    assert torch.equal(fresh(ids), model(ids))
    # saving again over the same folder replaces it whole
    save_adapter(fresh, folder, config)
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] is None


def test_bad_adapters_are_refused_and_leave_the_model_untouched(tmp_path):
    model, config = adapted()
    folder = save_adapter(model, tmp_path / "adapter", config)
    weights = folder / "adapter_model.safetensors"

    def refused(target, match):
        with pytest.raises(LmforgeError, match=match):
            load_adapter(target, folder)
        assert not any(isinstance(m, LoraLinear) for m in target.modules())

    refused(tiny_model(hidden_size=64), r"lora_A\.weight has shape \(4, 32\).*needs \(4, 64\)")  # other base
    refused(tiny_model(num_hidden_layers=1), r"unexpected tensors .*layers\.1\.")
    with pytest.raises(LmforgeError, match="already has LoRA adapters"):
        load_adapter(model, folder)
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # one flipped bit in the last tensor's data
    weights.write_bytes(bytes(raw))
    refused(tiny_model(), "sha256 does not match")
    weights.unlink()
    refused(tiny_model(), "no adapter_model.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    refused(tiny_model(), "use_dora=True is not supported")
    with pytest.raises(LmforgeError, match="rank 8, alpha 16"):
        save_adapter(model, tmp_path / "other", LoraConfig())  # not the config the adapters were made with


@pytest.mark.parametrize("field, value", [("rank", 0), ("rank", 2.0), ("alpha", 0.0), ("dropout", 1.0),
                                          ("dropout", -0.1), ("target_modules", ()),
                                          ("target_modules", "q_proj")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(LmforgeError, match=f"{field}="):
        apply_lora(tiny_model(), LoraConfig(**{field: value}))


def test_impossible_targets_are_refused_with_what_there_is():
    with pytest.raises(LmforgeError, match="target_modules=.*match no nn.Linear.*q_proj"):
        apply_lora(tiny_model(), LoraConfig(target_modules=("qkv",)))
    with pytest.raises(LmforgeError, match="lm_head"):
        apply_lora(tiny_model(), LoraConfig(target_modules=("q_proj", "lm_head")))
    # GPT-2's projections are Conv1D, weight (in, out): refused by name, and listed when nothing matches
    gpt2 = GPT2(GPT2Config(vocab_size=V, n_positions=CTX, n_embd=D, n_layer=L, n_head=H))
    with pytest.raises(LmforgeError, match="c_attn is a Conv1D, not an nn.Linear"):
        apply_lora(gpt2, LoraConfig(target_modules=("c_attn",)))
    with pytest.raises(LmforgeError, match=r"match no nn.Linear.*c_attn \(Conv1D\)"):
        apply_lora(gpt2, LoraConfig())
    assert all(p.requires_grad for p in gpt2.parameters())  # refused before anything was frozen


@torch.no_grad()
def test_peft_and_lmforge_load_each_others_adapters_and_agree(tmp_path, small_data):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lmforge.hf import export_hf
    from lmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(small_data / "tokenizer.json")
    assert tokenizer.vocab_size == V
    model = tiny_model(qkv_bias=False, tie_word_embeddings=False)  # exports as a plain LlamaForCausalLM
    base_folder = save_model_folder(tmp_path / "base", model, tokenizer)
    config = LoraConfig(rank=4, alpha=8.0, dropout=0.05)
    torch.manual_seed(0)
    apply_lora(model, config)
    train_adapters(model)
    adapter = save_adapter(model, tmp_path / "adapter", config, base_model=str(base_folder))

    hf_folder = export_hf(base_folder, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    ids = random_ids()
    ours, base_logits = model(ids), hf(ids).logits
    assert (ours - base_logits).abs().max() > 1e-3  # the adapters matter, so agreeing below means something
    theirs = peft.PeftModel.from_pretrained(hf, adapter).eval()
    assert (theirs(ids).logits - ours).abs().max() <= 1e-4
    # and the adapters PEFT holds are ours, tensor for tensor
    peft_state = peft.get_peft_model_state_dict(theirs)
    for name, tensor in lora_state_dict(model).items():
        assert torch.equal(peft_state["base_model.model." + name], tensor), name

    # the other way: an adapter PEFT made (its own init, B moved off zero) loads here with PEFT's logits
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf_folder),
                                 peft.LoraConfig(r=2, lora_alpha=6, target_modules=["k_proj", "up_proj"])).eval()
    for name, p in theirs.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft-adapter")
    ours = load_model(base_folder)
    assert load_adapter(ours, tmp_path / "peft-adapter") == LoraConfig(rank=2, alpha=6, target_modules=(
        "k_proj", "up_proj"))
    assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-4
