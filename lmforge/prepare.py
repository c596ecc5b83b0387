"""Corpus -> tokenizer -> token shards: the data stage of `lmforge run` and `lmforge pretrain --corpus`.

Writes into one folder everything training needs and nothing it must guess:
    tokenizer.json        the tokenizer the shards were encoded with
    train_*.npy, val_*.npy token shards (see data.py)
    val.txt               the held-out documents' exact bytes, for the compressor baselines
    meta.json             vocab size, bytes per token id, counts of documents/tokens/bytes per split,
                          and every skipped input by reason
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

from tqdm import tqdm

from lmforge.checkpoint import TOKENIZER_FILE
from lmforge.common import LmforgeError
from lmforge.corpus import Corpus, describe_skipped, is_heldout
from lmforge.data import ShardWriter, encode_documents, write_meta
from lmforge.tokenizer import Tokenizer


def train_tokenizer(corpus: Corpus, vocab_size: int, max_bytes: int | None = None,
                    progress: bool = True) -> Tokenizer:
    """BPE on the training split (never the held-out one), optionally on its first max_bytes."""
    docs = corpus.documents("train")
    first = next(docs, None)
    if first is None:
        raise _no_documents(corpus)

    def texts():
        seen = 0
        for doc in itertools.chain([first], docs):
            yield doc.text
            seen += len(doc.text)
            if max_bytes is not None and seen >= max_bytes:
                return

    return Tokenizer.train(texts(), vocab_size, show_progress=progress)


def _no_documents(corpus: Corpus) -> LmforgeError:
    skipped = f" (skipped: {describe_skipped(corpus.skipped)})" if corpus.skipped else ""
    return LmforgeError(f"corpus {corpus.source!r} has no readable documents{skipped}; point --corpus at a folder "
                        "of UTF-8 text files or a JSONL file with a 'text' field")


def prepare_data(corpus: Corpus, out_dir: str | Path, *, vocab_size: int, tokenizer: Tokenizer | None = None,
                 tokenizer_max_bytes: int | None = None, progress: bool = True) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if tokenizer is None:
        tokenizer = train_tokenizer(corpus, vocab_size, tokenizer_max_bytes, progress)
    tokenizer.save(out_dir / TOKENIZER_FILE)
    t_tok = time.perf_counter() - t0

    writers = {s: ShardWriter(out_dir, s, tokenizer.bos_id, tokenizer.vocab_size) for s in ("train", "val")}
    val_texts: list[str] = []

    def split_of(doc):
        if is_heldout(doc.id):
            val_texts.append(doc.text)
            return "val"
        return "train"

    with tqdm(desc="encoding", unit="B", unit_scale=True, disable=not progress) as bar:
        num_bytes = encode_documents(tokenizer, corpus.documents(), writers, split_of, progress=bar)
    counts = {s: {**w.close(), "num_bytes": num_bytes[s]} for s, w in writers.items()}
    if counts["train"]["num_documents"] == 0:
        raise _no_documents(corpus)
    if counts["val"]["num_documents"] == 0:
        # A tiny corpus can miss the 2% hash split entirely. Moving a document over would break the
        # fixed split rule (and the eval's comparability), so stop and say so.
        raise LmforgeError(f"corpus {corpus.source!r} has {counts['train']['num_documents']} documents and none "
                           "fell in the held-out split (2% by hash of the document id); add more documents")
    (out_dir / "val.txt").write_bytes("".join(val_texts).encode("utf-8"))
    meta = {"corpus": corpus.source, "vocab_size": tokenizer.vocab_size, "bos_id": tokenizer.bos_id,
            "token_bytes": tokenizer.token_byte_lengths().tolist(), "splits": counts,
            "skipped": dict(corpus.skipped), "tokenizer_seconds": t_tok,
            "encode_seconds": time.perf_counter() - t0 - t_tok}
    write_meta(out_dir, meta)
    return meta
