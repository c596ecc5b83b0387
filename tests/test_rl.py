"""RL with verifiable rewards: group advantages, the clipped objective and its gradient, answer
checking for math, and a short run that raises a reward a program measures."""

import json

import pytest
import torch
from test_sft import base_model, tokenizer  # noqa: F401 - fixtures

from lmforge import rl as rl_module
from lmforge.rl import (
    Item,
    RLConfig,
    final_number,
    group_advantages,
    math_items,
    math_reward,
    policy_loss,
    rl,
)


def test_group_advantages_are_zero_mean_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.25, 1.0, 0.75]])
    for scale in (False, True):
        adv = group_advantages(rewards, scale)
        assert torch.allclose(adv.mean(1), torch.zeros(3), atol=1e-6)
        assert torch.equal(adv[1], torch.zeros(4))  # a group that agrees teaches nothing
        assert torch.all((adv[0] > 0) == (rewards[0] > 0.5))
    assert torch.allclose(group_advantages(rewards, True)[0], torch.tensor([1.0, -1.0, -1.0, 1.0]) / 1.1547,
                          atol=1e-3)  # over the group's std (sample std of 1,0,0,1 is 0.577)


def test_clipped_objective_value_and_gradient():
    logps = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([2.0, -1.0])
    loss, _ = policy_loss(logps, logps.detach(), adv, mask, clip_eps=0.2)  # on-policy: ratio 1
    assert loss.item() == pytest.approx(-(2.0 - 1.0))  # -(mean over answer 1's tokens of A) - (answer 2's)
    loss.backward()
    assert torch.allclose(logps.grad, torch.tensor([[-1.0, -1.0, 0.0], [1.0, 0.0, 0.0]]))  # -A / length
    # a token already pushed past 1 + eps in the advantage's direction gets no more push
    old = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    logps2 = logps.detach().clone().requires_grad_(True)
    loss, _ = policy_loss(logps2, old, adv, mask, clip_eps=0.2)
    loss.backward()
    assert logps2.grad[0, 0] == 0 and logps2.grad[0, 1] == -1.0
    # KL to the reference is zero where the policy equals it and positive elsewhere (k3)
    _, kl = policy_loss(logps, logps.detach(), adv, mask, 0.2, ref_logps=logps.detach(), kl_coef=0.1)
    assert kl.item() == 0
    _, kl = policy_loss(logps, logps.detach(), adv, mask, 0.2, ref_logps=logps.detach() - 0.5, kl_coef=0.1)
    assert kl.item() > 0


def test_math_answers_are_checked_by_their_final_number(tmp_path):
    assert final_number("Natalia sold 48/2 = 24 clips in May.\n#### 72") == "72"
    assert final_number("so the total is 1,234.") == "1234" and final_number("it is 5.0") == "5"
    assert final_number("no digits") is None
    path = tmp_path / "gsm.jsonl"
    path.write_text(json.dumps({"question": "2+3?", "answer": "2+3=5\n#### 5"}) + "\n")
    items = math_items(path)
    assert items[0].payload == "5" and items[0].messages == [{"role": "user", "content": "2+3?"}]
    assert math_reward(items * 3, ["it is 5", "it is 6", "it is 5"], [True, True, False]) == [1.0, 0.0, 0.0]
    path.write_text('{"question": "q"}\n')
    with pytest.raises(Exception, match="gsm.jsonl:1"):
        math_items(path)


def test_a_short_run_raises_a_programmatic_reward(tmp_path, monkeypatch, tokenizer, base_model):  # noqa: F811
    """Reward: the share of answer tokens that are one particular token. A random model says it rarely;
    GRPO should make it say it more."""
    target = tokenizer.encode("x")[0]
    items = [Item([{"role": "user", "content": f"say something {i}"}], None) for i in range(40)]

    def reward(batch_items, answers, ended):
        return [sum(t == target for t in tokenizer.encode(a)) / max(1, len(tokenizer.encode(a))) for a in answers]
    monkeypatch.setitem(rl_module.TASKS, "toy", (lambda data, eval_prompts: (items, items[:eval_prompts]), reward))
    cfg = RLConfig(task="toy", data="unused", out_dir=str(tmp_path / "rl"), steps=12, prompts_per_step=4,
                   group_size=8, max_tokens=8, lr=1e-2, warmup_steps=1, eval_every=100, eval_prompts=8, ckpt_every=100,
                   device="cpu", dtype="fp32", progress=False)
    summary = rl(base_model, base_model / "tokenizer.json", cfg)
    rewards = [json.loads(x)["reward"] for x in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()
               if '"reward"' in x and "val_" not in x]
    assert len(rewards) == 12
    assert sum(rewards[-4:]) > 3 * sum(rewards[:4]) + 0.01  # sampled answers say it more
    assert summary["first"]["reward"] < 0.1 and summary["final"]["reward"] > 0.5  # and greedy ones


def test_resume_restores_the_settings_and_continues_exactly(tmp_path, monkeypatch, tokenizer, base_model):  # noqa: F811
    """Killed after a checkpoint and resumed from the saved settings alone: the same rewards and weights
    as a run that was never stopped (each answer samples with its own seed, so the rollouts repeat)."""
    from safetensors.torch import load_file

    from lmforge.rl import load_settings

    target = tokenizer.encode("x")[0]
    items = [Item([{"role": "user", "content": f"say something {i}"}], None) for i in range(12)]

    def reward(batch_items, answers, ended):
        return [sum(t == target for t in tokenizer.encode(a)) / max(1, len(tokenizer.encode(a))) for a in answers]
    monkeypatch.setitem(rl_module.TASKS, "toy", (lambda data, eval_prompts: (items, []), reward))
    settings = dict(task="toy", data="unused", steps=4, prompts_per_step=2, group_size=4, max_tokens=6, lr=1e-2,
                    warmup_steps=1, eval_prompts=0, ckpt_every=2, device="cpu", dtype="fp32", progress=False)
    rl(base_model, base_model / "tokenizer.json", RLConfig(out_dir=str(tmp_path / "whole"), **settings))

    class Killed(Exception):
        pass
    real_save = rl_module.save_checkpoint

    def save_then_die(out, step, *args, **kwargs):
        real_save(out, step, *args, **kwargs)
        raise Killed
    monkeypatch.setattr(rl_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        rl(base_model, base_model / "tokenizer.json", RLConfig(out_dir=str(tmp_path / "cut"), **settings))
    monkeypatch.setattr(rl_module, "save_checkpoint", real_save)
    folder, tok_path, cfg = load_settings(tmp_path / "cut")
    assert (folder, tok_path) == (base_model, base_model / "tokenizer.json")
    assert cfg == RLConfig(out_dir=str(tmp_path / "cut"), **settings)
    rl(folder, tok_path, cfg, resume=True)

    def rewards(run):
        return [json.loads(x)["reward"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert rewards("cut") == rewards("whole") and len(rewards("whole")) == 4
    whole, cut = (load_file(tmp_path / run / "model" / "model.safetensors") for run in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
