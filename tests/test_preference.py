"""DPO and the reward model: the loss formulas on hand-computed numbers, answer-only log-likelihoods,
the frozen reference, both raising held-out preference accuracy on a learnable preference, and both
resuming exactly."""

import hashlib
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from test_sft import base_model, reversal_chats, tokenizer, write_jsonl  # noqa: F401 - fixtures

from lmforge.checkpoint import load_model
from lmforge.conversations import Preference, read_preferences
from lmforge.dpo import DPOConfig, dpo, dpo_loss, load_dpo_settings, pair_tensors, sequence_logps
from lmforge.posttrain import FitConfig
from lmforge.reward import (
    RewardConfig,
    bradley_terry_loss,
    load_reward_model,
    load_reward_settings,
    reward_loss,
    train_reward_model,
    with_last_token,
)


def test_dpo_loss_equals_the_formula_on_hand_computed_log_probs():
    beta = 0.1
    pc, pr, rc, rr = torch.tensor([-4.0, -10.0]), torch.tensor([-6.0, -7.0]), torch.tensor([-5.0, -9.0]), \
        torch.tensor([-5.5, -8.0])
    loss, figures = dpo_loss(pc, pr, rc, rr, beta)
    # pair 1: 0.1 * ((-4 + 5) - (-6 + 5.5)) = 0.15; pair 2: 0.1 * ((-10 + 9) - (-7 + 8)) = -0.2
    expected = (-math.log(1 / (1 + math.exp(-0.15))) - math.log(1 / (1 + math.exp(0.2)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert figures["reward_accuracy"].item() == 0.5
    assert figures["reward_margin"].item() == pytest.approx((0.15 - 0.2) / 2, rel=1e-6)
    assert bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.0]))[0].item() == pytest.approx(
        math.log(1 + math.exp(-1.0)), rel=1e-6)


def test_answer_log_likelihood_counts_only_the_answer(tokenizer, base_model):  # noqa: F811
    model = load_model(base_model)
    pair = Preference([{"role": "user", "content": "reverse abc"}], "cba", "abc", 1)
    counts: dict = {}
    data = pair_tensors(tokenizer, [pair], 128, counts)
    ids = data["chosen_inputs"][0].tolist()
    answer = tokenizer.encode("cba") + [tokenizer.special_token_id("<|assistant_end|>")]
    with torch.no_grad():
        logp = F.log_softmax(model(data["chosen_inputs"]).float(), -1)[0]  # (T, V)
        got = sequence_logps(model, data["chosen_inputs"], data["chosen_targets"])[0]
    n = (data["chosen_targets"][0] >= 0).sum().item()
    start = ids.index(tokenizer.special_token_id("<|assistant_start|>"))  # answer follows it
    full = ids + [data["chosen_targets"][0][len(ids) - 1].item()]
    assert full[start + 1:start + 1 + n] == answer
    by_hand = sum(logp[start + i, answer[i]].item() for i in range(n))
    assert got.item() == pytest.approx(by_hand, rel=1e-5)


def preference_file(path, n=160):
    """Chosen answers close politely, rejected ones rudely: a preference a tiny model can learn in a few
    steps and carry over to unseen prompts."""
    rows = []
    for chat in reversal_chats(n, seed=3):
        user, answer = chat["messages"][0]["content"], chat["messages"][1]["content"]
        rows.append({"prompt": user, "chosen": f"{answer}, thanks", "rejected": f"{answer}, whatever"})
    return write_jsonl(path, rows)


def _fit(out, **kw):
    return FitConfig(out_dir=str(out), batch_size=8, warmup_steps=2, eval_every=1000, log_every=5, progress=False, **kw)


def test_dpo_raises_held_out_preference_accuracy_and_leaves_the_reference_alone(tmp_path, base_model):  # noqa: F811
    data = preference_file(tmp_path / "prefs.jsonl")
    before = hashlib.sha256((base_model / "model.safetensors").read_bytes()).hexdigest()
    summary = dpo(base_model, base_model / "tokenizer.json", DPOConfig(
        data=str(data), val_fraction=0.25, device="cpu", dtype="fp32", fit=_fit(tmp_path / "dpo", lr=3e-3,
                                                                                 max_steps=40)))
    assert summary["first"]["val_reward_accuracy"] == 0.0  # the reference IS the policy at the start: margin 0
    assert summary["final"]["val_reward_accuracy"] >= 0.8 and summary["final"]["val_reward_margin"] > 0
    assert summary["counts"]["val_pairs"] >= 20
    # the reference is the starting model, untouched: its file and its log-likelihoods are as before
    assert hashlib.sha256((base_model / "model.safetensors").read_bytes()).hexdigest() == before
    policy = load_model(tmp_path / "dpo" / "model")
    reference = load_model(base_model)
    assert not all(torch.equal(a, b) for a, b in zip(policy.parameters(), reference.parameters()))


def test_reward_model_learns_the_preference(tmp_path, tokenizer, base_model):  # noqa: F811
    data = preference_file(tmp_path / "prefs.jsonl")
    summary = train_reward_model(base_model, base_model / "tokenizer.json", RewardConfig(
        data=str(data), val_fraction=0.25, device="cpu", dtype="fp32", fit=_fit(tmp_path / "rm", lr=3e-3,
                                                                                  max_steps=40)))
    assert summary["final"]["val_accuracy"] >= 0.8
    # the saved body and head score as the trained model did: chosen above rejected on training pairs
    model = load_reward_model(tmp_path / "rm")
    pairs, _ = read_preferences(data)
    batch = with_last_token(pair_tensors(tokenizer, pairs[:16], 127, {}), tokenizer.pad_id)
    with torch.no_grad():
        _, figures = reward_loss(model, batch)
    assert figures["accuracy"].item() >= 0.75


@pytest.mark.parametrize("stage", ["dpo", "reward-model"])
def test_a_killed_run_resumed_matches_an_uninterrupted_one(tmp_path, base_model, stage):  # noqa: F811
    data = preference_file(tmp_path / "prefs.jsonl", n=80)
    train, config_class, load = {"dpo": (dpo, DPOConfig, load_dpo_settings),
                                 "reward-model": (train_reward_model, RewardConfig, load_reward_settings)}[stage]

    def config(out):
        return config_class(data=str(data), val_fraction=0.25, device="cpu", dtype="fp32",
                            fit=_fit(out, lr=3e-3, max_steps=10, ckpt_every=5))  # checkpoints on log steps
    train(base_model, base_model / "tokenizer.json", config(tmp_path / "whole"))
    part = tmp_path / "part"
    train(base_model, base_model / "tokenizer.json", config(part))
    shutil.rmtree(part / "checkpoints" / "step_000010")  # as if killed after step 5
    shutil.rmtree(part / "model")
    (part / "checkpoints" / "latest").write_text("step_000005")
    folder, tok, cfg = load(part)
    assert folder == base_model and cfg.fit.max_steps == 10 and cfg == config(part)
    train(folder, tok, cfg, resume=True)

    a, b = (load_model(run / "model") for run in (tmp_path / "whole", part))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses(part) == losses(tmp_path / "whole") and len(losses(part)) >= 2
