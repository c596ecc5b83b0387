"""Recipe sweep: held-out bits per byte of several training recipes at the same wall-clock budget.

Each recipe trains from scratch on the default corpus (tokenized once per vocabulary size) for
--minutes, then is scored on the whole held-out split. This is how the `lmforge run` default
preset was chosen; results go to BENCHMARKS.md.

    python bench/recipe_sweep.py --minutes 3
    python bench/recipe_sweep.py --minutes 3 --recipe '{"vocab": 4096, "depth": 4, "aspect_ratio": 32}'
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmforge.checkpoint import load_model
from lmforge.corpus import Corpus
from lmforge.evaluate import evaluate_heldout
from lmforge.prepare import prepare_data
from lmforge.train import TrainConfig, pretrain

RECIPES = [
    {"vocab": 8192, "depth": 4},
    {"vocab": 4096, "depth": 4},
    {"vocab": 4096, "depth": 4, "optimizer": "adamw"},
    {"vocab": 2048, "depth": 4},
    {"vocab": 4096, "depth": 4, "aspect_ratio": 48, "head_dim": 48},
    {"vocab": 2048, "depth": 5, "aspect_ratio": 32, "head_dim": 32},
    {"vocab": 2048, "depth": 4, "aspect_ratio": 32, "head_dim": 32},
    {"vocab": 2048, "depth": 4, "aspect_ratio": 32, "head_dim": 32, "compile": True},
    {"vocab": 4096, "depth": 4, "aspect_ratio": 32, "head_dim": 32},
]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0, help="training budget per recipe")
    p.add_argument("--recipe", action="append", help="JSON: vocab plus TrainConfig fields (repeatable); "
                                                     "default: the built-in list")
    p.add_argument("--work-dir", default="runs/sweep", help="where data and runs go")
    args = p.parse_args()
    recipes = [json.loads(r) for r in args.recipe] if args.recipe else RECIPES
    work = Path(args.work_dir)
    for recipe in recipes:
        recipe = dict(recipe)
        vocab = recipe.pop("vocab")
        data = work / f"data{vocab}"
        if not (data / "meta.json").exists():
            prepare_data(Corpus("stdlib"), data, vocab_size=vocab, progress=False)
        name = "_".join(f"{k}{v}" for k, v in {"vocab": vocab, **recipe}.items())
        cfg = TrainConfig(data_dir=str(data), out_dir=str(work / name), time_budget_s=args.minutes * 60,
                          progress=False, eval_every=10**9, ckpt_every=10**9, **recipe)
        summary = pretrain(cfg)
        result = evaluate_heldout(load_model(work / name / "model"), data, seq_len=cfg.seq_len, batch_size=16,
                                  device=torch.device("cpu"))
        print(json.dumps({"vocab": vocab, **recipe, "params": summary["num_params"], "steps": summary["steps"],
                          "tokens_per_s": round(summary["tokens_per_s"]), "bpb": round(result["bpb"], 4)}),
              flush=True)


if __name__ == "__main__":
    main()
