"""`lmforge run`: the main job, every stage end to end, like a speedrun script.

    corpus -> data pipeline (dataprep/: clean, filter, deduplicate, redact, split; data_card.md)
    -> tokenizer -> token shards -> pretrain (wall-clock budget) -> held-out eval
    (beside xz -9 and zlib -9 on the same bytes) -> sample generations
    -> SFT on the built-in code domain (chat/) -> held-out pass rate, base vs chat -> report.md

The default recipe is tuned for the embedded stdlib corpus on a 2-core CPU in about 15
minutes; `--tiny` runs the same stages on a slice of the corpus in about a minute.

The run folder holds the base model in `model/` (what `generate` and `eval` take with --run) and
the chat model fine-tuned on the code domain (codetask: "write a function `name(args)` that ...")
in `chat/`, itself an SFT run folder (`lmforge chat --run runs/<name>/chat`). The SFT stage runs on
the stdlib corpus only: the code tasks are the stdlib's own functions.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from lmforge.common import LmforgeError, atomic_write_text, get_device, resolve_dtype
from lmforge.data import read_meta
from lmforge.dataprep.pipeline import STDLIB, PrepareConfig, prepare
from lmforge.evaluate import evaluate_heldout
from lmforge.generate import generate
from lmforge.tokenizer import Tokenizer
from lmforge.train import TrainConfig, pretrain


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    corpus_max_bytes: int | None  # read only this much of the corpus
    tokenizer_max_bytes: int | None  # train BPE on this much of the training split
    train: dict  # TrainConfig fields
    sft: dict  # SFTConfig fields of the code-domain SFT stage ("fit": FitConfig fields)
    sft_reserve_s: float  # wall-clock kept back from pretraining for SFT and its evaluation
    sft_eval_tasks: int | None  # held-out code tasks the base and chat models answer (None: all)


PRESETS = {
    # Chosen by 3-minute sweeps on the 2-core CPU (BENCHMARKS.md): at this compute a narrow model
    # that sees many tokens beats a wide one that sees few, a 4k vocabulary beat 2k at width 128, and Muon
    # beat AdamW despite its Newton-Schulz cost.
    "default": Preset(vocab_size=4096, corpus_max_bytes=None, tokenizer_max_bytes=None, train=dict(
        depth=4, aspect_ratio=32, head_dim=32, seq_len=256, batch_size=16, optimizer="muon", lr=3e-3,
        matrix_lr=0.02, schedule="wsd", warmup_steps=50, decay_frac=0.4, eval_every=250, eval_tokens=32768,
        ckpt_every=500), sft=dict(fit=dict(
        epochs=3.0, batch_size=16, lr=1e-3, warmup_steps=10, eval_every=50, ckpt_every=10_000)),
        sft_reserve_s=120, sft_eval_tasks=None),
    "tiny": Preset(vocab_size=1024, corpus_max_bytes=3_000_000, tokenizer_max_bytes=1_000_000, train=dict(
        depth=2, aspect_ratio=32, head_dim=32, seq_len=128, batch_size=8, optimizer="muon", lr=3e-3, matrix_lr=0.02,
        schedule="wsd", warmup_steps=10, decay_frac=0.4, eval_every=50, eval_tokens=8192, ckpt_every=100),
        # a 128-token context: most code tasks only fit truncated; enough to exercise the stage
        sft=dict(too_long="truncate", fit=dict(max_steps=8, batch_size=8, lr=1e-3, warmup_steps=2, eval_every=8,
                                               ckpt_every=10_000)),
        sft_reserve_s=20, sft_eval_tasks=16),
}
SAMPLE_PROMPTS = ["def fib(", "import os\n", "class Stack:\n", "The for statement"]
SAMPLING = dict(temperature=0.8, top_k=50, max_tokens=100)


def code_chat_stage(run_dir: Path, preset: Preset, *, seed: int, device: str, progress: bool) -> dict:
    """SFT of the base model on the code domain's training tasks into run_dir/chat, then the held-out
    tasks answered greedily in chat form by the base model and the chat model (codetask.score)."""
    from lmforge.checkpoint import load_model
    from lmforge.codetask import evaluate as evaluate_code
    from lmforge.codetask import extract_tasks, write_jsonl
    from lmforge.engine import LLM
    from lmforge.posttrain import FitConfig
    from lmforge.sft import SFTConfig, sft

    out = run_dir / "chat"
    out.mkdir(exist_ok=True)
    tasks = extract_tasks(self_contained=False)  # for SFT volume: the check needs only the name defined
    train = [t for t in tasks if t.split == "train"]
    val = [t for t in tasks if t.split == "val"][:preset.sft_eval_tasks]
    write_jsonl(train, out / "code_train.jsonl")
    write_jsonl(val, out / "code_val.jsonl")
    settings = dict(preset.sft)
    fit = FitConfig(out_dir=str(out), seed=seed, progress=progress, **settings.pop("fit"))
    cfg = SFTConfig(data=str(out / "code_train.jsonl"), val_data=str(out / "code_val.jsonl"), device=device,
                    fit=fit, **settings)
    summary = sft(run_dir / "model", run_dir / "model" / "tokenizer.json", cfg)

    dev = get_device(device)
    dtype = resolve_dtype("auto", dev, decoding=True)
    tokenizer = Tokenizer.load(run_dir / "tokenizer.json")
    figures, answers = {}, {}
    for name, folder in (("base", run_dir / "model"), ("chat", out / "model")):
        llm = LLM(load_model(folder, dev), tokenizer, device=dev, dtype=dtype, max_num_seqs=64,
                  enable_prefix_caching=False, seed=seed)
        figures[name], answers[name] = evaluate_code(llm, tokenizer, val)
    result = {"train_tasks": len(train), "val_tasks": len(val),
              "val_from_heldout_files": sum(t.heldout_file for t in val), "sft": summary, **figures,
              "answers": [{"task": t.id, "prompt": t.prompt, "base": a, "chat": b}
                          for t, a, b in zip(val, answers["base"], answers["chat"])]}
    atomic_write_text(out / "code_eval.json", json.dumps(result, indent=2))
    return result


def run(*, name: str | None, corpus: str, minutes: float | None, tiny: bool, seed: int = 1337,
        device: str = "auto", runs_dir: str = "runs", progress: bool = True, chat: bool = True) -> Path:
    t_start = time.perf_counter()
    preset = PRESETS["tiny" if tiny else "default"]
    minutes = minutes if minutes is not None else (1.0 if tiny else 15.0)
    if minutes <= 0:
        raise LmforgeError(f"--minutes {minutes}: must be positive")
    run_dir = Path(runs_dir) / (name or datetime.now().strftime("%Y%m%d-%H%M%S"))
    if (run_dir / "model").exists():
        raise LmforgeError(f"{run_dir} already holds a finished run; pick another --name or remove it")
    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    say = print if progress else (lambda *a, **k: None)
    chat = chat and corpus == STDLIB  # the code domain is the stdlib's own functions
    stages = 6 if chat else 5

    # 1-2. corpus -> data pipeline (clean, filter, dedup, redact, split) -> tokenizer -> shards
    say(f"[1/{stages}] corpus {corpus!r} -> data pipeline -> tokenizer ({preset.vocab_size:,} tokens) -> token "
        f"shards in {run_dir}/data")
    t0 = time.perf_counter()
    # The built-in corpus is curated reference code and docs, not scraped pages: the web prose filters
    # (Gopher, C4, FineWeb) would drop 78 of its 88 pydoc topics for holding code samples and tables.
    curated = {"prose_filters": []} if corpus == STDLIB else {}
    manifest = prepare(PrepareConfig(inputs=[corpus], out=str(run_dir / "data"), vocab_size=preset.vocab_size,
                                     tokenizer_max_bytes=preset.tokenizer_max_bytes or 0,
                                     max_input_bytes=preset.corpus_max_bytes or 0, **curated), progress=progress)
    meta = read_meta(run_dir / "data")
    timings["data pipeline + tokenizer + shards"] = time.perf_counter() - t0
    tokenizer = Tokenizer.load(run_dir / "data" / "tokenizer.json")
    split = meta["splits"]
    counts = manifest["counts"]
    say(f"      {counts['documents_in']:,} documents in, {sum(counts['dropped'].values()):,} dropped "
        f"(see {run_dir}/data/data_card.md); {split['train']['num_documents']:,} train / "
        f"{split['val']['num_documents']:,} held-out documents, {split['train']['num_tokens']:,} / "
        f"{split['val']['num_tokens']:,} tokens")

    # 3. pretrain within what is left of the budget, keeping back time for the stages after it
    reserve_s = (10 if tiny else 45) + (preset.sft_reserve_s if chat else 0)  # eval, samples, SFT, report
    budget_s = minutes * 60 - (time.perf_counter() - t_start) - reserve_s
    if budget_s < 5:
        raise LmforgeError(f"--minutes {minutes}: no time left to train after preparing the data; give more")
    say(f"[2/{stages}] pretraining for {budget_s / 60:.1f} minutes")
    cfg = TrainConfig(data_dir=str(run_dir / "data"), out_dir=str(run_dir), time_budget_s=budget_s, seed=seed,
                      device=device, progress=progress, **preset.train)
    t0 = time.perf_counter()
    train = pretrain(cfg)
    timings["pretrain"] = time.perf_counter() - t0

    # 4. held-out evaluation on the whole split, beside compressors on the very same bytes
    say(f"[3/{stages}] held-out evaluation")
    t0 = time.perf_counter()
    from lmforge.checkpoint import load_model

    dev = get_device(device)
    dtype = resolve_dtype("auto", dev)
    model = load_model(run_dir / "model", dev)
    result = evaluate_heldout(model, run_dir / "data", seq_len=cfg.seq_len, batch_size=cfg.batch_size, device=dev,
                              dtype=dtype)
    atomic_write_text(run_dir / "eval.json", json.dumps(result, indent=2))
    timings["eval"] = time.perf_counter() - t0

    # 5. samples and the report
    say(f"[4/{stages}] samples")
    t0 = time.perf_counter()
    samples = []
    for i, prompt in enumerate(SAMPLE_PROMPTS):
        ids = list(generate(model, tokenizer.encode(prompt), seed=seed + i, stop_ids={tokenizer.bos_id},
                            device=dev, dtype=dtype, **SAMPLING))
        samples.append((prompt, tokenizer.decode(ids)))
    (run_dir / "samples.md").write_text("\n\n".join(f"### {p!r}\n```\n{p}{t}\n```" for p, t in samples))
    timings["samples"] = time.perf_counter() - t0

    code = None
    if chat:
        say(f"[5/{stages}] supervised fine-tuning on the code domain -> chat model in {run_dir / 'chat'}")
        t0 = time.perf_counter()
        code = code_chat_stage(run_dir, preset, seed=seed, device=device, progress=progress)
        timings["sft + code eval"] = time.perf_counter() - t0
        say(f"      held-out code tasks passed (in chat form, parses, defines the function): base "
            f"{code['base']['passed']}/{code['base']['n']}, chat {code['chat']['passed']}/{code['chat']['n']}")
    elif corpus != "stdlib":
        say("      (no SFT stage: the built-in code domain is the stdlib's functions; fine-tune on your own "
            "conversations with `lmforge sft --data`)")

    say(f"[{stages}/{stages}] report")
    recipe = (f"{cfg.optimizer} (matrix lr {cfg.matrix_lr}, AdamW lr {cfg.lr} for embeddings and gains), "
              f"{cfg.schedule} schedule ({cfg.warmup_steps} warm-up steps, last {cfg.decay_frac:.0%} decaying to "
              f"0), batch {cfg.batch_size} x {cfg.seq_len} tokens, clip {cfg.grad_clip}, "
              f"{train['dtype']}, seed {seed}")
    pipeline = {"documents_in": counts["documents_in"], "dropped": counts["dropped"],
                "redacted": sum(v for k, v in counts["modified"].items() if k.startswith("redacted_"))}
    facts = {"data": meta, "pipeline": pipeline, "train": train, "eval": result, "model": model.config.to_dict(),
             "samples": samples,
             "tokenizer": {"vocab_size": tokenizer.vocab_size,
                           "bytes_per_token": split["train"]["num_bytes"] / max(1, split["train"]["num_tokens"])},
             "recipe": recipe, "sampling": ", ".join(f"{k} {v}" for k, v in SAMPLING.items()),
             "code": code, "timings": timings, "total_minutes": (time.perf_counter() - t_start) / 60,
             "machine": f"{platform.machine()} {dev.type}, {torch.get_num_threads()} threads"}
    from lmforge.report import write_report

    report = write_report(run_dir, facts)
    say(f"done in {facts['total_minutes']:.1f} min: held-out {result['bpb']:.3f} bits/byte "
        f"(xz -9 {result['compressors']['xz -9']:.3f}, zlib -9 {result['compressors']['zlib -9']:.3f}). "
        f"Report: {report}\nTry: lmforge generate --run {run_dir} --prompt 'def fib('"
        + (f"\n     lmforge chat --run {run_dir / 'chat'}" if code else ""))
    return run_dir
