"""GSM8K-style math for the record: a tiny model's RL reward curve (issue 5, acceptance 5).

    python bench/rl_gsm8k.py --run runs/code                       # synthetic GSM8K-form problems
    python bench/rl_gsm8k.py --run runs/code --source gsm8k        # GSM8K itself (../shared/data/gsm8k)

From a base run folder: SFT on worked solutions in chat form (question -> reasoning lines with
GSM8K's <<calculator>> annotations, ending '#### N'), then GRPO (`lmforge rl --task math`: reward 1
for the right final number in an answer that ends its turn), then greedy accuracy on held-out
questions before and after RL, with 95% Wilson intervals, and the training reward per step.

Two sources of questions:
    synthetic   grade-school word problems made here from templates, in GSM8K's exact answer
                form: one or two steps of +, -, x, / on numbers up to 20 (`synthetic_problems`).
                After one SFT epoch a 1.3M-parameter model answers about half right, so GRPO's
                groups of answers disagree and carry a gradient. RL trains on a pool of
                --rl-questions questions that it revisits (each about 6 times by default); the
                held-out questions are in no training pool.
    gsm8k       GSM8K's own training and test questions (those with at most --max-lines reasoning
                lines). A model this small answers almost none right before or after RL: every
                group scores all zeros and GRPO learns nothing (BENCHMARKS.md records it).
With --gsm8k pointing at the data, the synthetic run also reports accuracy on GSM8K's short test
questions before and after RL, for the record. Nothing in lmforge depends on that data.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_model
from lmforge.engine import LLM
from lmforge.evaluate import wilson_interval
from lmforge.posttrain import FitConfig
from lmforge.rl import RLConfig, evaluate, math_items, math_reward, rl
from lmforge.sft import SFTConfig, sft
from lmforge.tokenizer import load_tokenizer

NAMES = [("Ava", "She"), ("Ben", "He"), ("Carla", "She"), ("Dev", "He"), ("Emma", "She"), ("Finn", "He"),
         ("Grace", "She"), ("Hugo", "He"), ("Iris", "She"), ("Jon", "He"), ("Kira", "She"), ("Leo", "He"),
         ("Maya", "She"), ("Noah", "He"), ("Olga", "She"), ("Pablo", "He")]
THINGS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "coins", "cards", "shells", "balloons",
          "stamps", "eggs"]


def _calc(a: int, op: str, b: int) -> tuple[str, int]:
    """GSM8K's calculator annotation for one operation: ('a op b = <<a op b=c>>c', c)."""
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return f"{a} {op} {b} = <<{a}{op}{b}={c}>>{c}", c


def synthetic_problem(rng: random.Random) -> dict:
    """One word problem in GSM8K's form: {"question", "answer"}, the answer's reasoning lines ending '#### N'."""
    (name, he), (friend, _) = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    kind = rng.choice(["add", "sub", "mul", "div", "mul_add", "add_sub"])
    if kind == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        q = f"{name} has {a} {thing}. {he} gets {b} more {thing}. How many {thing} does {name} have now?"
        step, n = _calc(a, "+", b)
        lines = [f"{name} has {step} {thing} now."]
    elif kind == "sub":
        a = rng.randint(4, 20)
        b = rng.randint(1, a - 1)
        q = f"{name} has {a} {thing}. {he} gives {b} {thing} to {friend}. How many {thing} does {name} have left?"
        step, n = _calc(a, "-", b)
        lines = [f"{name} has {step} {thing} left."]
    elif kind == "mul":
        a, b = rng.randint(2, 10), rng.randint(2, 10)
        q = f"{name} buys {a} bags of {thing}. Each bag has {b} {thing}. How many {thing} does {name} buy?"
        step, n = _calc(a, "*", b)
        lines = [f"{name} buys {step} {thing}."]
    elif kind == "div":
        b, n = rng.randint(2, 10), rng.randint(2, 10)
        q = (f"{name} shares {b * n} {thing} equally among {b} friends. How many {thing} does each friend "
             f"get?")
        step, n = _calc(b * n, "/", b)
        lines = [f"Each friend gets {step} {thing}."]
    elif kind == "mul_add":
        a, b, c = rng.randint(2, 20), rng.randint(2, 5), rng.randint(2, 5)
        q = (f"{name} has {a} {thing}. {he} buys {b} bags with {c} {thing} in each bag. How many {thing} "
             f"does {name} have now?")
        step1, bought = _calc(b, "*", c)
        step2, n = _calc(a, "+", bought)
        lines = [f"{name} buys {step1} {thing}.", f"{name} has {step2} {thing} now."]
    else:  # add_sub
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        c = rng.randint(1, a + b - 1)
        q = (f"{name} has {a} {thing}. {friend} gives {name} {b} more. Then {name} loses {c} {thing}. How "
             f"many {thing} does {name} have?")
        step1, total = _calc(a, "+", b)
        step2, n = _calc(total, "-", c)
        lines = [f"{name} has {step1} {thing}.", f"After losing some, {name} has {step2} {thing}."]
    return {"question": q, "answer": "\n".join(lines) + f"\n#### {n}"}


def synthetic_problems(n_sft: int, n_rl: int, n_held_out: int, seed: int) -> tuple[list, list, list]:
    """(SFT problems, RL training questions, held-out questions), distinct question texts across all three."""
    rng, seen, pools = random.Random(seed), set(), ([], [], [])
    for pool, n in zip(pools, (n_sft, n_rl, n_held_out)):
        while len(pool) < n:
            problem = synthetic_problem(rng)
            if problem["question"] not in seen:
                seen.add(problem["question"])
                pool.append(problem)
    return pools


def short(rows: list[dict], max_lines: int) -> list[dict]:
    """Questions whose reference solution has at most max_lines reasoning lines (before '#### N')."""
    return [r for r in rows if len(r["answer"].split("####")[0].strip().splitlines()) <= max_lines]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def accuracy(folder: Path, tokenizer_path: Path, questions: Path, max_tokens: int) -> dict:
    """Greedy accuracy of a model folder on a question/answer file, with its 95% interval."""
    tokenizer = load_tokenizer(tokenizer_path)
    llm = LLM(load_model(folder, torch.device("cpu")), tokenizer, kv_cache_bytes=256 << 20, seed=0)
    result = evaluate(llm, tokenizer, math_items(questions), math_reward, max_tokens)
    solved = round(result["solved"] * result["n"])
    return {"solved": solved, "n": result["n"], "ci95": wilson_interval(solved, result["n"])}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a base run folder (model/, tokenizer.json)")
    p.add_argument("--source", choices=["synthetic", "gsm8k"], default="synthetic")
    p.add_argument("--gsm8k", default="../shared/data/gsm8k", help="folder with train.jsonl and test.jsonl")
    p.add_argument("--out", default=None, help="default: RUN/bench_gsm8k_<source>")
    p.add_argument("--sft-problems", type=int, default=20_000, help="synthetic: worked problems to fine-tune on")
    p.add_argument("--sft-epochs", type=float, default=1.0)
    p.add_argument("--max-lines", type=int, default=2, help="gsm8k: RL and evaluation on solutions this short")
    p.add_argument("--rl-questions", type=int, default=256, help="synthetic: the RL training pool")
    p.add_argument("--rl-steps", type=int, default=100)
    p.add_argument("--prompts-per-step", type=int, default=16)
    p.add_argument("--rl-lr", type=float, default=1e-4)
    p.add_argument("--kl", type=float, default=0.0, help="KL penalty to the SFT model (k3)")
    p.add_argument("--eval-questions", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    run, data, t_start = Path(args.run), Path(args.gsm8k), time.perf_counter()
    out = Path(args.out) if args.out else run / f"bench_gsm8k_{args.source}"
    out.mkdir(parents=True, exist_ok=True)
    # GSM8K's short test questions: the held-out set of --source gsm8k, asked for the record otherwise
    gsm8k_test = (short(read_jsonl(data / "test.jsonl"), args.max_lines)[:args.eval_questions]
                  if (data / "test.jsonl").is_file() else None)
    if args.source == "gsm8k":
        if gsm8k_test is None or not (data / "train.jsonl").is_file():
            raise SystemExit(f"--source gsm8k: {data} has no train.jsonl and test.jsonl; point --gsm8k at GSM8K")
        train = read_jsonl(data / "train.jsonl")
        sft_rows, rl_train, held_out = train, short(train, args.max_lines), gsm8k_test
        max_tokens = 160
    else:
        sft_rows, rl_train, held_out = synthetic_problems(args.sft_problems, args.rl_questions, args.eval_questions,
                                                          args.seed)
        max_tokens = 64
        if gsm8k_test is not None:
            write_jsonl(gsm8k_test, out / "gsm8k_short_test.jsonl")
    write_jsonl([{"prompt": r["question"], "completion": r["answer"]} for r in sft_rows], out / "sft_train.jsonl")

    fit = FitConfig(out_dir=str(out / "sft"), epochs=args.sft_epochs, batch_size=16, lr=1e-3, warmup_steps=10,
                    eval_every=10**9, ckpt_every=10**9, seed=args.seed)
    sft_summary = sft(run / "model", run / "tokenizer.json", SFTConfig(data=str(out / "sft_train.jsonl"),
                                                                       val_fraction=0.02, fit=fit))
    # rl's math task holds out the file's last eval_prompts questions
    write_jsonl(rl_train + held_out, out / "rl_questions.jsonl")
    cfg = RLConfig(task="math", data=str(out / "rl_questions.jsonl"), out_dir=str(out / "rl"), steps=args.rl_steps,
                   lr=args.rl_lr, max_tokens=max_tokens, temperature=1.0, prompts_per_step=args.prompts_per_step,
                   kl_coef=args.kl, eval_prompts=len(held_out), eval_every=25, ckpt_every=10**9, seed=args.seed)
    summary = rl(out / "sft" / "model", run / "tokenizer.json", cfg)

    records = read_jsonl(out / "rl" / "metrics.jsonl")
    curve = [r["reward"] for r in records if "reward" in r]
    window = 10
    smooth = [sum(curve[max(0, i - window + 1):i + 1]) / len(curve[max(0, i - window + 1):i + 1])
              for i in range(len(curve))]
    first, final = summary["first"], summary["final"]
    n = first["n"]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "source": args.source, "sft": {k: sft_summary[k] for k in ("steps", "final")},
              "rl_train_questions": summary["train_prompts"], "held_out_questions": n, "reward_curve": curve,
              "reward_moving_avg": smooth, "held_out_before": first, "held_out_after": final,
              "held_out_by_step": [(r["step"], r["val_solved"]) for r in records if "val_solved" in r],
              "ci95_before": wilson_interval(round(first["solved"] * n), n),
              "ci95_after": wilson_interval(round(final["solved"] * n), n)}
    if gsm8k_test is not None and args.source == "synthetic":
        questions = out / "gsm8k_short_test.jsonl"
        result["gsm8k_short_test"] = {"sft": accuracy(out / "sft" / "model", run / "tokenizer.json", questions, 160),
                                      "rl": accuracy(out / "rl" / "model", run / "tokenizer.json", questions, 160)}
    result["minutes"] = (time.perf_counter() - t_start) / 60
    (out / "results.json").write_text(json.dumps(result, indent=2))

    marks = [0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1]
    halves = [sum(curve[:len(curve) // 2]) / (len(curve) // 2),
              sum(curve[len(curve) // 2:]) / (len(curve) - len(curve) // 2)]
    print(f"\n{result['date']}, {result['machine']}, {args.source} questions: SFT {sft_summary['steps']} steps on "
          f"{len(sft_rows):,} solutions; GRPO {len(curve)} steps on {summary['train_prompts']:,} questions")
    print("training reward, moving average of 10 steps: "
          + ", ".join(f"step {i + 1}: {smooth[i]:.3f}" for i in marks))
    print(f"mean training reward: first half {halves[0]:.3f}, second half {halves[1]:.3f}; first 10 steps "
          f"{sum(curve[:10]) / 10:.3f}, last 10 {sum(curve[-10:]) / 10:.3f}")
    print("held-out greedy accuracy by step: " + ", ".join(f"{s}: {a:.3f}" for s, a in result["held_out_by_step"]))
    lo0, hi0 = result["ci95_before"]
    lo1, hi1 = result["ci95_after"]
    print(f"held-out accuracy (greedy, {n} questions): {first['solved']:.3f} [{lo0:.3f}, {hi0:.3f}] -> "
          f"{final['solved']:.3f} [{lo1:.3f}, {hi1:.3f}]")
    if "gsm8k_short_test" in result:
        g = result["gsm8k_short_test"]
        print(f"GSM8K short test questions, for the record: SFT {g['sft']['solved']}/{g['sft']['n']}, "
              f"after RL {g['rl']['solved']}/{g['rl']['n']}")
    print(f"({result['minutes']:.1f} min; {out / 'results.json'})")


if __name__ == "__main__":
    main()
