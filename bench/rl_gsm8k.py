"""GSM8K for the record: a tiny model's RL reward curve on grade-school math (issue 5, acceptance 5).

    python bench/rl_gsm8k.py --run runs/code --gsm8k ../shared/data/gsm8k    # about 15 minutes, 2 CPU cores

From a base run folder: SFT on GSM8K's training solutions (chat form: question -> worked answer
ending '#### N'), then GRPO (`lmforge rl --task math`: reward 1 for the right final number in an
answer that ends its turn) on training questions with short solutions (at most --max-lines
reasoning lines: a tiny model's only chance of a right answer, and GRPO learns nothing from a
group whose answers all score 0). Reports the training reward per step (and a moving average),
and the greedy accuracy on held-out test questions before and after RL, with 95% Wilson intervals.
The data is read from the shared benchmark folder; nothing in lmforge depends on it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lmforge.evaluate import wilson_interval
from lmforge.posttrain import FitConfig
from lmforge.rl import RLConfig, rl
from lmforge.sft import SFTConfig, sft


def short(rows: list[dict], max_lines: int) -> list[dict]:
    """Questions whose reference solution has at most max_lines reasoning lines (before '#### N')."""
    return [r for r in rows if len(r["answer"].split("####")[0].strip().splitlines()) <= max_lines]


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a base run folder (model/, tokenizer.json)")
    p.add_argument("--gsm8k", default="../shared/data/gsm8k", help="folder with train.jsonl and test.jsonl")
    p.add_argument("--out", default=None, help="default: RUN/bench_gsm8k")
    p.add_argument("--sft-epochs", type=float, default=2.0)
    p.add_argument("--max-lines", type=int, default=2, help="RL and evaluation on solutions this short")
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--rl-lr", type=float, default=3e-5)
    p.add_argument("--eval-questions", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    run, data, t_start = Path(args.run), Path(args.gsm8k), time.perf_counter()
    out = Path(args.out) if args.out else run / "bench_gsm8k"
    out.mkdir(parents=True, exist_ok=True)
    train = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines() if line.strip()]
    test = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    write_jsonl([{"prompt": r["question"], "completion": r["answer"]} for r in train], out / "sft_train.jsonl")

    fit = FitConfig(out_dir=str(out / "sft"), epochs=args.sft_epochs, batch_size=16, lr=1e-3, warmup_steps=10,
                    eval_every=10**9, ckpt_every=10**9, seed=args.seed)
    sft_summary = sft(run / "model", run / "tokenizer.json", SFTConfig(data=str(out / "sft_train.jsonl"),
                                                                       val_fraction=0.02, fit=fit))
    # rl's math task holds out the file's last --eval-prompts questions: the short test questions go last
    rl_rows = short(train, args.max_lines) + short(test, args.max_lines)[:args.eval_questions]
    held_out = len(short(test, args.max_lines)[:args.eval_questions])
    write_jsonl(rl_rows, out / "rl_questions.jsonl")
    cfg = RLConfig(task="math", data=str(out / "rl_questions.jsonl"), out_dir=str(out / "rl"), steps=args.rl_steps,
                   lr=args.rl_lr, max_tokens=160, temperature=1.0, eval_prompts=held_out, eval_every=10**9,
                   ckpt_every=10**9, seed=args.seed)
    summary = rl(out / "sft" / "model", run / "tokenizer.json", cfg)

    records = [json.loads(line) for line in (out / "rl" / "metrics.jsonl").read_text().splitlines() if line]
    curve = [r["reward"] for r in records if "reward" in r]
    window = 10
    smooth = [sum(curve[max(0, i - window + 1):i + 1]) / len(curve[max(0, i - window + 1):i + 1])
              for i in range(len(curve))]
    first, final = summary["first"], summary["final"]
    n = first["n"]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
              "sft": {k: sft_summary[k] for k in ("steps", "final")}, "rl_train_questions": summary["train_prompts"],
              "held_out_questions": n, "reward_curve": curve, "reward_moving_avg": smooth,
              "held_out_before": first, "held_out_after": final,
              "ci95_before": wilson_interval(round(first["solved"] * n), n),
              "ci95_after": wilson_interval(round(final["solved"] * n), n),
              "minutes": (time.perf_counter() - t_start) / 60}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    marks = [0, len(curve) // 4, len(curve) // 2, 3 * len(curve) // 4, len(curve) - 1]
    print(f"\n{result['date']}, {result['machine']}: SFT {sft_summary['steps']} steps on {len(train):,} solutions; "
          f"GRPO {len(curve)} steps on {summary['train_prompts']:,} questions with <= {args.max_lines} lines")
    print("training reward, moving average of 10 steps: "
          + ", ".join(f"step {i + 1}: {smooth[i]:.3f}" for i in marks))
    lo0, hi0 = result["ci95_before"]
    lo1, hi1 = result["ci95_after"]
    print(f"held-out accuracy (greedy, {n} short test questions): {first['solved']:.3f} [{lo0:.3f}, {hi0:.3f}] -> "
          f"{final['solved']:.3f} [{lo1:.3f}, {hi1:.3f}]  ({result['minutes']:.1f} min; {out / 'results.json'})")


if __name__ == "__main__":
    main()
