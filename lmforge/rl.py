"""`lmforge rl`: reinforcement learning with verifiable rewards, GRPO-style (Shao et al. 2024, DeepSeekMath).

    lmforge rl --run runs/chat --task math --data gsm8k_train.jsonl --out runs/rl

Each step takes `prompts_per_step` prompts, samples a group of `group_size` answers to each with
the inference engine (engine/), and scores every answer with a program (the reward function of
the task: does the code parse and pass its doctests, is the final number right). An answer's
advantage is its reward minus its group's mean (divided by the group's std with
--scale-rewards, as the GRPO paper does; Dr. GRPO, Liu et al. 2025, argues against it), so the
policy is pushed toward the better answers *to the same prompt* and no value model is needed.
A group whose answers all score the same teaches nothing and is skipped.

The update is PPO's clipped objective on each answer token (Schulman et al. 2017):

    ratio = pi(token) / pi_old(token);  loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)

averaged over each answer's tokens, then over answers; with one update per batch (the default)
ratio is 1 and this is the plain policy gradient. --kl-coef adds beta * KL(pi || pi_ref) to a
frozen copy of the starting model, with the k3 estimator exp(r) - r - 1, r = log pi_ref - log pi.

Sampling uses each answer's own seed (from --seed, the step and its position), so a resumed run
draws the same answers an uninterrupted one would have.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge.checkpoint import load_model, resume_checkpoint, save_checkpoint, save_model_folder
from lmforge.common import LmforgeError, atomic_write_text, autocast, get_device, print0, resolve_dtype, seed_everything
from lmforge.conversations import chat_template, encode_chat, pad_token_id
from lmforge.optim import build_optimizers, lr_multiplier, set_lr
from lmforge.posttrain import pad_rows, read_settings, rewind_metrics, save_settings
from lmforge.tokenizer import load_tokenizer


@dataclass
class Item:
    """One prompt of a task: the conversation to answer and what the reward function needs to check it."""
    messages: list[dict]
    payload: object


# A reward function scores answers to items: (items, answer texts, whether each ended its turn) -> rewards.
RewardFn = Callable[[list[Item], list[str], list[bool]], list[float]]


# ----------------------------------------------------------------------------- tasks

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The last number in a text, without thousands separators or a trailing '.0' (GSM8K's answers are
    integers, written after '####' in the reference)."""
    found = _NUMBER.findall(text.split("####")[-1] if "####" in text else text)
    if not found:
        return None
    number = found[-1].replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def math_items(path: str | Path) -> list[Item]:
    """GSM8K-style JSONL: {"question", "answer"} with the final answer after '####'."""
    if not Path(path).is_file():
        raise LmforgeError(f"{path}: no such file; give a JSONL of {{'question', 'answer'}} lines (GSM8K's form)")
    items = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, gold = row["question"], final_number(row["answer"])
        except (ValueError, KeyError, TypeError) as e:
            raise LmforgeError(f"{path}:{line_no}: not a {{'question', 'answer'}} JSON line ({e})") from None
        if gold is None:
            raise LmforgeError(f"{path}:{line_no}: the answer has no final number")
        items.append(Item([{"role": "user", "content": question}], gold))
    if not items:
        raise LmforgeError(f"{path}: no questions")
    return items


def math_reward(items: list[Item], answers: list[str], ended: list[bool]) -> list[float]:
    """1 for the right final number in an answer that ended its turn, else 0."""
    return [float(done and final_number(a) == item.payload) for item, a, done in zip(items, answers, ended)]


def math_task(data: str | None, eval_prompts: int) -> tuple[list[Item], list[Item]]:
    """Training and held-out questions: the file's last eval_prompts (none if that would leave fewer
    for training)."""
    if not data:
        raise LmforgeError("--task math needs --data: a JSONL of {'question', 'answer'} lines (GSM8K's form)")
    items = math_items(data)
    held_out = items[-eval_prompts:] if len(items) > 2 * eval_prompts else []
    return items[:len(items) - len(held_out)], held_out


def code_task(data: str | None, eval_prompts: int) -> tuple[list[Item], list[Item]]:
    """The built-in code domain: stdlib functions to write from their signature and docstring (codetask),
    split as the corpus splits their files."""
    from lmforge.codetask import extract_tasks

    tasks = extract_tasks()  # read once: it parses the whole standard library
    items = {split: [Item([{"role": "user", "content": t.prompt}], t) for t in tasks if t.split == split]
             for split in ("train", "val")}
    return items["train"], items["val"][:eval_prompts]


def code_reward(items: list[Item], answers: list[str], ended: list[bool]) -> list[float]:
    """codetask's shaped reward (parses, defines the name, passes doctests), 0 for an answer that never
    ended its turn. Answers run only in the sandbox."""
    from lmforge.codetask import check_many, reward

    results = check_many([i.payload for i in items], answers)
    return [reward(r) if done else 0.0 for r, done in zip(results, ended)]


# task -> (load(data, eval_prompts) -> (training items, held-out items), reward function)
TASKS = {"math": (math_task, math_reward), "code": (code_task, code_reward)}


# ----------------------------------------------------------------------------- the algorithm

def group_advantages(rewards: torch.Tensor, scale: bool = False) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): reward minus its group's mean (over its std with scale)."""
    adv = rewards - rewards.mean(1, keepdim=True)
    if scale:
        adv = adv / (rewards.std(1, keepdim=True) + 1e-4)
    return adv


def token_logps(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position (B, T), 0 where the target is ignored (-1)."""
    return -model(inputs, targets, loss_reduction="none").float()


@torch.no_grad()
def frozen_logps(model, inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int, device,
                 dtype) -> torch.Tensor:
    """token_logps over a whole batch (N, T), micro-batch by micro-batch, without gradients (on the CPU)."""
    with autocast(device, dtype):
        return torch.cat([token_logps(model, inputs[i:i + micro_batch].to(device),
                                      targets[i:i + micro_batch].to(device)).cpu()
                          for i in range(0, inputs.size(0), micro_batch)])


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_eps: float, ref_logps: torch.Tensor | None = None, kl_coef: float = 0.0):
    """GRPO's clipped surrogate (B, T) -> scalar: per answer, the mean over its tokens; then the sum
    over answers (the caller divides by the number of answers in the whole batch)."""
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = torch.zeros_like(per_token)
    if ref_logps is not None and kl_coef > 0:
        r = ref_logps - logps
        kl = torch.exp(r) - r - 1  # k3: unbiased, always >= 0
        per_token = per_token + kl_coef * kl
    lengths = mask.sum(1).clamp(min=1)
    per_answer = (per_token * mask).sum(1) / lengths
    return per_answer.sum(), ((kl * mask).sum(1) / lengths).sum().detach()


@dataclass
class RLConfig:
    task: str = "code"
    data: str | None = None  # math: a question/answer JSONL; code: the built-in stdlib tasks
    out_dir: str = "runs/rl"
    steps: int = 50
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    lr: float = 1e-5
    warmup_steps: int = 5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    scale_rewards: bool = False
    updates_per_step: int = 1
    micro_batch: int = 16  # answers per forward/backward
    eval_every: int = 10
    eval_prompts: int = 64  # held-out prompts, greedy, for the reported pass rate
    ckpt_every: int = 25
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True


SETTINGS_FILE = "rl_settings.json"  # what --resume restores: the starting model and every setting


def load_settings(out_dir: str | Path) -> tuple[Path, Path, RLConfig]:
    """(starting model folder, tokenizer file, settings) an RL run was started with, for --resume."""
    folder, tokenizer_path, config = read_settings(out_dir, SETTINGS_FILE, "an RL run folder")
    return folder, tokenizer_path, RLConfig(**config)


def turn_end_id(tokenizer) -> int:
    special = getattr(tokenizer, "special_ids", {})
    end = special.get("<|assistant_end|>", getattr(tokenizer, "eos_id", None))
    if end is None:
        raise LmforgeError("the tokenizer has neither <|assistant_end|> nor an eos token to end an answer with")
    return end


def rollout(llm, tokenizer, items: list[Item], *, n: int, max_tokens: int, temperature: float, top_p: float,
            seed: int, **sampling) -> tuple[list[list[int]], list[list[list[int]]], list[list[bool]], list[list[str]]]:
    """Prompt ids, and per prompt n answers' token ids (with the end-of-turn token when they ended
    it), whether they ended, and their text, stray special tokens included (graded as written).
    `sampling`: more SamplingParams fields (penalties)."""
    from lmforge.engine import SamplingParams

    template, end = chat_template(tokenizer), turn_end_id(tokenizer)
    prompts = [encode_chat(tokenizer, it.messages, template) for it in items]
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed + 1000 * i,
                             stop_token_ids=[end], ignore_eos=True, skip_special_tokens=False, **sampling)
              for i in range(len(items))]
    results = llm.generate(prompts, params)
    ids = [[c.token_ids + ([end] if c.finish_reason == "stop" else []) for c in group] for group in results]
    ended = [[c.finish_reason == "stop" for c in group] for group in results]
    texts = [[c.text for c in group] for group in results]
    return prompts, ids, ended, texts


def evaluate(llm, tokenizer, items: list[Item], reward_fn: RewardFn, max_tokens: int) -> dict:
    """Greedy answers to held-out items: mean reward and the share with full reward."""
    _, _, ended, texts = rollout(llm, tokenizer, items, n=1, max_tokens=max_tokens, temperature=0.0, top_p=1.0,
                                 seed=0)
    rewards = reward_fn(items, [t[0] for t in texts], [e[0] for e in ended])
    return {"reward": sum(rewards) / len(rewards), "solved": sum(r >= 1.0 for r in rewards) / len(rewards),
            "n": len(rewards)}


def rl(folder: Path, tokenizer_path: Path, cfg: RLConfig, *, resume: bool = False) -> dict:
    from lmforge.engine import LLM

    if cfg.task not in TASKS:
        raise LmforgeError(f"--task {cfg.task}: choose one of {', '.join(TASKS)}")
    load_items, reward_fn = TASKS[cfg.task]
    train_items, held_out = load_items(cfg.data, cfg.eval_prompts)
    if not train_items:
        raise LmforgeError(f"--task {cfg.task}: no training prompts")
    seed_everything(cfg.seed)
    device = get_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(tokenizer_path)
    model = load_model(folder, device, dtype=torch.float32)
    reference = None
    if cfg.kl_coef > 0:
        reference = load_model(folder, device).requires_grad_(False).eval()
    optimizers = build_optimizers(model, name="adamw", lr=cfg.lr, matrix_lr=cfg.lr, weight_decay=cfg.weight_decay)
    # Answers are sampled by the engine over the same weights, so each step samples from the current policy.
    # Without prefix caching: cached keys would come from weights the last update changed.
    llm = LLM(model, tokenizer, device=device, dtype=dtype, max_num_seqs=cfg.prompts_per_step * cfg.group_size,
              kv_cache_bytes=256 << 20, enable_prefix_caching=False, seed=cfg.seed)
    out = Path(cfg.out_dir)
    metrics_path = out / "metrics.jsonl"
    step = 0
    if resume:
        step = resume_checkpoint(out, model, optimizers)[1]["step"]  # past a broken latest, with a warning
        rewind_metrics(metrics_path, step)
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(metrics_path, "")
        save_settings(out, SETTINGS_FILE, folder, tokenizer_path, cfg)

    def log(record: dict):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def held_out_eval() -> dict:
        if not held_out:
            return {}
        result = evaluate(llm, tokenizer, held_out, reward_fn, cfg.max_tokens)
        log({"step": step, **{f"val_{k}": v for k, v in result.items()}})
        return result

    first = held_out_eval() if step == 0 else {}
    last_eval = first
    order = torch.randperm(len(train_items), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, unit="step", desc="rl", dynamic_ncols=True)
    pad = pad_token_id(tokenizer)
    while step < cfg.steps:
        t0 = time.perf_counter()
        picks = [order[(step * cfg.prompts_per_step + i) % len(order)] for i in range(cfg.prompts_per_step)]
        batch_items = [train_items[i] for i in picks]
        model.eval()
        prompts, answers, ended, texts = rollout(llm, tokenizer, batch_items, n=cfg.group_size,
                                                 max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                                 top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step * 100_000)
        flat_items = [it for it in batch_items for _ in range(cfg.group_size)]
        rewards = torch.tensor(reward_fn(flat_items, [t for g in texts for t in g], [e for g in ended for e in g]))
        rewards = rewards.view(cfg.prompts_per_step, cfg.group_size)
        advantages = group_advantages(rewards, cfg.scale_rewards)
        # rows of prompt + answer; only the answer's tokens are targets; groups that teach nothing are skipped
        examples, adv = [], []
        for p, group in enumerate(answers):
            if rewards[p].std() == 0:
                continue
            for g, answer in enumerate(group):
                if answer:
                    examples.append((prompts[p] + answer, [False] * len(prompts[p]) + [True] * len(answer)))
                    adv.append(advantages[p, g].item())
        record = {"step": step + 1, "reward": rewards.mean().item(), "solved": (rewards >= 1).float().mean().item(),
                  "ended": sum(e for g in ended for e in g) / rewards.numel(),
                  "answer_tokens": sum(len(a) for g in answers for a in g) / rewards.numel(),
                  "groups_used": len({i for i in range(len(answers)) if rewards[i].std() > 0})}
        set_lr(optimizers, lr_multiplier(step, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                                         schedule="wsd", decay_frac=0.0))
        if examples:
            model.train()
            inputs, targets = pad_rows(examples, pad)
            adv_t = torch.tensor(adv)
            mask = targets >= 0
            # With one update per batch pi_old is the policy itself: its log-probs are the live ones, detached,
            # and no extra forward pass is needed. Several updates need them frozen before the first.
            old = frozen_logps(model, inputs, targets, cfg.micro_batch, device, dtype) \
                if cfg.updates_per_step > 1 else None
            ref = None if reference is None else frozen_logps(reference, inputs, targets, cfg.micro_batch, device,
                                                              dtype)
            for _ in range(cfg.updates_per_step):
                kl_sum = 0.0
                for i in range(0, len(examples), cfg.micro_batch):
                    s = slice(i, i + cfg.micro_batch)
                    with autocast(device, dtype):
                        logps = token_logps(model, inputs[s].to(device), targets[s].to(device))
                    old_s = logps.detach() if old is None else old[s].to(device)
                    loss, kl = policy_loss(logps, old_s, adv_t[s].to(device), mask[s].to(device),
                                           cfg.clip_eps, None if ref is None else ref[s].to(device), cfg.kl_coef)
                    (loss / len(examples)).backward()
                    kl_sum += kl.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                if not math.isfinite(grad_norm):
                    raise LmforgeError(f"rl diverged at step {step}: gradient norm {grad_norm}; lower --lr")
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            record.update(kl=kl_sum / len(examples), grad_norm=grad_norm)
        step += 1
        record["seconds"] = time.perf_counter() - t0
        log(record)
        bar.set_postfix(reward=f"{record['reward']:.3f}", solved=f"{record['solved']:.2f}", refresh=False)
        bar.update(1)
        if step % cfg.eval_every == 0 and step != cfg.steps:
            last_eval = held_out_eval()
        if step % cfg.ckpt_every == 0 and step != cfg.steps:
            save_checkpoint(out, step, model, optimizers, {}, trainable_only=True)
    bar.close()
    last_eval = held_out_eval() or last_eval
    save_checkpoint(out, step, model, optimizers, {}, trainable_only=True)
    save_model_folder(out / "model", model, tokenizer, extra={"rl": {"task": cfg.task, "steps": step}})
    summary = {"steps": step, "first": first, "final": last_eval, "task": cfg.task,
               "train_prompts": len(train_items), "held_out_prompts": len(held_out)}
    atomic_write_text(out / "rl.json", json.dumps(summary, indent=2))
    start = f"{first['reward']:.3f} -> " if first else ""  # a resumed run scored its start before
    held = f"held-out reward {start}{last_eval['reward']:.3f}" if held_out else "no held-out prompts scored"
    print0(f"rl: {step} steps; {held}")
    return summary
