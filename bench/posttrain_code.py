"""Post-training on the built-in code domain: issue 5's acceptance figures from one `lmforge run` folder.

    lmforge run --name code                            # base model (model/) + SFT'd chat model (chat/)
    python bench/posttrain_code.py --run runs/code     # about 15 minutes on 2 CPU cores

The tasks are codetask's: "write a Python function `name(args)` that <docstring summary>", made from
the stdlib's own functions; held-out tasks are a hash slice (codetask's docstring says what that
slice does and does not measure). Every answer is greedy, in chat form, and checked by codetask
(generated code runs only in the sandbox). Rates carry a 95% Wilson interval.

1. SFT: held-out pass rate (ends its turn, parses, defines the requested function) of the base
   model prompted the same way vs the chat model from `lmforge run`'s SFT stage.
2. RL: GRPO (`lmforge rl --task code`, the shaped reward: form, then doctests) from the chat model;
   held-out pass rate and doctest pass rate before and after, and the doctest pass rate on the
   training tasks whose doctests are verified (`verified_doctest_tasks`: they pass with the reference
   solution, in its module's globals, and fail without it). Greedy answers say little where a model
   passes no doctest, so each model also samples K answers per verified doctest task (at the RL
   temperature): how many pass, how many tasks have any passing answer (pass@K), and the mean share
   of doctest checks passed (`codetask.doctest_checks`). GRPO learns from a group only where its
   answers differ in reward.
3. DPO: pairs with the reference solution chosen and one of the chat model's own sampled answers
   that fails the checks rejected; DPO from the chat model on the training tasks' pairs; held-out
   implicit-reward accuracy (chosen beats rejected) before and after, and the margin.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_model
from lmforge.codetask import check_many, evaluate, extract_tasks, verified_doctest_tasks
from lmforge.common import get_device, resolve_dtype
from lmforge.dpo import DPOConfig, dpo
from lmforge.engine import LLM, SamplingParams
from lmforge.evaluate import wilson_interval
from lmforge.posttrain import FitConfig
from lmforge.report import rate_text
from lmforge.rl import Item, RLConfig, rl, rollout, turn_end_id
from lmforge.tokenizer import load_tokenizer


def engine(folder: Path, tokenizer, seed: int) -> LLM:
    device = get_device("auto")
    return LLM(load_model(folder, device), tokenizer, device=device, dtype=resolve_dtype("auto", device),
               max_num_seqs=64, enable_prefix_caching=False, seed=seed)


def sampled_doctests(llm, tokenizer, tasks: list, *, k: int, temperature: float, seed: int) -> dict:
    """k sampled answers per task: answers passing every doctest (ended, defines the name), tasks with at
    least one such answer (pass@k), and the mean share of doctest checks passed (the reward's doctest
    part: 0 for an answer that did not end its turn)."""
    items = [Item([{"role": "user", "content": t.prompt}], t) for t in tasks]
    _, _, ended, texts = rollout(llm, tokenizer, items, n=k, max_tokens=512, temperature=temperature,
                                 top_p=1.0, seed=seed)
    flat = [(task, text, done) for task, group, dones in zip(tasks, texts, ended) for text, done in zip(group, dones)]
    results = check_many([f[0] for f in flat], [f[1] for f in flat])
    passing = [done and r.passed_doctests for (_, _, done), r in zip(flat, results)]
    return {"tasks": len(tasks), "k": k, "temperature": temperature, "answers": len(flat),
            "answers_passing": sum(passing),
            "tasks_with_a_passing_answer": sum(any(passing[i * k:(i + 1) * k]) for i in range(len(tasks))),
            "mean_share_of_checks_passed": sum(r.doctests_passed / r.num_doctests if done else 0.0
                                                 for (_, _, done), r in zip(flat, results)) / max(1, len(flat))}


def score_models(folders: dict[str, Path], tokenizer, task_sets: dict[str, list], seed: int, *,
                 doctest_sets: dict[str, list], k: int, temperature: float) -> dict:
    """{model: {task set: codetask.score figures, "sampled " + doctest set: sampled_doctests figures}}"""
    out = {}
    for name, folder in folders.items():
        llm = engine(folder, tokenizer, seed)
        out[name] = {set_name: evaluate(llm, tokenizer, tasks)[0] for set_name, tasks in task_sets.items()}
        if k:
            out[name].update({f"sampled {set_name}": sampled_doctests(llm, tokenizer, tasks, k=k,
                                                                       temperature=temperature, seed=seed)
                              for set_name, tasks in doctest_sets.items()})
    return out


def preference_pairs(folder: Path, tokenizer, tasks: list, *, samples: int, seed: int, counts: dict) -> list[dict]:
    """Per task, the first sampled answer (temperature 1) that fails the checks, as the rejected side of a
    pair whose chosen side is the reference solution."""
    from lmforge.conversations import chat_template, render_template

    llm = engine(folder, tokenizer, seed)
    template, end = chat_template(tokenizer), turn_end_id(tokenizer)
    prompts = [tokenizer.encode_with_special(render_template(template, [{"role": "user", "content": t.prompt}],
                                                             tokenizer)) for t in tasks]
    params = [SamplingParams(max_tokens=512, temperature=1.0, n=samples, seed=seed + 100 * i, stop_token_ids=[end],
                             ignore_eos=True, skip_special_tokens=False) for i in range(len(tasks))]
    groups = llm.generate(prompts, params)
    flat = [(task, c.text, c.finish_reason == "stop") for task, group in zip(tasks, groups) for c in group]
    results = check_many([f[0] for f in flat], [f[1] for f in flat])
    pairs, seen = [], set()
    for (task, text, ended), result in zip(flat, results):
        passed = ended and result.parses and result.defines and (result.passed_doctests or not result.num_doctests)
        if task.id in seen or passed:
            continue
        if not text.strip():
            counts["empty failing answers skipped"] = counts.get("empty failing answers skipped", 0) + 1
            continue
        seen.add(task.id)
        pairs.append({"prompt": task.prompt, "chosen": task.solution, "rejected": text})
    counts.update(tasks=len(tasks), samples=len(flat), passing_samples=sum(
        ended and r.parses and r.defines for (_, _, ended), r in zip(flat, results)), pairs=len(pairs))
    return pairs


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder from `lmforge run` (with model/ and chat/)")
    p.add_argument("--out", default=None, help="where the RL and DPO runs go (default: RUN/bench_code)")
    p.add_argument("--rl-steps", type=int, default=30)
    p.add_argument("--rl-lr", type=float, default=2e-5)
    p.add_argument("--rl-temperature", type=float, default=0.7,
                   help="rollout temperature (at 1.0 most of a small model's sampled code does not parse)")
    p.add_argument("--dpo-train-tasks", type=int, default=400, help="training tasks sampled for DPO pairs")
    p.add_argument("--dpo-samples", type=int, default=2, help="sampled answers per task for DPO's rejected side")
    p.add_argument("--doctest-samples", type=int, default=16,
                   help="answers sampled per verified doctest task and model, for pass@K (0: skip)")
    p.add_argument("--skip", action="append", default=[], choices=["rl", "dpo"])
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    if args.doctest_samples < 0:
        p.error(f"--doctest-samples {args.doctest_samples}: give 0 to skip, or a number of answers to sample")
    run, t_start = Path(args.run), time.perf_counter()
    out = Path(args.out) if args.out else run / "bench_code"
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(run / "tokenizer.json")
    tasks = extract_tasks(self_contained=False)
    val = [t for t in tasks if t.split == "val"]
    train = [t for t in tasks if t.split == "train"]
    verified = verified_doctest_tasks(tasks)
    doctest_val = [t for t in verified if t.split == "val"]
    doctest_train = [t for t in verified if t.split == "train"]
    sets = {"held-out": val, "train tasks with verified doctests (in-sample)": doctest_train}
    doctest_sets = {"held-out verified doctest tasks": doctest_val, "training verified doctest tasks": doctest_train}
    folders = {"base": run / "model", "sft": run / "chat" / "model"}
    results: dict = {"run": str(run), "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                     "date": time.strftime("%Y-%m-%d"), "train_tasks": len(train), "val_tasks": len(val),
                     "val_from_heldout_files": sum(t.heldout_file for t in val)}

    if "rl" not in args.skip:
        cfg = RLConfig(task="code", out_dir=str(out / "rl"), steps=args.rl_steps, lr=args.rl_lr,
                       temperature=args.rl_temperature, eval_every=10**9,
                       eval_prompts=0, ckpt_every=10**9, seed=args.seed)
        results["rl"] = rl(folders["sft"], run / "tokenizer.json", cfg)
        folders["sft+rl"] = out / "rl" / "model"
    results["scores"] = score_models(folders, tokenizer, sets, args.seed, doctest_sets=doctest_sets,
                                     k=args.doctest_samples, temperature=args.rl_temperature)

    if "dpo" not in args.skip:
        counts: dict = {}
        picked = train[::max(1, len(train) // args.dpo_train_tasks)][:args.dpo_train_tasks]
        train_pairs = preference_pairs(folders["sft"], tokenizer, picked, samples=args.dpo_samples, seed=args.seed,
                                       counts=counts)
        val_counts: dict = {}
        val_pairs = preference_pairs(folders["sft"], tokenizer, val, samples=args.dpo_samples, seed=args.seed + 1,
                                     counts=val_counts)
        write_jsonl(train_pairs, out / "prefs_train.jsonl")
        write_jsonl(val_pairs, out / "prefs_val.jsonl")
        cfg = DPOConfig(data=str(out / "prefs_train.jsonl"), val_data=str(out / "prefs_val.jsonl"), fit=FitConfig(
            out_dir=str(out / "dpo"), lr=5e-5, epochs=2.0, batch_size=8, eval_every=10**9, seed=args.seed))
        summary = dpo(folders["sft"], run / "tokenizer.json", cfg)
        n = summary["counts"]["val_pairs"] - summary["counts"]["val_too_long_dropped"]
        acc = summary["final"]["val_reward_accuracy"]
        results["dpo"] = {"pairs": counts, "val_pairs_made": val_counts, "val_pairs_scored": n,
                          "before": summary["first"], "after": summary["final"],
                          "accuracy_ci95": wilson_interval(round(acc * n), n), "steps": summary["steps"]}
    results["minutes"] = (time.perf_counter() - t_start) / 60
    (out / "results.json").write_text(json.dumps(results, indent=2))

    s = results["scores"]
    print(f"\n{results['date']}, {results['machine']}: {results['train_tasks']} training tasks, "
          f"{results['val_tasks']} held out ({results['val_from_heldout_files']} from held-out files)")
    print("| model | held-out pass | held-out doctests | in-sample doctests |\n|---|---|---|---|")
    for name, by_set in s.items():
        held, ins = by_set["held-out"], by_set["train tasks with verified doctests (in-sample)"]
        print(f"| {name} | {rate_text(held)} | {rate_text(held, 'doctest')} | {rate_text(ins, 'doctest')} |")
    if args.doctest_samples:
        print(f"\n{args.doctest_samples} sampled answers per verified doctest task, temperature {args.rl_temperature}:")
        print("| model | tasks | answers passing all doctests | tasks with a passing answer | share of checks passed |")
        print("|---|---|---|---|---|")
        for name, by_set in s.items():
            for set_name in doctest_sets:
                d = by_set[f"sampled {set_name}"]
                print(f"| {name} | {set_name}: {d['tasks']} | {d['answers_passing']}/{d['answers']} | "
                      f"{d['tasks_with_a_passing_answer']}/{d['tasks']} | {d['mean_share_of_checks_passed']:.3f} |")
    base, sft = s["base"]["held-out"]["pass_rate"], s["sft"]["held-out"]["pass_rate"]
    print(f"SFT / base held-out pass rate: {sft / base if base else float('inf'):.1f}x")
    if "dpo" in results:
        d = results["dpo"]
        lo, hi = d["accuracy_ci95"]
        print(f"DPO: {d['pairs']['pairs']} training pairs, {d['val_pairs_scored']} held-out; held-out reward accuracy "
              f"{d['before'].get('val_reward_accuracy', float('nan')):.3f} -> {d['after']['val_reward_accuracy']:.3f} "
              f"[{lo:.3f}, {hi:.3f}], margin {d['after']['val_reward_margin']:.3f}")
    print(f"({results['minutes']:.1f} min; everything in {out / 'results.json'})")


if __name__ == "__main__":
    main()
