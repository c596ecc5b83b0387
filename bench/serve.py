"""Serving: `lmforge serve` under concurrent streaming clients, beside Hugging Face `generate()`.

One model folder (random weights of the given shape, or --model), loaded twice in the same run:
by `lmforge serve` in its own process, driven over HTTP by streaming clients, and by
`transformers`' LlamaForCausalLM (the lmforge model exported with `export_hf`), timed with
`generate()` in this process while the server is idle. Greedy, fixed lengths (ignore_eos), so both
produce the same number of tokens.

Each concurrency level (1, 8, 32 clients, each sending requests back to back) is timed --repeats
times, each window right after HF's best of two generate() calls; the reported ratio is the median
of the windows' ratios (a shared host's speed drifts by up to 2x within minutes, so only figures
taken together compare). Per level, from the median window:
    TTFT      time from sending the request to the first streamed token
    TPOT      (last token time - first token time) / (tokens - 1), per request
    ITL       gaps between consecutive streamed chunks
    tokens/s  all completion tokens / wall time of the level
and the prefix-cache check: a 1,000-token shared prefix, TTFT of a miss (new prefix) vs a hit
(same prefix, new 16-token suffix), max_tokens 1.

    python bench/serve.py                              # lmforge run's default shape, context 2048
    python bench/serve.py --depth 8 --aspect-ratio 64  # a wider model
    python bench/serve.py --model models/smollm        # any lmforge model folder
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lmforge.checkpoint import save_model_folder
from lmforge.model import ModelConfig, Transformer


def make_model_folder(args, out: Path) -> Path:
    """Random weights of the requested shape, with a tokenizer trained on a slice of the stdlib."""
    import sysconfig

    from lmforge.tokenizer import Tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:200]]
    tokenizer = Tokenizer.train(texts, args.vocab_size)
    config = ModelConfig.from_depth(args.depth, tokenizer.vocab_size, args.context, head_dim=args.head_dim,
                                    aspect_ratio=args.aspect_ratio)
    model = Transformer(config)
    model.init_weights(seed=0)
    return save_model_folder(out / "model", model, tokenizer)


# ----------------------------------------------------------------------------- a small streaming client

async def stream_completion(port: int, body: dict) -> tuple[float, list[float], int]:
    """POST a streaming completion; returns (send time, arrival time of each token chunk, tokens)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    sent = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(payload) + payload)
    await writer.drain()
    arrivals, tokens = [], 0
    while line := await reader.readline():
        if not line.startswith(b"data: "):
            continue  # HTTP headers and chunked-encoding sizes
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        # Only the error and usage events are parsed: on a 2-core host the client's own CPU time is taken
        # from the server it measures (a JSON parse per token was a tenth of all CPU at 32 clients).
        if data.startswith(b'{"error"'):
            raise RuntimeError(json.loads(data)["error"]["message"])
        if b'"usage": {' in data:  # the usage chunk (choices empty); a token's text would show \" inside
            tokens = json.loads(data)["usage"]["completion_tokens"]
        else:  # a token chunk (or the last one, which may hold no text)
            arrivals.append(time.perf_counter())
    writer.close()
    return sent, arrivals, tokens


async def run_level(port: int, model: str, prompts: list[list[int]], concurrency: int, max_tokens: int,
                    requests_per_client: int) -> dict:
    queue = list(prompts)

    async def client(results):
        for _ in range(requests_per_client):
            prompt = queue.pop()
            results.append(await stream_completion(port, dict(model=model, prompt=prompt, max_tokens=max_tokens,
                                                              temperature=0, ignore_eos=True)))

    results: list = []
    start = time.perf_counter()
    await asyncio.gather(*(client(results) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    ttft = [a[0] - s for s, a, _ in results]
    tpot = [(a[-1] - a[0]) / (n - 1) for s, a, n in results if n > 1]
    itl = [b - a for _, arr, _ in results for a, b in zip(arr, arr[1:])]
    tokens = sum(n for _, _, n in results)
    return dict(concurrency=concurrency, requests=len(results), tokens=tokens, wall_s=wall,
                tokens_per_s=tokens / wall, ttft_ms=1e3 * statistics.median(ttft),
                tpot_ms=1e3 * statistics.median(tpot), itl_p50_ms=1e3 * statistics.median(itl),
                itl_p99_ms=1e3 * sorted(itl)[int(0.99 * (len(itl) - 1))])


async def prefix_ttft(port: int, model: str, vocab: int, rounds: int, prefix_len: int) -> tuple[float, float]:
    """Median TTFT (s) of a cache miss and of a hit, over `rounds` fresh 1,000-token prefixes."""
    rng = random.Random(1)
    misses, hits = [], []
    for _ in range(rounds):
        prefix = [rng.randrange(vocab) for _ in range(prefix_len)]
        for bucket in (misses, hits):
            suffix = [rng.randrange(vocab) for _ in range(16)]
            sent, arrivals, _ = await stream_completion(port, dict(model=model, prompt=prefix + suffix,
                                                                   max_tokens=1, temperature=0, ignore_eos=True))
            bucket.append(arrivals[0] - sent)
    return statistics.median(misses), statistics.median(hits)


# ----------------------------------------------------------------------------- Hugging Face

class HFPeer:
    """Hugging Face `transformers` on the same weights (exported with export_hf), in this process."""

    def __init__(self, folder: Path, prompt: list[int], max_tokens: int):
        from transformers import AutoModelForCausalLM

        from lmforge.hf import export_hf

        hf_dir = export_hf(folder, Path(tempfile.mkdtemp()) / "hf")
        self.model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
        self.ids, self.max_tokens = torch.tensor([prompt]), max_tokens
        self.tokens_per_s(calls=1)  # warm-up

    @torch.inference_mode()
    def tokens_per_s(self, calls: int = 2) -> float:
        """Single-stream greedy decoding speed: the best of `calls` generate() calls."""
        best = 0.0
        for _ in range(calls):
            t0 = time.perf_counter()
            out = self.model.generate(self.ids, max_new_tokens=self.max_tokens, min_new_tokens=self.max_tokens,
                                      do_sample=False)
            best = max(best, (out.size(1) - self.ids.size(1)) / (time.perf_counter() - t0))
        return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(server: subprocess.Popen, port: int, seconds: float, log_text) -> None:
    """Until the server accepts connections on `port`; exit with its log's tail if it dies first."""
    for _ in range(int(seconds * 10)):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if server.poll() is not None:
                sys.exit(f"the server exited: {log_text()[-2000:]}")
            time.sleep(0.1)


def add_model_args(p: argparse.ArgumentParser, context: int) -> None:
    """--model, or the shape of the random model make_model_folder builds."""
    p.add_argument("--model", help="an lmforge model folder (default: random weights of the shape below)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--context", type=int, default=context)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, context=2048)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--levels", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="paired (HF, server) windows per level; the median "
                   "ratio is reported")
    p.add_argument("--workers", type=int, help="the server's engine workers (default: lmforge serve's own)")
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats {args.repeats}: each level needs at least one window")

    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-serve-"))
    folder = Path(args.model) if args.model else make_model_folder(args, work)
    from lmforge.tokenizer import load_tokenizer

    vocab = load_tokenizer(folder / "tokenizer.json").vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.prompt_tokens)] for _ in range(64 * args.requests_per_client)]
    print(f"model: {folder}, torch threads {torch.get_num_threads()}", flush=True)

    hf = HFPeer(folder, prompts[0], args.max_tokens)
    print(f"HF transformers generate(), single stream: {hf.tokens_per_s():.1f} tokens/s", flush=True)

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", "--model", str(folder), "--no-auth",
                               "--port", str(port), "--served-model-name", "bench", "--device", "cpu",
                               *(["--workers", str(args.workers)] if args.workers else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    try:
        wait_for_server(server, port, 60, lambda: server.stderr.read().decode())
        asyncio.run(run_level(port, "bench", prompts[:4], 2, 8, 2))  # warm-up
        rows = []
        for c in [int(x) for x in args.levels.split(",")]:
            # Paired windows: HF's best of two generate() calls (the server idle), then the level, `repeats`
            # times. This host's speed drifts by up to 2x within minutes, for HF and server alike; a ratio
            # of two figures taken minutes apart measures the drift as much as the server.
            pairs = []
            for _ in range(args.repeats):
                peer = hf.tokens_per_s()
                pairs.append((peer, asyncio.run(run_level(port, "bench", list(prompts), c, args.max_tokens,
                                                          args.requests_per_client))))
            pairs.sort(key=lambda pair: pair[1]["tokens_per_s"] / pair[0])
            peer, r = pairs[len(pairs) // 2]  # the pair with the median ratio
            r = {**r, "hf_tokens_per_s": peer, "ratios": [w["tokens_per_s"] / h for h, w in pairs]}
            rows.append(r)
            seen = ", ".join(f"{w['tokens_per_s']:.0f}/{h:.0f}" for h, w in pairs)
            print(f"c={c:>2}: {r['tokens_per_s']:8.1f} tokens/s vs HF {peer:.1f} ({r['tokens_per_s'] / peer:5.2f}x, "
                  f"the median pair), TTFT {r['ttft_ms']:7.1f} ms, TPOT {r['tpot_ms']:6.2f} ms, ITL p50 "
                  f"{r['itl_p50_ms']:6.2f} / p99 {r['itl_p99_ms']:6.2f} ms, {r['requests']} requests; "
                  f"windows (server/HF tokens/s): {seen}", flush=True)
        miss, hit = asyncio.run(prefix_ttft(port, "bench", vocab, rounds=5, prefix_len=1000))
    finally:
        server.terminate()
        server.wait(timeout=60)
    single = next((r for r in rows if r["concurrency"] == 1), None)
    top = next((r for r in rows if r["concurrency"] == 32), None)
    print("\nsummary (each level's median ratio over its windows, each against HF timed just before it)")
    for r in rows:
        lo, hi = min(r["ratios"]), max(r["ratios"])
        print(f"  c={r['concurrency']:>2}: {r['tokens_per_s']:8.1f} tokens/s vs HF {r['hf_tokens_per_s']:.1f} = "
              f"{r['tokens_per_s'] / r['hf_tokens_per_s']:5.2f}x (windows {lo:.2f}-{hi:.2f}x)")
    if single:
        print(f"  single-stream decode: {single['tokens_per_s'] / single['hf_tokens_per_s']:.2f}x HF (target >= 3x)")
    if top:
        print(f"  concurrency 32 aggregate: {top['tokens_per_s'] / top['hf_tokens_per_s']:.1f}x HF single stream "
              "(target >= 15x)")
    print(f"  1,000-token prefix: TTFT miss {1e3 * miss:.1f} ms, hit {1e3 * hit:.1f} ms = {miss / hit:.1f}x "
          "(target >= 5x)")


if __name__ == "__main__":
    main()
