"""The `lmforge` command: one subcommand per stage, each backed by one module.

A user mistake (LmforgeError) prints one line naming the problem and the fix, and exits 2;
no traceback; so does a missing dependency, named with the extra that installs it. Each command
imports the stage modules it needs when it runs. Stop strings take the escapes a shell passes
through as typed (`--stop "\\n\\n"` is two newlines).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import fields
from pathlib import Path

from lmforge.base import LmforgeError, missing_module
from lmforge.interp.cli import add_inspect_parser

_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|[ntr0\\])")
_ESCAPED = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\"}


def unescape(text: str) -> str:
    """The characters \\n, \\t, \\r, \\0, \\\\, \\xHH, \\uXXXX and \\UXXXXXXXX stand for; a shell passes
    `"\\n"` on as a backslash and an n. Any other backslash stays as typed (a regex's \\d, say)."""
    def char(m: re.Match) -> str:
        if m[1] in _ESCAPED:
            return _ESCAPED[m[1]]
        code = int(m[1][1:], 16)
        return chr(code) if code <= 0x10FFFF else m[0]  # past Unicode: kept as typed

    return _ESCAPE.sub(char, text)


def _add_model_source(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--run", metavar="RUN_FOLDER", help="a run folder made by `lmforge run` or `lmforge pretrain`")
    g.add_argument("--model", metavar="MODEL_FOLDER", help="a model folder (config.json, model.safetensors, "
                                                           "tokenizer.json)")


def _add_run_args(sub) -> None:
    p = sub.add_parser("run", help="the main job: corpus -> tokenizer -> pretrain -> eval -> samples -> chat SFT "
                                   "-> report",
                       description="Train a small language model from nothing and write a run folder with the "
                                   "tokenizer, checkpoints, metrics, samples and report.md. By default the corpus "
                                   "is this Python's own standard library sources plus pydoc topics, and a last "
                                   "stage fine-tunes the model into a chat model (chat/) that writes functions "
                                   "on request, measured on held-out requests beside the base model.")
    p.add_argument("--corpus", default="stdlib", help="'stdlib' (default, built in), a folder of text files, "
                                                      "a text file or a JSONL file with a 'text' field")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget for the whole run (default 15; 1 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a small preset that finishes in about a minute (for tests)")
    p.add_argument("--name", help="run folder name under --runs-dir (default: date-time)")
    p.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--no-chat", action="store_true", help="skip the SFT stage (it runs on the stdlib corpus only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_tokenizer_args(sub) -> None:
    p = sub.add_parser("tokenizer", help="train, show or export a byte-level BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="{train,show,export}")
    t = tsub.add_parser("train", help="train a tokenizer on a corpus",
                        description="Byte-level BPE (GPT-4 split pattern) trained on the corpus's training split.")
    t.add_argument("--corpus", default="stdlib", help="'stdlib', a folder, a text file or a JSONL file")
    t.add_argument("--vocab-size", type=int, default=8192, help="total tokens incl. special tokens (default 8192)")
    t.add_argument("--max-bytes", type=int, default=None, help="train on at most this many bytes")
    t.add_argument("--out", default="tokenizer.json", help="output file (default tokenizer.json)")
    s = tsub.add_parser("show", help="show how text is cut into tokens, coloured, with ids",
                        description="Print the text with each token coloured and the token ids, like an online "
                                    "tokenizer playground.")
    s.add_argument("text", help="the text to tokenize ('-' reads standard input)")
    _add_model_source(s)
    s.add_argument("--tokenizer", metavar="FILE", help="a tokenizer.json file")
    s.add_argument("--no-color", action="store_true", help="mark token boundaries with | instead of colour")
    e = tsub.add_parser("export", help="write tokenizer.json + tokenizer_config.json for Hugging Face",
                        description="Write a folder that transformers.AutoTokenizer.from_pretrained() loads.")
    _add_model_source(e)
    e.add_argument("--tokenizer", metavar="FILE", help="a tokenizer.json file")
    e.add_argument("--out", required=True, help="output folder")


def _add_pretrain_args(sub) -> None:
    from lmforge.train import TrainConfig

    p = sub.add_parser("pretrain", help="pretrain a model on token shards (torchrun for several processes)",
                       description="Pretrain from --data (a token-shard folder) or --corpus (tokenized first into "
                                   "OUT/data). Under torchrun it trains with DDP. --resume continues OUT's latest "
                                   "checkpoint exactly, with the settings it was started with.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="token-shard folder (from `lmforge run` or a previous --corpus)")
    src.add_argument("--corpus", help="corpus to tokenize first ('stdlib', folder, text or JSONL file)")
    p.add_argument("--vocab-size", type=int, default=8192, help="tokenizer size with --corpus (default 8192)")
    p.add_argument("--out", required=True, help="run folder for checkpoints, metrics and the final model")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, dest="max_steps", help="optimizer steps to run")
    length.add_argument("--minutes", type=float, help="wall-clock budget, turned into a step count after timing")
    p.add_argument("--resume", action="store_true", help="continue OUT's latest checkpoint")
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    help_text = {"depth": "model size dial: layers; width = depth x aspect ratio", "batch_size":
                 "sequences per process per micro-step", "grad_accum": "micro-steps per optimizer step",
                 "optimizer": "adamw or muon", "lr": "AdamW learning rate", "matrix_lr": "Muon learning rate",
                 "schedule": "wsd (warmup-stable-decay) or cosine", "decay_frac": "wsd: fraction of steps decaying",
                 "dtype": "auto, fp32, bf16 or fp16", "device": "auto, cpu, cuda, mps",
                 "eval_every": "steps between held-out checks", "eval_tokens": "tokens per held-out check",
                 "ckpt_every": "steps between checkpoints", "kv_group": "query heads per key/value head"}
    for name in ("depth", "aspect_ratio", "head_dim", "kv_group", "seq_len", "batch_size", "grad_accum",
                 "optimizer", "lr", "matrix_lr", "weight_decay", "grad_clip", "schedule", "warmup_steps",
                 "decay_frac", "min_lr_frac", "dtype", "device", "seed", "eval_every", "eval_tokens",
                 "ckpt_every", "log_every"):
        d = defaults[name]
        p.add_argument("--" + name.replace("_", "-"), type=type(d), default=d,
                       help=f"{help_text.get(name, name.replace('_', ' '))} (default {d})")
    p.add_argument("--untied", action="store_true", help="separate lm_head instead of the tied embedding")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_generate_args(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model, streaming",
                       description="Sample a continuation of --prompt, printing tokens as they come.")
    _add_model_source(p)
    p.add_argument("--prompt", required=True, help="text to continue ('-' reads standard input)")
    p.add_argument("--max-tokens", type=int, default=200, help="most new tokens (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--seed", type=int, default=None, help="same seed, same text")
    p.add_argument("--stop", action="append", default=[], type=unescape,
                   help="stop before this string (repeatable); \\n, \\t, \\uXXXX are the characters")
    p.add_argument("--show-special", action="store_true",
                   help="print special tokens (chat markers, padding) as text instead of leaving them out")
    p.add_argument("--device", default="auto")


def _add_chat_args(sub) -> None:
    p = sub.add_parser("chat", help="talk to a model in the terminal through its chat template, with history",
                       description="An interactive chat: each turn goes through the model's chat template and the "
                                   "answer streams as it is generated. /reset clears the history, /exit or Ctrl-D "
                                   "leaves.")
    _add_model_source(p)
    p.add_argument("--system", help="a system message that opens the conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default 0.7)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto")


def _add_sft_args(sub) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on conversations (full or LoRA)",
                       description="Fine-tune a model on conversations: OpenAI-style {'messages': [...]} or "
                                   "{'prompt', 'completion'} JSONL. The loss is on the assistant's tokens only; "
                                   "examples are packed into rows. OUT becomes a run folder (OUT/model; with LoRA "
                                   "also OUT/adapter in PEFT's layout). --resume continues OUT exactly.")
    _add_model_source(p)
    p.add_argument("--data", help="conversations JSONL")
    p.add_argument("--out", required=True, help="output run folder")
    p.add_argument("--resume", action="store_true", help="continue OUT's latest checkpoint with its settings")
    p.add_argument("--val-data", help="validation JSONL (default: a 5%% hash slice of --data)")
    p.add_argument("--seq-len", type=int, default=None, help="packed row length (default: context, at most 1024)")
    p.add_argument("--too-long", choices=("drop", "truncate"), default="drop",
                   help="conversations longer than --seq-len: drop them (default) or cut them; counted either way")
    p.add_argument("--on-bad-line", choices=("skip", "raise"), default="skip",
                   help="malformed lines: skip and report them with line numbers (default), or stop at the first")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank; 0 (default) fine-tunes every weight")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (updates scaled alpha/rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", help="comma-separated module names (default: all attention and MLP projections)")
    _add_fit_args(p, {})


def _add_fit_args(p, defaults) -> None:
    """The shared post-training loop's settings (posttrain.FitConfig), with `defaults` overriding its own."""
    from lmforge.posttrain import FitConfig

    d = {**{f.name: f.default for f in fields(FitConfig)}, **defaults}
    text = {"batch_size": "examples (packed rows or pairs) per micro-step", "grad_accum": "micro-steps per optimizer "
            "step", "optimizer": "adamw or muon", "lr": "peak learning rate", "schedule": "cosine or wsd",
            "eval_every": "steps between held-out checks", "ckpt_every": "steps between checkpoints"}
    p.add_argument("--epochs", type=float, default=d["epochs"], help=f"passes over the data (default {d['epochs']})")
    p.add_argument("--steps", type=int, dest="max_steps", default=None, help="optimizer steps (overrides --epochs)")
    for name in ("batch_size", "grad_accum", "optimizer", "lr", "weight_decay", "grad_clip", "schedule",
                 "warmup_steps", "eval_every", "ckpt_every", "log_every", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=type(d[name]), default=d[name],
                       help=f"{text.get(name, name.replace('_', ' '))} (default {d[name]})")
    p.add_argument("--dtype", default="auto", help="auto, fp32, bf16 or fp16 compute")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _fit_config(args):
    from lmforge.posttrain import FitConfig

    names = {f.name for f in fields(FitConfig)} - {"out_dir", "progress"}
    return FitConfig(out_dir=args.out, progress=not args.quiet, **{k: v for k, v in vars(args).items() if k in names})


def _add_preference_args(sub) -> None:
    for name, short, text, defaults in (
            ("dpo", "preference tuning with DPO (prompt/chosen/rejected pairs)",
             "Direct Preference Optimisation against the frozen starting model; reports implicit-reward "
             "accuracy and margin on held-out pairs.", {"lr": 5e-5, "epochs": 1.0}),
            ("reward-model", "train a Bradley-Terry reward model on preference pairs",
             "A Bradley-Terry reward model (the model's body and a scalar head) trained on the "
             "pairs; reports held-out accuracy.", {"lr": 1e-4, "epochs": 1.0})):
        if name == "dpo":
            text += (" --from-feedback makes the pairs from the feedback `lmforge serve` stored (POST /v1/feedback): "
                     "a preferred answer beats the answer it replaces; an up-rated answer beats a down-rated answer "
                     "to the same prompt.")
        p = sub.add_parser(name, help=short,
                           description=text + " Data: JSONL of {'prompt', 'chosen', 'rejected'}; prompt is a "
                                              "string or a message list.")
        _add_model_source(p)
        if name == "dpo":
            source = p.add_mutually_exclusive_group()
            source.add_argument("--data", help="preference JSONL")
            source.add_argument("--from-feedback", nargs="?", const="", metavar="DB_URL",
                                help="pairs from the server's stored feedback in this database (default: --db, "
                                     "else LMFORGE_DB, else SQLite under ~/.lmforge)")
            p.add_argument("--db", metavar="URL", help="with --from-feedback: the server's database (SQLAlchemy URL)")
            p.add_argument("--write-pairs", metavar="FILE", help="with --from-feedback: where the pairs are "
                                                                 "written as preference JSONL, to read or reuse "
                                                                 "(default: OUT/feedback_pairs.jsonl)")
        else:
            p.add_argument("--data", help="preference JSONL")
        p.add_argument("--out", required=True, help="output run folder")
        p.add_argument("--resume", action="store_true", help="continue OUT's latest checkpoint with its settings")
        p.add_argument("--val-data", help="held-out JSONL (default: a 10%% hash slice of --data by prompt)")
        p.add_argument("--seq-len", type=int, default=None, help="longest prompt + answer kept (default: context, "
                                                                  "at most 1024); longer pairs are dropped, counted")
        p.add_argument("--on-bad-line", choices=("skip", "raise"), default="skip")
        if name == "dpo":
            p.add_argument("--beta", type=float, default=0.1, help="strength of the pull to the reference (0.1)")
        _add_fit_args(p, defaults)


def _add_rl_args(sub) -> None:
    from lmforge.rl import RLConfig

    p = sub.add_parser("rl", help="reinforcement learning with verifiable rewards (GRPO)",
                       description="GRPO: sample a group of answers per prompt with the engine, score each with a "
                                   "program (task 'code': the built-in stdlib functions, checked for parsing, the "
                                   "name and doctests in a sandbox; task 'math': GSM8K-style question/answer JSONL, "
                                   "checked by the final number), and push the policy toward answers that beat "
                                   "their group's mean.")
    _add_model_source(p)
    p.add_argument("--task", choices=("code", "math"), default="code")
    p.add_argument("--data", help="task 'math': JSONL of {'question', 'answer'} (answer ends '#### N')")
    p.add_argument("--out", required=True, help="output run folder")
    p.add_argument("--resume", action="store_true", help="continue OUT's latest checkpoint with its settings")
    d = {f.name: f.default for f in fields(RLConfig)}
    text = {"prompts_per_step": "prompts sampled per step", "group_size": "answers per prompt",
            "max_tokens": "most tokens per answer", "clip_eps": "PPO clip range", "kl_coef": "weight of KL to the "
            "starting model (0: none)", "updates_per_step": "optimizer passes over each batch",
            "micro_batch": "answers per forward/backward", "eval_prompts": "held-out prompts scored greedily"}
    for name in ("steps", "prompts_per_step", "group_size", "max_tokens", "temperature", "top_p", "lr",
                 "warmup_steps", "grad_clip", "clip_eps", "kl_coef", "updates_per_step", "micro_batch", "eval_every",
                 "eval_prompts", "ckpt_every", "seed", "device", "dtype"):
        p.add_argument("--" + name.replace("_", "-"), type=type(d[name]), default=d[name],
                       help=f"{text.get(name, name.replace('_', ' '))} (default {d[name]})")
    p.add_argument("--scale-rewards", action="store_true", help="divide advantages by the group's std (GRPO paper)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_eval_args(sub) -> None:
    p = sub.add_parser("eval", help="held-out bits per byte, beside xz -9 and zlib -9",
                       description="Bits per byte on a held-out split (default: the run's own), and the same "
                                   "bytes compressed by xz -9 and zlib -9.")
    _add_model_source(p)
    p.add_argument("--data", help="token-shard folder with val shards (default: RUN/data)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per scored window (default: the model's context, at most 2048)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")


def _add_serve_args(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API server (completions, chat, embeddings, streaming)",
                       description="Serve a model over HTTP with OpenAI's API: the openai client, LangChain and "
                                   "evaluation harnesses work unchanged. Every route but /health needs an API key "
                                   "(`lmforge keys create`; LMFORGE_ADMIN_KEY sets an admin key) unless --no-auth.")
    _add_model_source(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API (default: the run's or model folder's name)")
    p.add_argument("--workers", type=int, default=None,
                   help="engine workers behind the router, each in its own process (default: on CPU one per core "
                        "while the copies of the weights fit in a quarter of memory; 1 on a GPU, give N for N GPUs)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="compute precision")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together per worker")
    p.add_argument("--max-batched-tokens", type=int, default=512, help="tokens per engine step (prefill chunk)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV cache size per worker, in GiB")
    p.add_argument("--max-pending", type=int, default=256, help="requests in flight per worker before 503s")
    p.add_argument("--db", default=None, help="key store, usage ledger, stored responses and feedback: SQLAlchemy "
                                              "URL (default: LMFORGE_DB or SQLite under ~/.lmforge); "
                                              "postgresql+psycopg://... for replicas")
    p.add_argument("--redis", default=None, help="redis://host:port/db for rate limits shared by replicas "
                                                 "(default: per process)")
    p.add_argument("--no-auth", action="store_true", help="serve without API keys (local experiments only)")
    p.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body in MiB; a larger one is a 413, cut while it is read (default 4)")
    p.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without an admin key (for a scraper on a private network)")
    p.add_argument("--engine-in-thread", action="store_true",
                   help="run the workers' step loops in threads of the server process (for debugging; slower: "
                        "they share one interpreter lock with the HTTP side)")


def _add_export_args(sub) -> None:
    p = sub.add_parser("export", help="write a model for Hugging Face transformers (hf) or llama.cpp (gguf)",
                       description="--format hf writes a folder AutoModelForCausalLM and AutoTokenizer load as "
                                   "they are (config, safetensors weights, tokenizer with chat template, "
                                   "generation config, model card). --format gguf writes one GGUF file for "
                                   "llama.cpp-family runtimes.")
    _add_model_source(p)
    p.add_argument("--format", choices=("hf", "gguf"), default="hf", help="hf (default) or gguf")
    p.add_argument("--out", required=True, help="output folder (hf) or .gguf file (gguf)")
    p.add_argument("--dtype", choices=("auto", "f32", "f16", "bf16"), default="auto",
                   help="gguf: precision of the weight matrices (default auto: as stored)")
    p.add_argument("--quant", choices=("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"),
                   help="gguf: a quantised file instead, its types chosen per tensor as llama-quantize does "
                        "(q4_k, q5_k: its Q4_K_M, Q5_K_M mixes)")
    p.add_argument("--calibration", default="stdlib",
                   help="gguf --quant: text whose activations weight the rounding: 'stdlib' (default: a slice of "
                        "the built-in corpus outside its held-out part), a UTF-8 text file, or 'none'")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it is a non-empty folder or a file")


def _add_import_args(sub) -> None:
    p = sub.add_parser("import", help="bring a downloaded Hugging Face model or GGUF file into lmforge's format",
                       description="Convert a local Hugging Face model folder (config.json, *.safetensors, one "
                                   "file or shards, tokenizer.json) or a .gguf file (llama.cpp, Ollama; weights "
                                   "dequantised) into an lmforge model folder that --model takes everywhere. "
                                   "Families: Llama (2/3, SmolLM, TinyLlama), Mistral, Qwen2, Qwen3, GPT-2.")
    p.add_argument("source", help="the Hugging Face model folder, or a FILE.gguf")
    p.add_argument("--out", required=True, help="the lmforge model folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it is a non-empty folder")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="convert the weights (default auto: keep the checkpoint's precision; fp32 for GGUF)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read PyTorch .bin/.pt weights when no safetensors exist (torch.load with "
                        "weights_only=True). Pickles can carry code: use only for sources you trust")


def _add_db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="URL", help="key store: SQLAlchemy URL (default: LMFORGE_DB, else SQLite under "
                                               "~/.lmforge); postgresql+psycopg://user@host:5432/dbname for replicas")


def _add_keys_args(sub) -> None:
    p = sub.add_parser("keys", help="create, list or revoke the server's API keys",
                       description="API keys for `lmforge serve`. The database keeps only a salted hash of each "
                                   "key, so a key is shown once, when it is created.")
    ksub = p.add_subparsers(dest="keys_command", required=True, metavar="{create,list,revoke}")
    c = ksub.add_parser("create", help="make a key and print it (once)")
    c.add_argument("--name", required=True, help="a name for the key, unique among live keys (e.g. team-a)")
    c.add_argument("--models", help="comma-separated models the key may use (default: every served model)")
    c.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    c.add_argument("--tpm", type=int, help="prompt + completion tokens per minute (default: unlimited)")
    c.add_argument("--budget", type=int, metavar="TOKENS", help="prompt + completion tokens over the key's life")
    c.add_argument("--admin", action="store_true", help="may manage keys and read usage over the API")
    _add_db_arg(c)
    ls = ksub.add_parser("list", help="list keys: names, limits, tokens used (never the secrets)")
    ls.add_argument("--all", action="store_true", help="include revoked keys")
    _add_db_arg(ls)
    r = ksub.add_parser("revoke", help="revoke a key by name; it stops working at its next request")
    r.add_argument("name", help="the key's name (see `lmforge keys list`)")
    _add_db_arg(r)


def _add_usage_args(sub) -> None:
    p = sub.add_parser("usage", help="requests and tokens per key (or per day) from the server's usage ledger",
                       description="Requests, input (prompt) tokens, completion tokens and cached prompt tokens, "
                                   "from the usage ledger the server writes.")
    p.add_argument("--by", choices=("key", "day", "model"), default="key",
                   help="one row per key (default), per day and key, or per key and model")
    p.add_argument("--since", metavar="YYYY-MM-DD", help="only usage on or after this day (UTC)")
    _add_db_arg(p)


def _add_data_args(sub) -> None:
    p = sub.add_parser("data", help="prepare training data from raw text, HTML, WARC, JSONL or Parquet; crawl",
                       description="The data pipeline: raw inputs -> clean, filtered, deduplicated, redacted "
                                   "token shards with a held-out split, a manifest and a data card.")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,crawl}")
    d = dsub.add_parser("prepare", help="inputs -> token shards + manifest.json + data_card.md",
                        description="Read folders of text/code/HTML files, WARC/WET archives, JSONL and Parquet; "
                                    "repair and normalise text; drop spam and junk (Gopher, C4, FineWeb and code "
                                    "rules, URL blocklist, word list); remove exact and near duplicates; redact "
                                    "personal data; split off a held-out set by document hash; drop training "
                                    "documents that overlap your eval files; train or apply a tokenizer; write "
                                    "token shards. Every document is counted as kept or dropped by a named "
                                    "reason (data_card.md). Settings come from --config (TOML, keys as in "
                                    "lmforge/dataprep/pipeline.py PrepareConfig); the options below override it.")
    d.add_argument("inputs", nargs="*", help="folders or files to read, or 'stdlib' (default: the config's, "
                                             "else stdlib)")
    d.add_argument("--config", metavar="TOML", help="a data.toml with any PrepareConfig settings")
    d.add_argument("--out", help="output folder (default: data)")
    d.add_argument("--executor", choices=("local", "ray"), help="local processes (default) or a Ray cluster "
                                                                 "(RAY_ADDRESS; --out on a filesystem all nodes see)")
    d.add_argument("--workers", type=int, help="processes (default: every CPU); the output does not depend on it")
    d.add_argument("--tasks", type=int, help="input shards (default: as many as workers)")
    d.add_argument("--tokenizer", metavar="FILE", help="encode with this tokenizer.json instead of training one")
    d.add_argument("--vocab-size", type=int, help="size of the tokenizer to train (default 8192)")
    d.add_argument("--decontaminate", nargs="+", metavar="EVAL_FILE",
                   help="drop training documents sharing a 13-gram with these files (text, JSONL or Parquet)")
    d.add_argument("--language-model", metavar="FILE", help="a fastText language-ID model (.bin); without one "
                                                            "no language filtering is done")
    d.add_argument("--keep-work", action="store_true", help="keep out/work/ (kept and removed documents as JSONL, "
                                                            "datatrove logs and stats)")
    d.add_argument("--quiet", action="store_true", help="no progress output")
    c = dsub.add_parser("crawl", help="fetch a list of URLs politely into a gzip WARC file",
                        description="Fetch each URL of URLS_FILE (one per line, # comments) once: robots.txt obeyed, "
                                    "requests to a host spaced by --delay (or its Crawl-delay), bodies cut at "
                                    "--max-bytes, at most 5 redirects. Writes one gzip WARC 1.1 file that "
                                    "`lmforge data prepare` reads, and prints every URL's outcome by reason.")
    c.add_argument("urls_file", metavar="URLS_FILE", help="text file, one http(s) URL per line")
    c.add_argument("--out", required=True, metavar="FILE.warc.gz", help="the WARC file to write")
    c.add_argument("--user-agent", help="User-Agent naming you and a contact, e.g. 'mybot/1.0 "
                                        "(+https://example.com/bot)' (default: lmforge-crawler/VERSION)")
    c.add_argument("--delay", type=float, default=1.0,
                   help="least seconds between two requests to one host (default 1)")
    c.add_argument("--max-bytes", type=int, default=5 << 20, help="most body bytes kept per response (default 5 MiB)")
    c.add_argument("--workers", type=int, default=4, help="hosts crawled at once (default 4)")
    c.add_argument("--allow-private", action="store_true",
                   help="also fetch loopback, private and link-local addresses (a local test server, an intranet); "
                        "off, a URL list cannot reach this machine or its network")
    c.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Make, run and understand language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run_args, _add_data_args, _add_tokenizer_args, _add_pretrain_args, _add_generate_args,
                _add_chat_args, _add_sft_args, _add_preference_args, _add_rl_args,
                _add_eval_args, _add_serve_args, _add_export_args,
                _add_import_args, _add_keys_args, _add_usage_args, add_inspect_parser):
        add(sub)
    return parser


# ----------------------------------------------------------------------------- commands

def _load_tokenizer(args):
    from lmforge.checkpoint import resolve_model_folder
    from lmforge.tokenizer import load_tokenizer

    if getattr(args, "tokenizer", None):
        return load_tokenizer(args.tokenizer)
    if args.run or args.model:
        return load_tokenizer(resolve_model_folder(args.run, args.model)[1])
    runs = sorted(Path("runs").glob("*/tokenizer.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise LmforgeError("no tokenizer given and none under runs/; pass --run, --model or --tokenizer, "
                           "or train one with `lmforge tokenizer train`")
    return load_tokenizer(runs[-1])


def _read_text(value: str) -> str:
    return sys.stdin.read() if value == "-" else value


def cmd_run(args) -> None:
    from lmforge.run import run

    run(name=args.name, corpus=args.corpus, minutes=args.minutes, tiny=args.tiny, seed=args.seed,
        device=args.device, runs_dir=args.runs_dir, progress=not args.quiet, chat=not args.no_chat)


def cmd_data(args) -> None:
    if args.data_command == "crawl":
        from lmforge.dataprep.crawl import DEFAULT_USER_AGENT, crawl, read_url_list

        counts = crawl(read_url_list(args.urls_file), args.out, user_agent=args.user_agent or DEFAULT_USER_AGENT,
                       delay_s=args.delay, max_bytes=args.max_bytes, workers=args.workers, progress=not args.quiet,
                       allow_private=args.allow_private)
        print(", ".join(f"{n:,} {k}" for k, n in sorted(counts.items())) + f"; wrote {args.out}")
        return
    from lmforge.dataprep.pipeline import PrepareConfig, prepare

    overrides = {"inputs": args.inputs or None, "out": args.out, "executor": args.executor, "workers": args.workers,
                 "tasks": args.tasks, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
                 "decontaminate": args.decontaminate, "language_model": args.language_model,
                 "keep_work": args.keep_work or None}
    if args.config:
        config = PrepareConfig.from_toml(args.config, **overrides)
    else:
        config = PrepareConfig(**{k: v for k, v in overrides.items() if v is not None})
    manifest = prepare(config, progress=not args.quiet)
    counts, splits = manifest["counts"], manifest["splits"]
    dropped = ", ".join(f"{n:,} {reason}" for reason, n in sorted(counts["dropped"].items(), key=lambda kv: -kv[1]))
    print(f"{counts['documents_in']:,} documents in, {counts['kept']:,} kept "
          f"({splits['train']['num_tokens']:,} train / {splits['val']['num_tokens']:,} held-out tokens), "
          f"{sum(counts['dropped'].values()):,} dropped" + (f": {dropped}" if dropped else ""))
    print(f"wrote {config.out}/ in {manifest['seconds']:.1f} s; read {config.out}/data_card.md; "
          f"train with: lmforge pretrain --data {config.out}")


def cmd_tokenizer(args) -> None:
    if args.tokenizer_command == "train":
        from lmforge.corpus import Corpus
        from lmforge.prepare import train_tokenizer

        tok = train_tokenizer(Corpus(args.corpus), args.vocab_size, args.max_bytes)
        tok.save(args.out)
        print(f"wrote {args.out} ({tok.vocab_size:,} tokens)")
    elif args.tokenizer_command == "show":
        from lmforge.tokenizer import render_tokens

        print(render_tokens(_load_tokenizer(args), _read_text(args.text), color=not args.no_color))
    else:
        _load_tokenizer(args).export_hf(args.out)
        print(f"wrote {args.out}/tokenizer.json and tokenizer_config.json")


def cmd_pretrain(args) -> None:
    from lmforge.train import TrainConfig, pretrain

    out = Path(args.out)
    if args.resume:
        saved = out / "train_config.json"
        if not saved.exists():
            raise LmforgeError(f"--resume: {saved} not found; {out} is not a run folder that was trained")
        cfg = TrainConfig(**json.loads(saved.read_text()))
    else:
        if (args.max_steps is None) == (args.minutes is None):
            raise LmforgeError("give the training length: --steps N or --minutes M")
        data = args.data
        if data is None:
            if args.corpus is None:
                raise LmforgeError("give --data SHARD_FOLDER or --corpus SOURCE")
            from lmforge.corpus import Corpus
            from lmforge.prepare import prepare_data

            data = str(out / "data")
            prepare_data(Corpus(args.corpus), data, vocab_size=args.vocab_size, progress=not args.quiet)
        names = {f.name for f in fields(TrainConfig)}
        values = {k: v for k, v in vars(args).items() if k in names}
        cfg = TrainConfig(**{**values, "data_dir": data, "out_dir": str(out), "progress": not args.quiet,
                             "tie_embeddings": not args.untied,
                             "time_budget_s": args.minutes * 60 if args.minutes else None})
    summary = pretrain(cfg, resume=args.resume)
    from lmforge.common import print0

    print0(f"trained {summary['steps']} steps ({summary['tokens']:,} tokens) in {summary['elapsed_s']:.0f} s; "
           f"held-out {summary['val_bpb']:.3f} bits/byte (first {cfg.eval_tokens:,} tokens). Model: {out}/model")


def cmd_generate(args) -> None:
    from lmforge.checkpoint import load_model, resolve_model_folder
    from lmforge.common import get_device, resolve_dtype
    from lmforge.generate import generate, stream_text
    from lmforge.tokenizer import load_tokenizer

    folder, tok_path = resolve_model_folder(args.run, args.model)
    tokenizer = load_tokenizer(tok_path)
    device = get_device(args.device)
    model = load_model(folder, device)
    prompt = _read_text(args.prompt)
    stop_ids = {i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None}  # imported ones may lack either
    ids = generate(model, tokenizer.encode(prompt), max_tokens=args.max_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop_ids=stop_ids,
                   device=device, dtype=resolve_dtype("auto", device, decoding=True), num_tokens=tokenizer.vocab_size)
    sys.stdout.write(prompt)
    for piece in stream_text(tokenizer, ids, stop=args.stop, skip_special=not args.show_special):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def cmd_chat(args) -> None:
    from lmforge.chat import chat_loop
    from lmforge.checkpoint import load_model, resolve_model_folder
    from lmforge.common import get_device, resolve_dtype
    from lmforge.tokenizer import load_tokenizer

    folder, tok_path = resolve_model_folder(args.run, args.model)
    device = get_device(args.device)
    chat_loop(load_model(folder, device), load_tokenizer(tok_path), system=args.system, max_tokens=args.max_tokens,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=device,
              dtype=resolve_dtype("auto", device, decoding=True))


def cmd_sft(args) -> None:
    from lmforge.checkpoint import resolve_model_folder
    from lmforge.sft import SFTConfig, load_settings, sft

    if args.resume:
        folder, tok_path, cfg = load_settings(args.out)
    else:
        if not args.data:
            raise LmforgeError("give --data CONVERSATIONS.jsonl (or --resume an existing --out)")
        folder, tok_path = resolve_model_folder(args.run, args.model)
        targets = tuple(t.strip() for t in args.lora_targets.split(",")) if args.lora_targets else None
        cfg = SFTConfig(data=args.data, val_data=args.val_data, seq_len=args.seq_len, too_long=args.too_long,
                        on_bad_line=args.on_bad_line, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, lora_targets=targets, device=args.device, dtype=args.dtype,
                        fit=_fit_config(args))
    summary = sft(folder, tok_path, cfg, resume=args.resume)
    final = summary["final"]
    print(f"fine-tuned {summary['steps']} steps ({summary['epochs']:.2f} epochs, {summary['num_trainable']:,} "
          f"trainable parameters); held-out loss {summary['first'].get('val_loss', float('nan')):.3f} -> "
          f"{final.get('val_loss', float('nan')):.3f}. Model: {cfg.fit.out_dir}/model. "
          f"Try: lmforge chat --run {cfg.fit.out_dir}")


def cmd_dpo(args) -> None:
    from lmforge.checkpoint import resolve_model_folder
    from lmforge.dpo import DPOConfig, dpo, load_dpo_settings

    if args.resume:
        folder, tok_path, cfg = load_dpo_settings(args.out)
        cfg.fit.progress = not args.quiet
    else:
        data = args.data
        if args.from_feedback is None and not data:
            raise LmforgeError("give --data PAIRS.jsonl or --from-feedback (or --resume an existing --out)")
        folder, tok_path = resolve_model_folder(args.run, args.model)
        if args.from_feedback is None:
            if args.db or args.write_pairs:
                raise LmforgeError("--db and --write-pairs go with --from-feedback; with --data they do nothing")
        else:
            from lmforge.feedback import write_feedback_pairs

            if args.from_feedback and args.db and args.from_feedback != args.db:
                raise LmforgeError(f"two databases: --from-feedback {args.from_feedback} and --db {args.db}; give one")
            data = args.write_pairs or str(Path(args.out) / "feedback_pairs.jsonl")
            write_feedback_pairs(args.from_feedback or args.db, data)  # then trained on exactly as --data would be
        cfg = DPOConfig(data=data, val_data=args.val_data, beta=args.beta, seq_len=args.seq_len,
                        on_bad_line=args.on_bad_line, device=args.device, dtype=args.dtype, fit=_fit_config(args))
    s = dpo(folder, tok_path, cfg, resume=args.resume)
    before, after = (s[k].get("val_reward_accuracy", float("nan")) for k in ("first", "final"))
    final = s["final"]
    print(f"DPO {s['steps']} steps (beta {cfg.beta}); held-out reward accuracy {before:.3f} -> {after:.3f}"
          f", margin {final.get('val_reward_margin', float('nan')):.3f}. Model: {args.out}/model")


def cmd_reward_model(args) -> None:
    from lmforge.checkpoint import resolve_model_folder
    from lmforge.reward import RewardConfig, load_reward_settings, train_reward_model

    if args.resume:
        folder, tok_path, cfg = load_reward_settings(args.out)
        cfg.fit.progress = not args.quiet
    else:
        if not args.data:
            raise LmforgeError("give --data PAIRS.jsonl (or --resume an existing --out)")
        folder, tok_path = resolve_model_folder(args.run, args.model)
        cfg = RewardConfig(data=args.data, val_data=args.val_data, seq_len=args.seq_len,
                           on_bad_line=args.on_bad_line, device=args.device, dtype=args.dtype, fit=_fit_config(args))
    s = train_reward_model(folder, tok_path, cfg, resume=args.resume)
    print(f"reward model {s['steps']} steps; held-out accuracy {s['first'].get('val_accuracy', float('nan')):.3f} -> "
          f"{s['final'].get('val_accuracy', float('nan')):.3f}. Saved in {args.out}")


def cmd_rl(args) -> None:
    from lmforge.checkpoint import resolve_model_folder
    from lmforge.rl import RLConfig, load_settings, rl

    if args.resume:
        folder, tok_path, cfg = load_settings(args.out)
        cfg.progress = not args.quiet
    else:
        folder, tok_path = resolve_model_folder(args.run, args.model)
        names = {f.name for f in fields(RLConfig)} - {"out_dir", "progress"}
        cfg = RLConfig(out_dir=args.out, progress=not args.quiet,
                       **{k: v for k, v in vars(args).items() if k in names})
    rl(folder, tok_path, cfg, resume=args.resume)


def cmd_eval(args) -> None:
    from lmforge.checkpoint import load_model, resolve_model_folder
    from lmforge.common import get_device, resolve_dtype
    from lmforge.evaluate import evaluate_heldout

    folder, _ = resolve_model_folder(args.run, args.model)
    if not args.data and not args.run:
        raise LmforgeError("--model needs --data SHARD_FOLDER with a held-out split to evaluate on")
    device = get_device(args.device)
    model = load_model(folder, device)
    context = model.config.max_position_embeddings
    seq_len = args.seq_len or min(context, 2048)  # imported models may declare 128k positions
    if not 0 < seq_len <= context:
        raise LmforgeError(f"--seq-len {seq_len} is outside the model's context of {context} tokens")
    result = evaluate_heldout(model, args.data or Path(args.run) / "data", seq_len=seq_len, batch_size=args.batch_size,
                              device=device, dtype=resolve_dtype("auto", device))
    print(json.dumps(result, indent=2))


def _positive_mb(value: float, flag: str) -> int:
    if not value > 0:
        raise LmforgeError(f"{flag} {value}: give a size above 0 MiB, e.g. {flag} 4")
    return int(value * 2**20)


def cmd_serve(args) -> None:
    from lmforge.checkpoint import resolve_model_folder
    from lmforge.serve import build_served, run_server

    folder, tok_path = resolve_model_folder(args.run, args.model)
    name = args.served_model_name or (Path(args.run).resolve().name if args.run else None)  # a run: its name
    served = build_served(folder, tok_path, name=name, workers=args.workers, device=args.device,
                          dtype=args.dtype, db=args.db, redis=args.redis, auth=not args.no_auth,
                          max_pending=args.max_pending, engine_process=not args.engine_in_thread,
                          max_body_bytes=_positive_mb(args.max_body_mb, "--max-body-mb"),
                          public_metrics=args.public_metrics,
                          max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_batched_tokens,
                          kv_cache_bytes=int(args.kv_cache_gb * 2**30))
    workers = len(served.engine.workers)
    where = ("each in its own process" if not args.engine_in_thread else
             "in a thread of this process" if workers == 1 else "in threads of this process")
    print(f"serving {served.model_name!r} at http://{args.host}:{args.port}/v1 with {workers} engine "
          f"worker{'s' if workers != 1 else ''} ({where})"
          + ("" if served.keys is not None else " WITHOUT API keys (--no-auth)"), flush=True)
    run_server(served, args.host, args.port)


def cmd_export(args) -> None:
    from lmforge.checkpoint import resolve_model_folder

    folder, tok_path = resolve_model_folder(args.run, args.model)
    if args.format == "hf":
        from lmforge.hf import export_hf

        out = export_hf(folder, args.out, run_dir=args.run, overwrite=args.overwrite)
        print(f"wrote {out}: load it with transformers' AutoModelForCausalLM.from_pretrained({str(out)!r})")
    else:
        from lmforge.export_gguf import export_gguf

        out = export_gguf(folder, args.out, dtype=args.dtype, quant=args.quant, tokenizer=tok_path,
                          calibration=None if args.calibration == "none" else args.calibration,
                          overwrite=args.overwrite)
        print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.1f} MB)")


def cmd_import(args) -> None:
    from lmforge.common import DTYPES

    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    if Path(args.source).suffix.lower() == ".gguf":  # auto: fp32, the dequantised weights exactly
        from lmforge.import_gguf import import_gguf

        out = import_gguf(args.source, args.out, dtype=dtype, overwrite=args.overwrite)
    else:
        from lmforge.hf import import_hf

        out = import_hf(args.source, args.out, dtype=dtype, allow_pickle=args.allow_pickle, overwrite=args.overwrite)
    print(f"wrote {out}; use it with --model {out} (generate, eval, export)")


def _print_table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> None:
    """Columns padded to their widest cell; the columns in `right` (numbers) right-aligned."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
              .rstrip())


def cmd_keys(args) -> None:
    from lmforge.auth import KeyStore

    store = KeyStore(args.db)
    if args.keys_command == "create":
        models = None if args.models is None else args.models.split(",")
        plaintext, record = store.create_key(args.name, models=models, rpm=args.rpm, tpm=args.tpm,
                                             token_budget=args.budget, admin=args.admin)
        print(plaintext)  # alone on stdout, so KEY=$(lmforge keys create ...) works; the note goes to stderr
        limits = [f"{v:,} {unit}" for v, unit in ((record.rpm, "requests/min"), (record.tpm, "tokens/min"),
                                                  (record.token_budget, "tokens in all")) if v is not None]
        print(f"created key {record.name!r} (id {record.id}{', admin' if record.admin else ''}): models "
              f"{', '.join(record.models) if record.models else 'all'}; {', '.join(limits) or 'no limits'}.\n"
              "Store it now: it will not be shown again (the database keeps only a salted hash).", file=sys.stderr)
    elif args.keys_command == "list":
        records = store.list_keys(include_revoked=args.all)
        if not records:
            print("no keys; make one with `lmforge keys create --name NAME`")
            return
        rows = [[r.name, r.prefix, ",".join(r.models) if r.models else "all",
                 *("-" if v is None else f"{v:,}" for v in (r.rpm, r.tpm, r.token_budget)),
                 f"{store.tokens_used(r.id):,}", "yes" if r.admin else "", f"{r.created_at:%Y-%m-%d %H:%M}",
                 f"{r.revoked_at:%Y-%m-%d %H:%M}" if r.revoked else ""] for r in records]
        _print_table(["NAME", "KEY", "MODELS", "RPM", "TPM", "BUDGET", "USED", "ADMIN", "CREATED (UTC)", "REVOKED"],
                     rows, right={3, 4, 5, 6})
    else:
        record = store.revoke(args.name)
        print(f"revoked key {record.name!r} ({record.prefix})")


def cmd_usage(args) -> None:
    from datetime import date

    from lmforge.auth import KeyStore

    since = None
    if args.since:
        try:
            since = date.fromisoformat(args.since)
        except ValueError:
            raise LmforgeError(f"--since {args.since!r} is not a date; write it as YYYY-MM-DD") from None
    rows = KeyStore(args.db).usage(by=args.by, since=since)
    if not rows:
        print("no usage recorded" + (f" since {since}" if since else ""))
        return
    counts = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens")
    labels = {"key": ["KEY"], "day": ["DAY", "KEY"], "model": ["KEY", "MODEL"]}[args.by]
    fields_of = {"key": ["name"], "day": ["day", "name"], "model": ["name", "model"]}[args.by]
    table = [[r[f] for f in fields_of] + [f"{r[c]:,}" for c in counts] for r in rows]
    table.append(["total"] + [""] * (len(labels) - 1) + [f"{sum(r[c] for r in rows):,}" for c in counts])
    _print_table(labels + ["REQUESTS", "INPUT TOKENS", "COMPLETION TOKENS", "CACHED TOKENS"], table,
                 right=set(range(len(labels), len(labels) + len(counts))))


COMMANDS = {"run": cmd_run, "data": cmd_data, "tokenizer": cmd_tokenizer, "pretrain": cmd_pretrain,
            "generate": cmd_generate, "chat": cmd_chat, "sft": cmd_sft, "dpo": cmd_dpo,
            "reward-model": cmd_reward_model, "rl": cmd_rl,
            "eval": cmd_eval, "export": cmd_export, "import": cmd_import, "serve": cmd_serve, "keys": cmd_keys,
            "usage": cmd_usage, "inspect": lambda args: args.func(args)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except LmforgeError as e:
        print(f"lmforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if not e.name or e.name.partition(".")[0] == "lmforge":
            raise  # a bug, not an installation: the traceback is for us
        print(f"lmforge {args.command}: error: {missing_module(e.name)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        from lmforge.common import destroy_distributed

        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
