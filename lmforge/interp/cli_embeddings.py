"""`lmforge inspect neighbours | analogy | analogies`: word geometry from the command line.

The work is in embeddings.py (imported only when a command runs). Without --layer the space is the
input embedding matrix over the letters-only vocabulary words; with --layer L it is the residual
stream entering layer L, over the single-token words of an analogy file (--vocab, or FILE itself).
"""

from __future__ import annotations

from lmforge.interp.cli import _model_args


def _add_embeddings(isub) -> None:
    p = isub.add_parser("neighbours", help="nearest words of a word by cosine on the input embedding matrix",
                        description="Nearest neighbours of WORD (one token: ' WORD' tried first, then 'WORD') by "
                                    "cosine over the letters-only vocabulary words' embedding rows.")
    _model_args(p)
    p.add_argument("word")
    p.add_argument("-k", type=int, default=10, help="how many neighbours (default %(default)s)")
    p.set_defaults(func=cmd_neighbours)

    p = isub.add_parser("analogy", help="A : B :: C : ? by 3CosAdd",
                        description="argmax cos(x, B - A + C) over unit vectors, A, B and C excluded (Mikolov et al. "
                                    "2013). Embedding matrix by default; --layer L reads the residual stream entering "
                                    "layer L, over the words of --vocab (an analogy file).")
    _model_args(p)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("c")
    p.add_argument("-k", type=int, default=5, help="how many answers (default %(default)s)")
    p.add_argument("--layer", type=int, help="residual stream entering this layer instead of the embedding matrix")
    p.add_argument("--vocab", help="with --layer: an analogy file whose single-token words are the candidates")
    p.set_defaults(func=cmd_analogy)

    p = isub.add_parser("analogies", help="top-1 3CosAdd accuracy on a questions-words.txt-style file",
                        description="Accuracy per section and overall on the questions whose four words are single "
                                    "tokens; skipped lines are counted with their reason.")
    _model_args(p)
    p.add_argument("file")
    p.add_argument("--layer", type=int, help="residual stream entering this layer (candidates: the file's words)")
    p.set_defaults(func=cmd_analogies)


def _space(args, hooked, tok, vocab_file: str | None):
    from lmforge.common import LmforgeError
    from lmforge.interp import embeddings as E

    if args.layer is None:
        return E.embedding_space(hooked.model, tok)
    if vocab_file is None:
        raise LmforgeError("--layer needs --vocab FILE (an analogy file): its words are the residual-stream candidates")
    return E.residual_space(hooked, tok, E.file_words(E.read_analogies(vocab_file, tok), tok), args.layer)


def _check_k(k: int) -> None:
    from lmforge.common import LmforgeError

    if not 1 <= k <= 1000:
        raise LmforgeError(f"-k {k}: give a count from 1 to 1000")


def cmd_neighbours(args) -> None:
    from lmforge.interp import embeddings as E
    from lmforge.interp.cli import load_for_inspect

    _check_k(args.k)
    hooked, tok = load_for_inspect(args)
    E.word_id(tok, args.word)  # a clear error for a multi-token word before the space is built
    for w, cos in E.nearest(E.embedding_space(hooked.model, tok), args.word, args.k):
        print(f"{cos:+.4f}  {w}")


def cmd_analogy(args) -> None:
    from lmforge.interp import embeddings as E
    from lmforge.interp.cli import load_for_inspect

    _check_k(args.k)
    hooked, tok = load_for_inspect(args)
    for w in (args.a, args.b, args.c):
        E.word_id(tok, w)
    space = _space(args, hooked, tok, args.vocab)
    for w, cos in E.analogy(space, args.a, args.b, args.c, args.k):
        print(f"{cos:+.4f}  {w}")


def cmd_analogies(args) -> None:
    from lmforge.interp import embeddings as E
    from lmforge.interp.cli import load_for_inspect

    hooked, tok = load_for_inspect(args)
    questions = E.read_analogies(args.file, tok)
    space = _space(args, hooked, tok, args.file)
    result = E.analogy_accuracy(space, questions)
    where = "embedding matrix" if args.layer is None else f"blocks.{args.layer}.hook_resid_pre"
    print(f"{where}: {len(space.words)} candidate words; {questions.num_lines} lines, skipped: "
          + ", ".join(f"{n} {why}" for why, n in questions.skipped.items())
          + (f", {result.not_candidates} not candidates" if result.not_candidates else ""))
    for section, n in result.total.items():
        if n:
            print(f"{section:32s} {result.correct[section]:5d}/{n:<5d} {100 * result.section_accuracy(section):6.2f}%")
    print(f"{'overall':32s} {sum(result.correct.values()):5d}/{sum(result.total.values()):<5d} "
          f"{100 * result.accuracy:6.2f}%")
